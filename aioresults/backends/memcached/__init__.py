"""MemcachedBackend: results in memcached, as Celery's cache backend keeps them
(``cache+memcached://h1:11211;h2:11211/``, ``memcached://``).

**Format.** Keys and values are Celery's: a task's record is the raw JSON meta
at ``celery-task-meta-<id>`` (client flags 0), a saved group is at
``celery-taskset-meta-<id>``, a chord's counter is ``chord-unlock-<id>``; all
under ``global_keyprefix``. With several servers, each key lives on the server
pymemcache's ``HashClient`` (Celery's client) picks: rendezvous hashing on
murmur3 over the node names ``"host:port"``, so Celery and aioresults read and
write the same node. Celery reads what aioresults writes and the reverse
(Celery decodes text: not results written with ``compression`` or msgpack).

**Waits.** Memcached sends no notifications: the hub's one poller re-reads
every watched record with one multi-key ``get`` per server, starting
``poll_interval`` (0.05 s) after a change or a new waiter and backing off to
``max_poll_interval`` (0.5 s) while nothing changes. A waiter wakes at most
``max_poll_interval`` plus one round trip after a result is stored by another
process; backends of one process on the same servers wake each other at once.
``watch="notify"`` adds memcached's ``watch mutations`` log stream as a wake
hint on top of the poller, never alone: a stored key is re-read a few
milliseconds after the write while the server is busy, but the log's lines
come late after the server was idle (see :mod:`._watch`).

**Writes.** Storing a state reads the record with ``gets`` and writes it with
``cas`` (``add`` where there is none), so a SUCCESS is never overwritten
without a race; a retry that finds its own payload reports True.

**Limits.** Memcached refuses items over 1 MiB by default (its ``-I``; tell
this backend with ``item_size_max``): a larger result raises
:class:`~aioresults.ResultTooLarge` before anything is written. Expiry is
relative and at most 30 days (a longer one would be read as a Unix time):
``expires`` and ``chord_expires`` over 30 days raise
:class:`~aioresults.ConfigurationError`. Memcached counts expiry in whole
seconds on a clock that ticks once a second: a record stored with ``expires=T``
lives between ``ceil(T) - 1`` and ``ceil(T)`` seconds. Keys hold at most 250
bytes and no spaces: ids that would not fit raise
:class:`~aioresults.InvalidTaskId`. Memcached is a cache: under memory
pressure it evicts records, and a restarted server has none.

**Chords** count on Celery's ``incr`` counter, once per part and crash-safely
(see :mod:`._chords`).

Runs on asyncio, with its own small client (see :mod:`._client` for why).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from ..._exceptions import (
    AioResultsError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    InvalidTaskId,
    ResultTooLarge,
)
from .._chords import PartCount
from .._feeds import Feed
from .._support import ErrorRule, ErrorTable
from ..keyvalue import KeyValueBackend
from ._chords import ChordCounter
from ._client import (
    Cluster,
    MemcacheClientError,
    MemcacheConnectionError,
    MemcacheError,
    MemcacheServerError,
    Node,
)
from ._watch import MutationFeed

__all__ = ["MemcachedBackend"]

#: Memcached reads a longer expiry as an absolute Unix time.
MAX_RELATIVE_EXPIRES = 30 * 24 * 3600
MAX_KEY_BYTES = 250
#: Room for memcached's item header, the key and the CAS unique within ``-I``.
_ITEM_OVERHEAD = 64
_MAX_CAS_ATTEMPTS = 100
# The longest chord key after the group id (see _chords): ".<epoch>.p<hash>".
_CHORD_SUFFIX = 1 + 8 + 2 + 32
_DEFAULTS: dict[str, Any] = {
    "watch": "poll",
    "timeout": 5.0,
    "connect_timeout": 5.0,
    "item_size_max": 1024 * 1024,
    "chord_claim_timeout": 30.0,
}
_OPTIONS: dict[str, Callable[[str], Any]] = {
    "watch": str,
    "timeout": float,
    "connect_timeout": float,
    "item_size_max": int,
    "chord_claim_timeout": float,
    "global_keyprefix": str,
    "expires": float,
    "chord_expires": float,
    "serializer": str,
    "compression": str,
    "poll_interval": float,
    "max_poll_interval": float,
}


def parse_location(location: str) -> tuple[list[tuple[str, tuple[str, int] | str]], dict[str, Any]]:
    """Servers and query options of ``h1:11211;h2:11211`` or a whole URL.

    A server is ``host[:port]`` (11211 by default), ``[v6 address]:port``,
    ``unix:/path`` or ``/path``; servers are separated by ``;`` (Celery) or
    ``,``. Each is named as pymemcache names it (``"host:port"``, or the path).
    """
    # Any scheme: Celery's cache backend also takes cache+memcache://, cache+pymemcache://...
    _, sep, rest = location.partition("://")
    if sep:
        location = rest
    location, _, query = location.partition("?")
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ConfigurationError(
                f"unknown memcached URL option {name!r}; known: {', '.join(sorted(_OPTIONS))}"
            )
        try:
            options[name] = _OPTIONS[name](value)
        except ValueError:
            raise ConfigurationError(f"invalid value for {name}: {value!r}") from None
    servers: list[tuple[str, tuple[str, int] | str]] = []
    for spec in location.rstrip("/").replace(",", ";").split(";"):
        spec = spec.strip()
        if not spec:
            continue
        if spec.startswith("unix:"):
            spec = spec[len("unix:") :]
        if spec.startswith("/"):
            servers.append((spec, spec))
            continue
        host, port = spec, 11211
        if ":" in spec and not spec.endswith("]"):
            host, _, number = spec.rpartition(":")
            try:
                port = int(number)
            except ValueError:
                raise ConfigurationError(f"invalid memcached server {spec!r}") from None
        host = host.strip("[]")
        if not host or "/" in host:
            raise ConfigurationError(f"invalid memcached server {spec!r}")
        servers.append((f"{host}:{port}", (host, port)))
    if not servers:
        raise ConfigurationError("no memcached server given, e.g. memcached://127.0.0.1:11211/")
    return servers, options


class MemcachedBackend(KeyValueBackend):
    """Results in memcached, as Celery's cache backend keeps them; see the module docstring.

    :param servers: ``"h1:11211;h2:11211"``, a list of servers, or a whole
        ``cache+memcached://`` / ``memcached://`` URL (its query options apply
        unless given here).
    :param watch: ``"poll"`` (default; ``"auto"`` is the same): the batched
        poller alone. ``"notify"``: memcached's ``watch mutations`` stream too,
        as a wake hint.
    :param timeout: seconds to wait for a server's answer (5, as Celery).
    :param connect_timeout: seconds to wait for a connection (5, as Celery).
    :param item_size_max: the servers' largest item in bytes (their ``-I``; 1 MiB).
    :param chord_claim_timeout: seconds after which a chord part that a worker
        claimed and never counted is counted by its redelivery (30).
    :param options: see :class:`~aioresults.KeyValueBackend` (``expires`` and
        ``chord_expires`` at most 30 days; ``poll_interval``,
        ``max_poll_interval``: 0.05 s and 0.5 s by default).
    """

    schemes: ClassVar[tuple[str, ...]] = ("memcached", "cache+memcached")
    local_wake: ClassVar[bool] = True
    default_max_poll_interval: ClassVar[float] = 0.5

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        watch: str | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        item_size_max: int | None = None,
        chord_claim_timeout: float | None = None,
        url: str | None = None,
        **options: Any,
    ) -> None:
        location = servers if servers is not None else url
        if location is None:
            raise ConfigurationError("give the memcached servers, e.g. '127.0.0.1:11211'")
        if not isinstance(location, str):
            location = ";".join(location)
        parsed, query = parse_location(location)
        if "://" in location:
            url = url or location
        given: dict[str, Any] = {
            "watch": watch,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "item_size_max": item_size_max,
            "chord_claim_timeout": chord_claim_timeout,
        }
        for name, value in query.items():  # what the caller gives wins over the URL
            if name not in given:
                options.setdefault(name, value)
            elif given[name] is None:
                given[name] = value
        for name, default in _DEFAULTS.items():
            if given[name] is None:
                given[name] = default
        watch, timeout = given["watch"], given["timeout"]
        connect_timeout, item_size_max = given["connect_timeout"], given["item_size_max"]
        chord_claim_timeout = given["chord_claim_timeout"]
        if watch not in ("poll", "auto", "notify"):
            raise ConfigurationError("watch must be 'poll' (or 'auto') or 'notify'")
        if not (timeout > 0 and connect_timeout > 0 and chord_claim_timeout > 0):
            raise ConfigurationError("timeouts must be positive numbers of seconds")
        if item_size_max < 1024:
            raise ConfigurationError("item_size_max is in bytes (1048576 by default)")
        names = ";".join(name for name, _ in parsed)
        super().__init__(url=url or f"memcached://{names}/", **options)
        for name, value in (("expires", self.expires), ("chord_expires", self.chord_expires)):
            if value is not None and value > MAX_RELATIVE_EXPIRES:
                raise ConfigurationError(
                    f"{name}={value:g} s is over memcached's 30-day limit on relative expiry "
                    f"({MAX_RELATIVE_EXPIRES} s; a longer one is read as a Unix time): "
                    "use at most 30 days, or None to keep results until evicted"
                )
        self.watch = "notify" if watch == "notify" else "poll"
        self.item_size_max = item_size_max
        #: Since creation: round trips to a server (``requests``: one write of one or
        #: more pipelined commands), ``commands`` in them, and record ``keys_read``.
        self.stats: dict[str, int] = {"requests": 0, "commands": 0, "keys_read": 0}
        self._cluster = Cluster(
            [
                Node(
                    name,
                    address,
                    connect_timeout=connect_timeout,
                    timeout=timeout,
                    stats=self.stats,
                )
                for name, address in parsed
            ]
        )
        self._errors = ErrorTable(
            [
                ErrorRule(
                    (MemcacheConnectionError, OSError, TimeoutError),
                    BackendUnavailable,
                    "cannot reach",
                ),
                ErrorRule(
                    MemcacheServerError,
                    ResultTooLarge,
                    "a value too large for",
                    lambda exc: "too large" in str(exc),
                ),
                ErrorRule(MemcacheServerError, BackendError, "failed on"),
                ErrorRule((MemcacheClientError, MemcacheError), BackendError, "refused by"),
            ],
            lambda: f"memcached {names}",
        )
        self._reads = self._batcher(self._read_batch, "memcached reads")
        self._chords = ChordCounter(
            self._cluster, lambda: self._exptime(self.chord_expires), chord_claim_timeout
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemcachedBackend:
        """``cache+memcached://h1:11211;h2:11211/`` (Celery's form) or ``memcached://...``,
        with options as query parameters (``?watch=notify&timeout=2``)."""
        return cls(url, **options)

    @property
    def servers(self) -> list[str]:
        """The servers' names, in the order given (pymemcache's ``"host:port"``)."""
        return [node.name for node in self._cluster.nodes]

    def server_for(self, key: str) -> str:
        """The server that holds ``key`` (as pymemcache's ``HashClient`` places it)."""
        return self._cluster.node(key).name

    # ------------------------------------------------------------ lifecycle

    async def _close(self) -> None:
        await self._cluster.close()

    def _feed(self) -> Feed | None:
        if self.watch != "notify":
            return None
        return MutationFeed(self._cluster.nodes, self.global_keyprefix + self.task_keyprefix)

    def _store_key(self) -> object:
        return ("memcached", tuple(sorted(self.servers)))

    # ------------------------------------------------------------ ids and keys

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        task_id = super()._check_id(task_id, what)
        if " " in task_id:
            raise InvalidTaskId(f"{what} {task_id!r} holds a space: memcached keys cannot")
        if what == "group id":
            longest = len(self._chord_base(task_id).encode()) + _CHORD_SUFFIX
            longest = max(longest, len(self.group_key(task_id).encode()))
        else:
            longest = len(self.task_key(task_id).encode())
        if longest > MAX_KEY_BYTES:
            raise InvalidTaskId(
                f"{what} {task_id[:40]!r}... is too long: its memcached key would be "
                f"{longest} bytes; the limit is {MAX_KEY_BYTES}"
            )
        return task_id

    def _chord_base(self, group_id: str) -> str:
        """Celery's chord counter key, under which the chord's other keys live."""
        return f"{self.global_keyprefix}chord-unlock-{group_id}"

    @staticmethod
    def _exptime(ttl: float | None) -> int:
        """Memcached's expiry field: whole seconds (rounded up), 0 for never."""
        return 0 if ttl is None else max(1, math.ceil(ttl))

    def _check_size(self, key: str, value: bytes) -> None:
        if len(value) + len(key.encode()) + _ITEM_OVERHEAD > self.item_size_max:
            raise ResultTooLarge(
                f"writing {key}: the value is {len(value)} bytes; memcached keeps items of at "
                f"most {self.item_size_max} bytes (its -I setting; see item_size_max)"
            )

    # ------------------------------------------------------------ reads

    async def _get(self, key: str) -> bytes | None:
        found = (await self._mget([key]))[0]
        if isinstance(found, Exception):
            raise found
        return found

    async def _mget(self, keys: Sequence[str]) -> Sequence[bytes | None | Exception]:
        """Read ``keys`` with every other read of this moment: one ``get`` per server."""
        found: list[bytes | None | Exception] = await self._reads(list(keys))
        return found

    async def _read_batch(self, batches: list[list[str]]) -> list[list[Any]]:
        keys = list(dict.fromkeys(key for batch in batches for key in batch))
        self.stats["keys_read"] += len(keys)
        found = await self._cluster.get_many(keys)
        values: dict[str, bytes | None] = {}
        for key in keys:
            item = found.get(key)
            if isinstance(item, Exception):
                # A server that cannot answer fails the whole batch: the poller
                # tries again, where an error per id would end those waits.
                raise self._translated(item, f"reading {key}")
            values[key] = item.value if item is not None else None
        return [[values[key] for key in batch] for batch in batches]

    def _translated(self, exc: Exception, doing: str) -> Exception:
        error: AioResultsError | None = self._errors.translate(exc, doing)
        if error is None:
            return exc
        error.__cause__ = exc
        return error

    # ------------------------------------------------------------ writes

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._check_size(key, value)
        with self._errors.translating(f"writing {key}"):
            reply = await self._cluster.store(b"set", key, value, self._exptime(ttl))
        if reply != b"STORED":
            raise BackendError(
                f"writing {key}: memcached answered {reply.decode(errors='replace')}"
            )

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Write unless a SUCCESS is stored: ``gets``, then ``cas`` (or ``add``)."""
        self._check_size(key, value)
        exptime = self._exptime(ttl)
        cluster = self._cluster
        for attempt in range(_MAX_CAS_ATTEMPTS):
            with self._errors.translating(f"writing {key}"):
                current = await cluster.get(key, cas=True)
                if current is None:
                    reply = await cluster.store(b"add", key, value, exptime)
                elif current.value == value:
                    return True  # this very write, retried after a lost reply
                elif self.is_success(current.value):
                    return False
                else:
                    reply = await cluster.store(b"cas", key, value, exptime, current.cas)
            if reply == b"STORED":
                return True
            if reply not in (b"NOT_STORED", b"EXISTS", b"NOT_FOUND"):
                raise BackendError(f"writing {key}: memcached answered {reply!r}")
            if attempt >= 2:
                # Writers that collided spread out instead of colliding again.
                await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
        raise BackendError(f"writing {key}: gave up after {_MAX_CAS_ATTEMPTS} conflicts")

    async def _delete(self, key: str) -> None:
        with self._errors.translating(f"deleting {key}"):
            await self._cluster.delete(key)

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        with self._errors.translating(f"starting chord {group_id}"):
            await self._chords.start(self._chord_base(group_id), size)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        base = self._chord_base(group_id)
        self._check_size(base, payload)
        with self._errors.translating(f"counting a part of chord {group_id}"):
            return await self._chords.count(base, part_id, payload, receipt)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        with self._errors.translating(f"reading chord {group_id}"):
            return await self._chords.parts(self._chord_base(group_id))
