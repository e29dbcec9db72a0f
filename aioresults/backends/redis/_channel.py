"""One multiplexed command connection per backend, reconnected when lost.

Every coroutine's commands share one :class:`~._resp.Connection`: what is
asked for in one event-loop iteration leaves in one write, and each caller gets
its own reply or error. When the connection is lost, the commands in flight
fail with a connection error and each caller retries its own, after a pause of
:class:`~aioresults.backends._support.Backoff`, up to ``retries`` times on a
new connection (opened once for all of them). Every command sent here is
idempotent: reads, the guarded write script (it recognises its own payload),
the chord script (receipts), DEL, SET with PUBLISH (a repeated message is
deduplicated by the hub). A command that timed out is not retried: the
server is silent, and the caller hears so at once.

Scripts are sent as EVALSHA; a server that does not know one (NOSCRIPT, after
a restart) gets EVAL, which loads it. A master that became a replica (READONLY,
after a Sentinel failover) closes the connection, so the next one finds the
new master.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as redis_errors

from ..._exceptions import BackendClosed
from .._support import Backoff
from ._resp import Connection, Endpoint, connect, pack

__all__ = ["Channel", "Script"]


class Script:
    """A Lua script known by its SHA1; packed as EVALSHA, EVAL when unknown."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class Channel:
    """The reconnecting, auto-pipelined command connection; see the module docstring."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        retries: int,
        timeout: float | None,
        where: str,
    ) -> None:
        self.endpoint = endpoint
        self.retries = retries
        self.timeout = timeout
        self.where = where
        self._connection: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._closed: Exception | None = None
        #: Scripts loaded on every new connection.
        self.scripts: list[Script] = []

    # ------------------------------------------------------------ the connection

    async def _connect(self) -> Connection:
        """The open connection, or a new one (one attempt shared by every caller)."""
        if self._closed is not None:
            raise _closed_copy(self._closed)
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._open())
            connecting.add_done_callback(self._opened)
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The connect was cancelled by close(), not this caller: say so.
            task = asyncio.current_task()
            if self._closed is not None and (task is None or not task.cancelling()):
                raise _closed_copy(self._closed) from None
            raise

    async def _open(self) -> Connection:
        connection = await connect(self.endpoint, timeout=self.timeout, where=self.where)
        if self.scripts:
            # Loaded with the connection, so the first EVALSHAs of a burst do not
            # all come back NOSCRIPT (a server that refuses leaves EVAL to do it).
            loads = [connection.request(pack(("SCRIPT", "LOAD", s.source))) for s in self.scripts]
            failed: Exception | None = None
            for load in loads:  # every reply is taken before one is raised
                try:
                    await load
                except redis_errors.AuthenticationError as exc:  # AUTH was needed
                    failed = failed or exc
                except redis_errors.ResponseError:
                    pass
                except BaseException:
                    connection.close()
                    raise
            if failed is not None:
                connection.close()
                raise failed
        return connection

    def _opened(self, connecting: asyncio.Future[Connection]) -> None:
        self._connecting = None
        if connecting.cancelled():
            return
        error = connecting.exception()
        if error is None:
            connection = connecting.result()
            if self._closed is not None:
                connection.close(self._closed)
            else:
                self._connection = connection

    def connection(self) -> Connection | None:
        """The open connection, if there is one."""
        connection = self._connection
        return connection if connection is not None and connection.error is None else None

    def close(self, error: Exception) -> None:
        """Close for good: commands in flight and later ones fail with ``error``."""
        self._closed = error
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.close(error)
            self._connection = None

    # ------------------------------------------------------------ commands

    async def call(self, *args: Any) -> Any:
        """Run one command; its reply."""
        return await self.send(pack(args))

    async def send(self, packed: bytes, count: int = 1) -> Any:
        """Send ``count`` packed commands as one unit (MULTI ... EXEC); the last
        one's reply."""
        connection = self._connection
        if connection is not None and connection.error is None:
            try:
                if count == 1:
                    return await connection.request(packed)
                return await connection.request_many(packed, count)
            except redis_errors.ReadOnlyError as exc:
                failed: Exception = self._demoted(connection, exc)
            except redis_errors.ConnectionError as exc:
                failed = exc
            return await self._retry(lambda c: _one(c, packed, count), failed)
        return await self._retry(lambda c: _one(c, packed, count), None)

    async def send_all(self, commands: Sequence[bytes]) -> list[Any]:
        """Send packed commands in one write; their replies, in order (an error
        reply is raised once every reply has come)."""
        replies: list[Any] = await self._retry(lambda c: _all(c, commands), None)
        return replies

    async def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a Lua script: EVALSHA, then EVAL if the server does not know it."""
        try:
            return await self.send(pack(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except redis_errors.NoScriptError:
            return await self.send(pack(("EVAL", script.source, len(keys), *keys, *args)))

    async def _retry(
        self, attempt: Callable[[Connection], Awaitable[Any]], failed: Exception | None
    ) -> Any:
        """Run ``attempt`` on the connection, reconnecting and retrying after a
        connection error (not after a timeout) up to ``retries`` times."""
        backoff = Backoff(0.05, 1.0)
        while True:
            if failed is not None:
                if self._closed is not None:
                    raise _closed_copy(self._closed) from None
                if (
                    isinstance(failed, redis_errors.AuthenticationError)
                    or backoff.attempts >= self.retries
                ):
                    raise failed
                await backoff.sleep()
            connection = self.connection() or await self._connect()
            try:
                return await attempt(connection)
            except redis_errors.ReadOnlyError as exc:
                failed = self._demoted(connection, exc)
            except redis_errors.ConnectionError as exc:
                failed = exc

    def _demoted(self, connection: Connection, error: Exception) -> Exception:
        """The server became a replica (a failover): drop the connection, so the
        next one goes to the master, and retry there."""
        lost = redis_errors.ConnectionError(f"{self.where} is a replica now: {error}")
        connection.abort(lost)
        return lost


async def _one(connection: Connection, packed: bytes, count: int) -> Any:
    if count == 1:
        return await connection.request(packed)
    return await connection.request_many(packed, count)


async def _all(connection: Connection, commands: Sequence[bytes]) -> list[Any]:
    futures = [connection.request(c) for c in commands]
    # All leave in one write: this waits about as long as for the last one.
    out = []
    error: Exception | None = None
    for future in futures:
        try:
            out.append(await future)
        except Exception as exc:  # every reply is taken before one is raised
            error = error or exc
    if error is not None:
        raise error
    return out


def _closed_copy(error: Exception) -> Exception:
    if isinstance(error, BackendClosed):
        return BackendClosed(*error.args)
    return error
