"""SQLiteBackend: results in one SQLite file (``sqlite:///path.db``), the embedded default.

The file holds Celery's own tables, ``celery_taskmeta`` and ``celery_tasksetmeta``,
in the format of Celery 5.7's database backend (``db+sqlite:///path.db``), so a
Celery client reads what aioresults writes and the reverse (with the JSON
serializer on both sides). What Celery has no column for lives in columns and
tables of aioresults' own, which Celery never looks at: each record's expiry,
group and parent ids in ``aioresults_*`` columns of its ``celery_taskmeta``
row (one row per record), groups' expiry and chord counters in
``aioresults_*`` tables. ``aioresults_schema`` records the layout's version;
an older layout is brought up to date when the file is opened, and a file with
a newer or foreign layout is refused, never altered.

Writes go through one writer connection in WAL mode, in a thread of its own
that callers queue their writes to directly. The thread commits every write
waiting in the queue in one ``BEGIN IMMEDIATE`` transaction (group commit:
writes that arrive while one commits make the next batch) and answers the
batch with one call into the event loop, each caller still getting its own
answer. The never-overwrite-SUCCESS guard is the upsert's own ``WHERE``; a
stored SUCCESS is looked at (has it expired?) only when it is there. Reads use
an aiosqlite connection of their own. Waiters in this process wake as soon as
a commit lands; waiters in other processes wake through inotify on the file's
directory and then re-read only the ids they wait for, so a process that waits
while nothing changes does no work at all. Without inotify (not Linux), or
with ``watch="poll"``, the waiter hub polls instead.

A database file deleted or replaced while in use is noticed before the next
write (by its inode): that write fails with
:class:`~aioresults.BackendUnavailable` naming the path, and the backend then
opens the file found at the path (creating it if missing) for what follows.

URLs: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, and
Celery's ``db+sqlite:///...``. ``:memory:`` is refused: an in-memory database
is private to one connection, and this backend uses two (and is meant to be
shared between processes). Options may also be given in the query string:
``?busy_timeout=10`` (``timeout``, pysqlite's name, is accepted too).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import anyio

from ..._exceptions import (
    BackendClosed,
    BackendUnavailable,
    ConfigurationError,
    DecodeError,
    MissingDependency,
    StoreNotFound,
)
from ..._meta import ResultMeta
from ..._runtime import shielded
from .. import _inotify
from .._chords import PartCount
from .._feeds import Feed, wake_siblings
from .._support import expires_at
from ..base import BaseBackend
from . import _rows
from ._options import error_table, url_path, watch_option
from ._rows import Write, chunks, format_date, marks
from ._schema import SCHEMA_VERSION
from ._writer import FileSwapped, Writer, Writes

try:
    import aiosqlite
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        "the SQLite backend needs aiosqlite: pip install aioresults (it is a core dependency)"
    ) from exc

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]

logger = logging.getLogger("aioresults.backends")

#: After a burst of file events, look once more when it has been quiet this long:
#: a commit's WAL write can be seen before its index update makes it visible.
_SETTLE = 0.05


class SQLiteBackend(BaseBackend):
    """Results in a SQLite file, readable by Celery's database backend.

    :param location: the database file (created with its tables if missing;
        its directory must exist), or a ``sqlite:///`` URL.
    :param busy_timeout: seconds to keep retrying while another connection
        holds the write lock, before raising :class:`~aioresults.BackendUnavailable`.
    :param commit_delay: after a commit of several writes, wait up to this many
        seconds for more to join the next one. 0 (the default) does not wait:
        writes that arrive while a commit is under way make the next batch
        anyway, and a commit in WAL mode costs less than a wait (a lone write
        never waits).
    :param max_batch: the most writes committed in one transaction.
    :param synchronous: SQLite's ``synchronous`` setting for writes. ``"NORMAL"``
        (default) keeps every commit through a process crash; ``"FULL"`` also
        through a power loss, at the cost of an fsync per commit.
    :param watch: how waiters learn of writes by other processes: ``"auto"``
        (inotify where available, else polling), ``"notify"`` or ``"poll"``.
    :param options: the options of :class:`~aioresults.BaseBackend`.

    ``stats`` counts ``commits`` (write transactions) and ``writes`` (records written).
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite", "db+sqlite")

    def __init__(
        self,
        location: str | os.PathLike[str] = "aioresults.db",
        *,
        busy_timeout: float = 5.0,
        commit_delay: float = 0.0,
        max_batch: int = 500,
        synchronous: str = "NORMAL",
        watch: str = "auto",
        watch_mode: str | None = None,
        **options: Any,
    ) -> None:
        path = os.fspath(location)
        if path[:9].lower() == "sqlite://" or path[:12].lower() == "db+sqlite://":
            path = url_path(path, options)
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigurationError(
                f"SQLiteBackend needs a database file, not {path!r}: an in-memory database "
                "is private to one connection and one process (use a file, e.g. on a tmpfs)"
            )
        if busy_timeout < 0 or commit_delay < 0 or max_batch < 1:
            raise ConfigurationError(
                "busy_timeout and commit_delay must be >= 0 and max_batch >= 1"
            )
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown synchronous setting {synchronous!r}")
        self.watch = watch_option(watch, watch_mode)
        if self.watch == "notify" and not _inotify.available():
            raise ConfigurationError('watch="notify" needs Linux\'s inotify')
        self.path = os.path.abspath(path)
        options.setdefault("url", f"sqlite:///{path}")
        super().__init__(**options)
        self.busy_timeout = float(busy_timeout)
        self.commit_delay = float(commit_delay)
        self.max_batch = max_batch
        self.synchronous = synchronous.upper()
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        # The store calls not answered yet; their batches wake this process's
        # waiters as soon as they commit.
        self._writes = Writes(self._stored)
        self._transactions = 0  # other than stores; kept here: a reopened file gets a new Writer
        #: aclose() has begun: writes are refused from now on.
        self._closing = False
        # One reopening at a time, after the file was deleted or replaced.
        self._reopening = asyncio.Lock()  # asyncio's binds no loop until used
        self._errors = error_table(lambda: self.path)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``db+sqlite:///...``.

        :raises ConfigurationError: not a SQLite file URL (``:memory:`` included).
        """
        path = url_path(url, options)
        return cls(path, url=url, **options)

    @property
    def stats(self) -> dict[str, int]:
        """``commits`` (write transactions) and ``writes`` (records written) so far."""
        writes = self._writes
        return {"commits": writes.commits + self._transactions, "writes": writes.stored}

    @property
    def _batch_running(self) -> bool:
        """A batch of writes is being committed (tests watch it from outside)."""
        return self._writes.running > 0

    # ------------------------------------------------------------ lifecycle

    def _check_path(self) -> None:
        if os.path.isdir(self.path):
            raise ConfigurationError(f"{self.path} is a directory, not a database file")
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            error = StoreNotFound if not self.create else BackendUnavailable
            raise error(f"no store at {self.path}: {directory} does not exist")

    async def _open(self) -> None:
        self._check_path()  # two stat calls: cheaper than a thread hop
        writer = Writer(
            self.path,
            self.busy_timeout,
            self.synchronous,
            self.create,
            writes=self._writes,
            errors=self._errors,
            expired=self._expired,
            commit_delay=self.commit_delay,
            max_batch=self.max_batch,
        )
        reader: aiosqlite.Connection | None = None
        try:
            with self._errors.translating("opening the database"):
                await writer.open()
                reader = await aiosqlite.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None
                )
                await reader.execute("PRAGMA query_only = 1")
        except BaseException:
            # Also when aclose() cancelled the open: close what was opened.
            await shielded(self._close_pair(reader, writer))
            raise
        # Both at once: a caller never finds one open without the other.
        self._writer, self._reader = writer, reader

    async def _reopen(self, stale: Writer | None) -> None:
        """The file was deleted or replaced: use the one at the path from now on.

        ``stale`` is the writer the caller found unusable (None: none was open).
        Callers that notice at once reopen once: the others find the new writer.
        """
        async with self._reopening:
            if self._closed:  # aclose() began: open nothing it would not close
                raise BackendClosed(f"{self!r} is closed")
            if self._writer is not stale and self._writer is not None:
                return  # another caller reopened already
            await self._drop()
            await self._open()

    async def _connections(self) -> tuple[Writer, aiosqlite.Connection]:
        """The writer and the reader, reopened first if a file swap closed them."""
        if self._writer is None or self._reader is None:
            await self._reopen(self._writer)
        return self._live()

    async def _checked(self) -> tuple[Writer, aiosqlite.Connection]:
        """:meth:`_connections`, after checking that the file at the path is
        still theirs (a read of a deleted file would answer from the past)."""
        writer, reader = await self._connections()
        try:
            writer.check_file()
        except FileSwapped as exc:
            await self._swapped(writer, exc)
            raise
        return writer, reader

    async def _swapped(self, writer: Writer, error: FileSwapped) -> None:
        """After ``error``: reopen for the operations that follow (a failure to
        reopen is theirs to report; this one reports the swap)."""
        try:
            await self._reopen(writer)
        except Exception as exc:
            logger.warning("reopening %s after %s failed: %s", self.path, error, exc)

    def _feed(self) -> Feed | None:
        if self.watch == "poll" or not _inotify.available():
            return None
        base = os.path.basename(os.path.realpath(self.path))
        names = {base, f"{base}-wal", f"{base}-journal"}
        return _inotify.InotifyFeed(
            os.path.dirname(os.path.realpath(self.path)),
            _inotify.IN_MODIFY
            | _inotify.IN_CLOSE_WRITE
            | _inotify.IN_MOVED_TO
            | _inotify.IN_CREATE,
            lambda name: None if name in names else [],
            settle=_SETTLE,
        )

    def _store_key(self) -> object:
        return ("sqlite", os.path.realpath(self.path))

    async def aclose(self) -> None:
        """Finish the writes already queued, then close. Idempotent.

        Writes still unanswered when that takes too long (the database stays
        locked), or when this call is cancelled, fail at once with
        :class:`~aioresults.BackendClosed`: they may or may not have been stored.
        """
        if self._closed:
            return
        try:
            if self._opened:
                self._closing = True  # a write arriving from now on is refused
                # Bounded: a queued batch waits at most busy_timeout for the lock.
                with anyio.move_on_after(self.busy_timeout + 5):
                    await self._writes.wait_idle()
        finally:
            self._writes.close(
                BackendClosed(
                    f"{self!r} was closed while committing the write; "
                    "it may or may not have been stored"
                ),
                BackendClosed(f"{self!r} is closed"),
            )
            await super().aclose()

    async def _close(self) -> None:
        async with self._reopening:  # after a reopening under way, close what it opened
            await self._drop()

    async def _drop(self) -> None:
        """Close the writer and the reader."""
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        await self._close_pair(reader, writer)

    async def _close_pair(self, reader: aiosqlite.Connection | None, writer: Writer | None) -> None:
        for closing in (reader, writer):
            if closing is not None:
                try:
                    await closing.close()
                except Exception as exc:  # closing must not mask the caller's error
                    logger.warning("closing %s failed: %s", self.path, exc)

    def _live(self) -> tuple[Writer, aiosqlite.Connection]:
        if self._writer is None or self._reader is None:
            raise BackendUnavailable(f"{self.path} is not open (it was deleted or replaced)")
        return self._writer, self._reader

    async def _transaction(self, doing: str, work: Any) -> Any:
        """``work(conn)`` in one write transaction; reopens after a file swap."""
        writer, _ = await self._connections()
        try:
            with self._errors.translating(doing):
                result = await writer.transaction(work)
        except FileSwapped as exc:
            await self._swapped(writer, exc)
            raise
        self._transactions += 1
        return result

    # ------------------------------------------------------------ writing results

    async def _write_meta(self, meta: ResultMeta) -> bool:
        if self._closing:
            raise BackendClosed(f"{self!r} is closing; the write was not stored")
        write = Write(meta, self.codec, self.expires)  # encoding errors are the caller's alone
        writer = self._writer
        if writer is None or not writer.accepting:  # closed by a reopening under way
            writer, _ = await self._connections()
        try:
            written: bool = await writer.store(write)
        except FileSwapped as exc:
            await self._swapped(writer, exc)
            raise
        return written

    def _stored(self, task_ids: list[str]) -> None:
        """A batch was committed: wake the waiters for it in this process at once."""
        if self._sibling_key is not None:
            wake_siblings(self._sibling_key, task_ids)

    # ------------------------------------------------------------ reading results

    def _expired(self, has_meta: Any, deadline: Any, date_done: Any, now: float) -> bool:
        if has_meta:  # written by aioresults: its writer chose the expiry
            return deadline is not None and deadline <= now
        if self.expires is None or date_done is None:  # Celery's: date_done + expires
            return False
        try:
            done = _rows.parse_date(date_done)
        except DecodeError:
            return False
        return done is not None and done.timestamp() + self.expires <= now

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        writer, reader = await self._checked()
        found: dict[str, Any] = {}
        now = time.time()
        with self._errors.translating("reading results"):
            for chunk in chunks(list(dict.fromkeys(task_ids))):
                rows = await reader.execute_fetchall(
                    _rows.SELECT_TASKS.format(marks(len(chunk))), chunk
                )
                for values in rows:
                    row = tuple(values)
                    if not self._expired(row[-5], row[-4], row[3], now):
                        found[row[0]] = row
        return [found.get(t) for t in task_ids]

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        return _rows.decode_row(raw, self.codec)

    async def _forget(self, task_id: str) -> None:
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM celery_taskmeta WHERE task_id = ?", (task_id,))

        await self._transaction("forgetting a result", forget)

    # ------------------------------------------------------------ groups

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        # Celery's database backend stores the bare tuple (no {"result": ...} wrapper).
        payload = self.codec.encode(group)
        deadline = expires_at(self.expires)
        now = format_date(dt.datetime.now(dt.UTC))

        await self._transaction(
            "saving a group", partial(_rows.save_group, group_id, payload, now, deadline)
        )

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        _, reader = await self._checked()
        with self._errors.translating("restoring a group"):
            rows = list(await reader.execute_fetchall(_rows.SELECT_GROUP, (group_id,)))
        if not rows:
            return None
        payload, date_done, has_own, deadline = rows[0]
        if payload is None or self._expired(has_own, deadline, date_done, time.time()):
            return None
        return _rows.decode_group(group_id, payload, self.codec)

    async def _delete_group(self, group_id: str) -> None:
        await self._transaction("deleting a group", partial(_rows.delete_group, group_id))

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        deadline = expires_at(self.chord_expires)

        await self._transaction(
            "starting a chord", partial(_rows.start_chord, group_id, size, deadline)
        )

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        # The size check, the deduplicating insert and the increment are one
        # transaction under the database's write lock: safe across processes.
        def count(conn: sqlite3.Connection) -> PartCount | None:
            return _rows.count_part(group_id, part_id, payload, receipt, conn)

        result: PartCount | None = await self._transaction("counting a chord part", count)
        return result

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        _, reader = await self._checked()
        with self._errors.translating("reading a chord"):
            rows = await reader.execute_fetchall(
                "SELECT payload FROM aioresults_chord_part WHERE group_id = ?", (group_id,)
            )
        return [bytes(row[0]) for row in rows]

    # ------------------------------------------------------------ housekeeping

    async def _cleanup(self) -> int:
        now = time.time()
        # A NULL cutoff (results kept forever) matches no row.
        cutoff = None
        if self.expires is not None:
            cutoff = format_date(dt.datetime.fromtimestamp(now - self.expires, dt.UTC))
        params = {"now": now, "cutoff": cutoff}

        deleted: int = await self._transaction(
            "deleting expired results", partial(_rows.clean, params)
        )
        return deleted
