"""RedisBackend: results in Redis, read and written as Celery does (``redis://``).

Keys, payloads and channels are Celery's: a write is one atomic script that
refuses to overwrite a SUCCESS, sets the value with its TTL and PUBLISHes the
same payload on the channel named as the key. The script reads JSON and msgpack
records itself; a compressed or pickled record is checked in Python under
WATCH/MULTI instead. Chord parts are deduplicated and counted by one script,
with a receipt per part so a retried call finds its own count.

Waits are pushed: one pub/sub connection per backend (one per master on a
cluster) serves every waiter (see :mod:`._subscriber`). When it drops, the hub
reconnects it with jittered back-off, re-SUBSCRIBEs every watched channel
first and only then re-reads every watched key, so no result is lost.
``watch()`` delivers every state published while connected; a state stored
while the connection was down is seen only if it is the latest one when the
keys are re-read.

Other operations retry a connection error (``retries``, about two seconds by
default) and then raise :class:`~aioresults.BackendUnavailable`; a command
unanswered for ``command_timeout`` seconds (10 by default) fails the same way,
so a black-holed server never blocks a caller. A wait that *starts* while
Redis is unreachable fails with that error; a wait already under way survives
an outage of any length (bounded only by its own timeout). Reads issued in the
same event-loop iteration share one MGET.

URLs and their options: see :mod:`._url` (``redis://``, ``rediss://``,
``redis+socket://``, ``sentinel://``, ``?cluster=true``). Redis Cluster: the
URL names any one node; every command stays in one slot (task keys are single
keys, reads are split into one MGET per slot, chord keys share the hash tag
``{group_id}``); see :mod:`._cluster` for its pub/sub. (Celery's Redis result
backend has no cluster mode; the keys and records stay Celery's.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import anyio

from ..._exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    MissingDependency,
)
from .._chords import PartCount
from .._feeds import Feed
from .._support import ErrorRule, ErrorTable, milliseconds
from ..base import redact_url
from ..keyvalue import KeyValueBackend

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        f"the redis:// backend needs redis-py >= 5.3 ({exc}): pip install 'aioresults[redis]'"
    ) from exc

from . import _scripts
from ._cluster import ClusterFeed
from ._subscriber import Subscriber
from ._url import BACKEND_OPTIONS, cluster_options, parse_url

__all__ = ["RedisBackend", "parse_url"]

logger = logging.getLogger("aioresults.backends.redis")

#: Keys per MGET; larger batches are pipelined.
BATCH = 1000
#: Seconds a command may wait for its reply, unless the URL or an argument says.
COMMAND_TIMEOUT = 10.0
_DEFAULT: Any = object()


def _bytes(value: Any) -> bytes | None:
    # A caller's client may decode responses; payloads are bytes to the codec.
    return value.encode() if isinstance(value, str) else value


class RedisBackend(KeyValueBackend):
    """Results in Redis; see the module docstring.

    :param location: a ``redis://``, ``rediss://``, ``redis+socket://`` or
        ``sentinel://`` URL (not needed when ``client`` is given).
    :param client: a ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``
        to use instead of connecting from the URL (with ``decode_responses=False``);
        the caller keeps ownership and closes it. Pub/sub connections are made
        from its settings.
    :param cluster: talk to a Redis Cluster (also ``?cluster=true``; implied by
        an injected ``RedisCluster``).
    :param master_name: the Sentinel service name (also ``?master_name=``).
    :param sentinel_kwargs: connection options for the Sentinel servers themselves.
    :param redis_options: extra keyword arguments for the redis-py connections.
    :param max_connections: the size of the connection pool (callers beyond it
        wait); on a cluster, the commands in flight at once.
    :param retries: attempts after a connection error (0.05 s back-off doubling to
        1 s) before an operation raises :class:`~aioresults.BackendUnavailable`.
    :param command_timeout: seconds a command may wait for its reply before it
        counts as a connection error (None: for ever).
    :param health_check_interval: seconds between liveness PINGs on the pub/sub
        connection; one unanswered for as long (at least 1 s) ends the connection.
    :param options: see :class:`~aioresults.KeyValueBackend`.

    Any of these (and ``global_keyprefix``, ``expires``, ...) may also be given
    in the URL's query string; an argument wins over the URL.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+socket", "sentinel")

    def __init__(
        self,
        location: str | None = None,
        *,
        url: str | None = None,
        client: aioredis.Redis | RedisCluster | None = None,
        cluster: bool | None = None,
        master_name: str | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        redis_options: Mapping[str, Any] | None = None,
        max_connections: int | None = None,
        retries: int | None = None,
        command_timeout: float | None = _DEFAULT,
        health_check_interval: float | None = None,
        **options: Any,
    ) -> None:
        url = location or url
        if client is None and url is None:
            raise ConfigurationError("RedisBackend needs a URL or a client")
        settings = parse_url(url) if url is not None and client is None else {}
        # The backend's own options from the URL; arguments win.
        from_url = {k: settings.pop(k) for k in list(settings) if k in BACKEND_OPTIONS}
        for key in ("global_keyprefix", "expires", "chord_expires", "serializer", "compression"):
            if key in from_url:
                options.setdefault(key, from_url.pop(key))
        super().__init__(url=url, **options)
        if client is not None and cluster and not isinstance(client, RedisCluster):
            raise ConfigurationError("cluster=True needs a RedisCluster client")
        #: Whether the store is a Redis Cluster (sharded pub/sub, per-slot reads).
        self.cluster: bool = isinstance(client, RedisCluster) or bool(
            from_url.get("cluster", False) if cluster is None else cluster
        )
        self._sentinels: list[tuple[str, int]] | None = settings.pop("sentinels", None)
        self.master_name = master_name or from_url.get("master_name")
        if self._sentinels is not None and not self.master_name:
            raise ConfigurationError(
                "a sentinel:// URL needs master_name (option or ?master_name=)"
            )
        self.max_connections = max_connections or from_url.get("max_connections", 64)
        retries = from_url.get("retries", 6) if retries is None else retries
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError("retries must be a non-negative integer")
        interval = (
            from_url.get("health_check_interval", 30.0)
            if health_check_interval is None
            else health_check_interval
        )
        if not interval or interval <= 0:
            raise ConfigurationError("health_check_interval must be a positive number of seconds")
        self.health_check_interval = float(interval)
        if command_timeout is _DEFAULT:
            command_timeout = from_url.get("command_timeout", COMMAND_TIMEOUT)
        if command_timeout is not None:
            settings.setdefault("socket_timeout", command_timeout)
        # A lost connection is retried (every command here is idempotent); a
        # command that timed out is not: the host is silent, say so at once.
        settings["retry"] = Retry(
            ExponentialWithJitterBackoff(base=0.05, cap=1.0),
            retries,
            supported_errors=(redis_errors.ConnectionError,),
        )
        if self.cluster and client is None:
            if self._sentinels is not None:
                raise ConfigurationError("a Redis Cluster is not found through Sentinel")
            settings = cluster_options(settings)
        self._settings = {**settings, **(redis_options or {})}
        self._sentinel_kwargs = dict(sentinel_kwargs or {})
        self._client = client
        self._owns_client = client is None
        self._sentinel: Any = None
        # Commands in flight on a cluster: its nodes refuse connections past a limit
        # instead of queueing callers as the single server's blocking pool does.
        self._limit: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        self._reads = self._batcher(self._read_batch, "redis reads")
        self._errors = ErrorTable(
            [
                ErrorRule(
                    redis_errors.AuthenticationError, BackendError, "authentication failed on"
                ),
                ErrorRule(
                    (
                        redis_errors.ConnectionError,
                        redis_errors.TimeoutError,
                        redis_errors.ClusterDownError,
                        redis_errors.RedisClusterException,  # no node reachable, a slot not covered
                        OSError,
                    ),
                    BackendUnavailable,
                    "cannot reach",
                ),
                ErrorRule(redis_errors.RedisError, BackendError, "failed on"),
            ],
            lambda: repr(self),
        )

    def __repr__(self) -> str:
        url = ";".join(redact_url(c) or "" for c in (self.url or "").split(";"))
        return f"<{type(self).__name__} url={url or self._client!r}>"

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The redis-py client of ordinary commands (created on first use): a
        ``redis.asyncio.Redis``, or a ``RedisCluster`` on a cluster."""
        if self._client is None:
            raise BackendError(f"{self!r} is not open yet")
        return self._client

    def _feed(self) -> Feed:
        if self.cluster:
            return ClusterFeed(self, self.health_check_interval)
        return Subscriber(self, self.health_check_interval)

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        try:
            if self._client is None:
                if self.cluster:
                    self._client = RedisCluster(
                        max_connections=self.max_connections, **self._settings
                    )
                elif self._sentinels is not None:
                    from redis.asyncio import sentinel

                    make_sentinel: Any = sentinel.Sentinel  # untyped in redis-py
                    self._sentinel = make_sentinel(
                        self._sentinels, sentinel_kwargs=self._sentinel_kwargs, **self._settings
                    )
                    self._client = self._sentinel.master_for(self.master_name)
                else:
                    pool = aioredis.BlockingConnectionPool(
                        max_connections=self.max_connections, **self._settings
                    )
                    self._client = aioredis.Redis.from_pool(pool)
        except TypeError as exc:  # an option the driver does not take
            raise ConfigurationError(f"redis-py refused an option of {self!r}: {exc}") from exc
        if self.cluster:
            self._limit = anyio.Semaphore(self.max_connections)
            # Before it knows the slots, redis-py sends commands to random nodes, and
            # a burst of MOVED replies makes it close the connections in use.
            with self._errors.translating("reading the cluster's slots"):
                await self._client.initialize()
        self._write_script = self._client.register_script(
            _scripts.WRITE_SHARDED if self.cluster else _scripts.WRITE
        )
        self._count_script = self._client.register_script(_scripts.COUNT_PART)

    async def _close(self) -> None:
        feed = self._hub.feed
        if isinstance(feed, (Subscriber, ClusterFeed)):
            feed.close()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
                if isinstance(client, aioredis.Redis):
                    await client.connection_pool.disconnect()
            for sentinel in getattr(self._sentinel, "sentinels", ()):
                with contextlib.suppress(Exception):
                    await sentinel.aclose()

    def _pubsub_connection(self, node: str | None = None) -> AbstractConnection:
        """A new connection for pub/sub (to cluster node ``node``, named
        ``host:port``): same credentials, but no read timeout (waits of any
        length), no retries (the hub reconnects), RESP2 and raw bytes."""
        client = self.client
        if isinstance(client, aioredis.Redis):
            pool = client.connection_pool
            connection_class, options = pool.connection_class, dict(pool.connection_kwargs)
        else:
            # Any node's settings, credentials and TLS included, aimed at ``node``.
            known = client.get_node(node_name=node) or client.get_default_node()
            connection_class, options = known.connection_class, dict(known.connection_kwargs)
            host, _, port = (node or known.name).rpartition(":")
            options.update(host=host, port=int(port))
        options.update(
            socket_timeout=None,
            health_check_interval=0,
            decode_responses=False,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
        )
        if issubclass(connection_class, aioredis.Connection):
            options["socket_keepalive"] = True
        connection: AbstractConnection = connection_class(**options)
        return connection

    @contextlib.asynccontextmanager
    async def _command(self, what: str) -> AsyncIterator[Any]:
        """The client for one operation, within the cluster's concurrency limit;
        redis-py's errors become the aioresults tree, chained with ``from``."""
        async with self._limit:
            with self._errors.translating(what):
                yield self.client

    # ------------------------------------------------------------ keys

    def chord_key(self, group_id: str, suffix: str) -> str:
        """Chord keys share the hash tag ``{group_id}``, hence one cluster slot."""
        return f"{self.global_keyprefix}{self.group_keyprefix}{{{group_id}}}.{suffix}"

    # ------------------------------------------------------------ key-value primitives

    async def _get(self, key: str) -> bytes | None:
        return (await self._mget([key]))[0]

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys``; reads started in the same event-loop iteration share one MGET
        batch (1,000 keys per MGET, pipelined; on a cluster one MGET per slot), so
        many concurrent readers cost one round trip per node."""
        if not keys:
            return []
        values: list[bytes | None] = await self._reads(list(keys))
        return values

    async def _read_batch(self, batches: list[list[str]]) -> list[list[bytes | None]]:
        keys = [key for batch in batches for key in batch]
        async with self._command("MGET") as client:
            if isinstance(client, RedisCluster):
                values = await client.mget_nonatomic(keys)
            elif len(keys) <= BATCH:
                values = await client.mget(keys)
            else:
                async with client.pipeline(transaction=False) as pipe:
                    for start in range(0, len(keys), BATCH):
                        pipe.mget(keys[start : start + BATCH])
                    values = [v for chunk in await pipe.execute() for v in chunk]
        out = []
        offset = 0
        for batch in batches:
            out.append([_bytes(v) for v in values[offset : offset + len(batch)]])
            offset += len(batch)
        return out

    def _publish(self, pipe: Any, key: str, value: bytes) -> None:
        # PUBLISH reaches every node of a cluster; SPUBLISH only the key's shard.
        if self.cluster:
            pipe.spublish(key, value)
        else:
            pipe.publish(key, value)

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        # As Celery: the value with its TTL and a PUBLISH, in one MULTI.
        async with self._command("SET") as client, client.pipeline(transaction=True) as pipe:
            pipe.set(key, value, px=milliseconds(ttl) or None)
            self._publish(pipe, key, value)
            await pipe.execute()

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        async with self._command("storing a result") as client:
            written = await self._write_script(keys=[key], args=[value, milliseconds(ttl)])
            if written != -1:
                return bool(written)
            return await self._set_guarded_watched(client, key, value, ttl)

    async def _set_guarded_watched(
        self, client: Any, key: str, value: bytes, ttl: float | None
    ) -> bool:
        """The guard for payloads Lua cannot read: WATCH, check in Python, MULTI."""
        pipe: Any  # redis-py leaves watch/multi/reset untyped
        async with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    current = _bytes(await pipe.get(key))
                    if current is not None and current != value and self.is_success(current):
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.set(key, value, px=milliseconds(ttl) or None)
                    self._publish(pipe, key, value)
                    await pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    async def _delete(self, key: str) -> None:
        async with self._command("DEL") as client:
            await client.delete(key)

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        async with (
            self._command("starting a chord") as client,
            client.pipeline(transaction=True) as pipe,
        ):
            pipe.delete(*(self.chord_key(group_id, s) for s in "pnr"))
            pipe.set(
                self.chord_key(group_id, "s"), size, px=milliseconds(self.chord_expires) or None
            )
            await pipe.execute()

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        keys = [self.chord_key(group_id, s) for s in "spnr"]
        args: list[bytes | str | int] = [
            part_id,
            payload,
            milliseconds(self.chord_expires),
            receipt,
        ]
        async with self._command("counting a chord part"):
            counted = await self._count_script(keys=keys, args=args)
        if counted is None:
            return None
        return PartCount(int(counted[0]), int(counted[1]), bool(counted[2]))

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        async with self._command("reading chord parts") as client:
            values = await client.hvals(self.chord_key(group_id, "p"))
        return [v for v in map(_bytes, values) if v is not None]
