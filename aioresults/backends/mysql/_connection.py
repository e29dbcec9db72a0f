"""The MySQL backend's connections: their options, TLS, errors worth a retry, requests.

A request is one text of one or more statements (the connections allow
several), sent with its arguments escaped by asyncmy; its results are all read
before the connection goes back to the pool. A connection that failed or was
cancelled mid-request is closed, never handed out again half-read or in a
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from asyncmy import errors as mysql_errors
from asyncmy.constants import CLIENT

from ..._exceptions import ConfigurationError
from .._sql import Write, boolean

__all__ = ["Result", "chunks", "connection_options", "is_code", "request", "tls_context"]

#: Bytes of values sent in one request at most (the server's max_allowed_packet
#: is 16 MiB by default, 64 MiB on MySQL 8; escaping may double a value).
PACKET_BUDGET = 4 * 1024 * 1024
# Server errors after which an operation is tried again: connections refused,
# lost or killed, a server going down, a deadlock or lock wait lost.
_TRANSIENT_CODES = frozenset({1040, 1053, 1205, 1213, 1927, 2003, 2006, 2013, 2055, 4031})
_OPTIONS = (
    "unix_socket",
    "connect_timeout",
    "charset",
    "ssl_ca",
    "ssl_cert",
    "ssl_key",
    "ssl_check_hostname",
)

#: Per statement of a request: (rows affected, LAST_INSERT_ID, rows).
Result = tuple[int, int, list[tuple[Any, ...]]]


def connection_options(
    host: str | None, port: int | None, database: str | None, query: dict[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """asyncmy's keyword arguments from a URL's parts and query, and its ``ssl_*`` options.

    :raises ConfigurationError: an unknown option, or a charset but utf8mb4.
    """
    unknown = set(query) - set(_OPTIONS)
    if unknown:
        raise ConfigurationError(f"unknown option(s) in the URL: {', '.join(sorted(unknown))}")
    if query.get("charset", "utf8mb4").lower() != "utf8mb4":
        raise ConfigurationError("the MySQL backend talks utf8mb4 (charset=utf8mb4)")
    connect: dict[str, Any] = {
        "host": host or "localhost",
        "port": port or 3306,
        "database": database,
        "charset": "utf8mb4",
        "autocommit": True,  # each read sees the latest commits; transactions are explicit
        "client_flag": CLIENT.MULTI_STATEMENTS,
        "binary_prefix": True,  # payloads are bytes, never text in the connection's charset
        # Strict: a value a column cannot hold is an error, never cut short silently.
        "init_command": "SET SESSION sql_mode = CONCAT_WS(',', @@SESSION.sql_mode, "
        "'STRICT_ALL_TABLES')",
    }
    if "unix_socket" in query:
        connect["unix_socket"] = query["unix_socket"]
    try:
        if "connect_timeout" in query:
            connect["connect_timeout"] = int(float(query["connect_timeout"]))
        if "ssl_check_hostname" in query:
            boolean(query["ssl_check_hostname"])
    except ValueError:
        raise ConfigurationError(
            "connect_timeout must be a number of seconds, ssl_check_hostname true or false"
        ) from None
    return connect, {key: value for key, value in query.items() if key.startswith("ssl_")}


def tls_context(tls: dict[str, str], owner: object) -> ssl.SSLContext | None:
    """The TLS context the ``ssl_*`` options describe, made when opening (making
    a backend touches no file).

    :raises ConfigurationError: a file cannot be used.
    """
    if not tls:
        return None
    try:
        context = ssl.create_default_context(cafile=tls.get("ssl_ca"))
        if "ssl_cert" in tls:
            context.load_cert_chain(tls["ssl_cert"], tls.get("ssl_key"))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot use the TLS files of {owner!r}: {exc}") from exc
    if "ssl_check_hostname" in tls:
        context.check_hostname = boolean(tls["ssl_check_hostname"])
    return context


def code(exc: BaseException) -> int | None:
    """A server error's number."""
    number = exc.args[0] if exc.args else None
    return number if isinstance(number, int) else None


def is_code(*codes: int) -> Any:
    """A predicate for :class:`~aioresults.backends._support.ErrorRule`."""
    return lambda exc: code(exc) in codes


def transient(exc: BaseException) -> bool:
    """Whether an operation that raised ``exc`` is worth another attempt."""
    if isinstance(exc, (OSError, TimeoutError, EOFError, mysql_errors.InterfaceError)):
        return True  # the connection is gone (InterfaceError: it was closed)
    return isinstance(exc, mysql_errors.Error) and code(exc) in _TRANSIENT_CODES


def _size(write: Write) -> int:
    return sum(len(v) for v in write.values if isinstance(v, (bytes, str))) + 256


def chunks(writes: Sequence[Write]) -> Iterator[Sequence[Write]]:
    """Runs of writes whose values fit one request."""
    start, size = 0, 0
    for end, write in enumerate(writes):
        size += _size(write)
        if size > PACKET_BUDGET and end > start:
            yield writes[start:end]
            start, size = end, _size(write)
    yield writes[start:]


class _Deadline:
    """``asyncio.timeout`` that does not take no for an answer: once ``delay``
    has passed, the task is cancelled, and again every 0.1 s until the block
    ends. Leaving the block then raises :class:`TimeoutError`.

    asyncmy 0.2.18 makes a connection with Python 3.11's ``asyncio.wait_for``,
    which swallows a cancellation that lands as the TCP connection completes;
    the handshake after it waits with no timeout of its own, so one
    cancellation may not end the wait for a server that stopped answering.
    """

    __slots__ = ("_before", "_delay", "_fired", "_handle", "_task")

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._fired = 0
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task, self._before = task, task.cancelling()
        if self._delay is not None:
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._fire)

    def _fire(self) -> None:
        self._fired += 1
        self._task.cancel()
        self._handle = asyncio.get_running_loop().call_later(0.1, self._fire)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
        for _fired in range(self._fired):
            self._task.uncancel()
        if self._fired and self._task.cancelling() <= self._before:  # nobody else cancelled
            raise TimeoutError


@contextlib.asynccontextmanager
async def connection(pool: Any, timeout: float | None = None) -> AsyncIterator[Any]:
    """A connection of ``pool``, taken (or made) within ``timeout`` seconds, and
    closed if it fails or is cancelled mid-way.

    asyncmy's own ``connect_timeout`` covers the TCP connection, not the
    handshake after it: a server that takes connections but stops answering
    would hold the caller for ever.
    """
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0
    async with _Deadline(timeout):
        conn = await pool.acquire()
        if task is not None and task.cancelling() > cancels:
            # asyncmy 0.2.18's pool can swallow a cancellation that lands while
            # it hands a connection over: deliver it (a cancelled poller would
            # otherwise poll on after its backend closed; past the deadline it
            # becomes TimeoutError).
            conn.close()
            pool.release(conn)
            raise asyncio.CancelledError
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    finally:
        pool.release(conn)


async def request(
    conn: Any, sql: str, args: Sequence[Any] | None, timeout: float | None
) -> list[Result]:
    """Send ``sql`` (one or more statements) and read every result, within
    ``timeout`` seconds.

    The timeout is ours, not asyncmy's ``read_timeout``: that one rests on
    Python 3.11's ``asyncio.wait_for``, which can swallow a cancellation.
    asyncmy runs on asyncio only, so asyncio's own timeout serves (a timer,
    no cancel scope: a fraction of anyio's cost on every request).
    """
    async with asyncio.timeout(timeout):
        cursor = conn.cursor()
        await cursor.execute(sql, args)
        results: list[Result] = []
        while True:
            rows = list(await cursor.fetchall()) if cursor.description else []
            results.append((cursor.rowcount, cursor.lastrowid, rows))
            if not await cursor.nextset():
                return results
