"""A small RESP2 client on asyncio's transport, parsed by hiredis.

:class:`Connection` is an :class:`asyncio.Protocol`. Commands are packed by
hiredis and buffered; everything asked for in one event-loop iteration leaves
in one ``transport.write`` (auto-pipelining), and replies are matched in order
to futures resolved right in ``data_received``. A pub/sub reader takes the
replies over instead (:attr:`Connection.receiver`) and handles each message
where it is parsed, with no task in between.

A watchdog per connection closes it when the oldest unanswered command is
older than the command timeout: every command waiting on it fails with
:class:`redis.exceptions.TimeoutError`. A lost connection fails them with
:class:`redis.exceptions.ConnectionError`. Errors are redis-py's, so one error
table serves this client and redis-py's. :func:`connect` opens, secures and
authenticates a connection (AUTH, SELECT, CLIENT SETNAME in one write).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio.connection import RedisSSLContext

__all__ = ["Connection", "Endpoint", "connect", "pack", "reply_error"]

pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
#: Seconds to open and set up a connection when nothing else is said.
CONNECT_TIMEOUT = 10.0
_SSL_KEYS = {
    "ssl_keyfile": "keyfile",
    "ssl_certfile": "certfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_include_verify_flags": "include_verify_flags",
    "ssl_exclude_verify_flags": "exclude_verify_flags",
    "ssl_ca_certs": "ca_certs",
    "ssl_ca_data": "ca_data",
    "ssl_ca_path": "ca_path",
    "ssl_check_hostname": "check_hostname",
    "ssl_min_version": "min_version",
    "ssl_ciphers": "ciphers",
    "ssl_password": "password",
}
#: redis-py connection settings this client understands (others need redis-py).
OPTIONS = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "client_name",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "connection_class",
        "ssl",
        "retry",
        *_SSL_KEYS,
    }
)


def reply_error(reply: hiredis.ReplyError) -> redis_errors.RedisError:
    """The redis-py exception for an error reply (NOSCRIPT, READONLY, MOVED...)."""
    error: redis_errors.RedisError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return error


@dataclass
class Endpoint:
    """Where a connection goes and how it introduces itself."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    keepalive: bool = False
    #: redis-py's ``credential_provider`` (an injected client may carry one).
    credentials: Any = None
    #: Finds the master's address first (Sentinel); None: ``host``/``port``.
    resolve: Callable[[], Awaitable[tuple[str, int]]] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Endpoint:
        """An endpoint from redis-py connection settings (as the URL parser makes them)."""
        from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

        connection_class = settings.get("connection_class")
        context = None
        host = str(settings.get("host") or "localhost")
        if settings.get("ssl") or (
            isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)
        ):
            options = {_SSL_KEYS[k]: v for k, v in settings.items() if k in _SSL_KEYS}
            options.setdefault("cert_reqs", "required")
            options.setdefault("check_hostname", options["cert_reqs"] == ssl.CERT_REQUIRED)
            context = RedisSSLContext(**options).get()
        path = settings.get("path")
        if connection_class is UnixDomainSocketConnection and not path:
            raise ValueError("a Unix socket connection needs a path")
        timeout = settings.get("socket_connect_timeout") or settings.get("socket_timeout")
        return cls(
            host=host,
            port=int(settings.get("port") or 6379),
            path=path,
            db=int(settings.get("db") or 0),
            username=settings.get("username"),
            password=settings.get("password"),
            client_name=settings.get("client_name"),
            ssl=context,
            server_hostname=host if context is not None and context.check_hostname else None,
            connect_timeout=float(timeout or CONNECT_TIMEOUT),
            keepalive=bool(settings.get("socket_keepalive")),
            credentials=settings.get("credential_provider"),
        )

    def describe(self) -> str:
        return self.path or f"{self.host}:{self.port}"


class Connection(asyncio.Protocol):
    """One RESP connection; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        # One entry per command sent: its future, or None for a reply nobody reads.
        self._pending: deque[asyncio.Future[Any] | None] = deque()
        self._out: list[bytes] = []
        self._flushing = False
        # The watchdog: (sent at, commands sent up to then) per write.
        self._sent = 0
        self._writes: deque[tuple[float, int]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        #: Set when the connection is gone; holds why.
        self.error: Exception | None = None
        #: Done (with the error as its exception) when the connection is lost.
        self.lost: asyncio.Future[None] = loop.create_future()
        #: Takes every reply instead of the futures (a pub/sub reader).
        self.receiver: Callable[[Any], None] | None = None
        self.where = "redis"

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            while (reply := reader.gets()) is not False:
                receiver = self.receiver
                if receiver is not None:
                    receiver(reply)
                    continue
                future = pending.popleft()
                if future is None or future.done():
                    continue
                if type(reply) is hiredis.ReplyError:
                    future.set_exception(reply_error(reply))
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.abort(redis_errors.ConnectionError(f"protocol error from {self.where}: {exc}"))
        except IndexError:
            self.abort(redis_errors.ConnectionError(f"unexpected reply from {self.where}"))
        except Exception as exc:  # a receiver's own error ends the connection
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            detail = f": {exc}" if exc else ""
            self.error = redis_errors.ConnectionError(f"connection to {self.where} lost{detail}")
        self._fail(self.error)

    # ------------------------------------------------------------ commands

    @property
    def closed(self) -> bool:
        return self.error is not None

    def request(self, packed: bytes) -> asyncio.Future[Any]:
        """Send one packed command (with this iteration's others); its reply's future."""
        if self.error is not None:
            raise self.error
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(future)
        self._out.append(packed)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)
        return future

    def request_many(self, packed: bytes, count: int) -> asyncio.Future[Any]:
        """Send ``count`` packed commands that stay together (MULTI ... EXEC);
        the future of the last reply (the others are dropped)."""
        if self.error is not None:
            raise self.error
        for _ in range(count - 1):
            self._pending.append(None)
        return self.request(packed)

    def write(self, data: bytes) -> None:
        """Write raw commands whose replies go to :attr:`receiver`."""
        if self.error is None and self._transport is not None:
            self._transport.write(data)

    def _flush(self) -> None:
        self._flushing = False
        out = self._out
        if not out or self._transport is None or self.error is not None:
            return
        self._out = []
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._timeout is not None:
            self._sent += len(out)
            self._writes.append((self._loop.time(), self._sent))
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(
                    self._loop.time() + self._timeout, self._check_timeout
                )

    def _check_timeout(self) -> None:
        self._watchdog = None
        assert self._timeout is not None
        answered = self._sent - len(self._pending)
        writes = self._writes
        while writes and writes[0][1] <= answered:
            writes.popleft()
        if not writes:
            return
        oldest = writes[0][0]
        if oldest + self._timeout <= self._loop.time():
            self.abort(
                redis_errors.TimeoutError(f"no reply from {self.where} within {self._timeout:g} s")
            )
            return
        self._watchdog = self._loop.call_at(oldest + self._timeout, self._check_timeout)

    def abort(self, error: Exception) -> None:
        """Close at once; everything waiting fails with ``error``."""
        if self.error is None:
            self.error = error
        if self._transport is not None:
            self._transport.abort()
        self._fail(self.error)

    def close(self, error: Exception | None = None) -> None:
        """Close; commands still waiting fail with ``error`` (a lost connection by default)."""
        self.abort(error or redis_errors.ConnectionError(f"connection to {self.where} closed"))

    def _fail(self, error: Exception) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._out = []
        pending, self._pending = self._pending, deque()
        for future in pending:
            if future is not None and not future.done():
                future.set_exception(_copy(error))
                future.exception()  # a caller cancelled meanwhile must not be logged
        if not self.lost.done():
            self.lost.set_exception(error)
            self.lost.exception()  # retrieved: nobody may be waiting for it


def _copy(error: Exception) -> Exception:
    """One exception object per caller: raised in many tasks, one would collect
    all their tracebacks."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy


async def connect(
    endpoint: Endpoint, *, timeout: float | None = None, where: str | None = None
) -> Connection:
    """Open a connection to ``endpoint`` and introduce the client (AUTH, SELECT,
    CLIENT SETNAME), within the endpoint's connect timeout.

    :param timeout: the command timeout of the connection's watchdog (None: none).
    :raises redis.exceptions.ConnectionError: it cannot be reached (or
        :class:`~redis.exceptions.AuthenticationError`, :class:`~redis.exceptions.TimeoutError`).
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(endpoint.connect_timeout):
            host, port = endpoint.host, endpoint.port
            if endpoint.resolve is not None:
                host, port = await endpoint.resolve()
            connection = Connection(loop, timeout)
            connection.where = where or (endpoint.path or f"{host}:{port}")
            if endpoint.path is not None:
                await loop.create_unix_connection(lambda: connection, endpoint.path)
            else:
                await loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=endpoint.ssl,
                    server_hostname=endpoint.server_hostname if endpoint.ssl else None,
                )
            try:
                await _introduce(connection, endpoint)
            except BaseException:
                connection.close()
                raise
    except TimeoutError as exc:
        raise redis_errors.TimeoutError(
            f"connecting to {where or endpoint.describe()} took over {endpoint.connect_timeout:g} s"
        ) from exc
    except (OSError, ssl.SSLError) as exc:
        raise redis_errors.ConnectionError(
            f"Error connecting to {where or endpoint.describe()}: {exc}"
        ) from exc
    if endpoint.keepalive and endpoint.path is None and connection._transport is not None:
        sock = connection._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return connection


async def _introduce(connection: Connection, endpoint: Endpoint) -> None:
    commands: list[Sequence[Any]] = []
    username, password = endpoint.username, endpoint.password
    if endpoint.credentials is not None:
        found = endpoint.credentials.get_credentials()
        if asyncio.iscoroutine(found):  # pragma: no cover - depends on the provider
            found = await found
        username, password = (None, found[0]) if len(found) == 1 else found
    if password is not None:
        commands.append(("AUTH", username, password) if username else ("AUTH", password))
    if endpoint.db:
        commands.append(("SELECT", endpoint.db))
    if endpoint.client_name:
        commands.append(("CLIENT", "SETNAME", endpoint.client_name))
    futures = [connection.request(pack(tuple(c))) for c in commands]
    failed: Exception | None = None
    for future in futures:  # every reply is taken before one is raised
        try:
            await future
        except redis_errors.ResponseError as exc:
            if failed is None:
                failed = exc
                if "auth" in str(exc).lower() or "password" in str(exc).lower():
                    failed = redis_errors.AuthenticationError(str(exc))
                    failed.__cause__ = exc
    if failed is not None:
        raise failed
