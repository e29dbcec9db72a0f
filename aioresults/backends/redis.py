"""RedisBackend: results in Redis, read and written as Celery does (``redis://``).

Keys, payloads and channels are Celery's: a write is one atomic script that
refuses to overwrite a SUCCESS, sets the value with its TTL and PUBLISHes the
same payload on the channel named as the key. The script reads JSON and msgpack
records itself; a compressed or pickled record is checked in Python under
WATCH/MULTI instead. Chord parts are deduplicated and counted by one script.

Waits are pushed: one pub/sub connection per backend, read by one background
task, serves every waiter; its reads never time out (idle waits of any length
are fine) and a PING every ``health_check_interval`` seconds detects a dead
peer. When the connection drops the task reconnects with jittered back-off,
re-SUBSCRIBEs every watched channel first and only then re-reads every watched
key, so no result is lost.

Other operations retry a connection error briefly (``retries``, about two
seconds by default) and then raise :class:`~aioresults.BackendUnavailable`. So
a wait that *starts* while Redis is unreachable fails fast with that error,
while a wait already under way survives an outage of any length (bounded only
by its own timeout). Reads issued in the same event-loop tick share one MGET,
so thousands of concurrent waits cost one round trip and one connection.

URLs::

    redis://[[user]:password@]host[:port][/db]
    rediss://...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem
    redis+socket:///path/to/redis.sock?virtual_host=0
    sentinel://host1:26379;sentinel://host2:26379/0?master_name=mymaster
    redis://host:port/0?cluster=true        (Redis Cluster; rediss:// too)

Redis Cluster (``?cluster=true``, the ``cluster=True`` option, or an injected
``redis.asyncio.cluster.RedisCluster``): the URL names any one node, the client
finds the others. Every command stays in one slot: task keys are single keys,
reads are split into one MGET per slot (pipelined per node), chord keys share
the hash tag ``{group_id}``. Writes SPUBLISH (sharded pub/sub: the channel is
the key, served by the key's master) instead of PUBLISH, and waiters SSUBSCRIBE
on the master that owns each channel's slot: one pub/sub connection per master,
each reconnecting as above. A MOVED reply, a channel the server drops (its slot
moved) or a lost connection re-reads the slot map; channels whose slot moved are
subscribed on their new master first, then their keys are re-read. (Celery's
Redis result backend has no cluster mode; the keys and records stay Celery's.)
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio

from .._exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    MissingDependency,
)
from .base import KeyValueBackend, redact_url

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
    from redis.crc import key_slot
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        "the redis:// backend needs redis-py: pip install 'aioresults[redis]'"
    ) from exc

__all__ = ["RedisBackend"]

logger = logging.getLogger("aioresults.backends.redis")

#: Keys per MGET and channels per (UN)SUBSCRIBE; larger batches are pipelined.
BATCH = 1000
_CONNECT_TIMEOUT = 10.0

# 1 written, 0 refused (a SUCCESS is stored), -1 undecidable here (compressed or
# pickled payload, or one cjson/cmsgpack cannot read): Python decides instead.
_WRITE = """
local current = redis.call('GET', KEYS[1])
if current then
  if string.sub(current, 1, 19) == '\\0celery-compressed\\0' then return -1 end
  if string.find(current, 'SUCCESS', 1, true) then
    local first, second = string.byte(current, 1, 2)
    local ok, data
    if first == 123 then
      ok, data = pcall(cjson.decode, current)
    elseif first == 128 and second and second >= 2 and second <= 5 then
      return -1
    elseif (first >= 128 and first <= 143) or first == 222 or first == 223 then
      ok, data = pcall(cmsgpack.unpack, current)
    else
      return -1
    end
    if not ok or type(data) ~= 'table' then return -1 end
    if data['status'] == 'SUCCESS' then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
# On a cluster the write publishes on the key's own shard.
_WRITE_SHARDED = _WRITE.replace("'PUBLISH'", "'SPUBLISH'")

# KEYS: size, parts, counter, receipts; ARGV: part, payload, TTL in ms, call token.
# A part counts once. The receipt remembers which call counted it, so a client
# retrying that very call (its reply was lost) gets its count back, not 0.
_COUNT_PART = """
local size = redis.call('GET', KEYS[1])
if not size then return false end
local count = 0
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  count = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[4], ARGV[1], count .. ':' .. ARGV[4])
else
  local receipt = redis.call('HGET', KEYS[4], ARGV[1]) or ''
  local sep = string.find(receipt, ':', 1, true)
  if sep and string.sub(receipt, sep + 1) == ARGV[4] then
    count = tonumber(string.sub(receipt, 1, sep - 1))
  end
end
if tonumber(ARGV[3]) > 0 then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return {count, tonumber(size)}
"""

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def _boolean(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _cert_reqs(value: str) -> ssl.VerifyMode:
    return _CERT_REQS[value.lower().removeprefix("cert_")]


_QUERY: dict[str, Callable[[str], Any]] = {
    "virtual_host": int,
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _boolean,
    "client_name": str,
    "max_connections": int,
    "master_name": str,
    "cluster": _boolean,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _boolean,
}


def parse_url(url: str) -> dict[str, Any]:
    """Turn a backend URL into connection settings (see the module docstring).

    :returns: keyword arguments for a redis-py connection, plus ``sentinels``
        (a list of ``(host, port)``) for ``sentinel://``, and ``master_name``,
        ``max_connections`` and ``cluster`` when the query names them.
    :raises ConfigurationError: the URL or one of its options is invalid.
    """
    scheme = url.partition("://")[0].lower()
    chunks = [c.strip() for c in url.split(";") if c.strip()] if scheme == "sentinel" else [url]
    settings: dict[str, Any] = {}
    sentinels: list[tuple[str, int]] = []
    for chunk in chunks:
        parts = urlsplit(chunk)
        if parts.scheme.lower() != scheme:
            raise ConfigurationError(f"cannot mix schemes in {redact_url(url)!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {redact_url(chunk)!r}") from exc
        if parts.username:
            settings.setdefault("username", unquote(parts.username))
        if parts.password:
            settings.setdefault("password", unquote(parts.password))
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in _QUERY:
                raise ConfigurationError(
                    f"unknown option {name!r} in {redact_url(chunk)!r}; known: {', '.join(_QUERY)}"
                )
            try:
                settings[name] = _QUERY[name](value)
            except (ValueError, KeyError) as exc:
                raise ConfigurationError(f"bad value for {name!r}: {value!r}") from exc
        path = unquote(parts.path)
        if scheme == "redis+socket":
            if not path or path == "/":
                raise ConfigurationError("a redis+socket:// URL needs the socket's path")
            settings["path"] = path
        else:
            db = path.strip("/")
            if db:
                if not db.isdigit():
                    raise ConfigurationError(
                        f"the database in {redact_url(chunk)!r} is not a number"
                    )
                settings["db"] = int(db)
            host = parts.hostname or "localhost"
            if scheme == "sentinel":
                sentinels.append((host, port or 26379))
            else:
                settings.update(host=host, port=port or 6379)
    if "virtual_host" in settings:
        settings["db"] = settings.pop("virtual_host")
    if scheme == "rediss":
        settings.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
        settings["connection_class"] = aioredis.SSLConnection
    elif any(key in settings for key in _SSL_KEYS):
        raise ConfigurationError("ssl_* options need a rediss:// URL")
    elif scheme == "redis+socket":
        settings["connection_class"] = aioredis.UnixDomainSocketConnection
    elif scheme == "sentinel":
        settings["sentinels"] = sentinels
    elif scheme != "redis":
        raise ConfigurationError(f"not a Redis URL: {redact_url(url)!r}")
    return settings


def _cluster_options(settings: dict[str, Any]) -> dict[str, Any]:
    """A single server's connection settings, as ``RedisCluster`` takes them."""
    options = dict(settings)
    connection_class = options.pop("connection_class", None)
    if "path" in options:
        raise ConfigurationError("a Redis Cluster is reached at host:port, not by a Unix socket")
    if options.pop("db", 0):
        raise ConfigurationError("a Redis Cluster has only database 0")
    if connection_class is aioredis.SSLConnection:
        options["ssl"] = True
    # A MOVED reply patches that slot's entry; redis-py's default also closes every
    # connection (the ones in use too) on each fifth MOVED, failing commands in flight.
    options.setdefault("reinitialize_steps", 0)
    return options


def _px(ttl: float | None) -> int:
    """A TTL in milliseconds for SET PX / PEXPIRE; 0 means none (never EXPIRE key 0)."""
    return 0 if not ttl else max(1, round(ttl * 1000))


def _bytes(value: Any) -> bytes | None:
    # A caller's client may decode responses; payloads are bytes to the codec.
    return value.encode() if isinstance(value, str) else value


class RedisBackend(KeyValueBackend):
    """Results in Redis; see the module docstring.

    :param url: a ``redis://``, ``rediss://``, ``redis+socket://`` or
        ``sentinel://`` URL (ignored for connecting when ``client`` is given).
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
    :param health_check_interval: seconds between liveness PINGs on the pub/sub
        connection; one unanswered for as long (at least 1 s) ends the connection.
    :param options: see :class:`~aioresults.backends.base.KeyValueBackend`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis+socket", "sentinel")

    def __init__(
        self,
        *,
        url: str | None = None,
        client: aioredis.Redis | RedisCluster | None = None,
        cluster: bool | None = None,
        master_name: str | None = None,
        sentinel_kwargs: Mapping[str, Any] | None = None,
        redis_options: Mapping[str, Any] | None = None,
        max_connections: int | None = None,
        retries: int = 6,
        health_check_interval: float = 30.0,
        **options: Any,
    ) -> None:
        super().__init__(url=url, **options)
        if client is None and url is None:
            raise ConfigurationError("RedisBackend needs a url or a client")
        settings = parse_url(url) if url is not None and client is None else {}
        url_cluster = settings.pop("cluster", False)
        if client is not None and cluster and not isinstance(client, RedisCluster):
            raise ConfigurationError("cluster=True needs a RedisCluster client")
        #: Whether the store is a Redis Cluster (sharded pub/sub, per-slot reads).
        self.cluster: bool = isinstance(client, RedisCluster) or bool(
            url_cluster if cluster is None else cluster
        )
        self._sentinels: list[tuple[str, int]] | None = settings.pop("sentinels", None)
        self.master_name = master_name or settings.pop("master_name", None)
        settings.pop("master_name", None)
        if self._sentinels is not None and not self.master_name:
            raise ConfigurationError(
                "a sentinel:// URL needs master_name (option or ?master_name=)"
            )
        self.max_connections = max_connections or settings.pop("max_connections", 64)
        settings.pop("max_connections", None)
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError("retries must be a non-negative integer")
        if not health_check_interval or health_check_interval <= 0:
            raise ConfigurationError("health_check_interval must be a positive number of seconds")
        settings["retry"] = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries)
        if self.cluster and client is None:
            if self._sentinels is not None:
                raise ConfigurationError("a Redis Cluster is not found through Sentinel")
            settings = _cluster_options(settings)
        self._settings = {**settings, **(redis_options or {})}
        self._sentinel_kwargs = dict(sentinel_kwargs or {})
        self._client = client
        self._owns_client = client is None
        self._sentinel: Any = None
        self._reads: _Reads | None = None
        # Commands in flight on a cluster: its nodes refuse connections past a limit
        # instead of queueing callers as the single server's blocking pool does.
        self._limit: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()
        self._interval = health_check_interval
        #: The pub/sub subscriber of a single server.
        self._subscriber = _Subscriber(self, health_check_interval)
        #: Cluster: one sharded subscriber per master, by node name.
        self._shards: dict[str, _Subscriber] = {}
        self._lost_ids: set[str] = set()
        self._lost_slots: set[int] = set()
        self._rehoming = False
        self._rehome_again = False

    def __repr__(self) -> str:
        url = ";".join(redact_url(c) or "" for c in (self.url or "").split(";"))
        return f"<{type(self).__name__} url={url or self._client!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """Create a backend from a Redis URL (see the module docstring)."""
        return cls(url=url, **options)

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The redis-py client of ordinary commands (created on first use): a
        ``redis.asyncio.Redis``, or a ``RedisCluster`` on a cluster."""
        if self._client is None:
            raise BackendError(f"{self!r} is not open yet")
        return self._client

    @property
    def _nodes(self) -> RedisCluster:
        """The client, on a cluster (the slot map, the nodes)."""
        client = self.client
        if not isinstance(client, RedisCluster):
            raise BackendError(f"{self!r} is not talking to a Redis Cluster")
        return client

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        if self._client is None:
            if self.cluster:
                self._client = RedisCluster(max_connections=self.max_connections, **self._settings)
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
        if self.cluster:
            self._limit = anyio.Semaphore(self.max_connections)
            # Before it knows the slots, redis-py sends commands to random nodes, and
            # a burst of MOVED replies makes it close the connections in use.
            with self._errors("reading the cluster's slots"):
                await self._nodes.initialize()
        self._write_script = self._client.register_script(
            _WRITE_SHARDED if self.cluster else _WRITE
        )
        self._count_script = self._client.register_script(_COUNT_PART)

    async def _close(self) -> None:
        for subscriber in [self._subscriber, *self._shards.values()]:
            subscriber.close()
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
        length), no retries (the subscriber has its own), RESP2 and raw bytes."""
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
        # The key-value primitives are public: they may be the first call.
        await self._ensure_open()
        async with self._limit:
            with self._errors(what):
                yield self.client

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate redis-py's errors into the aioresults tree, chained with ``from``."""
        try:
            yield
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: BaseException) -> BackendError:
        if isinstance(exc, redis_errors.AuthenticationError):
            return BackendError(f"{what}: authentication failed on {self!r}: {exc}")
        if isinstance(
            exc,
            (
                redis_errors.ConnectionError,
                redis_errors.TimeoutError,
                redis_errors.ClusterDownError,
                redis_errors.RedisClusterException,  # no node reachable, a slot not covered
                OSError,
            ),
        ):
            return BackendUnavailable(f"{what}: cannot reach {self!r}: {exc}")
        return BackendError(f"{what} failed on {self!r}: {exc}")

    # ------------------------------------------------------------ keys

    def chord_key(self, group_id: str, suffix: str) -> str:
        """Chord keys share the hash tag ``{group_id}``, hence one cluster slot."""
        return f"{self.global_keyprefix}{self.group_keyprefix}{{{group_id}}}.{suffix}"

    # ------------------------------------------------------------ primitives

    async def get(self, key: str) -> bytes | None:
        async with self._command("GET") as client:
            return _bytes(await client.get(key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys``; reads started in the same event-loop tick share one MGET
        batch (1,000 keys per MGET, pipelined; on a cluster one MGET per slot), so
        many concurrent readers cost one round trip per node."""
        await self._ensure_open()
        if not keys:
            return []
        batch = self._reads
        if batch is None:
            self._reads = batch = _Reads()
            self._spawn(self._read_batch, batch, name="aioresults redis MGET")
        offset = len(batch.keys)
        batch.keys.extend(keys)
        await batch.done.wait()
        if batch.error is not None:
            raise self._translate("MGET", batch.error) from batch.error
        return batch.values[offset : offset + len(keys)]

    async def _read_batch(self, batch: _Reads) -> None:
        # Runs one loop iteration after the first reader: the others have joined by now.
        self._reads = None
        try:
            async with self._limit:
                client = self.client
                if isinstance(client, RedisCluster):
                    values = await client.mget_nonatomic(batch.keys)
                elif len(batch.keys) <= BATCH:
                    values = await client.mget(batch.keys)
                else:
                    async with client.pipeline(transaction=False) as pipe:
                        for start in range(0, len(batch.keys), BATCH):
                            pipe.mget(batch.keys[start : start + BATCH])
                        values = [v for chunk in await pipe.execute() for v in chunk]
            batch.values = [_bytes(v) for v in values]
        except Exception as exc:
            batch.error = exc
        except BaseException:
            batch.error = BackendError(f"{self!r} was closed while reading")
            raise
        finally:
            batch.done.set()

    def _publish(self, pipe: Any, key: str, value: bytes) -> None:
        # PUBLISH reaches every node of a cluster; SPUBLISH only the key's shard.
        if self.cluster:
            pipe.spublish(key, value)
        else:
            pipe.publish(key, value)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        # As Celery: the value with its TTL and a PUBLISH, in one MULTI.
        async with self._command("SET") as client, client.pipeline(transaction=True) as pipe:
            pipe.set(key, value, px=_px(ttl) or None)
            self._publish(pipe, key, value)
            await pipe.execute()

    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        async with self._command("storing a result") as client:
            written = await self._write_script(keys=[key], args=[value, _px(ttl)])
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
                    if current is not None and self.is_success(current):
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.set(key, value, px=_px(ttl) or None)
                    self._publish(pipe, key, value)
                    await pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    async def delete(self, key: str) -> None:
        async with self._command("DEL") as client:
            await client.delete(key)

    async def incr(self, key: str, ttl: float | None) -> int:
        async with self._command("INCR") as client, client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            if ttl:
                pipe.pexpire(key, _px(ttl))
            return int((await pipe.execute())[0])

    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        async with self._command("HSETNX") as client, client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, field, value)
            if ttl:
                pipe.pexpire(key, _px(ttl))
            return bool((await pipe.execute())[0])

    async def get_fields(self, key: str) -> dict[str, bytes]:
        async with self._command("HGETALL") as client:
            fields = await client.hgetall(key)
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in fields.items()
        }

    # ------------------------------------------------------------ chords

    async def _chord_init(self, group_id: str, size: int) -> None:
        async with (
            self._command("starting a chord") as client,
            client.pipeline(transaction=True) as pipe,
        ):
            pipe.delete(*(self.chord_key(group_id, s) for s in "pnr"))
            pipe.set(self.chord_key(group_id, "s"), size, px=_px(self.chord_expires) or None)
            await pipe.execute()

    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes, *, token: str | None = None
    ) -> tuple[int, int] | None:
        keys = [self.chord_key(group_id, s) for s in "spnr"]
        args: list[bytes | str | int] = [field, payload, _px(self.chord_expires)]
        args.append(token or uuid.uuid4().hex)
        async with self._command("counting a chord part"):
            counted = await self._count_script(keys=keys, args=args)
        return None if counted is None else (int(counted[0]), int(counted[1]))

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        async with self._command("reading chord parts") as client:
            values = await client.hvals(self.chord_key(group_id, "p"))
        return [v for v in map(_bytes, values) if v is not None]

    # ------------------------------------------------------------ waiting

    async def _watch(self, task_ids: Sequence[str]) -> None:
        if not self.cluster:
            await self._subscriber.watch(task_ids)
            return
        pending = list(task_ids)
        while pending:
            requests = [(s, s.submit(ids)) for s, ids in self._route(pending).items()]
            try:
                # All are in flight already: this waits for the slowest master only.
                for _, request in requests:
                    await request.done.wait()
            except BaseException:
                # The hub takes these ids as never watched: end what was started.
                for subscriber, request in requests:
                    subscriber.unwatch(request.ids)
                raise
            pending = []
            for _, request in requests:
                if isinstance(request.error, _Rerouted):
                    pending.extend(request.ids)  # its slot moved meanwhile: subscribe anew
                elif request.error is not None:
                    for subscriber, other in requests:
                        subscriber.unwatch(other.ids)
                    raise request.error

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        if not self.cluster:
            self._subscriber.unwatch(task_ids)
            return
        for subscriber in self._shards.values():
            if subscriber.watched:
                subscriber.unwatch([i for i in task_ids if i in subscriber.watched])

    # ------------------------------------------------------------ cluster channels

    def _shard_for(self, task_id: str) -> _Subscriber:
        """The subscriber of the master that serves ``task_id``'s slot now."""
        key = self.task_key(task_id)
        node = self._nodes.get_node_from_key(key)
        if node is None:  # only for replica=True in redis-py: never here
            raise BackendUnavailable(f"no master of {self!r} serves {key!r}")
        subscriber = self._shards.get(node.name)
        if subscriber is None:
            self._shards[node.name] = subscriber = _Subscriber(self, self._interval, node.name)
        return subscriber

    def _route(self, task_ids: Sequence[str]) -> dict[_Subscriber, list[str]]:
        """Group ids by the subscriber of their slot's master."""
        groups: dict[_Subscriber, list[str]] = {}
        with self._errors("finding a channel's master"):
            for task_id in task_ids:
                groups.setdefault(self._shard_for(task_id), []).append(task_id)
        return groups

    def _rehome_soon(self, ids: Sequence[str] = (), slots: Sequence[int] = ()) -> None:
        """Re-read the slot map soon, and move channels whose master changed.

        :param ids: channels a master dropped (they are subscribed again).
        :param slots: slots a master refused with MOVED (likewise).
        """
        self._lost_ids.update(ids)
        self._lost_slots.update(slots)
        self._rehome_again = True
        if not self._rehoming and not self._closed:
            self._rehoming = True
            self._spawn(self._rehome, name=f"{self!r} slot map")

    async def _rehome(self) -> None:
        delay = 0.05
        try:
            while self._rehome_again:
                self._rehome_again = False
                try:
                    with anyio.fail_after(_CONNECT_TIMEOUT):
                        await self._nodes.nodes_manager.initialize()
                    self._move_channels()
                except Exception as exc:
                    logger.warning("re-reading the slot map of %r failed: %s", self, exc)
                    self._rehome_again = True
                # Re-read at most this often, however many replies ask for it.
                await anyio.sleep(delay)
                delay = min(1.0, delay * 2)
        finally:
            self._rehoming = False

    def _move_channels(self) -> None:
        lost_ids, self._lost_ids = self._lost_ids, set()
        lost_slots, self._lost_slots = self._lost_slots, set()
        channels: list[str] = []
        for old in list(self._shards.values()):
            leaving = set()
            for task_id in old.watched:
                try:
                    new = self._shard_for(task_id)
                except (BackendError, redis_errors.RedisClusterException):
                    self._rehome_soon(ids=[task_id])  # its slot has no master right now
                    continue
                lost = task_id in lost_ids or (
                    bool(lost_slots) and key_slot(self.task_key(task_id).encode()) in lost_slots
                )
                if new is not old or lost:
                    leaving.add(task_id)
            old.release(leaving)
            channels.extend(leaving)
        if channels:
            logger.info("%r: %d channels moved to another master", self, len(channels))
            self._spawn(self._resubscribe, channels, name=f"{self!r} moved channels")
        # A master that left the cluster keeps no connection once nothing is on it.
        masters = {node.name for node in self._nodes.get_primaries()}
        for name, subscriber in list(self._shards.items()):
            if name not in masters and not subscriber.watched:
                subscriber.retire()
                del self._shards[name]

    async def _resubscribe(self, ids: list[str]) -> None:
        """Subscribe moved channels where their slot lives now, then re-read their keys."""
        delay = 0.05
        while True:
            # Ids whose waiters left meanwhile were unwatched nowhere: leave them out.
            ids = [i for i in ids if self.hub.has_waiters(i)]
            try:
                await self._watch(ids)
                break
            except Exception as exc:
                if self._closed:
                    return
                logger.warning("subscribing moved channels of %r failed: %s", self, exc)
                await anyio.sleep(delay)
                delay = min(1.0, delay * 2)
        await self._refresh(ids)

    async def _refresh(self, ids: Sequence[str]) -> None:
        """Re-read ``ids`` (after their channels were subscribed anew) until it works."""
        delay = 0.05
        while True:
            try:
                await self.hub.refresh(ids)
                return
            except Exception as exc:
                logger.warning("re-reading results after a reconnect failed: %s", exc)
                await anyio.sleep(delay)
                delay = min(1.0, delay * 2)


class _Reads:
    """Keys that concurrent readers want, read together."""

    __slots__ = ("done", "error", "keys", "values")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[bytes | None] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None


class _Request:
    """Ids to subscribe; ``done`` is set once Redis has confirmed (a PING reply
    after the SUBSCRIBE), or ``error`` says why it cannot be."""

    __slots__ = ("done", "error", "ids", "token")

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = ids
        self.token = 0
        self.done = anyio.Event()
        self.error: Exception | None = None


class _Rerouted(Exception):
    """A request's slot moved to another master before it was confirmed."""


class _Subscriber:
    """One pub/sub connection and the task that owns it: the backend's only one
    on a single server; on a cluster, one per master (``node``), SSUBSCRIBEd to
    the channels the backend placed on it.

    Only the task writes to the connection (waiters queue requests and never
    block on it): SUBSCRIBE batches followed by ``PING <token>``, whose reply
    confirms everything before it; queued UNSUBSCRIBEs, skipping ids watched
    again since. After a reconnect it subscribes every watched id, and once that
    is confirmed it re-reads them all (:meth:`WaiterHub.refresh`).
    """

    def __init__(
        self, backend: RedisBackend, health_check_interval: float, node: str | None = None
    ) -> None:
        self._backend = backend
        self._hub = backend.hub
        self._interval = health_check_interval
        #: The cluster master (``host:port``) this subscriber serves; None on a single server.
        self.node = node
        self._subscribe, self._unsubscribe = (
            ("SUBSCRIBE", "UNSUBSCRIBE") if node is None else ("SSUBSCRIBE", "SUNSUBSCRIBE")
        )
        self._started = False
        self._closed = False
        self._scope: anyio.CancelScope | None = None
        self._queued: list[_Request] = []
        self._sent: deque[_Request] = deque()
        #: The ids watched through this connection (subscribed, or about to be).
        self.watched: set[str] = set()
        self._drop: set[str] = set()
        self._resync = False
        self._resynced: list[str] = []
        self._tokens = 0
        self._answered = 0
        self._wake = anyio.Event()
        self._answer = anyio.Event()
        #: Established connections so far (the first one included).
        self.connections = 0

    def __repr__(self) -> str:
        return f"pub/sub of {self._backend!r}" + (f" on {self.node}" if self.node else "")

    # ------------------------------------------------------------ called by the backend

    def submit(self, ids: Sequence[str]) -> _Request:
        """Queue ``ids`` for subscription; the request is done once confirmed."""
        if self._closed:
            raise BackendError(f"{self._backend!r} is closed")
        if not self._started:
            self._started = True
            self._backend._spawn(self._run, name=repr(self))
        self.watched.update(ids)
        request = _Request(ids)
        self._queued.append(request)
        self._wake.set()
        return request

    async def watch(self, ids: Sequence[str]) -> None:
        request = self.submit(ids)
        try:
            await request.done.wait()
        except BaseException:
            # The hub takes these ids as never watched; drop what was subscribed.
            self.unwatch(ids)
            raise
        if request.error is not None:
            self.unwatch(ids)
            raise request.error

    def unwatch(self, ids: Sequence[str]) -> None:
        """End the watch of ``ids`` (their channels are unsubscribed unless watched again)."""
        self.watched.difference_update(ids)
        if self._started:
            self._drop.update(ids)
            self._wake.set()

    def release(self, ids: set[str]) -> None:
        """Forget ``ids`` whose slot moved to another master (which dropped their
        channels itself), and answer their unconfirmed requests with :class:`_Rerouted`."""
        if ids:
            self.watched -= ids
            self._answer_early(lambda r: not ids.isdisjoint(r.ids), _Rerouted())

    def retire(self) -> None:
        """Stop for good: the master left. Unconfirmed requests are rerouted."""
        self._answer_early(lambda r: True, _Rerouted())
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        self._answer_early(lambda r: True, BackendError(f"{self._backend!r} was closed"))

    def _answer_early(self, which: Callable[[_Request], bool], error: Exception) -> None:
        for request in [*self._sent, *self._queued]:
            if which(request):
                request.error = error
                request.done.set()
        self._sent = deque(r for r in self._sent if not r.done.is_set())
        self._queued = [r for r in self._queued if not r.done.is_set()]

    # ------------------------------------------------------------ the task

    async def _run(self) -> None:
        failures = 0
        with anyio.CancelScope() as self._scope:
            while not self._closed:
                if failures:
                    delay = min(1.0, 0.05 * 2 ** (failures - 1))
                    await anyio.sleep(random.uniform(delay / 2, delay))
                connection: Any = self._backend._pubsub_connection(self.node)  # untyped
                established = self.connections
                try:
                    # Bounded: with no read timeout, a hung handshake would block for ever.
                    with anyio.fail_after(_CONNECT_TIMEOUT):
                        await connection.connect()
                    await self._session(connection)
                except Exception as exc:
                    while isinstance(exc, ExceptionGroup):  # from the session's task group
                        exc = exc.exceptions[0]
                    if isinstance(
                        exc, (redis_errors.AuthenticationError, redis_errors.ResponseError)
                    ):
                        self._answer_early(
                            lambda r: True, BackendError(f"cannot subscribe on {self!r}: {exc}")
                        )
                    if self.connections != established:
                        logger.warning("%r lost (%s); reconnecting", self, exc)
                    elif failures == 0:
                        logger.warning("%r cannot connect (%s); retrying", self, exc)
                    if self.node is not None:
                        # The master may have failed over: ask the cluster who serves what.
                        self._backend._rehome_soon()
                finally:
                    with anyio.CancelScope(shield=True):
                        await connection.disconnect(nowait=True)
                failures = 0 if self.connections != established else failures + 1

    async def _session(self, connection: AbstractConnection) -> None:
        self._resync = True
        self._wake.set()
        resync_token = self._tokens + 1  # the first PING the writer will send
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._write, connection)
            tasks.start_soon(self._keep_alive)
            tasks.start_soon(self._refresh_after, resync_token, self.connections > 0)
            await self._read(connection)

    async def _write(self, connection: AbstractConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            commands = self._pack(connection)
            if commands:
                await connection.send_packed_command(commands, check_health=False)

    def _pack(self, connection: AbstractConnection) -> list[bytes]:
        """The commands for everything queued; no await, so it sees one state."""
        commands: list[bytes] = []

        def batches(command: str, ids: list[str]) -> None:
            channels = [self._backend.task_key(i) for i in ids]
            groups: list[list[str]] = [channels]
            if self.node is not None:  # a sharded command takes the channels of one slot
                by_slot: dict[int, list[str]] = {}
                for channel in channels:
                    by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
                groups = list(by_slot.values())
            for group in groups:
                for start in range(0, len(group), BATCH):
                    commands.extend(connection.pack_command(command, *group[start : start + BATCH]))

        resync, self._resync = self._resync, False
        if resync:
            # A new connection: subscribe every id served here; that answers every request.
            requests = [*self._sent, *self._queued]
            self._sent.clear()
            ids = self._resynced = list(self.watched)
        else:
            # Skipping ids watched again since: their waiters keep the subscription.
            batches(self._unsubscribe, [i for i in self._drop if i not in self.watched])
            requests = self._queued
            ids = list(dict.fromkeys(i for r in requests for i in r.ids if i in self.watched))
        self._drop.clear()
        self._queued = []
        batches(self._subscribe, ids)
        if resync or requests:
            self._tokens += 1
            commands.extend(connection.pack_command("PING", str(self._tokens)))
            for request in requests:
                request.token = self._tokens
                self._sent.append(request)
        return commands

    async def _read(self, connection: AbstractConnection) -> None:
        prefix = self._backend.global_keyprefix + self._backend.task_keyprefix
        while True:
            try:
                response = await connection.read_response()
            except redis_errors.AskError as exc:
                # A cluster's reply (MOVED) to an SSUBSCRIBE for a slot this master
                # no longer serves: subscribe that slot's channels where it lives now.
                if self.node is None:
                    raise
                self._backend._rehome_soon(slots=[exc.slot_id])
                continue
            except (redis_errors.TryAgainError, redis_errors.ClusterDownError):
                if self.node is None:
                    raise
                self._backend._rehome_soon(ids=list(self.watched))
                continue
            if isinstance(response, list) and len(response) == 3:
                kind, channel = response[0], response[1]
                if kind in (b"message", b"smessage") or kind == b"sunsubscribe":
                    key = channel.decode("utf-8", "replace") if channel else ""
                    if not key.startswith(prefix):
                        continue
                    task_id = key[len(prefix) :]
                    if kind == b"sunsubscribe":
                        # Not ours (ours leave only unwanted ids): the master gave the
                        # slot away and dropped the channel. Find its new master.
                        if task_id in self.watched:
                            self._backend._rehome_soon(ids=[task_id])
                    elif self._hub.has_waiters(task_id):
                        item = self._backend.decode_meta(task_id, response[2])
                        self._hub.deliver(task_id, item)
            elif isinstance(response, list) and len(response) == 2 and response[0] == b"pong":
                self._answered_up_to(response[1])
            elif isinstance(response, bytes):  # PING's reply when nothing is subscribed
                self._answered_up_to(response)

    def _answered_up_to(self, token: bytes) -> None:
        if not token.isdigit():
            return
        self._answered = max(self._answered, int(token))
        while self._sent and self._sent[0].token <= self._answered:
            self._sent.popleft().done.set()
        self._answer.set()
        self._answer = anyio.Event()

    async def _wait_answered(self, token: int) -> None:
        while self._answered < token:
            await self._answer.wait()

    async def _refresh_after(self, token: int, reconnected: bool) -> None:
        await self._wait_answered(token)
        self.connections += 1
        if reconnected:
            ids = self._resynced
            logger.info("%r is back; re-reading %d results", self, len(ids))
            await self._backend._refresh(ids)

    async def _keep_alive(self) -> None:
        # A silent peer (host gone, no RST) would leave the read blocked for ever.
        while True:
            await anyio.sleep(self._interval)
            request = _Request(())
            self._queued.append(request)
            self._wake.set()
            timeout = max(1.0, self._interval)
            with anyio.move_on_after(timeout):
                await request.done.wait()
            if not request.done.is_set():
                raise redis_errors.ConnectionError(f"no reply to PING within {timeout:g} s")
