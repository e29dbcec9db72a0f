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

Commands are single-key or hash-tagged (chord keys share ``{group_id}``), and
the pub/sub connection is made in one place (:meth:`RedisBackend._pubsub_connection`),
so a cluster client can be plugged in.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
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
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _boolean,
}


def parse_url(url: str) -> dict[str, Any]:
    """Turn a backend URL into connection settings (see the module docstring).

    :returns: keyword arguments for a redis-py connection, plus ``sentinels``
        (a list of ``(host, port)``) for ``sentinel://``, and ``master_name``
        and ``max_connections`` when the query names them.
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
    :param client: a ``redis.asyncio.Redis`` to use instead of connecting from
        the URL (with ``decode_responses=False``); the caller keeps ownership
        and closes it. The pub/sub connection is made from its pool's settings.
    :param master_name: the Sentinel service name (also ``?master_name=``).
    :param sentinel_kwargs: connection options for the Sentinel servers themselves.
    :param redis_options: extra keyword arguments for the redis-py connections.
    :param max_connections: the size of the connection pool (callers beyond it wait).
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
        client: aioredis.Redis | None = None,
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
        self._settings = {**settings, **(redis_options or {})}
        self._sentinel_kwargs = dict(sentinel_kwargs or {})
        self._client = client
        self._owns_client = client is None
        self._sentinel: Any = None
        self._reads: _Reads | None = None
        self._subscriber = _Subscriber(self, health_check_interval)

    def __repr__(self) -> str:
        url = ";".join(redact_url(c) or "" for c in (self.url or "").split(";"))
        return f"<{type(self).__name__} url={url or self._client!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """Create a backend from a Redis URL (see the module docstring)."""
        return cls(url=url, **options)

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py client of ordinary commands (created on first use)."""
        if self._client is None:
            raise BackendError(f"{self!r} is not open yet")
        return self._client

    async def _redis(self) -> aioredis.Redis:
        # The key-value primitives are public: they may be the first call.
        await self._ensure_open()
        return self.client

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        if self._client is None:
            if self._sentinels is not None:
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
        self._write_script = self._client.register_script(_WRITE)
        self._count_script = self._client.register_script(_COUNT_PART)

    async def _close(self) -> None:
        self._subscriber.close()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
                await client.connection_pool.disconnect()
            for sentinel in getattr(self._sentinel, "sentinels", ()):
                with contextlib.suppress(Exception):
                    await sentinel.aclose()

    def _pubsub_connection(self) -> AbstractConnection:
        """A new connection for pub/sub: same server and credentials, but no read
        timeout (waits of any length), no retries (the subscriber has its own),
        RESP2 and raw bytes."""
        pool = self.client.connection_pool
        options = dict(pool.connection_kwargs)
        options.update(
            socket_timeout=None,
            health_check_interval=0,
            decode_responses=False,
            protocol=2,
            retry=Retry(NoBackoff(), 0),
        )
        if issubclass(pool.connection_class, aioredis.Connection):
            options["socket_keepalive"] = True
        connection: AbstractConnection = pool.connection_class(**options)
        return connection

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate redis-py's errors into the aioresults tree, chained with ``from``."""
        try:
            yield
        except (redis_errors.RedisError, OSError) as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: BaseException) -> BackendError:
        if isinstance(exc, redis_errors.AuthenticationError):
            return BackendError(f"{what}: authentication failed on {self!r}: {exc}")
        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)):
            return BackendUnavailable(f"{what}: cannot reach {self!r}: {exc}")
        return BackendError(f"{what} failed on {self!r}: {exc}")

    # ------------------------------------------------------------ keys

    def chord_key(self, group_id: str, suffix: str) -> str:
        """Chord keys share the hash tag ``{group_id}``, hence one cluster slot."""
        return f"{self.global_keyprefix}{self.group_keyprefix}{{{group_id}}}.{suffix}"

    # ------------------------------------------------------------ primitives

    async def get(self, key: str) -> bytes | None:
        client = await self._redis()
        with self._errors("GET"):
            return _bytes(await client.get(key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read ``keys``; reads started in the same event-loop tick share one MGET
        batch (1,000 keys per MGET, pipelined), so many concurrent readers cost
        one round trip and one connection."""
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
            client = self.client
            if len(batch.keys) <= BATCH:
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

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        # As Celery: the value with its TTL and a PUBLISH, in one MULTI.
        client = await self._redis()
        with self._errors("SET"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(key, value, px=_px(ttl) or None)
                pipe.publish(key, value)
                await pipe.execute()

    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        client = await self._redis()
        with self._errors("storing a result"):
            written = await self._write_script(keys=[key], args=[value, _px(ttl)])
            if written != -1:
                return bool(written)
            return await self._set_guarded_watched(client, key, value, ttl)

    async def _set_guarded_watched(
        self, client: aioredis.Redis, key: str, value: bytes, ttl: float | None
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
                    pipe.publish(key, value)
                    await pipe.execute()
                    return True
                except redis_errors.WatchError:
                    continue

    async def delete(self, key: str) -> None:
        client = await self._redis()
        with self._errors("DEL"):
            await client.delete(key)

    async def incr(self, key: str, ttl: float | None) -> int:
        client = await self._redis()
        with self._errors("INCR"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                if ttl:
                    pipe.pexpire(key, _px(ttl))
                return int((await pipe.execute())[0])

    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        client = await self._redis()
        with self._errors("HSETNX"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, field, value)
                if ttl:
                    pipe.pexpire(key, _px(ttl))
                return bool((await pipe.execute())[0])

    async def get_fields(self, key: str) -> dict[str, bytes]:
        client = await self._redis()
        with self._errors("HGETALL"):
            fields = await client.hgetall(key)
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in fields.items()
        }

    # ------------------------------------------------------------ chords

    async def _chord_init(self, group_id: str, size: int) -> None:
        with self._errors("starting a chord"):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(*(self.chord_key(group_id, s) for s in "pnr"))
                pipe.set(self.chord_key(group_id, "s"), size, px=_px(self.chord_expires) or None)
                await pipe.execute()

    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes, *, token: str | None = None
    ) -> tuple[int, int] | None:
        keys = [self.chord_key(group_id, s) for s in "spnr"]
        args: list[bytes | str | int] = [field, payload, _px(self.chord_expires)]
        args.append(token or uuid.uuid4().hex)
        with self._errors("counting a chord part"):
            counted = await self._count_script(keys=keys, args=args)
        return None if counted is None else (int(counted[0]), int(counted[1]))

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        with self._errors("reading chord parts"):
            values = await self.client.hvals(self.chord_key(group_id, "p"))
        return [v for v in map(_bytes, values) if v is not None]

    # ------------------------------------------------------------ waiting

    async def _watch(self, task_ids: Sequence[str]) -> None:
        await self._subscriber.watch(task_ids)

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        self._subscriber.unwatch(task_ids)


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


class _Subscriber:
    """The backend's one pub/sub connection and the task that owns it.

    Only the task writes to the connection (waiters queue requests and never
    block on it): SUBSCRIBE batches followed by ``PING <token>``, whose reply
    confirms everything before it; queued UNSUBSCRIBEs, skipping ids that have
    waiters again. After a reconnect it subscribes every watched id, and once
    that is confirmed it re-reads them all (:meth:`WaiterHub.refresh`).
    """

    def __init__(self, backend: RedisBackend, health_check_interval: float) -> None:
        self._backend = backend
        self._hub = backend.hub
        self._interval = health_check_interval
        self._started = False
        self._closed = False
        self._queued: list[_Request] = []
        self._sent: deque[_Request] = deque()
        self._drop: set[str] = set()
        self._resync = False
        self._tokens = 0
        self._answered = 0
        self._wake = anyio.Event()
        self._answer = anyio.Event()
        #: Established connections so far (the first one included).
        self.connections = 0

    # ------------------------------------------------------------ called by waiters

    async def watch(self, ids: Sequence[str]) -> None:
        if self._closed:
            raise BackendError(f"{self._backend!r} is closed")
        if not self._started:
            self._started = True
            self._backend._spawn(self._run, name=f"{self._backend!r} pub/sub")
        request = _Request(ids)
        self._queued.append(request)
        self._wake.set()
        try:
            await request.done.wait()
        except BaseException:
            # The hub takes these ids as never watched; drop what was subscribed.
            self.unwatch(ids)
            raise
        if request.error is not None:
            raise request.error

    def unwatch(self, ids: Sequence[str]) -> None:
        if self._started:
            self._drop.update(ids)
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        for request in [*self._sent, *self._queued]:
            request.error = BackendError(f"{self._backend!r} was closed")
            request.done.set()
        self._sent.clear()
        self._queued.clear()

    # ------------------------------------------------------------ the task

    async def _run(self) -> None:
        failures = 0
        while True:
            if failures:
                delay = min(1.0, 0.05 * 2 ** (failures - 1))
                await anyio.sleep(random.uniform(delay / 2, delay))
            connection: Any = self._backend._pubsub_connection()  # connect() is untyped
            established = self.connections
            try:
                # Bounded: with no read timeout, a hung handshake would block for ever.
                with anyio.fail_after(_CONNECT_TIMEOUT):
                    await connection.connect()
                await self._session(connection)
            except Exception as exc:
                while isinstance(exc, ExceptionGroup):  # from the session's task group
                    exc = exc.exceptions[0]
                if isinstance(exc, (redis_errors.AuthenticationError, redis_errors.ResponseError)):
                    self._fail(BackendError(f"cannot subscribe on {self._backend!r}: {exc}"))
                if self.connections != established:
                    logger.warning("pub/sub of %r lost (%s); reconnecting", self._backend, exc)
                elif failures == 0:
                    logger.warning(
                        "pub/sub of %r cannot connect (%s); retrying", self._backend, exc
                    )
            finally:
                with anyio.CancelScope(shield=True):
                    await connection.disconnect(nowait=True)
            failures = 0 if self.connections != established else failures + 1

    def _fail(self, error: Exception) -> None:
        for request in [*self._sent, *self._queued]:
            request.error = error
            request.done.set()
        self._sent.clear()
        self._queued.clear()

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
            for start in range(0, len(ids), BATCH):
                channels = [self._backend.task_key(i) for i in ids[start : start + BATCH]]
                commands.extend(connection.pack_command(command, *channels))

        resync, self._resync = self._resync, False
        if resync:
            # A new connection: subscribe every watched id; that answers every request.
            requests = [*self._sent, *self._queued]
            self._sent.clear()
            ids = self._hub.watched_ids()
        else:
            batches("UNSUBSCRIBE", [i for i in self._drop if not self._hub.has_waiters(i)])
            requests = self._queued
            ids = list(
                dict.fromkeys(i for r in requests for i in r.ids if self._hub.has_waiters(i))
            )
        self._drop.clear()
        self._queued = []
        batches("SUBSCRIBE", ids)
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
            response = await connection.read_response()
            if isinstance(response, list) and response:
                kind = response[0]
                if kind == b"message" and len(response) == 3:
                    key = response[1].decode("utf-8", "replace")
                    if key.startswith(prefix):
                        task_id = key[len(prefix) :]
                        if self._hub.has_waiters(task_id):
                            item = self._backend.decode_meta(task_id, response[2])
                            self._hub.deliver(task_id, item)
                elif kind == b"pong" and len(response) == 2:
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
        if not reconnected:
            return
        logger.info(
            "pub/sub of %r is back; re-reading %d results",
            self._backend,
            len(self._hub.watched_ids()),
        )
        delay = 0.05
        while True:
            try:
                await self._hub.refresh()
                return
            except Exception as exc:
                logger.warning("re-reading results after a reconnect failed: %s", exc)
                await anyio.sleep(delay)
                delay = min(1.0, delay * 2)

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
