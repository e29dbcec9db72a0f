"""The SQLite backend's writer: one plain :mod:`sqlite3` connection in a thread of its own.

The connection is made, used and closed only in that thread. A whole
transaction (for a batch of writes: the read that keeps a SUCCESS from being
overwritten, the upserts and the commit) runs there as one call, so it costs
one hand-off from the event loop, not one per statement.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from ... import states
from ..._exceptions import BackendClosed, BackendUnavailable, StoreNotFound
from ..._meta import ResultMeta
from ..._serialization import Codec, exception_to_dict
from .._chords import PartCount
from . import _schema

__all__ = [
    "DATE_FORMAT",
    "TASK_COLUMNS",
    "FileSwapped",
    "Write",
    "Writer",
    "chunks",
    "format_date",
    "marks",
]

T = TypeVar("T")

#: SQLite's default limit of bound parameters is 999 on old builds.
CHUNK = 900
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DATETIME text on SQLite: naive UTC
TASK_COLUMNS = (
    "task_id status result date_done traceback children name args kwargs worker retries queue "
    "stamps".split()
)
_UPSERT_TASK = (
    f"INSERT INTO celery_taskmeta ({', '.join(TASK_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in TASK_COLUMNS)}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in TASK_COLUMNS[1:-1])
    # Celery keeps stamps it has when a write brings none.
    + ", stamps = coalesce(excluded.stamps, celery_taskmeta.stamps)"
    # The guard is decided under the write lock already; this keeps SQL honest too.
    " WHERE celery_taskmeta.status IS NOT 'SUCCESS' OR :replace"
)
_UPSERT_META = "INSERT OR REPLACE INTO aioresults_meta VALUES (?, ?, ?, ?, ?)"


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def marks(n: int) -> str:
    return ", ".join("?" * n)


def format_date(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.strftime(DATE_FORMAT)


class FileSwapped(BackendUnavailable):
    """The database file was deleted or replaced while the backend used it."""


class Write:
    """One record to write, as rows of both tables."""

    __slots__ = ("meta_row", "row", "status", "task_id")

    def __init__(self, meta: ResultMeta, codec: Codec, expires: float | None) -> None:
        encode = codec.encode
        result = meta.result
        if isinstance(result, BaseException):
            result = exception_to_dict(result)
        extra = dict(meta.extra)
        stamps = None
        headers = extra.pop("stamped_headers", None)
        if headers:
            stamped = {h: extra.pop(h) for h in list(headers) if h in extra}
            stamps = encode({"stamped_headers": headers, "stamps": stamped})
        self.task_id = meta.task_id
        self.status = meta.status
        self.row = {
            "task_id": meta.task_id,
            "status": meta.status,
            "result": encode(result),
            "date_done": None if meta.date_done is None else format_date(meta.date_done),
            "traceback": meta.traceback,
            "children": encode(meta.children) if meta.children else None,
            "name": meta.name,
            "args": None if meta.args is None else encode(meta.args),
            "kwargs": None if meta.kwargs is None else encode(meta.kwargs),
            "worker": meta.worker,
            "retries": meta.retries,
            "queue": meta.queue,
            "stamps": stamps,
        }
        self.meta_row = (
            meta.task_id,
            None if expires is None else time.time() + expires,
            meta.group_id,
            meta.parent_id,
            encode(extra) if extra else None,
        )


class Writer:
    """The writer connection and its thread.

    :param path: the database file.
    :param busy_timeout: seconds SQLite's busy handler waits for the write lock.
    :param synchronous: SQLite's ``synchronous`` setting.
    :param create: create the file and its tables if missing (else
        :class:`~aioresults.StoreNotFound`).
    """

    def __init__(
        self, path: str, busy_timeout: float, synchronous: str, create: bool = True
    ) -> None:
        self.path = path
        self.create = create
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        #: Transactions committed.
        self.commits = 0

    async def open(self) -> None:
        """Connect, switch to WAL and create or check the tables."""
        if not self.create and not os.path.isfile(self.path):  # noqa: ASYNC240 - one stat
            raise StoreNotFound(f"no store at {self.path}: the file does not exist")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="aioresults-sqlite")
        conn = await self.run(
            partial(
                sqlite3.connect,
                self.path,
                timeout=self._busy_timeout,  # the busy handler retries for this long
                isolation_level=None,  # autocommit: transactions are ours to begin
            )
        )
        self._conn = conn
        await self.run(self._use_wal, conn)
        await self.run(_schema.prepare, conn, self.path, self._synchronous, self.create)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    def _use_wal(self, conn: sqlite3.Connection) -> str:
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.001
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                # The switch needs an exclusive lock, and SQLite answers BUSY at once
                # (its busy handler would risk a deadlock) while another connection
                # opens the same new file: retry, within busy_timeout.
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY":
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def check_file(self, committed: bool = False) -> None:
        """Raise :class:`~aioresults.BackendUnavailable` if the file at ``path`` is
        no longer the one this connection writes (deleted or replaced): its
        writes would go to an unlinked file and be lost.

        :param committed: the check follows a commit, which then went to the
            old file (and is reported lost rather than acknowledged).
        """
        outcome = (
            "this transaction went to the old file and is lost"
            if committed
            else "nothing more was written to the old one"
        )
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise FileSwapped(f"{self.path} was deleted while in use; {outcome}") from None
        if (st.st_dev, st.st_ino) != self._inode:
            raise FileSwapped(f"{self.path} was replaced by another file while in use; {outcome}")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the writer's thread: one hand-off there and back.

        The thread runs one call at a time, in order. A caller cancelled before
        its call started leaves it unrun; one cancelled later stops waiting, and
        the call still runs to its end (the next starts after it).
        """
        thread = self._thread
        if thread is None:
            raise BackendClosed(f"the writer of {self.path} is closed")
        result: T = await asyncio.get_running_loop().run_in_executor(thread, fn, *args)
        return result

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(conn)`` in one ``BEGIN IMMEDIATE`` transaction, in the writer's thread."""
        conn = self._conn
        if conn is None:
            raise BackendClosed(f"the writer of {self.path} is closed")
        result: T = await self.run(self._checked_transaction, conn, work)
        self.commits += 1
        return result

    def _checked_transaction(
        self, conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]
    ) -> T:
        self.check_file()
        result = _schema.run_transaction(conn, work)
        # Deleted or replaced during the transaction: never acknowledge a commit
        # into a file nobody will open again.
        self.check_file(committed=True)
        return result

    async def close(self) -> None:
        conn, thread = self._conn, self._thread
        self._conn = self._thread = None
        if thread is None:
            return
        try:
            if conn is not None:
                # In its own thread, after whatever that thread is still running.
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        finally:
            thread.shutdown(wait=False)

    # ------------------------------------------------------------ work (writer's thread)

    @staticmethod
    def store_batch(
        batch: Sequence[Write],
        expired: Callable[[Any, Any, Any, float], bool],
        conn: sqlite3.Connection,
    ) -> list[bool]:
        """Write a batch in the current transaction; which were written.

        A SUCCESS already stored, and not expired, is never overwritten; neither is
        one written earlier in the same batch. The write lock is held since
        ``BEGIN IMMEDIATE``, so no other connection can store one in between.
        """
        ids = list(dict.fromkeys(w.task_id for w in batch))
        protected: set[str] = set()
        replaceable: set[str] = set()
        now = time.time()  # after BEGIN IMMEDIATE, which may have waited for the lock
        for chunk in chunks(ids):
            rows = conn.execute(
                "SELECT t.task_id, t.date_done, m.task_id IS NOT NULL, m.expires_at "
                "FROM celery_taskmeta AS t LEFT JOIN aioresults_meta AS m "
                "ON m.task_id = t.task_id "
                f"WHERE t.status = 'SUCCESS' AND t.task_id IN ({marks(len(chunk))})",
                chunk,
            )
            for task_id, date_done, has_meta, expires_at in rows:
                is_expired = expired(has_meta, expires_at, date_done, now)
                (replaceable if is_expired else protected).add(task_id)
        written: list[bool] = []
        rows_to_write: list[dict[str, Any]] = []
        meta_rows: list[tuple[Any, ...]] = []
        for write in batch:
            if write.task_id in protected:
                written.append(False)
                continue
            written.append(True)
            rows_to_write.append({**write.row, "replace": write.task_id in replaceable})
            meta_rows.append(write.meta_row)
            if write.status == states.SUCCESS:
                protected.add(write.task_id)
        if rows_to_write:
            conn.executemany(_UPSERT_TASK, rows_to_write)
            conn.executemany(_UPSERT_META, meta_rows)
        return written

    @staticmethod
    def count_part(
        group_id: str, field: str, payload: bytes, receipt: str, conn: sqlite3.Connection
    ) -> PartCount | None:
        """Count a chord part once (in the current transaction, under the write lock)."""
        row = conn.execute(
            "SELECT size, count, expires_at FROM aioresults_chord WHERE group_id = ?", (group_id,)
        ).fetchone()
        if row is None or (row[2] is not None and row[2] <= time.time()):
            return None
        size = int(row[0])
        found = conn.execute(
            "SELECT count, receipt FROM aioresults_chord_part WHERE group_id = ? AND field = ?",
            (group_id, field),
        ).fetchone()
        if found is not None:
            # A part counted by schema 1 has no count: it never completes again.
            return PartCount(int(found[0] or 0), size, found[1] == receipt)
        if int(row[1]) >= size:
            return PartCount(size + 1, size, False)
        (count,) = conn.execute(
            "UPDATE aioresults_chord SET count = count + 1 WHERE group_id = ? RETURNING count",
            (group_id,),
        ).fetchone()
        conn.execute(
            "INSERT INTO aioresults_chord_part VALUES (?, ?, ?, ?, ?)",
            (group_id, field, payload, count, receipt),
        )
        return PartCount(int(count), size, True)
