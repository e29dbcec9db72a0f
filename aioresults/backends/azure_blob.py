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
it holds SUCCESS, and else uploaded with ``If-Match`` on that ETag, and so on
until a condition holds. So a first write costs one request, and nothing is
ever decided on a stale read. Chord counters are compare-and-swapped the same
way, and each counted part is a blob of its own (``<group key>.p/<hash of the
part>``) created with ``If-None-Match: *``, which succeeds once however often
the part is delivered.

**Waits**: Blob Storage sends no notifications, so one poller per backend
serves every waiter. It re-reads the watched records (at most
``max_concurrency`` requests at a time) with conditional GETs: the last ETag
and payload of each watched blob are kept, so an unchanged blob costs one
``304 Not Modified`` without a body. When many records are polled at once and
the container holds few blobs, one listing (names and ETags) answers for the
missing and unchanged ones instead. The pause between polls starts at
``poll_interval`` (0.05 s) and doubles while nothing changes, up to
``max_poll_interval`` (2 s); a change or a new waiter starts it again from
``poll_interval``. A change is seen at the next poll, so a waiter wakes at most
``max_poll_interval`` plus one request's time after it; about
``poll_interval`` after it while things are changing, and longer the quieter
the wait was before (measured on Azurite at default settings: 40 ms when the
previous change was recent, 0.6 s after a quiet second, 1.2 s after four). With
no waiter, the poller sends nothing.

**Expiry**: each blob carries its expiry time in the metadata entry
``aioresults_expires_at`` (Unix seconds). An expired record reads as missing;
:meth:`~AzureBlockBlobBackend.cleanup` deletes expired blobs under
``base_path``. Celery neither writes nor honours that entry: its results never
expire, and it still reads results that aioresults considers expired.

**Errors**: connection failures and a service that stays busy (429, 5xx) after
``retries`` retries (with a back-off that starts at ``retry_backoff`` seconds
and doubles) raise :class:`~aioresults.BackendUnavailable`; refused
credentials, a missing container and other failures
:class:`~aioresults.BackendError`. Account keys and SAS signatures never appear
in ``repr()``, errors or logs.

Runs on asyncio (the SDK's aio client is built on aiohttp).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import time
import urllib.request
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.lowlevel

from .._exceptions import (
    AioResultsError,
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    InvalidTaskId,
    MissingDependency,
)
from ._waiters import Item
from .base import KeyValueBackend, redact_url

try:
    from azure.core import MatchConditions
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.storage.blob.aio import BlobClient, BlobServiceClient, ExponentialRetry
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency(
        "the azureblockblob:// backend needs azure-storage-blob with aiohttp; "
        "run: pip install 'aioresults[azure]'"
    ) from exc

__all__ = ["AzureBlockBlobBackend"]

logger = logging.getLogger("aioresults.backends")

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item

PREFIX = "azureblockblob://"
#: Blob metadata: when the record expires (Unix seconds), and a chord part's field name.
EXPIRES_KEY = "aioresults_expires_at"
FIELD_KEY = "aioresults_field"
_CREDENTIAL_NAMES = ("DefaultAzureCredential", "ManagedIdentityCredential")
_MAX_CAS_ATTEMPTS = 100
_CACHE_SIZE = 4096
_NOT_MODIFIED: Any = object()
#: Set in the poller's task: reads for ids nobody waits for any more are skipped.
_POLLING: ContextVar[bool] = ContextVar("aioresults_azure_polling", default=False)


@dataclass(frozen=True, slots=True)
class _Blob:
    payload: bytes
    etag: str
    expires_at: float | None

    def live(self) -> bool:
        return self.expires_at is None or self.expires_at > time.time()


class _Pending:
    """One queued read, shared by every reader of its key in that batch."""

    __slots__ = ("_done", "_result")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._result: _Blob | None | Exception = None

    def set(self, result: _Blob | None | Exception) -> None:
        if not self._done.is_set():
            self._result = result
            self._done.set()

    async def wait(self) -> _Blob | None:
        await self._done.wait()
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


class _Retry(ExponentialRetry):
    """The SDK's retry (connection errors, 408, 5xx) with a back-off that starts at
    ``backoff`` seconds and doubles (±25 %), instead of the SDK's 15 s start."""

    def __init__(self, backoff: float, retries: int) -> None:
        super().__init__(retry_total=retries)
        self.backoff = backoff

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        # The SDK counts the retry about to be made from 1.
        delay = self.backoff * 2 ** max(0, int(settings["count"]) - 1)
        return float(min(delay, 30.0) * random.uniform(0.75, 1.25))


class AzureBlockBlobBackend(KeyValueBackend):
    """Results in Azure Blob Storage; see the module docstring.

    Give either a ``connection_string`` or an ``account_url`` with a
    ``credential`` (an account key, a SAS token, an ``AzureNamedKeyCredential``
    or an async token credential).

    :param container_name: the container (created on first use unless
        ``create_container`` is False); Celery's ``azureblockblob_container_name``.
    :param base_path: prepended to every blob name; Celery's ``azureblockblob_base_path``.
    :param poll_interval: the shortest pause between two polls, in seconds.
    :param max_poll_interval: the longest pause, reached while nothing changes.
    :param max_concurrency: the most requests in flight at once.
    :param list_threshold: a batch of at least this many reads first lists the
        blobs, if the container holds at most twice as many; 0 never lists.
    :param retries: retries of a request that could not connect, timed out or
        was throttled (429, 5xx).
    :param retry_backoff: the first retry's pause in seconds, doubled for each next one.
    :param connection_timeout: seconds to wait for a connection.
    :param read_timeout: seconds to wait for an answer.
    :param use_env_settings: honour ``HTTP(S)_PROXY``; by default only when one is set.
    :param options: see :class:`~aioresults.KeyValueBackend`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("azureblockblob",)

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        account_url: str | None = None,
        credential: Any = None,
        container_name: str = "celery",
        base_path: str = "",
        create_container: bool = True,
        poll_interval: float = 0.05,
        max_poll_interval: float = 2.0,
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
        if (connection_string is None) == (account_url is None):
            raise ConfigurationError("give either connection_string or account_url")
        if connection_string is not None and not all(
            "=" in part for part in connection_string.split(";") if part.strip()
        ):
            raise ConfigurationError("a connection string looks like 'AccountName=...;...'")
        if not 0 < poll_interval <= max_poll_interval:
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
        self.create_container = create_container
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.max_concurrency = max_concurrency
        self.list_threshold = list_threshold
        self.retries = retries
        self.retry_backoff = float(retry_backoff)
        #: What this backend asked of the service: ``requests`` made (the SDK's own
        #: retries not counted), ``downloads`` (GETs answered with a body),
        #: ``not_modified`` (GETs answered 304), ``listings`` (listing pages read),
        #: ``conflicts`` (conditional writes that lost a race) and ``throttled``
        #: (429 answers).
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "downloads", "not_modified", "listings", "conflicts", "throttled"), 0
        )
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        self._client_options: dict[str, Any] = {
            "connection_timeout": connection_timeout,
            "read_timeout": read_timeout,
            "use_env_settings": use_env_settings,
        }
        self._owned_credential: Any = None
        self._service: Any = None
        self._container: Any = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._blob_clients: OrderedDict[str, BlobClient] = OrderedDict()
        # key -> the last blob seen (None: none yet), for each watched record.
        self._watched: dict[str, _Blob | None] = {}
        # key -> (payload, its meta) for each watched record, decoded once.
        self._decoded: dict[str, tuple[bytes | None, Item]] = {}
        # key -> the blob this backend last wrote: a compare-and-swap may skip its read.
        self._written: OrderedDict[str, _Blob] = OrderedDict()
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}
        self._queue: dict[str, _Pending] = {}
        # Blobs seen by the last listing (more than its limit if it stopped early).
        self._listed_size = 0
        self._list_again_at = 0.0

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
        rest = url[len(PREFIX) :]
        name, sep, account_url = rest.partition("@")
        if sep and name in _CREDENTIAL_NAMES:
            return cls(account_url=account_url, credential=name, url=url, **options)
        return cls(rest, url=url, **options)

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        self._limiter = anyio.CapacityLimiter(self.max_concurrency)
        options = dict(self._client_options, retry_policy=_Retry(self.retry_backoff, self.retries))
        if options["use_env_settings"] is None:
            # Else the SDK looks proxies up in a thread for every request.
            options["use_env_settings"] = bool(urllib.request.getproxies())
        with self._errors("connecting"):
            if self._connection_string is not None:
                try:
                    service = BlobServiceClient.from_connection_string(
                        self._connection_string, **options
                    )
                except ValueError as exc:
                    raise ConfigurationError(
                        f"invalid connection string: {redact_url(str(exc))}"
                    ) from None
            else:
                credential = self._credential
                if credential in _CREDENTIAL_NAMES:
                    credential = self._owned_credential = _identity_credential(credential)
                service = BlobServiceClient(str(self._account_url), credential, **options)
        self._service = service
        self._container = service.get_container_client(self.container_name)
        try:
            with self._errors(f"opening container {self.container_name!r}"):
                await self._ensure_container()
        except BaseException:
            await self._close()
            raise
        self._spawn(self._poll, name=f"{type(self).__name__} poller")

    async def _ensure_container(self) -> None:
        if not self.create_container:
            if not await self._call(self._container.exists):
                raise BackendError(
                    f"container {self.container_name!r} does not exist at "
                    f"{redact_url(self._service.url)} and create_container is False"
                )
            return
        try:
            await self._call(self._container.create_container)
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:
            # Credentials limited to blobs (a SAS, a role) may not create containers;
            # then the first read or write tells whether it is there.
            if exc.status_code != 403 or "Mismatch" not in str(getattr(exc, "error_code", "")):
                raise

    async def _close(self) -> None:
        service, self._service, self._container = self._service, None, None
        credential, self._owned_credential = self._owned_credential, None
        self._blob_clients.clear()
        self._watched.clear()
        self._decoded.clear()
        self._written.clear()
        if service is not None:
            await service.close()
        if credential is not None:
            await credential.close()

    async def _poll(self) -> None:
        _POLLING.set(True)
        await self.hub.run_poller(self.poll_interval, self.max_poll_interval, self._poll_failed)

    async def _poll_failed(self, exc: Exception) -> None:
        logger.warning("%r: polling %d results failed: %s", self, len(self.hub.watched_ids()), exc)

    # ------------------------------------------------------------ names and requests

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        task_id = super()._check_id(task_id, what)
        # HTTP clients resolve '.' and '..' path segments and the service reads
        # '\' as '/': such an id would name another blob.
        if _bad_segment(task_id.split("/")[1:]) or "\\" in task_id:
            raise InvalidTaskId(f"{what} {task_id!r} holds '.', '..' or '\\' path segments")
        return task_id

    def blob_name(self, key: str) -> str:
        """The blob that holds ``key`` (Celery's ``<base_path><key>``)."""
        return f"{self.base_path}{key}"

    def _blob(self, key: str) -> BlobClient:
        # A client costs about as much CPU as a request: keep those in use.
        client = self._blob_clients.pop(key, None)
        if client is None:
            if self._container is None:
                raise BackendError(f"{self!r} is closed")
            client = self._container.get_blob_client(self.blob_name(key))
        self._blob_clients[key] = client
        if len(self._blob_clients) > _CACHE_SIZE:
            self._blob_clients.popitem(last=False)
        return client

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate the SDK's errors into the aioresults error tree."""
        try:
            yield
        except AzureError as exc:
            raise self._translate(exc, action) from exc

    def _translate(self, exc: AzureError, action: str) -> AioResultsError:
        detail = redact_url(str(exc.message or exc).splitlines()[0]) or type(exc).__name__
        where = redact_url(self._service.url if self._service is not None else self._account_url)
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
            return BackendUnavailable(f"{action}: cannot reach {where}: {detail}")
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return BackendError(
                f"{action}: {where} refused the credentials ({code or status}); "
                "check the account name and key (or the SAS token)"
            )
        if status == 429 or (status is not None and status >= 500):
            return BackendUnavailable(f"{action}: {where} answered {status} ({code}): {detail}")
        if code == "ContainerNotFound":
            return BackendError(f"{action}: container {self.container_name!r} does not exist")
        return BackendError(f"{action}: {detail}")

    async def _call(self, func: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """One request; 429 answers are retried here (the SDK's policy does not)."""
        attempt = 0
        while True:
            self.stats["requests"] += 1
            try:
                return await func(*args, **kwargs)
            except HttpResponseError as exc:
                if exc.status_code != 429 or attempt >= self.retries:
                    raise
                self.stats["throttled"] += 1
                await anyio.sleep(self.retry_backoff * 2**attempt * random.uniform(0.75, 1.25))
                attempt += 1

    async def _fetch(self, key: str, etag: str | None = None) -> Any:
        """GET a blob: a :class:`_Blob`, None if missing, or ``_NOT_MODIFIED``
        when it still has ``etag``."""
        assert self._limiter is not None
        async with self._limiter:
            client = self._blob(key)
            try:
                if etag is None:
                    stream = await self._call(client.download_blob)
                else:
                    stream = await self._call(
                        client.download_blob, etag=etag, match_condition=MatchConditions.IfModified
                    )
                data = await stream.readall()
            except ResourceNotFoundError as exc:
                if getattr(exc, "error_code", None) == "ContainerNotFound":
                    raise
                return None
            except HttpResponseError as exc:
                if exc.status_code != 304:
                    raise
                self.stats["not_modified"] += 1
                return _NOT_MODIFIED
        self.stats["downloads"] += 1
        payload = data if isinstance(data, bytes) else data.encode()  # bytes: no encoding asked
        return _Blob(payload, stream.properties.etag, _expiry(stream.properties.metadata))

    async def _put(
        self,
        key: str,
        value: bytes,
        ttl: float | None,
        *,
        etag: str | None = None,
        create: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> _Blob:
        """Upload a blob: always, only if it still has ``etag``, or only if there
        is none (``create``). Raises the SDK's 412/409 error otherwise."""
        assert self._limiter is not None
        expires_at = None if ttl is None else time.time() + ttl
        meta = dict(metadata or {})
        if expires_at is not None:
            meta[EXPIRES_KEY] = f"{expires_at:.3f}"
        kwargs: dict[str, Any] = {"metadata": meta, "overwrite": not create}
        if etag is not None:
            kwargs.update(etag=etag, match_condition=MatchConditions.IfNotModified)
        async with self._limiter:
            result = await self._call(self._blob(key).upload_blob, value, **kwargs)
        return _Blob(value, result["etag"], expires_at)

    async def _list(self, prefix: str, limit: int | None = None) -> tuple[list[Any], bool]:
        """The blobs (with metadata) whose names start with ``prefix``, up to about
        ``limit``; and whether that is all of them."""
        assert self._container is not None
        found: list[Any] = []
        pages = self._container.list_blobs(
            name_starts_with=prefix, include=["metadata"], results_per_page=limit
        ).by_page()
        async for page in pages:
            self.stats["requests"] += 1
            self.stats["listings"] += 1
            found.extend([blob async for blob in page])
            if limit is not None and len(found) >= limit:
                break
        return found, pages.continuation_token is None

    async def _gather(self, func: Callable[[I], Awaitable[T]], items: Sequence[I]) -> list[T]:
        """``func`` over ``items`` concurrently, ``max_concurrency`` at a time."""
        if len(items) == 1:
            return [await func(items[0])]
        results: list[Any] = [None] * len(items)
        work = iter(enumerate(items))

        async def worker() -> None:
            for i, item in work:
                results[i] = await func(item)

        try:
            async with anyio.create_task_group() as group:
                for _ in range(min(len(items), self.max_concurrency)):
                    group.start_soon(worker)
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        return results

    # ------------------------------------------------------------ batched reads

    def _enqueue(self, key: str) -> _Pending | None:
        """Queue a read, batched with the other reads of this moment (see :meth:`_resolve`)."""
        if _POLLING.get() and key not in self._watched:
            return None  # its waiters left while this poll was under way
        pending = self._queue.get(key)
        if pending is None:
            # Joining a read that is not sent yet is safe: it answers after we asked.
            pending = self._queue[key] = _Pending()
            if len(self._queue) == 1:
                self._spawn(self._dispatch, name=f"{type(self).__name__} reads")
        return pending

    async def _dispatch(self) -> None:
        await anyio.lowlevel.checkpoint()  # let the reads of this tick join the batch
        batch, self._queue = self._queue, {}
        results: list[_Blob | None | Exception]
        results = [BackendError(f"{self!r} closed while reading")] * len(batch)
        try:
            results = await self._resolve(list(batch))
        except Exception as exc:  # a bug: let every reader see it rather than hang
            results = [exc] * len(batch)
            raise
        finally:
            for pending, result in zip(batch.values(), results, strict=True):
                pending.set(result)

    async def _resolve(self, keys: list[str]) -> list[_Blob | None | Exception]:
        """Read ``keys``: watched ones with conditional GETs (an unchanged blob costs
        a 304), after a listing that answers for missing and unchanged blobs when
        the batch is large and the container small."""
        cached = {key: self._watched.get(key) for key in keys}
        listed, complete = await self._scan(keys)
        results: dict[str, _Blob | None | Exception] = {}
        for key in keys:
            blob = listed.get(key)
            if (blob is None and complete) or (blob is not None and not _live(blob.metadata)):
                results[key] = None
            elif (
                blob is not None and (old := cached[key]) is not None and _same(old.etag, blob.etag)
            ):
                results[key] = old

        async def fetch(key: str) -> None:
            old = cached[key]
            try:
                with self._errors(f"reading {key}"):
                    got = await self._fetch(key, old.etag if old is not None else None)
            except AioResultsError as exc:
                results[key] = exc
            else:
                results[key] = old if got is _NOT_MODIFIED else got

        await self._gather(fetch, [key for key in keys if key not in results])
        for key in keys:
            if key in self._watched and not isinstance(results[key], Exception):
                self._watched[key] = results[key]  # type: ignore[assignment]
        return [results[key] for key in keys]

    async def _scan(self, keys: list[str]) -> tuple[dict[str, Any], bool]:
        """List the blobs that may hold ``keys`` if that is cheaper than a GET each:
        ``({key: listed blob}, whether the listing was complete)``."""
        # A listed blob costs about a quarter of a GET, in the client and the service.
        limit = 2 * len(keys)
        if not self.list_threshold or len(keys) < self.list_threshold:
            return {}, False
        if self._listed_size > limit and time.monotonic() < self._list_again_at:
            return {}, False
        prefix = os.path.commonprefix([self.blob_name(key) for key in keys])
        try:
            with self._errors("listing results"):
                blobs, complete = await self._list(prefix, min(limit, 5000))
        except AioResultsError as exc:
            logger.debug("%r: listing failed; reading one by one: %s", self, exc)
            return {}, False
        # Too many blobs to list: do not try again for a while.
        self._listed_size = len(blobs) if complete else limit + 1
        self._list_again_at = time.monotonic() + 300.0
        return {blob.name[len(self.base_path) :]: blob for blob in blobs}, complete

    # ------------------------------------------------------------ conditional writes

    @contextlib.asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        """Serialise this backend's own writes to ``key``: they would only make
        each other's conditions fail."""
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def _remember(self, key: str, blob: _Blob | None) -> None:
        self._written.pop(key, None)
        if blob is not None:
            self._written[key] = blob
            if len(self._written) > _CACHE_SIZE:
                self._written.popitem(last=False)

    async def _swap(
        self,
        key: str,
        ttl: float | None,
        update: Callable[[_Blob | None], bytes | None],
        metadata: dict[str, str] | None = None,
    ) -> bytes | None:
        """Compare-and-swap ``key``: ``update(live blob or None)`` gives the new
        payload (None: leave it as it is), uploaded on condition that the blob is
        still the one it was decided on; else it is read and decided again.
        Returns what was written.

        The first try needs no read: it assumes this backend's own last write
        (the condition fails if that is stale), or no blob at all (``If-None-Match: *``).
        """
        await self._ensure_open()
        async with self._lock(key):
            current, fresh = self._written.get(key), False
            for attempt in range(_MAX_CAS_ATTEMPTS):
                with self._errors(f"writing {key}"):
                    value = update(current if current is not None and current.live() else None)
                    if value is None and not fresh:
                        current, fresh = await self._fetch(key), True
                        continue
                    if value is None:
                        return None
                    try:
                        blob = await self._put(
                            key,
                            value,
                            ttl,
                            etag=None if current is None else current.etag,
                            create=current is None,
                            metadata=metadata,
                        )
                    except HttpResponseError as exc:
                        # 404: the blob to replace is gone; 409/412: it changed.
                        if exc.status_code not in (404, 409, 412):
                            raise
                        if fresh or current is not None:
                            self.stats["conflicts"] += 1
                            # Jitter keeps writers that collided from colliding again.
                            await anyio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
                        current, fresh = await self._fetch(key), True
                        continue
                self._remember(key, blob)
                return value
        raise BackendError(f"writing {key}: gave up after {_MAX_CAS_ATTEMPTS} conflicts")

    # ------------------------------------------------------------ primitives

    async def get(self, key: str) -> bytes | None:
        """See :meth:`KeyValueBackend.get`."""
        return (await self.mget([key]))[0]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys`` in one batch; watched ones with conditional GETs."""
        await self._ensure_open()
        queued = [self._enqueue(key) for key in keys]
        blobs = [None if pending is None else await pending.wait() for pending in queued]
        return [b.payload if b is not None and b.live() else None for b in blobs]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """See :meth:`KeyValueBackend.set`."""
        await self._ensure_open()
        async with self._lock(key):
            with self._errors(f"writing {key}"):
                self._remember(key, await self._put(key, value, ttl))

    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Write unless the stored record is SUCCESS, conditionally on its ETag."""

        def update(current: _Blob | None) -> bytes | None:
            return None if current is not None and self.is_success(current.payload) else value

        return await self._swap(key, ttl, update) is not None

    async def incr(self, key: str, ttl: float | None) -> int:
        """Add one to the counter at ``key`` by ETag compare-and-swap."""

        def update(current: _Blob | None) -> bytes:
            try:
                return str(int(current.payload) + 1 if current is not None else 1).encode()
            except ValueError:
                raise BackendCorrupted(f"counter {key} is not an integer") from None

        return int(await self._swap(key, ttl, update) or 0)

    async def delete(self, key: str) -> None:
        """See :meth:`KeyValueBackend.delete`."""
        await self._ensure_open()
        assert self._limiter is not None
        self._remember(key, None)
        with self._errors(f"deleting {key}"), contextlib.suppress(ResourceNotFoundError):
            async with self._limiter:
                await self._call(self._blob(key).delete_blob)

    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        """Create the blob of one field with ``If-None-Match: *``: that succeeds once
        (or again once it expired)."""
        # A hash: a field may hold '/' or '..', or be too long for a blob name.
        part = f"{key}/{hashlib.sha256(field.encode()).hexdigest()[:40]}"
        label = {FIELD_KEY: base64.b64encode(field.encode()).decode()}
        added = await self._swap(part, ttl, lambda current: None if current else value, label)
        return added is not None

    async def get_fields(self, key: str) -> dict[str, bytes]:
        """See :meth:`KeyValueBackend.get_fields`."""
        await self._ensure_open()
        with self._errors(f"reading {key}"):
            listed, _ = await self._list(self.blob_name(key) + "/")
            listed = [b for b in listed if FIELD_KEY in (b.metadata or {}) and _live(b.metadata)]
            start = len(self.base_path)
            blobs = await self._gather(lambda b: self._fetch(b.name[start:]), listed)
        return {
            base64.b64decode(b.metadata[FIELD_KEY]).decode(): blob.payload
            for b, blob in zip(listed, blobs, strict=True)
            if blob is not None and blob.live()
        }

    async def _chord_init(self, group_id: str, size: int) -> None:
        with self._errors(f"resetting chord {group_id}"):
            parts, _ = await self._list(self.blob_name(self.chord_key(group_id, "p")) + "/")
        start = len(self.base_path)
        await self._gather(self.delete, [b.name[start:] for b in parts])
        await self.delete(self.chord_key(group_id, "n"))
        await self.set(self.chord_key(group_id, "s"), str(size).encode(), self.chord_expires)

    async def _cleanup(self) -> int:
        with self._errors("listing expired results"):
            expired = [b for b in (await self._list(self.base_path))[0] if not _live(b.metadata)]

        async def remove(blob: Any) -> int:
            with self._errors(f"deleting {blob.name}"):
                try:
                    # Only the expired version: one rewritten since the listing stays.
                    await self._call(
                        self._container.delete_blob,
                        blob.name,
                        etag=blob.etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                except HttpResponseError as exc:
                    if exc.status_code in (404, 409, 412):
                        return 0
                    raise
            self._written.pop(blob.name[len(self.base_path) :], None)
            return 1

        return sum(await self._gather(remove, expired))

    # ------------------------------------------------------------ watching

    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]:
        keys = [self.task_key(task_id) for task_id in task_ids]
        items: list[Item] = []
        for task_id, key, payload in zip(task_ids, keys, await self.mget(keys), strict=True):
            # An unchanged record gives the same meta object: a new decoding would
            # differ from the last one where it holds an exception (a RETRY), and
            # look like a change to the waiter hub at every poll.
            decoded = self._decoded.get(key)
            if decoded is not None and decoded[0] is payload:
                items.append(decoded[1])
                continue
            item = self.decode_meta(task_id, payload)
            if key in self._watched:
                self._decoded[key] = (payload, item)
            items.append(item)
        return items

    async def _watch(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._watched.setdefault(self.task_key(task_id), None)

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            if not self.hub.has_waiters(task_id):
                self._watched.pop(self.task_key(task_id), None)
                self._decoded.pop(self.task_key(task_id), None)


def _bad_segment(segments: Sequence[str]) -> bool:
    return any(s in (".", "..") or "\\" in s for s in segments)


def _same(etag: str, listed_etag: str) -> bool:
    # A listing gives ETags without the quotes that response headers have.
    return etag.strip('"') == listed_etag.strip('"')


def _expiry(metadata: dict[str, str] | None) -> float | None:
    try:
        return float((metadata or {})[EXPIRES_KEY])
    except (KeyError, ValueError):
        return None  # not written by aioresults: never expires


def _live(metadata: dict[str, str] | None) -> bool:
    expires_at = _expiry(metadata)
    return expires_at is None or expires_at > time.time()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a task group's (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _identity_credential(name: str) -> Any:
    try:
        from azure.identity import aio as identity
    except ImportError as exc:
        raise MissingDependency(
            f"{name} needs the azure-identity package; run: pip install azure-identity"
        ) from exc
    return getattr(identity, name)()
