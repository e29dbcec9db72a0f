"""MySQLBackend: results in MySQL or MariaDB, in Celery's database tables, waits polled.

The tables are Celery 5.7's (``celery_taskmeta``, ``celery_tasksetmeta``), so a
Celery app configured with ``db+mysql://`` reads what aioresults writes and the
reverse (with the JSON serializer on both sides). What Celery has no column for
lives in tables of aioresults' own beside them; MariaDB's sequences, MySQL's
``AUTO_INCREMENT`` and the 64 KiB ``BLOB`` are handled (see the documentation
page).

Writes: concurrent writes of a process travel together (group commit), one
transaction per batch in two round trips: the "never overwrite SUCCESS" rule is
in the upsert itself, with no read before the write.

Waits: MySQL tells nobody about a write (its only change stream is binlog
replication), so the hub's one poller reads every watched id of the backend
in one ``SELECT ... WHERE task_id IN (...)`` per round, from ``poll_interval``
(0.05 s) backing off to ``max_poll_interval`` (1 s) while nothing changes; a
change or a new waiter brings it back to ``poll_interval``. A result stored by
another process is seen within the current pause; one stored by a backend of
this process on the same store wakes its waiters at once.

Chords count in ``aioresults_chord``: the chord's row is locked, then the part
is counted once (``count = LAST_INSERT_ID(count + 1)``), in one transaction.

URLs: ``mysql://user:password@host:port/database?options``, also ``mariadb://``
and Celery's ``db+mysql://`` / ``db+mariadb://`` (with any ``+driver`` suffix,
ignored). Query options are the backend's own (``pool_size``, ``retries``,
``command_timeout``, ``expires``...) or the connection's (``unix_socket``,
``connect_timeout``, ``charset`` (utf8mb4 only), ``ssl_ca``, ``ssl_cert``,
``ssl_key``, ``ssl_check_hostname``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import unquote

import anyio

from ..._exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    InvalidTaskId,
    MissingDependency,
    StoreNotFound,
)
from .._chords import PartCount
from .._sql import URL_OPTIONS, SQLBackend, Write, parse_url, take_options
from .._support import ErrorRule, ErrorTable, expires_at

try:
    import asyncmy
    from asyncmy import errors as mysql_errors
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        f"the mysql:// backend needs asyncmy ({exc}): pip install 'aioresults[mysql]'"
    ) from exc

from . import _schema
from ._connection import (
    Result,
    chunks,
    connection,
    connection_options,
    is_code,
    request,
    tls_context,
    transient,
)
from ._statements import Statements

__all__ = ["MySQLBackend"]

logger = logging.getLogger("aioresults.backends")

#: Ids per SELECT ... IN (...): one statement per poll for 10,000 waiters.
CHUNK = 10_000


class MySQLBackend(SQLBackend):
    """Results in MySQL or MariaDB; see the module docstring.

    :param location: a ``mysql://`` URL (or ``mariadb://``, ``db+mysql://``, ``db+mariadb://``).
    :param connect_options: keyword arguments for asyncmy's connections (``ssl``,
        ``init_command``...).
    :param options: the options of :class:`~aioresults.backends._sql.SQLBackend`
        (``pool_size``, ``table_names``, ``table_schemas``, ``retries``,
        ``command_timeout``) and of :class:`~aioresults.BaseBackend`.

    ``stats`` counts ``commits`` (write transactions) and ``writes`` (records written).
    """

    schemes: ClassVar[tuple[str, ...]] = ("mysql", "mariadb", "db+mysql", "db+mariadb")
    local_wake: ClassVar[bool] = True
    quote_char: ClassVar[str] = "`"
    identifier_limit: ClassVar[int] = 64

    def __init__(
        self,
        location: str,
        *,
        connect_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        _, parts, query = parse_url(location, ("mysql", "mariadb"))
        take_options(query, URL_OPTIONS, options)
        options.setdefault("url", location)
        super().__init__(**options)
        self.database = unquote(parts.path.lstrip("/")) or None
        if self.database is None and self.names.schema is None:
            raise ConfigurationError(
                f"name the database in the URL: mysql://host/<database> ({location!r})"
            )
        self._connect, self._tls = connection_options(
            parts.hostname, parts.port, self.database, query
        )
        if parts.username:
            self._connect["user"] = unquote(parts.username)
        if parts.password is not None:
            self._connect["password"] = unquote(parts.password)
        self._connect.update(connect_options or {})
        self._key = (
            "mysql",
            self._connect.get("unix_socket") or (self._connect["host"], self._connect["port"]),
            self.names.schema or self.database,
            self.names.task_name,
        )
        self._pool: Any = None
        self._sql: Statements | None = None
        self._whole_seconds = True
        self._commits = 0
        self._written = 0
        self._errors = ErrorTable(
            [
                ErrorRule(mysql_errors.Error, StoreNotFound, "not found on", is_code(1049, 1146)),
                ErrorRule(
                    mysql_errors.Error,
                    BackendError,
                    "authentication failed on",
                    is_code(1044, 1045),
                ),
                ErrorRule(
                    mysql_errors.Error, BackendError, "permission denied on", is_code(1142, 1227)
                ),
                ErrorRule(
                    (mysql_errors.Error, OSError, TimeoutError, EOFError),
                    BackendUnavailable,
                    "cannot reach",
                    transient,
                ),
                ErrorRule(mysql_errors.Error, BackendError, "failed on"),
            ],
            lambda: repr(self),
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MySQLBackend:
        """A backend for ``url`` (see the module docstring for its forms and options)."""
        return cls(url, **options)

    @property
    def stats(self) -> dict[str, int]:
        """``commits`` (write transactions) and ``writes`` (records written) so far."""
        return {"commits": self._commits, "writes": self._written}

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        try:
            with self._errors.translating("connecting"):
                options = dict(self._connect)
                tls = tls_context(self._tls, self)
                if tls is not None:
                    options.setdefault("ssl", tls)  # connect_options' own ssl wins
                self._pool = await asyncmy.create_pool(minsize=1, maxsize=self.pool_size, **options)
                async with self._connection() as conn:
                    version = (await self._run(conn, "SELECT VERSION()"))[-1][2][0][0]

                    async def run(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
                        return (await self._run(conn, sql, args))[-1][2]

                    layout = await _schema.prepare(
                        run, self.names, create=self.create, mariadb="mariadb" in version.lower()
                    )
        except BaseException:
            await self._close()
            raise
        self._sql = Statements(self.names, layout)
        self._limits = layout.limits
        self._whole_seconds = layout.whole_seconds

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        closed = False
        try:
            with anyio.move_on_after(5):
                await pool.wait_closed()
                closed = True
        finally:
            if not closed:  # timed out or cancelled: what is in use goes at once
                pool.terminate()

    def _store_key(self) -> object:
        return self._key

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        checked = super()._check_id(task_id, what)
        if checked.endswith(" "):
            # MySQL compares strings as if padded with spaces: "a " is "a".
            raise InvalidTaskId(f"{what} {checked!r} ends with a space, which MySQL ignores")
        return checked

    def _transient(self, exc: BaseException) -> bool:
        return transient(exc)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A connection of the pool (see :func:`._connection.connection`)."""
        if self._pool is None:
            raise BackendUnavailable(f"{self!r} is not open")
        async with connection(self._pool, self.command_timeout) as conn:
            yield conn

    async def _run(self, conn: Any, sql: str, args: Sequence[Any] | None = None) -> list[Result]:
        """Send a request on ``conn`` (see :func:`._connection.request`)."""
        return await request(conn, sql, args, self.command_timeout)

    async def _one(self, doing: str, sql: str, args: Sequence[Any]) -> list[Any]:
        """Run ``sql`` on a connection of its own (retried as ``_attempt`` says)."""

        async def run() -> list[Any]:
            async with self._connection() as conn:
                return await self._run(conn, sql, args)

        return await self._attempt(doing, run)

    def _live(self) -> Statements:
        if self._sql is None:
            raise BackendUnavailable(f"{self!r} is not open")
        return self._sql

    # ------------------------------------------------------------ records

    def _adapt(self, write: Write) -> None:
        super()._adapt(write)
        if self._whole_seconds and write.date_done is not None:
            # The column keeps whole seconds (MySQL rounds, MariaDB truncates):
            # send what it will hold, so a record can be compared with its row.
            write.date_done = write.values[3] = write.date_done.replace(microsecond=0)

    async def _select_rows(self, task_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        sql = self._live()
        rows: list[tuple[Any, ...]] = []
        async with self._connection() as conn:
            for start in range(0, len(task_ids), CHUNK):
                chunk = task_ids[start : start + CHUNK]
                rows += (await self._run(conn, sql.read(len(chunk)), chunk))[-1][2]
        return [tuple(row) for row in rows]

    async def _store_rows(self, writes: Sequence[Write]) -> Collection[str]:
        sql = self._live()
        now = time.time()
        requests = [
            (sql.upsert(len(chunk)), [v for w in chunk for v in (w.task_id, *w.values)])
            for chunk in chunks(writes)
        ]
        first, args = requests[0]
        requests[0] = (f"{sql.begin}; {first}", [now, self._cutoff(now), *args])
        last, args = requests[-1]
        ids = [w.task_id for w in writes]
        requests[-1] = (f"{last}; {sql.stored(len(ids))}", [*args, *ids])
        async with self._connection() as conn:
            for text, args in requests:
                results = await self._run(conn, text, args)
            held = {row[0]: row[1:] for row in results[-1][2]}
            stored = {
                w.task_id
                for w in writes
                if held.get(w.task_id)
                == (w.status, hashlib.sha1(w.result).hexdigest(), w.date_done)
            }
            written = [w for w in writes if w.task_id in stored]
            tail = [
                (sql.own_upsert(len(chunk)), [v for w in chunk for v in (w.task_id, *w.side)])
                for chunk in chunks(written)
                if chunk
            ] or [("", [])]
            last, args = tail[-1]
            tail[-1] = (f"{last}; COMMIT" if last else "COMMIT", args)
            for text, args in tail:
                await self._run(conn, text, args)
        self._commits += 1
        self._written += len(written)
        return stored

    async def _forget(self, task_id: str) -> None:
        await self._one("forgetting a result", self._live().forget, (task_id, task_id))

    # ------------------------------------------------------------ groups

    async def _store_group(
        self, group_id: str, payload: bytes, date_done: dt.datetime, deadline: float | None
    ) -> None:
        args = (group_id, group_id, payload, date_done, group_id, deadline)
        async with self._connection() as conn:
            await self._run(conn, self._live().store_group, args)

    async def _select_group(self, group_id: str) -> tuple[Any, ...] | None:
        async with self._connection() as conn:
            rows = (await self._run(conn, self._live().read_group, (group_id,)))[-1][2]
        return tuple(rows[0]) if rows else None

    async def _delete_group(self, group_id: str) -> None:
        await self._one("deleting a group", self._live().delete_group, (group_id, group_id))

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        args = (group_id, size, expires_at(self.chord_expires), group_id)
        await self._one("starting a chord", self._live().chord_start, args)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        sql = self._live()

        async def count() -> PartCount | None:
            async with self._connection() as conn:
                rows = (await self._run(conn, sql.chord_lock, (part_id, group_id)))[-1][2]
                if not rows or (rows[0][2] is not None and rows[0][2] <= time.time()):
                    await self._run(conn, "ROLLBACK")
                    return None
                size, count, _, part_count, stored_receipt = rows[0]
                if part_count is not None or count >= size:
                    await self._run(conn, "COMMIT")
                    if part_count is None:
                        return PartCount(size + 1, size, False)
                    return PartCount(part_count, size, stored_receipt == receipt)
                results = await self._run(
                    conn, sql.chord_count, (group_id, group_id, part_id, receipt, payload)
                )
                return PartCount(int(results[0][1]), size, True)

        # A retry after a lost reply finds its own part by the receipt.
        return await self._attempt("counting a chord part", count)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        results = await self._one("reading a chord", self._live().chord_parts, (group_id,))
        return [bytes(row[0]) for row in results[-1][2]]

    # ------------------------------------------------------------ housekeeping

    async def _delete_expired(self, now: float, cutoff: dt.datetime | None) -> int:
        sql = self._live()
        async with self._connection() as conn:
            results = await self._run(conn, f"{sql.begin}; {sql.cleanup}", (now, cutoff))
        # After SET, SET TRANSACTION and START TRANSACTION: the counted deletes.
        return sum(max(rowcount, 0) for rowcount, _, _ in results[3 : 3 + sql.cleanup_counted])
