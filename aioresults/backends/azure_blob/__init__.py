"""AzureBlockBlobBackend: results kept as block blobs in one container (``azureblockblob://``).

Blobs are named and filled as Celery's ``AzureBlockBlobBackend`` names and
fills them: a task's record is the blob ``<base_path>celery-task-meta-<id>`` in
the container ``celery`` (``container_name``), holding exactly the UTF-8 JSON
Celery writes; a saved group is ``<base_path>celery-taskset-meta-<id>``. Celery
reads what aioresults writes, and the reverse (Celery decodes blobs as text, so
it cannot read results written with ``compression`` or ``serializer="msgpack"``).

**Writes** are conditional on the blob's ETag, so no check races with another
writer. Storing a state uploads with ``If-None-Match: *`` (no blob yet) or
``If-Match`` on this backend's own last write; if the blob turns out to be
there or changed (412/409), it is read with its ETag, the write is refused if
it holds SUCCESS (unless it holds exactly this write: a retry whose first reply
was lost), and else uploaded with ``If-Match`` on that ETag, and so on until a
condition holds. A chord's count and the receipts of its counted parts are one
blob updated the same way (``<group key>.c``), so a retried request finds its
own earlier update instead of counting again; each part's value is a blob of
its own (``<group key>.p/<hash of the part>``), written first.

**Waits**: Blob Storage sends no notifications, so the hub's one poller serves
every waiter. It re-reads the watched records (at most ``max_concurrency``
requests at a time) with conditional GETs: an unchanged blob costs one
``304 Not Modified`` without a body. When many records are polled at once and
the container holds few blobs, one listing (names and ETags) answers for the
missing and unchanged ones instead. The pause between polls starts at
``poll_interval`` (0.05 s) and doubles while nothing changes, up to
``max_poll_interval`` (2 s); a change or a new waiter starts it again. A waiter
wakes at most ``max_poll_interval`` plus one request's time after a change
(measured on Azurite at default settings: 40 ms when the previous change was
recent, 0.6 s after a quiet second, 1.2 s after four). With no waiter, the
poller sends nothing.

**Expiry**: each blob carries its expiry time in the metadata entry
``aioresults_expires_at`` (Unix seconds). An expired record reads as missing;
:meth:`~AzureBlockBlobBackend.cleanup` deletes expired blobs under
``base_path``. Celery neither writes nor honours that entry.

**Errors**: connection failures and a service that stays busy (429, 5xx) after
``retries`` retries raise :class:`~aioresults.BackendUnavailable`; refused
credentials and other failures :class:`~aioresults.BackendError`; messages end
with the service's status and error code (``(403 AuthorizationFailure)``). A
container that disappears (deleted, or Azurite restarted) reads as empty and,
with ``create_container`` (the default), is created again by the next write;
without it (or with ``create=False``) a missing container raises
:class:`~aioresults.StoreNotFound` naming it, at open and at a write. While the
service is out of reach, polls fail and are tried again: waiters keep waiting.
Account keys and SAS signatures never appear in ``repr()``, errors or logs.

Runs on asyncio (the SDK's aio client is built on aiohttp).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from ..._exceptions import (
    BackendCorrupted,
    BackendUnavailable,
    ConfigurationError,
    InvalidTaskId,
    StoreNotFound,
)
from .._chords import PartCount
from ..base import redact_url
from ..keyvalue import KeyValueBackend
from ._client import Blob, Blobs, container_missing, live
from ._reads import ConditionalReads
from ._swap import Swapper

__all__ = ["AzureBlockBlobBackend"]

logger = logging.getLogger("aioresults.backends")

PREFIX = "azureblockblob://"
_CREDENTIAL_NAMES = ("DefaultAzureCredential", "ManagedIdentityCredential")


class AzureBlockBlobBackend(KeyValueBackend):
    """Results in Azure Blob Storage; see the module docstring.

    Give either a connection string (or a whole ``azureblockblob://`` URL) as
    ``location``, or an ``account_url`` with a ``credential`` (an account key,
    a SAS token, an ``AzureNamedKeyCredential`` or an async token credential).

    :param container_name: the container (created on first use unless
        ``create_container`` or ``create`` is False); Celery's
        ``azureblockblob_container_name``.
    :param base_path: prepended to every blob name; Celery's ``azureblockblob_base_path``.
    :param max_concurrency: the most requests in flight at once.
    :param list_threshold: a batch of at least this many reads first lists the
        blobs, if the container holds at most twice as many; 0 never lists.
    :param retries: retries of a request that could not connect, timed out or
        was throttled (429, 5xx).
    :param retry_backoff: the first retry's pause in seconds, doubled for each next one.
    :param connection_timeout: seconds to wait for a connection.
    :param read_timeout: seconds to wait for an answer.
    :param use_env_settings: honour ``HTTP(S)_PROXY``; by default only when one is set.
    :param options: see :class:`~aioresults.KeyValueBackend` (``poll_interval``,
        ``max_poll_interval``: 0.05 s and 2 s by default).
    """

    schemes: ClassVar[tuple[str, ...]] = ("azureblockblob",)
    default_max_poll_interval: ClassVar[float] = 2.0

    def __init__(
        self,
        location: str | None = None,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        container_name: str = "celery",
        base_path: str = "",
        create_container: bool = True,
        max_concurrency: int = 32,
        list_threshold: int = 16,
        retries: int = 3,
        retry_backoff: float = 0.5,
        connection_timeout: float = 20.0,
        read_timeout: float = 120.0,
        use_env_settings: bool | None = None,
        url: str | None = None,
        **options: Any,
    ) -> None:
        if location is not None and location.startswith(PREFIX):
            url = url or location
            location = location[len(PREFIX) :]
            name, sep, rest = location.partition("@")
            if sep and name in _CREDENTIAL_NAMES:
                account_url, credential, location = rest, name, None
        connection_string = connection_string or location
        if (connection_string is None) == (account_url is None):
            raise ConfigurationError("give either a connection string or an account_url")
        if connection_string is not None and not all(
            "=" in part for part in connection_string.split(";") if part.strip()
        ):
            raise ConfigurationError("a connection string looks like 'AccountName=...;...'")
        # (BaseBackend reads 0 as "the default"; a pause of 0 would poll in a busy loop.)
        if any(
            options.get(name) is not None and not options[name] > 0
            for name in ("poll_interval", "max_poll_interval")
        ):
            raise ConfigurationError("need 0 < poll_interval <= max_poll_interval")
        if max_concurrency < 1 or retries < 0 or retry_backoff < 0:
            raise ConfigurationError("need max_concurrency >= 1, retries and retry_backoff >= 0")
        if not container_name:
            raise ConfigurationError("container_name must not be empty")
        if _bad_segment(base_path.split("/")):
            raise ConfigurationError("base_path must not hold '.', '..' or '\\' segments")
        super().__init__(url=url or PREFIX + (connection_string or account_url or ""), **options)
        self.container_name = container_name
        self.base_path = base_path
        #: Create the container when it is missing (at open, and again when it was
        #: deleted under a write); False with ``create=False`` too.
        self.create_container = create_container and self.create
        self.list_threshold = list_threshold
        #: What this backend asked of the service: ``requests`` made (the SDK's own
        #: retries not counted), ``downloads`` (GETs answered with a body),
        #: ``not_modified`` (GETs answered 304), ``listings`` (listing pages read),
        #: ``conflicts`` (conditional writes that lost a race) and ``throttled``
        #: (429 answers).
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "downloads", "not_modified", "listings", "conflicts", "throttled"), 0
        )
        self._blobs = Blobs(
            connection_string=connection_string,
            account_url=account_url,
            credential=credential,
            container_name=container_name,
            base_path=base_path,
            max_concurrency=max_concurrency,
            retries=retries,
            retry_backoff=retry_backoff,
            client_options={
                "connection_timeout": connection_timeout,
                "read_timeout": read_timeout,
                "use_env_settings": use_env_settings,
            },
            stats=self.stats,
        )
        self._errors = self._blobs.errors
        self._swap = Swapper(self._blobs, self._create_container_again, self._ensure_open)
        # key -> the last blob seen, for each watched record: polls ask "changed since?".
        self._conditional = ConditionalReads(
            self._blobs, list_threshold, self._watched_key, lambda: repr(self)
        )
        self._reads = self._batcher(self._read_batch, "azure reads")

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} url={redact_url(self.url)!r} "
            f"container={self.container_name!r}>"
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AzureBlockBlobBackend:
        """``azureblockblob://<connection string>``, or Celery's
        ``azureblockblob://DefaultAzureCredential@<account URL>`` (and
        ``ManagedIdentityCredential@``), which need the ``azure-identity`` package."""
        if not url.startswith(PREFIX) or len(url) == len(PREFIX):
            raise ConfigurationError("expected azureblockblob://<connection string>")
        return cls(url, **options)

    def blob_name(self, key: str) -> str:
        """The blob that holds ``key`` (Celery's ``<base_path><key>``)."""
        return self._blobs.name(key)

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        self._blobs.open(self._blobs.retry_backoff, self._blobs.retries)
        try:
            with self._errors.translating(f"opening container {self.container_name!r}"):
                await self._ensure_container()
        except BaseException:
            await self._blobs.close()
            raise

    async def _ensure_container(self) -> None:
        blobs = self._blobs
        if not self.create_container:
            if not await blobs.call(blobs.open_container().exists):
                raise StoreNotFound(
                    f"container {self.container_name!r} does not exist at "
                    f"{redact_url(blobs.service.url)} and create_container is False"
                )
            return
        from azure.core.exceptions import HttpResponseError, ResourceExistsError

        try:
            await blobs.call(blobs.open_container().create_container)
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:
            # Credentials limited to blobs (a SAS, a role) may not create containers;
            # then the first read or write tells whether it is there.
            if exc.status_code != 403 or "Mismatch" not in str(getattr(exc, "error_code", "")):
                raise

    async def _create_container_again(self, exc: BaseException) -> bool:
        """After a write found no container: create it (if allowed); whether to retry."""
        if not self.create_container or not container_missing(exc):
            return False
        logger.warning("%r: the container is gone; creating it again", self)
        with self._errors.translating(f"creating container {self.container_name!r}"):
            await self._ensure_container()
        return True

    async def _close(self) -> None:
        self._conditional.seen.clear()
        self._swap.forget_all()
        await self._blobs.close()

    # ------------------------------------------------------------ ids

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        task_id = super()._check_id(task_id, what)
        # HTTP clients resolve '.' and '..' path segments and the service reads
        # '\' as '/': such an id would name another blob.
        if _bad_segment(task_id.split("/")[1:]) or "\\" in task_id:
            raise InvalidTaskId(f"{what} {task_id!r} holds '.', '..' or '\\' path segments")
        return task_id

    # ------------------------------------------------------------ reads

    async def _get(self, key: str) -> bytes | None:
        result = (await self._mget([key]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _mget(self, keys: Sequence[str]) -> Sequence[bytes | None | Exception]:
        """Read ``keys``, batched with every other read of this moment; watched ones
        with conditional GETs."""
        results: list[bytes | None | Exception] = await self._reads(list(keys))
        for result in results:
            if isinstance(result, BackendUnavailable):
                # The service was out of reach: these ids are not known to be
                # anything, so the read fails as a whole (a poll is tried again,
                # instead of handing the outage to the waiters as their result).
                raise _own_copy(result)
        return results

    async def _read_batch(self, batches: list[list[str]]) -> list[list[Any]]:
        keys = list(dict.fromkeys(k for batch in batches for k in batch))
        found = dict(zip(keys, await self._conditional.resolve(keys), strict=True))
        return [[found[k] for k in batch] for batch in batches]

    # ------------------------------------------------------------ writes

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._swap(key, ttl, lambda current: value, force=True)

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Write unless the stored record is SUCCESS, conditionally on its ETag."""

        def update(current: Blob | None) -> bytes | None:
            if current is None or current.payload == value:
                return value  # (the same payload: this write, retried after a lost reply)
            return None if self.is_success(current.payload) else value

        return await self._swap(key, ttl, update) is not None

    async def _delete(self, key: str) -> None:
        self._swap.forget(key)
        with self._errors.translating(f"deleting {key}"):
            await self._blobs.delete(key)

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        with self._errors.translating(f"resetting chord {group_id}"):
            parts, _ = await self._blobs.list_blobs(
                self.blob_name(self.chord_key(group_id, "p")) + "/"
            )
        start = len(self.base_path)
        await self._blobs.gather(self._delete, [b.name[start:] for b in parts])
        state = json.dumps({"size": size, "parts": {}}).encode()
        await self._set(self.chord_key(group_id, "c"), state, self.chord_expires)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        name = hashlib.sha256(part_id.encode()).hexdigest()[:40]
        # The value first: a part in the count always has its value stored.
        await self._swap(
            f"{self.chord_key(group_id, 'p')}/{name}",
            self.chord_expires,
            lambda current: None if current is not None else payload,
        )
        answer: PartCount | None = None

        def update(current: Blob | None) -> bytes | None:
            nonlocal answer
            answer = None
            if current is None:
                return None  # no chord
            try:
                state = json.loads(current.payload)
                size, parts = int(state["size"]), state["parts"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendCorrupted(f"chord {group_id!r} has a corrupt count") from exc
            found = parts.get(part_id)
            if found is not None:
                answer = PartCount(int(found[0]), size, found[1] == receipt)
                return None
            if len(parts) >= size:
                answer = PartCount(size + 1, size, False)
                return None
            parts[part_id] = [len(parts) + 1, receipt]
            answer = PartCount(len(parts), size, True)
            return json.dumps(state).encode()

        await self._swap(self.chord_key(group_id, "c"), self.chord_expires, update)
        return answer

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        blobs = self._blobs
        with self._errors.translating(f"reading chord {group_id}"):
            listed, _ = await blobs.list_blobs(self.blob_name(self.chord_key(group_id, "p")) + "/")
            listed = [b for b in listed if live(b.metadata)]
            start = len(self.base_path)
            found = await blobs.gather(lambda b: blobs.fetch(b.name[start:]), listed)
        return [blob.payload for blob in found if isinstance(blob, Blob) and blob.live()]

    async def _cleanup(self) -> int:
        blobs = self._blobs
        with self._errors.translating("listing expired results"):
            expired = [
                b for b in (await blobs.list_blobs(self.base_path))[0] if not live(b.metadata)
            ]

        async def remove(blob: Any) -> int:
            with self._errors.translating(f"deleting {blob.name}"):
                # Only the expired version: one rewritten since the listing stays.
                if not await blobs.delete_if_unchanged(blob.name, blob.etag):
                    return 0
            self._swap.forget(blob.name[len(self.base_path) :])
            return 1

        return sum(await blobs.gather(remove, expired))

    # ------------------------------------------------------------ waiting

    def _watched_key(self, key: str) -> bool:
        prefix = self.global_keyprefix + self.task_keyprefix
        return key.startswith(prefix) and self._is_watched(key[len(prefix) :])

    def _unwatched(self, task_ids: Sequence[str]) -> None:
        """No waiter waits for these any more: forget their last blobs."""
        for task_id in task_ids:
            self._conditional.seen.pop(self.task_key(task_id), None)


def _own_copy(error: BaseException) -> BaseException:
    """A fresh copy of ``error`` (one exception raised in many tasks would collect
    all their tracebacks), chained to the same cause."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy


def _bad_segment(segments: Sequence[str]) -> bool:
    return any(s in (".", "..") or "\\" in s for s in segments)
