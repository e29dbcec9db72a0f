"""RedisBackend: results in Redis, read and written as Celery does (``redis://``).

Keys, payloads and channels are Celery's: a write is one atomic script that
refuses to overwrite a SUCCESS, sets the value with its TTL and PUBLISHes the
same payload on the channel named as the key. The script reads JSON and msgpack
records itself; a compressed or pickled record is checked in Python under
WATCH/MULTI instead. Chord parts are deduplicated and counted by one script,
with a receipt per part so a retried call finds its own count.

Commands travel on one multiplexed connection per backend (see :mod:`._channel`):
everything that many coroutines ask for in one event-loop iteration (stores,
chord parts, reads) leaves in one write, and each caller gets its own reply or
error. A Redis Cluster, an injected client, or a connection option only
redis-py knows use redis-py instead (see :mod:`._commands`).

Waits are pushed: one pub/sub connection per backend (one per master on a
cluster) serves every waiter (see :mod:`._subscriber`); a message wakes its
waiters right where it is parsed. When it drops, the hub
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
an outage of any length (bounded only by its own timeout).

URLs and their options: see :mod:`._url` (``redis://``, ``rediss://``,
``redis+socket://``, ``sentinel://``, ``?cluster=true``). Redis Cluster: the
URL names any one node; every command stays in one slot (task keys are single
keys, reads are split into one MGET per slot, chord keys share the hash tag
``{group_id}``); see :mod:`._cluster` for its pub/sub. (Celery's Redis result
backend has no cluster mode; the keys and records stay Celery's.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

from ..._exceptions import (
    AioResultsError,
    BackendClosed,
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
    import hiredis  # noqa: F401 - the backend's own connections parse with it
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        f"the redis:// backend needs redis-py >= 5.3 ({exc}): pip install 'aioresults[redis]'"
    ) from exc

from ._channel import Channel
from ._cluster import ClusterFeed
from ._commands import ClientCommands, Commands, PipelinedCommands
from ._resp import OPTIONS as PIPELINED_OPTIONS, Connection, Endpoint, connect
from ._subscriber import Subscriber
from ._url import BACKEND_OPTIONS, cluster_options, parse_url

__all__ = ["RedisBackend", "parse_url"]

logger = logging.getLogger("aioresults.backends.redis")

#: Seconds a command may wait for its reply, unless the URL or an argument says.
COMMAND_TIMEOUT = 10.0
_DEFAULT: Any = object()


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
        #: Attempts after a connection error before an operation gives up.
        self.retries = retries
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
        self._commands: Commands
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
        """A redis-py client on the same server and settings: a
        ``redis.asyncio.Redis`` (or a ``RedisCluster`` on a cluster), the
        injected one if any. The backend's own commands use a lighter connection
        of their own where they can; this client is made on first use for
        callers that want one, and closed with the backend."""
        if self._client is None:
            if self._closed:
                raise BackendError(f"{self!r} is closed")
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> aioredis.Redis | RedisCluster:
        try:
            if self.cluster:
                return RedisCluster(max_connections=self.max_connections, **self._settings)
            if self._sentinels is not None:
                return self._redis_sentinel().master_for(self.master_name)  # type: ignore[no-any-return]
            pool = aioredis.BlockingConnectionPool(
                max_connections=self.max_connections, **self._settings
            )
            return aioredis.Redis.from_pool(pool)
        except TypeError as exc:  # an option the driver does not take
            raise ConfigurationError(f"redis-py refused an option of {self!r}: {exc}") from exc

    def _redis_sentinel(self) -> Any:
        if self._sentinel is None:
            from redis.asyncio import sentinel

            make_sentinel: Any = sentinel.Sentinel  # untyped in redis-py
            self._sentinel = make_sentinel(
                self._sentinels, sentinel_kwargs=self._sentinel_kwargs, **self._settings
            )
        return self._sentinel

    @property
    def pipelined(self) -> bool:
        """Whether commands use the backend's own multiplexed connection (a single
        server, its Unix socket, TLS or Sentinel with options it understands)
        rather than redis-py (a cluster, an injected client, other options)."""
        return not self.cluster and self._owns_client and set(self._settings) <= PIPELINED_OPTIONS

    def _feed(self) -> Feed:
        if self.cluster:
            return ClusterFeed(self, self.health_check_interval)
        return Subscriber(self, self.health_check_interval)

    # ------------------------------------------------------------ lifecycle

    def _endpoint(self) -> Endpoint:
        """Where the backend's own connections go (the URL's settings)."""
        try:
            endpoint = Endpoint.from_settings(self._settings)
        except (TypeError, ValueError, OSError) as exc:
            raise ConfigurationError(f"bad connection settings for {self!r}: {exc}") from exc
        if self._sentinels is not None:
            sentinel, name = self._redis_sentinel(), self.master_name

            async def master() -> tuple[str, int]:
                host, port = await sentinel.discover_master(name)
                return str(host), int(port)

            endpoint.resolve = master
        return endpoint

    async def _open(self) -> None:
        if self.pipelined:
            endpoint = self._endpoint()
            channel = Channel(
                endpoint,
                retries=self.retries,
                timeout=self._settings.get("socket_timeout"),
                where=self._where(endpoint),
            )
            self._commands = PipelinedCommands(channel)
            return
        client = self.client
        if self.cluster:
            self._limit = anyio.Semaphore(self.max_connections, fast_acquire=True)
            # Before it knows the slots, redis-py sends commands to random nodes, and
            # a burst of MOVED replies makes it close the connections in use.
            with self._errors.translating("reading the cluster's slots"):
                await client.initialize()
        self._commands = ClientCommands(
            client,
            limit=self._limit,
            batch=lambda run: self._batcher(run, "redis reads"),
        )

    def _where(self, endpoint: Endpoint) -> str:
        if self._sentinels is not None:
            return f"the master {self.master_name!r}"
        return endpoint.describe()

    async def _close(self) -> None:
        self._commands.close(BackendClosed(f"{self!r} was closed"))
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
                if isinstance(client, aioredis.Redis):
                    await client.connection_pool.disconnect()
        for sentinel in getattr(self._sentinel, "sentinels", ()):
            with contextlib.suppress(Exception):
                await sentinel.aclose()

    async def _pubsub_connect(self, node: str | None = None) -> Connection:
        """A new connection for pub/sub (to cluster node ``node``, named
        ``host:port``): the same server and credentials as the commands', TCP
        keep-alive, no command timeout (waits of any length; PINGs tell a dead
        peer), no retries (the hub reconnects)."""
        if self.pipelined:
            endpoint = self._endpoint()
        else:
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
            options["connection_class"] = connection_class
            try:
                endpoint = Endpoint.from_settings(options)
            except (TypeError, ValueError, OSError) as exc:
                raise ConfigurationError(f"bad connection settings for {self!r}: {exc}") from exc
        endpoint.keepalive = endpoint.path is None
        return await connect(endpoint, where=node or self._where(endpoint))

    # ------------------------------------------------------------ keys

    def chord_key(self, group_id: str, suffix: str) -> str:
        """Chord keys share the hash tag ``{group_id}``, hence one cluster slot."""
        return f"{self.global_keyprefix}{self.group_keyprefix}{{{group_id}}}.{suffix}"

    # ------------------------------------------------------------ key-value primitives

    def _failed(self, exc: BaseException, doing: str) -> BaseException:
        """The aioresults error for a driver error (or the error itself)."""
        if isinstance(exc, AioResultsError):
            return exc
        return self._errors.translate(exc, doing) or exc

    async def _get(self, key: str) -> bytes | None:
        return (await self._mget([key]))[0]

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys`` in one MGET (1,000 keys per MGET, several sent at once; on a
        cluster one MGET per slot)."""
        if not keys:
            return []
        try:
            return await self._commands.mget(keys)
        except self._errors.catches as exc:
            raise self._failed(exc, "MGET") from exc

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        prefix = self.global_keyprefix + self.task_keyprefix
        return await self._mget([prefix + t for t in task_ids])

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        try:
            await self._commands.set(key, value, milliseconds(ttl))
        except self._errors.catches as exc:
            raise self._failed(exc, "SET") from exc

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        try:
            written = await self._commands.write(key, value, milliseconds(ttl))
            if written != -1:
                return bool(written)
            return await self._set_guarded_in_python(key, value, ttl)
        except self._errors.catches as exc:
            raise self._failed(exc, "storing a result") from exc

    async def _set_guarded_in_python(self, key: str, value: bytes, ttl: float | None) -> bool:
        """The guard for payloads Lua cannot read (compressed, pickled): judge
        the stored record here, then write only if it is still that record."""
        while True:
            current = (await self._commands.mget([key]))[0]
            if current is not None and current != value and self.is_success(current):
                return False
            seen = "" if current is None else hashlib.sha1(current).hexdigest()
            if await self._commands.write_if(key, value, milliseconds(ttl), seen) != 2:
                return True

    async def _delete(self, key: str) -> None:
        try:
            await self._commands.delete(key)
        except self._errors.catches as exc:
            raise self._failed(exc, "DEL") from exc

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        keys = [self.chord_key(group_id, s) for s in "pnrs"]
        try:
            await self._commands.chord_start(keys, size, milliseconds(self.chord_expires))
        except self._errors.catches as exc:
            raise self._failed(exc, "starting a chord") from exc

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        key = self.chord_key(group_id, "")
        keys = (key + "s", key + "p", key + "n", key + "r")
        args = (part_id, payload, milliseconds(self.chord_expires), receipt)
        try:
            counted = await self._commands.chord_count(keys, args)
        except self._errors.catches as exc:
            raise self._failed(exc, "counting a chord part") from exc
        if counted is None:
            return None
        return PartCount(int(counted[0]), int(counted[1]), bool(counted[2]))

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        try:
            return await self._commands.hvals(self.chord_key(group_id, "p"))
        except self._errors.catches as exc:
            raise self._failed(exc, "reading chord parts") from exc
