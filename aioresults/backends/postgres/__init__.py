"""PostgresBackend: results in PostgreSQL, in Celery's database tables, waits pushed by NOTIFY.

The tables are Celery 5.7's (``celery_taskmeta``, ``celery_tasksetmeta``), so a
Celery app configured with ``db+postgresql://`` reads what aioresults writes
and the reverse (with the JSON serializer on both sides). What Celery has no
column for lives in tables of aioresults' own beside them (``aioresults_meta``,
``aioresults_group``, ``aioresults_chord``...); see the documentation page.

Writes: concurrent writes of a process travel together (group commit), one
statement per batch: the "never overwrite SUCCESS" rule is the ``WHERE`` of its
``INSERT ... ON CONFLICT DO UPDATE``, so it holds against any writer, Celery's
included, with no read before the write. The same statement NOTIFYs each
written id.

Waits: one LISTEN connection per backend serves every waiter. With the NOTIFY
trigger on the table (installed where the role may), writes of Celery workers
wake waiters as soon as they commit; without it they are found by the hub's one
batched poller, and writes of aioresults still wake at once.

Chords count in ``aioresults_chord``: the chord's row is locked, then the part
is counted once (``UPDATE ... RETURNING count``), in one transaction.

URLs: ``postgresql://user:password@host:port/database?options``, also
``postgres://`` and Celery's ``db+postgresql://`` (with any ``+driver`` suffix,
ignored). Query options are the backend's own (``pool_size``, ``retries``,
``command_timeout``, ``notify_trigger``, ``listen_url``, ``expires``...) or
asyncpg's (``sslmode``, ``application_name``, any server setting...).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode, urlunsplit

import anyio

from ..._exceptions import (
    BackendError,
    BackendUnavailable,
    MissingDependency,
    StoreNotFound,
)
from .._chords import PartCount
from .._feeds import Feed
from .._sql import URL_OPTIONS, SQLBackend, Write, boolean, parse_url, take_options
from .._support import ErrorRule, ErrorTable, expires_at

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        f"the postgresql:// backend needs asyncpg ({exc}): pip install 'aioresults[postgres]'"
    ) from exc

from . import _schema
from ._listen import APPLICATION_NAME, ListenFeed, keep_alive
from ._statements import Statements

__all__ = ["PostgresBackend"]

logger = logging.getLogger("aioresults.backends")

_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    **URL_OPTIONS,
    "notify_trigger": boolean,
    "listen_url": str,
}
# Errors after which the operation is tried again: the connection is gone, the
# server restarts, or the transaction lost a race it may win next time.
_TRANSIENT = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    OSError,
    TimeoutError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Hand a connection back to the pool as it is. asyncpg's default resets
    every connection on release (``RESET ALL``, ``UNLISTEN *``...): one more
    round trip per operation, for session state this backend never sets
    (it LISTENs on a connection of its own, its locks end with their
    transactions). An open transaction is still rolled back by asyncpg."""


def _closed(exc: BaseException) -> bool:
    return "closed" in str(exc) or "terminat" in str(exc)


class PostgresBackend(SQLBackend):
    """Results in PostgreSQL; see the module docstring.

    :param location: a ``postgresql://`` URL (or ``postgres://``, ``db+postgresql://``).
    :param listen_url: where the LISTEN connection goes, if not to ``location``:
        PostgreSQL itself when ``location`` is a PgBouncer in transaction mode.
    :param notify_trigger: install the NOTIFY trigger on ``celery_taskmeta``
        when it is missing and the role may (see the documentation).
    :param connect_options: keyword arguments for asyncpg's connections (``ssl``,
        ``statement_cache_size=0`` behind PgBouncer, ``server_settings``...).
    :param options: the options of :class:`~aioresults.backends._sql.SQLBackend`
        (``pool_size``, ``table_names``, ``table_schemas``, ``retries``,
        ``command_timeout``) and of :class:`~aioresults.BaseBackend`.

    ``stats`` counts ``commits`` (write transactions) and ``writes`` (records written).
    """

    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres", "db+postgresql")
    quote_char: ClassVar[str] = '"'
    identifier_limit: ClassVar[int] = 63

    def __init__(
        self,
        location: str,
        *,
        listen_url: str | None = None,
        notify_trigger: bool = True,
        connect_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        _, parts, query = parse_url(location, ("postgresql",))
        take_options(query, _URL_OPTIONS, options)
        listen_url = listen_url or options.pop("listen_url", None)
        notify_trigger = bool(options.pop("notify_trigger", notify_trigger))
        options.setdefault("url", location)
        super().__init__(**options)
        #: The LISTEN feed (its poller beside it when no trigger can be made).
        self._listen = ListenFeed(self)
        self._dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(query), ""))
        self._listen_dsn = self._dsn
        if listen_url is not None:
            _, listen, listen_query = parse_url(listen_url, ("postgresql",))
            self._listen_dsn = urlunsplit(
                ("postgresql", listen.netloc, listen.path, urlencode(listen_query), "")
            )
        self.notify_trigger = notify_trigger
        self._connect_options = dict(connect_options or {})
        self._pool: asyncpg.Pool | None = None
        # Batches are written one at a time, on a connection of their own: a
        # pool's acquire and release cost more than a small batch's statement.
        self._writer: asyncpg.Connection | None = None
        self._writing = anyio.Lock(fast_acquire=True)
        self._sql: Statements | None = None
        self._channel = ""
        self._commits = 0
        self._written = 0
        self._errors = ErrorTable(
            [
                ErrorRule(
                    (
                        asyncpg.InvalidCatalogNameError,
                        asyncpg.InvalidSchemaNameError,
                        asyncpg.UndefinedTableError,
                    ),
                    StoreNotFound,
                    "not found on",
                ),
                ErrorRule(
                    (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError),
                    BackendError,
                    "authentication failed on",
                ),
                ErrorRule(asyncpg.InsufficientPrivilegeError, BackendError, "permission denied on"),
                ErrorRule(_TRANSIENT, BackendUnavailable, "cannot reach"),
                ErrorRule(
                    asyncpg.InterfaceError, BackendUnavailable, "lost the connection to", _closed
                ),
                ErrorRule(asyncpg.PostgresError, BackendError, "failed on"),
                ErrorRule(asyncpg.InterfaceError, BackendError, "failed on"),
            ],
            lambda: repr(self),
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresBackend:
        """A backend for ``url`` (see the module docstring for its forms and options)."""
        return cls(url, **options)

    @property
    def stats(self) -> dict[str, int]:
        """``commits`` (write transactions) and ``writes`` (records written) so far."""
        return {"commits": self._commits, "writes": self._written}

    # ------------------------------------------------------------ lifecycle

    def _connect_kwargs(self, dsn: str, application_name: str, **settings: str) -> dict[str, Any]:
        """asyncpg's keyword arguments: ``connect_options`` over ``settings``, and
        a name for the connections in ``pg_stat_activity`` unless the URL gives one."""
        options = dict(self._connect_options)
        if "application_name=" not in dsn:
            settings["application_name"] = application_name
        options["server_settings"] = {**settings, **options.get("server_settings", {})}
        return options

    def _session(self) -> dict[str, Any]:
        """asyncpg's arguments for the connections of reads and writes."""
        return {
            "command_timeout": self.command_timeout,
            # Making a connection (the handshake included): a server that
            # takes connections but stops answering must not hold a caller.
            "timeout": self.command_timeout or 60.0,
            # PostgreSQL would plan the batch write anew at each run (its
            # parameters are arrays): planning costs more than running it.
            **self._connect_kwargs(self._dsn, "aioresults", plan_cache_mode="force_generic_plan"),
        }

    async def _open(self) -> None:
        try:
            with self._errors.translating("connecting"):
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self.pool_size,
                    reset=_keep_session,
                    **self._session(),
                )
                async with self._connection(self._pool) as conn:
                    layout = await _schema.prepare(
                        conn, self.names, create=self.create, trigger=self.notify_trigger
                    )
        except BaseException:
            await self._close()
            raise
        self._sql = Statements(self.names, layout)
        self._channel = layout.channel
        if not layout.trigger:
            self._listen.poll_too = True  # writes of others are polled for (see _listen)

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.terminate()  # batches are done or failed by now
        pool, self._pool = self._pool, None
        if pool is None:
            return
        closed = False
        try:
            with anyio.move_on_after(5):
                await pool.close()
                closed = True
        except Exception as exc:  # closing must not mask the caller's error
            logger.warning("closing %r failed: %s", self, exc)
        finally:
            if not closed:  # timed out, failed or cancelled: what is in use goes at once
                pool.terminate()

    def _feed(self) -> Feed:
        return self._listen

    async def _listen_connection(self) -> asyncpg.Connection:
        """A new connection for the LISTEN feed (it reconnects as the hub says)."""
        with self._errors.translating("connecting the LISTEN connection"):
            conn: asyncpg.Connection = await asyncpg.connect(
                self._listen_dsn,
                timeout=self.command_timeout or 60,
                # LISTEN and the trigger query: a frozen server must not hold a session.
                command_timeout=self.command_timeout,
                **self._connect_kwargs(self._listen_dsn, APPLICATION_NAME),
            )
        keep_alive(conn)
        return conn

    async def _has_trigger(self, conn: asyncpg.Connection) -> bool:
        return await _schema.has_trigger(conn, self.names)

    def _live(self) -> tuple[asyncpg.Pool, Statements]:
        if self._pool is None or self._sql is None:
            raise BackendUnavailable(f"{self!r} is not open")
        return self._pool, self._sql

    @contextlib.asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A connection of ``pool``, waited for no longer than ``command_timeout``
        (as its reset on release): ``pool.fetch()`` and the like wait for a free
        one for ever, so callers queued behind those held by a server that
        stopped answering would outlive every timeout of their own.

        asyncio's timeout, not asyncpg's ``acquire(timeout=)``, which runs
        ``asyncio.wait_for``: a task more per operation.
        """
        async with asyncio.timeout(self.command_timeout):
            conn: asyncpg.Connection = await pool.acquire()
        try:
            yield conn
        finally:
            await pool.release(conn, timeout=self.command_timeout)

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """``query``'s rows, on a connection of the pool (see :meth:`_connection`)."""
        pool, _ = self._live()
        async with self._connection(pool) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    def _transient(self, exc: BaseException) -> bool:
        return isinstance(exc, _TRANSIENT) or (
            isinstance(exc, asyncpg.InterfaceError) and _closed(exc)
        )

    # ------------------------------------------------------------ records

    async def _select_rows(self, task_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        _, sql = self._live()
        return [tuple(row) for row in await self._fetch(sql.read, task_ids)]

    async def _store_rows(self, writes: Sequence[Write]) -> Collection[str]:
        _, sql = self._live()
        columns = list(zip(*[(*w.values, *w.side) for w in writes], strict=True))
        async with self._writing:
            writer = self._writer
            if writer is None or writer.is_closed():
                writer = self._writer = await asyncpg.connect(self._dsn, **self._session())
            now = time.time()
            rows = await writer.fetch(sql.store, *columns, now, self._cutoff(now), self._channel)
        self._commits += 1
        self._written += len(rows)
        return {row[0] for row in rows}

    async def _forget(self, task_id: str) -> None:
        _, sql = self._live()
        await self._attempt("forgetting a result", lambda: self._fetch(sql.forget, task_id))

    # ------------------------------------------------------------ groups

    async def _store_group(
        self, group_id: str, payload: bytes, date_done: dt.datetime, deadline: float | None
    ) -> None:
        _, sql = self._live()
        await self._fetch(sql.store_group, group_id, payload, date_done, deadline)

    async def _select_group(self, group_id: str) -> tuple[Any, ...] | None:
        _, sql = self._live()
        rows = await self._fetch(sql.read_group, group_id)
        return tuple(rows[0]) if rows else None

    async def _delete_group(self, group_id: str) -> None:
        _, sql = self._live()
        await self._attempt("deleting a group", lambda: self._fetch(sql.delete_group, group_id))

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        pool, sql = self._live()
        deadline = expires_at(self.chord_expires)

        async def start() -> None:
            async with self._connection(pool) as conn, conn.transaction():
                await conn.execute(sql.chord_start, group_id, size, deadline)
                await conn.execute(sql.chord_forget_parts, group_id)

        await self._attempt("starting a chord", start)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        pool, sql = self._live()

        async def count() -> PartCount | None:
            async with self._connection(pool) as conn, conn.transaction():
                chord = await conn.fetchrow(sql.chord_lock, group_id)
                if chord is None or (chord[1] is not None and chord[1] <= time.time()):
                    return None
                size = int(chord[0])
                new, old, stored = await conn.fetchrow(
                    sql.chord_count, group_id, part_id, receipt, payload
                )
            if new is not None:
                return PartCount(new, size, True)
            if old is not None:
                return PartCount(old, size, stored == receipt)
            return PartCount(size + 1, size, False)

        # A retry after a lost reply finds its own part by the receipt.
        return await self._attempt("counting a chord part", count)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        _, sql = self._live()
        rows = await self._attempt(
            "reading a chord", lambda: self._fetch(sql.chord_parts, group_id)
        )
        return [bytes(row[0]) for row in rows]

    # ------------------------------------------------------------ housekeeping

    async def _delete_expired(self, now: float, cutoff: dt.datetime | None) -> int:
        pool, sql = self._live()
        deleted = 0
        async with self._connection(pool) as conn, conn.transaction():
            for statement, takes_now, takes_cutoff in sql.cleanup_counted:
                args = [now] if takes_now else [cutoff] if takes_cutoff else []
                status = await conn.execute(statement, *args)
                deleted += int(status.rsplit(" ", 1)[-1])
            for statement, takes_now in sql.cleanup_bookkeeping:
                await conn.execute(statement, *([now] if takes_now else []))
        return deleted
