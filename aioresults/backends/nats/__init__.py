"""NatsBackend: results in a NATS JetStream key-value bucket (``nats://``).

An aioresults-only store (Celery has no NATS backend): choose it where NATS is
already the messaging system and waits should be pushed without a Redis.

**Keys.** One bucket (``aioresults`` by default, created on first use) holds
records under Celery's names split into two subject tokens:
``celery-task-meta-.<id>``, ``celery-taskset-meta-.<id>``, with
``global_keyprefix`` in the first token. Ids that are not plain (letters,
digits, ``-``, ``_``) are encoded so they can never escape their token or act
as a wildcard (see :mod:`._keys`). Values are Celery's JSON meta.

**Waits** are pushed: while a waiter waits, one ephemeral JetStream consumer
delivers every task record written to the bucket (the KV watch of
``celery-task-meta-.*``), about half a millisecond after the write. After a
reconnect the consumer is created again and every watched record re-read, so
a result stored while the connection was down is not missed (see :mod:`._feed`).
Each process with waiters receives every result written to its bucket: give
unrelated applications buckets of their own.

**Writes.** Storing a state reads the key's revision and writes on condition
that it is still the last (``Nats-Expected-Last-Subject-Sequence``), so a
SUCCESS is never overwritten without a race; a retry that finds its own
payload reports True.

**Expiry.** A bucket's TTL (its stream's ``max_age``) is fixed when the bucket
is created: to ``bucket_ttl`` if given, else to the longer of ``expires`` and
``chord_expires`` (none if either is None). Every write also carries its own
expiry time in the header ``Aioresults-Expires``, and reads treat a record
past it as missing, so a backend may use a shorter ``expires`` than its
bucket's TTL; :meth:`~NatsBackend.cleanup` removes such records. A backend that
opens an existing bucket whose TTL is *shorter* than its ``expires`` (or that
has a TTL while ``expires`` is None) logs a warning: the server removes
values after the bucket's TTL, whatever ``expires`` says. Change a bucket's
TTL with the ``nats`` CLI (``nats stream edit KV_<bucket> --max-age``).

**Chords** count on one key per chord, changed only by conditional writes
(see :mod:`._chords`).

**Errors.** An unreachable server raises
:class:`~aioresults.BackendUnavailable` (the client reconnects in the
background); refused credentials :class:`~aioresults.BackendError`; a value
over the server's ``max_payload`` :class:`~aioresults.ResultTooLarge`.
Passwords and tokens never appear in ``repr()``, errors or logs.

Runs on asyncio (nats-py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from ..._exceptions import BackendError, ConfigurationError
from .._chords import PartCount
from .._feeds import Feed
from ..keyvalue import KeyValueBackend
from ._bucket import Bucket, WrongRevision, expiry
from ._chords import ChordStore
from ._feed import WatchFeed
from ._keys import token

__all__ = ["NatsBackend"]

logger = logging.getLogger("aioresults.backends")

_BUCKET = re.compile(r"[A-Za-z0-9_-]+")
_MAX_CAS_ATTEMPTS = 100
_DEFAULT: Any = object()
_OPTIONS: dict[str, Callable[[str], Any]] = {
    "bucket": str,
    "bucket_ttl": float,
    "replicas": int,
    "storage": str,
    "heartbeat": float,
    "timeout": float,
    "connect_timeout": float,
    "reconnect_wait": float,
    "global_keyprefix": str,
    "expires": float,
    "chord_expires": float,
    "serializer": str,
    "compression": str,
}


def parse_servers(location: str) -> tuple[list[str], str | None, dict[str, Any]]:
    """``nats://[user:password@]host[:port][,nats://host2...][/bucket][?options]``:
    the server URLs, the bucket named in the path, and the query options."""
    location, _, query = location.partition("?")
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ConfigurationError(
                f"unknown NATS URL option {name!r}; known: {', '.join(sorted(_OPTIONS))}"
            )
        try:
            options[name] = _OPTIONS[name](value)
        except ValueError:
            raise ConfigurationError(f"invalid value for {name}: {value!r}") from None
    servers, bucket = [], None
    for spec in location.split(","):
        spec = spec.strip()
        if not spec:
            continue
        if "://" not in spec:
            spec = "nats://" + spec
        parts = urlsplit(spec)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ConfigurationError(f"invalid NATS server {redact(spec)!r}")
        if parts.path.strip("/"):
            bucket = parts.path.strip("/")
        servers.append(f"{parts.scheme}://{parts.netloc}")
    if not servers:
        raise ConfigurationError("no NATS server given, e.g. nats://127.0.0.1:4222")
    return servers, bucket, options


def redact(url: str) -> str:
    """``url`` with its user information (password or token) replaced by ``***``."""
    return re.sub(r"(://)[^@/]*@", r"\1***@", url)


class NatsBackend(KeyValueBackend):
    """Results in a NATS JetStream KV bucket; see the module docstring.

    :param servers: ``"nats://host:4222"``, several separated by commas, a list,
        or a whole URL with options (``nats://host:4222/bucket?heartbeat=1``).
    :param bucket: the bucket (``aioresults``); letters, digits, ``-`` and ``_``.
    :param bucket_ttl: the TTL of a bucket this backend creates (default: the
        longer of ``expires`` and ``chord_expires``); an existing bucket keeps its own.
    :param storage: ``"file"`` (default) or ``"memory"``, for a bucket it creates.
    :param replicas: the replicas of a bucket it creates (1).
    :param heartbeat: seconds between the watch consumer's idle heartbeats (2);
        three missed start a new watch.
    :param timeout: seconds to wait for a JetStream answer (5).
    :param connect_timeout: seconds to wait for a connection (5).
    :param reconnect_wait: seconds between reconnection attempts (0.5).
    :param options: see :class:`~aioresults.KeyValueBackend`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("nats",)

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        bucket: str | None = None,
        bucket_ttl: float | None = _DEFAULT,
        storage: str | None = None,
        replicas: int | None = None,
        heartbeat: float | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        reconnect_wait: float | None = None,
        url: str | None = None,
        **options: Any,
    ) -> None:
        location = servers if servers is not None else url
        if location is None:
            raise ConfigurationError("give the NATS server, e.g. 'nats://127.0.0.1:4222'")
        if not isinstance(location, str):
            location = ",".join(location)
        urls, path_bucket, query = parse_servers(location)
        given: dict[str, Any] = {
            "bucket": bucket,
            "storage": storage,
            "replicas": replicas,
            "heartbeat": heartbeat,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "reconnect_wait": reconnect_wait,
        }
        query.setdefault("bucket", path_bucket)
        for name, value in query.items():  # what the caller gives wins over the URL
            if name == "bucket_ttl":
                bucket_ttl = value if bucket_ttl is _DEFAULT else bucket_ttl
            elif name not in given:
                options.setdefault(name, value)
            elif given[name] is None:
                given[name] = value
        defaults: dict[str, Any] = {
            "bucket": "aioresults",
            "storage": "file",
            "replicas": 1,
            "heartbeat": 2.0,
            "timeout": 5.0,
            "connect_timeout": 5.0,
            "reconnect_wait": 0.5,
        }
        settings = {
            name: defaults[name] if value is None else value for name, value in given.items()
        }
        if not _BUCKET.fullmatch(settings["bucket"]):
            raise ConfigurationError(
                f"invalid bucket name {settings['bucket']!r}: letters, digits, '-' and '_' only"
            )
        if settings["storage"] not in ("file", "memory"):
            raise ConfigurationError("storage must be 'file' or 'memory'")
        if min(settings[n] for n in ("heartbeat", "timeout", "connect_timeout")) <= 0:
            raise ConfigurationError("heartbeat and timeouts must be positive numbers of seconds")
        if settings["replicas"] < 1 or settings["reconnect_wait"] < 0:
            raise ConfigurationError("need replicas >= 1 and reconnect_wait >= 0")
        self._display = ",".join(redact(u) for u in urls)
        super().__init__(url=url or location, **options)
        if bucket_ttl is _DEFAULT:
            ttls = (self.expires, self.chord_expires)
            bucket_ttl = None if None in ttls else max(t for t in ttls if t is not None)
        #: The TTL of a bucket this backend creates (see the module docstring).
        self.bucket_ttl = bucket_ttl
        self.heartbeat = float(settings["heartbeat"])
        self._bucket = Bucket(
            urls,
            settings["bucket"],
            display=self._display,
            connect_timeout=float(settings["connect_timeout"]),
            timeout=float(settings["timeout"]),
            reconnect_wait=float(settings["reconnect_wait"]),
            storage=settings["storage"],
            replicas=int(settings["replicas"]),
        )
        self._errors = self._bucket.errors
        prefix = self.global_keyprefix
        self._task_token = token(prefix + self.task_keyprefix)
        self._group_token = token(prefix + self.group_keyprefix)
        self._chord_token = token(prefix + "chord-unlock-")
        self._part_token = token(prefix + "chord-part-")
        self._chords = ChordStore(self._bucket, lambda: self.chord_expires)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} url={self._display!r} bucket={self.bucket!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> NatsBackend:
        """``nats://[user:password@]host:4222[/bucket][?options]``; several servers
        separated by commas (``nats://h1:4222,nats://h2:4222``)."""
        return cls(url, **options)

    @property
    def bucket(self) -> str:
        """The bucket's name."""
        return self._bucket.name

    @property
    def bucket_ttl_in_use(self) -> float | None:
        """The open bucket's TTL in seconds (None: none); None before opening."""
        return self._bucket.ttl

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        await self._bucket.open(create=self.create, ttl=self.bucket_ttl)
        ttl = self._bucket.ttl
        if ttl is not None:
            longest = [t for t in (self.expires, self.chord_expires)]
            if None in longest or max(t for t in longest if t is not None) > ttl + 1e-3:
                logger.warning(
                    "%r: bucket %r removes values after %g s, sooner than expires=%s / "
                    "chord_expires=%s: results will be gone after %g s",
                    self,
                    self.bucket,
                    ttl,
                    self.expires,
                    self.chord_expires,
                    ttl,
                )

    async def _close(self) -> None:
        await self._bucket.close()

    def _feed(self) -> Feed:
        return WatchFeed(self._bucket, self._ensure_open, self._task_token, self.heartbeat)

    # ------------------------------------------------------------ keys

    def subject_key(self, key: str) -> str:
        """The KV key (subject tokens) of a record key (``celery-task-meta-<id>``...)."""
        for first, prefix in (
            (self._task_token, self.global_keyprefix + self.task_keyprefix),
            (self._group_token, self.global_keyprefix + self.group_keyprefix),
        ):
            if key.startswith(prefix) and len(key) > len(prefix):
                return f"{first}.{token(key[len(prefix) :])}"
        return f"key.{token(key)}"

    def _chord_key(self, group_id: str) -> str:
        return f"{self._chord_token}.{token(group_id)}"

    def _part_key(self, group_id: str, part: str) -> str:
        return f"{self._part_token}.{token(group_id)}.{part}"

    # ------------------------------------------------------------ reads

    async def _get(self, key: str) -> bytes | None:
        found = (await self._mget([key]))[0]
        if isinstance(found, Exception):
            raise found
        return found

    async def _mget(self, keys: Sequence[str]) -> Sequence[bytes | None | Exception]:
        entries = await self._bucket.read_many([self.subject_key(k) for k in keys])
        now = time.time()
        values: list[bytes | None] = []
        for entry in entries:
            if isinstance(entry, Exception):
                # The server cannot answer: the whole read fails, so a re-read after a
                # reconnect is tried again, where an error per id would end those waits.
                raise entry
            values.append(entry.live(now) if entry is not None else None)
        return values

    # ------------------------------------------------------------ writes

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        with self._errors.translating(f"writing {key}"):
            await self._bucket.write(self.subject_key(key), value, ttl)

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Write unless a SUCCESS is stored, on condition of the revision read."""
        subject = self.subject_key(key)
        bucket = self._bucket
        for attempt in range(_MAX_CAS_ATTEMPTS):
            with self._errors.translating(f"writing {key}"):
                entry = await bucket.read(subject)
                current = entry.live() if entry is not None else None
                if current is not None:
                    if current == value:
                        return True  # this very write, retried after a lost reply
                    if self.is_success(current):
                        return False
                try:
                    await bucket.write(subject, value, ttl, entry.revision if entry else 0)
                    return True
                except WrongRevision:
                    pass
            if attempt >= 2:
                await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
        raise BackendError(f"writing {key}: gave up after {_MAX_CAS_ATTEMPTS} conflicts")

    async def _delete(self, key: str) -> None:
        with self._errors.translating(f"deleting {key}"):
            await self._bucket.delete(self.subject_key(key))

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        with self._errors.translating(f"starting chord {group_id}"):
            await self._chords.start(self._chord_key(group_id), self._part_key(group_id, "*"), size)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        part = hashlib.sha256(part_id.encode()).hexdigest()[:32]
        with self._errors.translating(f"counting a part of chord {group_id}"):
            return await self._chords.count(
                self._chord_key(group_id), self._part_key(group_id, part), part, payload, receipt
            )

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        with self._errors.translating(f"reading chord {group_id}"):
            return await self._chords.parts(
                self._chord_key(group_id), lambda part: self._part_key(group_id, part)
            )

    # ------------------------------------------------------------ housekeeping

    async def _cleanup(self) -> int:
        """Remove every record whose ``Aioresults-Expires`` time has passed (each
        only in the revision seen: one rewritten since stays)."""
        bucket = self._bucket
        with self._errors.translating("listing expired records"):
            found = await bucket.scan(">")
        now = time.time()
        removed = 0
        for key, revision, headers in found:
            deadline = expiry(headers)
            if deadline is not None and deadline <= now:
                with self._errors.translating(f"removing {key}"):
                    await bucket.purge(key, before=revision + 1)
                removed += 1
        return removed
