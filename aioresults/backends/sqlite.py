"""SQLiteBackend: results in one SQLite file (``sqlite:///path.db``), the embedded default.

The file holds Celery's own tables, ``celery_taskmeta`` and ``celery_tasksetmeta``,
in the format of Celery 5.7's database backend (``db+sqlite:///path.db``), so a
Celery client reads what aioresults writes and the reverse (with the JSON
serializer on both sides). What Celery has no column for (expiry, group and
parent ids, chord counters) lives in tables of its own, ``aioresults_*``,
which Celery never looks at. ``aioresults_schema`` records the layout's
version; a file with a newer or foreign layout is refused, never altered.

Writes go through one writer connection in WAL mode: a plain :mod:`sqlite3`
connection that lives in a thread of its own and is only ever used there.
Concurrent writes are queued and committed together, many per ``BEGIN
IMMEDIATE`` transaction (group commit), each caller still getting its own
answer. A whole transaction (for a batch of writes: the read that keeps a
SUCCESS from being overwritten, the upserts and the commit) runs in that
thread as one call, so it costs one hand-off from the event loop, not one per
statement. Reads use an aiosqlite connection of their own. Waiters in this
process wake as soon as a commit lands; waiters in other processes wake
through inotify on the file's directory and then re-read only the ids they
wait for, so a process that waits while nothing changes does no work at all.
Without inotify (not Linux), the waiter hub polls instead.

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
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import anyio.lowlevel
import sniffio

from .. import states
from .._exceptions import (
    AioResultsError,
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DecodeError,
    MissingDependency,
)
from .._meta import ResultMeta
from .._serialization import exception_to_dict
from . import _inotify
from ._waiters import Item
from .base import BaseBackend

try:
    import aiosqlite
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        "the SQLite backend needs aiosqlite: pip install 'aioresults[sqlite]'"
    ) from exc

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]

logger = logging.getLogger("aioresults.backends")
_T = TypeVar("_T")

#: The layout of the ``aioresults_*`` tables this version reads and writes.
SCHEMA_VERSION = 1
#: SQLite's default limit of bound parameters is 999 on old builds.
_CHUNK = 900
#: After a burst of file events, look once more when it has been quiet this long:
#: a commit's WAL write can be seen before its index update makes it visible.
_TRAILING_CHECK = 0.05
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DATETIME text on SQLite: naive UTC

# Celery 5.7's tables, as SQLAlchemy creates them (Celery skips tables that exist).
_CELERY_DDL = (
    """CREATE TABLE IF NOT EXISTS celery_taskmeta (
\tid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
\ttask_id VARCHAR(155),
\tstatus VARCHAR(50),
\tresult BLOB,
\tdate_done DATETIME,
\ttraceback TEXT,
\tchildren BLOB,
\tname VARCHAR(155),
\targs BLOB,
\tkwargs BLOB,
\tworker VARCHAR(155),
\tretries INTEGER,
\tqueue VARCHAR(155),
\tstamps BLOB,
\tUNIQUE (task_id)
)""",
    "CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done)",
    """CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
\tid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
\ttaskset_id VARCHAR(155),
\tresult BLOB,
\tdate_done DATETIME,
\tUNIQUE (taskset_id)
)""",
    "CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done)",
)
_OWN_DDL = (
    "CREATE TABLE IF NOT EXISTS aioresults_schema (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS aioresults_meta (task_id TEXT PRIMARY KEY, expires_at REAL, "
    "group_id TEXT, parent_id TEXT, extra BLOB)",
    "CREATE INDEX IF NOT EXISTS aioresults_meta_expires_at ON aioresults_meta (expires_at)",
    "CREATE TABLE IF NOT EXISTS aioresults_group (group_id TEXT PRIMARY KEY, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS aioresults_chord (group_id TEXT PRIMARY KEY, "
    "size INTEGER NOT NULL, count INTEGER NOT NULL DEFAULT 0, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS aioresults_chord_part (group_id TEXT NOT NULL, "
    "field TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (group_id, field))",
)
# table -> (columns it must have, a column that must be UNIQUE or None)
_REQUIRED: dict[str, tuple[str, str | None]] = {
    "celery_taskmeta": ("task_id status result date_done traceback", "task_id"),
    "celery_tasksetmeta": ("taskset_id result date_done", "taskset_id"),
    "aioresults_meta": ("task_id expires_at group_id parent_id extra", "task_id"),
    "aioresults_group": ("group_id expires_at", "group_id"),
    "aioresults_chord": ("group_id size count expires_at", "group_id"),
    "aioresults_chord_part": ("group_id field payload", None),
}
# Nullable columns Celery 5.7 adds to tables made by older versions; we do the same.
_CELERY_LATE_COLUMNS = dict(
    column.split(":")
    for column in "children:BLOB name:VARCHAR(155) args:BLOB kwargs:BLOB worker:VARCHAR(155) "
    "retries:INTEGER queue:VARCHAR(155) stamps:BLOB".split()
)
_TASK_COLUMNS = (
    "task_id status result date_done traceback children name args kwargs worker retries queue "
    "stamps".split()
)
_UPSERT_TASK = (
    f"INSERT INTO celery_taskmeta ({', '.join(_TASK_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _TASK_COLUMNS)}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _TASK_COLUMNS[1:-1])
    # Celery keeps stamps it has when a write brings none.
    + ", stamps = coalesce(excluded.stamps, celery_taskmeta.stamps)"
    # The guard is decided under the write lock already; this keeps SQL honest too.
    " WHERE celery_taskmeta.status IS NOT 'SUCCESS' OR :replace"
)
_UPSERT_META = "INSERT OR REPLACE INTO aioresults_meta VALUES (?, ?, ?, ?, ?)"
_SELECT_TASKS = (
    f"SELECT {', '.join('t.' + c for c in _TASK_COLUMNS)}, "
    "m.task_id IS NOT NULL, m.expires_at, m.group_id, m.parent_id, m.extra "
    "FROM celery_taskmeta AS t LEFT JOIN aioresults_meta AS m ON m.task_id = t.task_id "
    "WHERE t.task_id IN ({})"
)
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")
_ROW = (*_TASK_COLUMNS, "has_meta", "expires_at", "group_id", "parent_id", "extra")
# cleanup(): statements whose deleted rows count, then the bookkeeping ones.
_CLEANUP_COUNTED = (
    # Records written by aioresults expire when their writer said.
    "DELETE FROM celery_taskmeta WHERE task_id IN "
    "(SELECT task_id FROM aioresults_meta WHERE expires_at <= :now)",
    # Celery's records expire as Celery's own cleanup() says: date_done + expires.
    "DELETE FROM celery_taskmeta WHERE date_done < :cutoff "
    "AND task_id NOT IN (SELECT task_id FROM aioresults_meta)",
    "DELETE FROM celery_tasksetmeta WHERE taskset_id IN "
    "(SELECT group_id FROM aioresults_group WHERE expires_at <= :now)",
    "DELETE FROM celery_tasksetmeta WHERE date_done < :cutoff "
    "AND taskset_id NOT IN (SELECT group_id FROM aioresults_group)",
    "DELETE FROM aioresults_chord WHERE expires_at <= :now",
)
_CLEANUP_BOOKKEEPING = (
    "DELETE FROM aioresults_meta WHERE expires_at <= :now "
    "OR task_id NOT IN (SELECT task_id FROM celery_taskmeta)",
    "DELETE FROM aioresults_group WHERE expires_at <= :now "
    "OR group_id NOT IN (SELECT taskset_id FROM celery_tasksetmeta)",
    "DELETE FROM aioresults_chord_part "
    "WHERE group_id NOT IN (SELECT group_id FROM aioresults_chord)",
)

# Open backends per database file, so a commit wakes waiters of every backend
# on that file in this process at once, without waiting for a file event.
_open_backends: dict[str, weakref.WeakSet[SQLiteBackend]] = {}


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _run_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """``work(conn)`` between ``BEGIN IMMEDIATE`` and ``COMMIT``; rolled back if it raises.

    Runs in the writer's thread. BEGIN IMMEDIATE takes the write lock first, so
    what ``work`` reads stays true until the commit (the busy handler waits for
    the lock up to the connection's timeout).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # the original error is the one to report
                pass
        raise
    return result


def _is_unique(conn: sqlite3.Connection, table: str, column: str) -> bool:
    for index in conn.execute(f"PRAGMA index_list({table})").fetchall():
        if index[2]:
            info = conn.execute(f"PRAGMA index_info('{index[1]}')").fetchall()
            if [row[2] for row in info] == [column]:
                return True
    return False


def _format_date(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.strftime(_DATE_FORMAT)


def _parse_date(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"stored date_done is not a date: {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise DecodeError(f"stored date_done is not a date: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


class _Write:
    """One queued ``_write_meta`` call and, once committed, its outcome."""

    __slots__ = ("done", "error", "meta_row", "row", "status", "taken", "task_id", "written")

    def __init__(
        self, task_id: str, status: str, row: dict[str, Any], meta_row: tuple[Any, ...]
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.row = row
        self.meta_row = meta_row
        self.done = anyio.Event()
        self.taken = False
        self.written = False
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        # Each caller raises its own copy: one exception object must not be
        # raised (and get its traceback extended) in many tasks at once.
        if isinstance(exc, BackendError):
            own = type(exc)(*exc.args)
            own.__cause__ = exc.__cause__
            exc = own
        self.error = exc
        self.done.set()


class SQLiteBackend(BaseBackend):
    """Results in a SQLite file, readable by Celery's database backend.

    :param path: the database file; created (with its tables) if missing. Its
        directory must exist.
    :param busy_timeout: seconds to keep retrying while another connection
        holds the write lock, before raising :class:`~aioresults.BackendUnavailable`.
    :param commit_delay: when writes are arriving concurrently, wait up to this
        many seconds for more of them to join the same commit (a lone write
        never waits).
    :param max_batch: the most writes committed in one transaction.
    :param synchronous: SQLite's ``synchronous`` setting for writes. ``"NORMAL"``
        (default) keeps every commit through a process crash; ``"FULL"`` also
        through a power loss, at the cost of an fsync per commit.
    :param watch_mode: how waiters learn of writes by other processes:
        ``"auto"`` (inotify where available, else polling), ``"inotify"`` or ``"poll"``.
    :param poll_interval: the first polling interval, in seconds (polling only).
    :param max_poll_interval: the longest polling interval (polling only).
    :param options: the options of :class:`~aioresults.BaseBackend`.

    ``stats`` counts ``commits`` (write transactions), ``writes`` (records
    written), ``file_events`` (change notifications acted on) and ``refreshes``.
    """

    schemes: ClassVar[tuple[str, ...]] = ("sqlite", "db+sqlite")

    def __init__(
        self,
        path: str | os.PathLike[str] = "aioresults.db",
        *,
        busy_timeout: float = 5.0,
        commit_delay: float = 0.001,
        max_batch: int = 500,
        synchronous: str = "NORMAL",
        watch_mode: str = "auto",
        poll_interval: float = 0.05,
        max_poll_interval: float = 1.0,
        **options: Any,
    ) -> None:
        path = os.fspath(path)
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
        if watch_mode not in ("auto", "inotify", "poll"):
            raise ConfigurationError("watch_mode must be 'auto', 'inotify' or 'poll'")
        if watch_mode == "inotify" and not _inotify.available():
            raise ConfigurationError("watch_mode='inotify' needs Linux's inotify")
        self.path = os.path.abspath(path)
        options.setdefault("url", f"sqlite:///{path}")
        super().__init__(**options)
        self.busy_timeout = float(busy_timeout)
        self.commit_delay = float(commit_delay)
        self.max_batch = max_batch
        self.synchronous = synchronous.upper()
        self.watch_mode = watch_mode
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.stats = {"commits": 0, "writes": 0, "file_events": 0, "refreshes": 0}
        # The writer connection is made, used and closed only in the executor's one thread.
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._inotify: _inotify.Inotify | None = None
        self._queue: deque[_Write] = deque()
        self._queued: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._batch_running = False
        self._writer_running = False
        self._accepting = True
        self._last_batch = 0
        self._last_rows: dict[str, tuple[tuple[Any, ...], Item]] = {}
        self._key = ""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``db+sqlite:///...``.

        :raises ConfigurationError: not a SQLite file URL (``:memory:`` included).
        """
        parts = urlsplit(url)
        if parts.scheme.lower() not in cls.schemes:
            raise ConfigurationError(f"not a sqlite:// URL: {url!r}")
        if parts.netloc or not parts.path.startswith("/"):
            raise ConfigurationError(
                f"bad SQLite URL {url!r}: use sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db (three slashes, then the path)"
            )
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in ("busy_timeout", "timeout"):
                try:
                    options.setdefault("busy_timeout", float(value))
                except ValueError as exc:
                    raise ConfigurationError(f"{key} must be a number of seconds") from exc
            elif key != "check_same_thread":  # pysqlite's; meaningless here
                raise ConfigurationError(f"unknown option {key!r} in SQLite URL {url!r}")
        return cls(unquote(parts.path[1:]), url=url, **options)

    # ------------------------------------------------------------ errors

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate sqlite3/aiosqlite errors raised by the block."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._translate(exc, doing) from exc
        except ValueError as exc:
            if isinstance(exc, AioResultsError) or "onnection" not in str(exc):
                raise
            raise BackendError(f"{self!r} is closed") from exc

    def _translate(self, exc: sqlite3.Error, doing: str) -> BackendError:
        name = getattr(exc, "sqlite_errorname", "") or ""
        where = f"{doing} in {self.path}"
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc):
            return BackendUnavailable(
                f"database is locked: {where} waited busy_timeout={self.busy_timeout:g} s "
                "for another connection to release its write lock"
            )
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return BackendCorrupted(
                f"{self.path} is not a SQLite database or is damaged ({exc}) while {doing}"
            )
        if name.startswith(
            ("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_PERM")
        ):
            return BackendUnavailable(f"{where} failed: {exc}")
        return BackendError(f"{where} failed: {exc}")

    # ------------------------------------------------------------ lifecycle

    def _check_path(self) -> None:
        if os.path.isdir(self.path):
            raise ConfigurationError(f"{self.path} is a directory, not a database file")
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise BackendUnavailable(f"cannot open {self.path}: {directory} does not exist")
        self._key = os.path.realpath(self.path)

    async def _open(self) -> None:
        if sniffio.current_async_library() != "asyncio":
            raise ConfigurationError(
                "the SQLite backend runs on asyncio (aiosqlite is asyncio-only)"
            )
        self._check_path()
        try:
            with self._errors("opening the database"):
                self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="aioresults-sqlite")
                self._writer = writer = await self._in_writer_thread(
                    partial(
                        sqlite3.connect,
                        self.path,
                        timeout=self.busy_timeout,  # the busy handler retries for this long
                        isolation_level=None,  # autocommit: transactions are ours to begin
                    )
                )
                await self._use_wal(writer)
                await self._in_writer_thread(self._prepare_writer, writer)
                self._reader = await aiosqlite.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None
                )
                await self._reader.execute("PRAGMA query_only = 1")
            self._inotify = self._make_inotify()
        except BaseException:
            await self._close_connections()
            raise
        _open_backends.setdefault(self._key, weakref.WeakSet()).add(self)
        self._writer_running = True  # from now on: queued writes are its to commit
        self._spawn(self._run_writer, name=f"sqlite writer {self.path}")
        if self._inotify is not None:
            self._spawn(self._watch_files, self._inotify, name=f"sqlite watcher {self.path}")
        else:
            self._spawn(
                self.hub.run_poller,
                self.poll_interval,
                self.max_poll_interval,
                name=f"sqlite poller {self.path}",
            )

    async def _use_wal(self, conn: sqlite3.Connection) -> None:
        def switch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in conn.execute("PRAGMA journal_mode = WAL")]

        deadline = anyio.current_time() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                mode = await self._in_writer_thread(switch, conn)
                break
            except sqlite3.OperationalError as exc:
                # The switch needs an exclusive lock, and SQLite answers BUSY at once
                # (its busy handler would risk a deadlock) while another connection
                # opens the same new file: retry, within busy_timeout.
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY":
                    raise
                if anyio.current_time() >= deadline:
                    raise
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
        if mode != [("wal",)]:
            logger.warning(
                "%s cannot use WAL mode (%s); waits and writes are slower", self.path, mode
            )

    def _make_inotify(self) -> _inotify.Inotify | None:
        if self.watch_mode == "poll" or not _inotify.available():
            return None
        try:
            ino = _inotify.Inotify()
        except OSError as exc:  # out of inotify instances
            error = exc
        else:
            try:
                ino.add_watch(
                    os.path.dirname(self._key),
                    _inotify.IN_MODIFY
                    | _inotify.IN_CLOSE_WRITE
                    | _inotify.IN_MOVED_TO
                    | _inotify.IN_CREATE,
                )
                return ino
            except OSError as exc:  # out of inotify watches
                ino.close()
                error = exc
        if self.watch_mode == "inotify":
            raise BackendUnavailable(f"cannot watch {self.path}: {error}") from error
        logger.warning("cannot watch %s (%s); polling instead", self.path, error)
        return None

    async def aclose(self) -> None:
        """Finish the writes already queued, then close. Idempotent."""
        if self._opened and not self._closed:
            self._accepting = False
            # Bounded: a queued batch waits at most busy_timeout for the lock.
            with anyio.move_on_after(self.busy_timeout + 5):
                while self._queue or self._batch_running:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        await super().aclose()

    async def _close(self) -> None:
        backends = _open_backends.get(self._key)
        if backends is not None:
            backends.discard(self)
            if not backends:
                del _open_backends[self._key]
        self._fail_queued(BackendError(f"{self!r} was closed before the write was committed"))
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        await self._close_connections()

    async def _close_connections(self) -> None:
        reader, writer, thread = self._reader, self._writer, self._writer_thread
        self._reader = self._writer = self._writer_thread = None
        if reader is not None:
            try:
                await reader.close()
            except Exception as exc:  # closing must not mask the caller's error
                logger.warning("closing %s failed: %s", self.path, exc)
        if thread is None:
            return
        try:
            if writer is not None:
                # In its own thread, after whatever that thread is still running.
                await asyncio.get_running_loop().run_in_executor(thread, writer.close)
        except Exception as exc:  # closing must not mask the caller's error
            logger.warning("closing %s failed: %s", self.path, exc)
        finally:
            thread.shutdown(wait=False)

    # ------------------------------------------------------------ the writer's thread

    async def _in_writer_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in the writer's thread: one hand-off there and back.

        The thread runs one call at a time, in order. A caller cancelled before
        its call started leaves it unrun; one cancelled later stops waiting, and
        the call still runs to its end (the next starts after it).
        """
        thread = self._writer_thread
        if thread is None:
            raise BackendError(f"{self!r} is closed")
        return await asyncio.get_running_loop().run_in_executor(thread, fn, *args)

    async def _transaction(self, doing: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work(conn)`` in one ``BEGIN IMMEDIATE`` transaction, all in the writer's thread."""
        conn = self._writer
        if conn is None:
            raise BackendError(f"{self!r} is closed")
        with self._errors(doing):
            result = await self._in_writer_thread(partial(_run_transaction, conn, work))
        self.stats["commits"] += 1
        return result

    # ------------------------------------------------------------ schema (writer's thread)

    def _prepare_writer(self, conn: sqlite3.Connection) -> None:
        """Set the writer up, then create or check the tables.

        A foreign or newer layout raises :class:`~aioresults.BackendCorrupted`.
        """
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if not self._schema_changes(conn):
            return

        def create(conn: sqlite3.Connection) -> None:
            # Checked again under the write lock: another process may have been first.
            for statement in self._schema_changes(conn):
                conn.execute(statement)

        _run_transaction(conn, create)

    def _schema_changes(self, conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        tables = {row[0] for row in rows}
        if "aioresults_schema" in tables:
            (version,) = conn.execute("SELECT max(version) FROM aioresults_schema").fetchone()
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise BackendCorrupted(
                    f"{self.path} was written by a newer aioresults (schema {version}; this "
                    f"version knows up to {SCHEMA_VERSION}); upgrade aioresults to use it"
                )
        changes: list[str] = []
        for table, (required, unique) in _REQUIRED.items():
            if table not in tables:
                continue
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = set(required.split()) - columns
            if not missing and unique is not None and not _is_unique(conn, table, unique):
                missing = {f"UNIQUE({unique})"}
            if missing:
                raise BackendCorrupted(
                    f"{self.path} has a table {table} that neither Celery nor aioresults "
                    f"made (it lacks {', '.join(sorted(missing))}); refusing to use it"
                )
            if table == "celery_taskmeta":
                changes += [
                    f"ALTER TABLE celery_taskmeta ADD COLUMN {name} {kind}"
                    for name, kind in _CELERY_LATE_COLUMNS.items()
                    if name not in columns
                ]
        if not tables >= set(_REQUIRED) | {"aioresults_schema"}:
            changes += [*_CELERY_DDL, *_OWN_DDL]
        if "aioresults_schema" not in tables:
            changes.append(f"INSERT INTO aioresults_schema VALUES ({SCHEMA_VERSION})")
        return changes

    # ------------------------------------------------------------ writing results

    def _encode_write(self, meta: ResultMeta) -> _Write:
        encode = self.codec.encode
        result = meta.result
        if isinstance(result, BaseException):
            result = exception_to_dict(result)
        extra = dict(meta.extra)
        stamps = None
        headers = extra.pop("stamped_headers", None)
        if headers:
            stamped = {h: extra.pop(h) for h in list(headers) if h in extra}
            stamps = encode({"stamped_headers": headers, "stamps": stamped})
        row = {
            "task_id": meta.task_id,
            "status": meta.status,
            "result": encode(result),
            "date_done": None if meta.date_done is None else _format_date(meta.date_done),
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
        expires_at = None if self.expires is None else time.time() + self.expires
        meta_row = (
            meta.task_id,
            expires_at,
            meta.group_id,
            meta.parent_id,
            encode(extra) if extra else None,
        )
        return _Write(meta.task_id, meta.status, row, meta_row)

    async def _write_meta(self, meta: ResultMeta) -> bool:
        if not self._accepting or not self._writer_running:
            raise BackendError(f"{self!r} is closing or its writer stopped")
        write = self._encode_write(meta)  # encoding errors are the caller's alone
        self._queue.append(write)
        if self._queued is not None:
            self._queued.set()
        try:
            await write.done.wait()
        except BaseException:
            if not write.taken and write in self._queue:
                self._queue.remove(write)  # cancelled before its batch began: never written
            raise
        if write.error is not None:
            raise write.error
        return write.written

    async def _run_writer(self) -> None:
        """Drain the queue, one transaction per batch (group commit)."""
        try:
            while True:
                while not self._queue:
                    if self._idle is not None:
                        self._idle.set()
                    self._queued = anyio.Event()
                    await self._queued.wait()
                # Writers woken in the same tick join this batch; under load, wait
                # a little for more (a lone writer never waits).
                await anyio.lowlevel.checkpoint()
                if self._last_batch > 1 and self.commit_delay and len(self._queue) < self.max_batch:
                    await anyio.sleep(self.commit_delay)
                batch: list[_Write] = []
                while self._queue and len(batch) < self.max_batch:
                    write = self._queue.popleft()
                    write.taken = True
                    batch.append(write)
                self._last_batch = len(batch)
                self._batch_running = True
                try:
                    await self._commit(batch)
                finally:
                    self._batch_running = False
        finally:
            self._writer_running = False
            self._fail_queued(BackendError(f"the writer of {self!r} stopped"))

    async def _commit(self, batch: list[_Write]) -> None:
        try:
            await self._commit_or_split(batch)
        finally:
            # Cancelled mid-commit (the backend or the event loop is closing): the
            # writer's thread may still commit, but the callers must not wait forever.
            for write in batch:
                if not write.done.is_set():
                    write.fail(
                        BackendError(
                            f"{self!r} was closed while committing the write; "
                            "it may or may not have been stored"
                        )
                    )

    async def _commit_or_split(self, batch: list[_Write]) -> None:
        try:
            written = await self._transaction("storing results", partial(self._store_batch, batch))
        except BackendError as exc:
            if len(batch) == 1 or isinstance(exc, (BackendUnavailable, BackendCorrupted)):
                for write in batch:
                    write.fail(exc)
                return
            # A failure that may be one record's: commit each alone, so only its caller fails.
            for write in batch:
                await self._commit_or_split([write])
            return
        except Exception as exc:  # a bug must reach the callers, not hang them
            for write in batch:
                write.fail(exc)
            return
        self.stats["writes"] += sum(written)
        for write, stored in zip(batch, written, strict=True):
            write.written = stored
            write.done.set()
        await self._wake_local([w.task_id for w in batch if w.written])

    def _store_batch(self, batch: list[_Write], conn: sqlite3.Connection) -> list[bool]:
        """Write a batch in the current transaction (writer's thread); which were written.

        A SUCCESS already stored, and not expired, is never overwritten; neither is
        one written earlier in the same batch. The write lock is held since
        ``BEGIN IMMEDIATE``, so no other connection can store one in between.
        """
        ids = list(dict.fromkeys(w.task_id for w in batch))
        protected: set[str] = set()
        replaceable: set[str] = set()
        now = time.time()  # after BEGIN IMMEDIATE, which may have waited for the lock
        for chunk in _chunks(ids):
            rows = conn.execute(
                "SELECT t.task_id, t.date_done, m.task_id IS NOT NULL, m.expires_at "
                "FROM celery_taskmeta AS t LEFT JOIN aioresults_meta AS m "
                "ON m.task_id = t.task_id "
                f"WHERE t.status = 'SUCCESS' AND t.task_id IN ({_marks(len(chunk))})",
                chunk,
            )
            for task_id, date_done, has_meta, expires_at in rows:
                expired = self._expired(has_meta, expires_at, date_done, now)
                (replaceable if expired else protected).add(task_id)
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

    def _fail_queued(self, exc: BackendError) -> None:
        while self._queue:
            self._queue.popleft().fail(exc)

    async def _wake_local(self, task_ids: list[str]) -> None:
        """Wake the waiters of every backend on this file in this process."""
        if not task_ids:
            return
        for backend in list(_open_backends.get(self._key, ())):
            wanted = [t for t in task_ids if backend.hub.has_waiters(t)]
            if wanted and not backend._closed:
                try:
                    await backend.hub.refresh(wanted)
                except Exception as exc:  # that backend's waiters retry on the next change
                    logger.warning("waking waiters of %r failed: %s", backend, exc)

    # ------------------------------------------------------------ reading results

    def _expired(self, has_meta: Any, expires_at: Any, date_done: Any, now: float) -> bool:
        if has_meta:  # written by aioresults: its writer chose the expiry
            return expires_at is not None and expires_at <= now
        if self.expires is None or date_done is None:  # Celery's: date_done + expires
            return False
        try:
            done = _parse_date(date_done)
        except DecodeError:
            return False
        return done is not None and done.timestamp() + self.expires <= now

    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]:
        if self._reader is None:
            raise BackendError(f"{self!r} is closed")
        found: dict[str, Item] = {}
        now = time.time()
        with self._errors("reading results"):
            for chunk in _chunks(list(dict.fromkeys(task_ids))):
                rows = await self._reader.execute_fetchall(
                    _SELECT_TASKS.format(_marks(len(chunk))), chunk
                )
                for values in rows:
                    found[values[0]] = self._decode_cached(tuple(values), now)
        return [found[t] if t in found else ResultMeta.pending(t) for t in task_ids]

    def _decode_cached(self, values: tuple[Any, ...], now: float) -> Item:
        row = dict(zip(_ROW, values, strict=True))
        task_id = row["task_id"]
        if self._expired(row["has_meta"], row["expires_at"], row["date_done"], now):
            return ResultMeta.pending(task_id)
        # Watched ids are re-read after every change to the file. An unchanged row
        # must give the same item, or the hub would take it for a new state (an
        # exception rebuilt twice never compares equal).
        last = self._last_rows.get(task_id)
        if last is not None and last[0] == values:
            return last[1]
        item = self._decode_row(row)
        if self.hub.has_waiters(task_id):
            self._last_rows[task_id] = (values, item)
        return item

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._last_rows.pop(task_id, None)

    def _decode_row(self, row: dict[str, Any]) -> Item:
        task_id = row["task_id"]

        def decoded(column: str) -> Any:
            raw = row[column]
            return None if raw is None else self.codec.decode(raw)

        try:
            data: dict[str, Any] = {
                "status": row["status"] or states.PENDING,
                "result": decoded("result"),
                "traceback": row["traceback"],
                "children": decoded("children"),
                "date_done": _parse_date(row["date_done"]),
            }
            data.update({k: row[k] for k in ("group_id", "parent_id") if row[k] is not None})
            if any(row[k] is not None for k in _EXTENDED):
                data.update(
                    {k: decoded(k) if k in ("args", "kwargs") else row[k] for k in _EXTENDED}
                )
            stamps = decoded("stamps")
            if isinstance(stamps, dict):  # Celery's {"stamped_headers": [...], "stamps": {...}}
                if "stamped_headers" in stamps:
                    data["stamped_headers"] = stamps["stamped_headers"]
                if isinstance(stamps.get("stamps"), dict):
                    data.update(stamps["stamps"])
            extra = decoded("extra")
            if isinstance(extra, dict):
                data.update(extra)
            data["task_id"] = task_id
            return ResultMeta.from_dict(data, task_id, self.codec.exception_from_dict)
        except AioResultsError as exc:
            return exc
        except Exception as exc:  # a hostile payload must not take the reader down
            return DecodeError(f"cannot decode the result of {task_id!r}: {exc}")

    async def _forget(self, task_id: str) -> None:
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM celery_taskmeta WHERE task_id = ?", (task_id,))
            conn.execute("DELETE FROM aioresults_meta WHERE task_id = ?", (task_id,))

        await self._transaction("forgetting a result", forget)

    # ------------------------------------------------------------ groups

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        # Celery's database backend stores the bare tuple (no {"result": ...} wrapper).
        payload = self.codec.encode(group)
        expires_at = None if self.expires is None else time.time() + self.expires
        now = _format_date(dt.datetime.now(dt.UTC))

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO celery_tasksetmeta (taskset_id, result, date_done) VALUES (?, ?, ?) "
                "ON CONFLICT (taskset_id) DO UPDATE SET result = excluded.result, "
                "date_done = excluded.date_done",
                (group_id, payload, now),
            )
            conn.execute(
                "INSERT OR REPLACE INTO aioresults_group VALUES (?, ?)", (group_id, expires_at)
            )

        await self._transaction("saving a group", save)

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        if self._reader is None:
            raise BackendError(f"{self!r} is closed")
        with self._errors("restoring a group"):
            rows = list(
                await self._reader.execute_fetchall(
                    "SELECT s.result, s.date_done, g.group_id IS NOT NULL, g.expires_at "
                    "FROM celery_tasksetmeta AS s LEFT JOIN aioresults_group AS g "
                    "ON g.group_id = s.taskset_id WHERE s.taskset_id = ?",
                    (group_id,),
                )
            )
        if not rows:
            return None
        payload, date_done, has_own, expires_at = rows[0]
        if payload is None or self._expired(has_own, expires_at, date_done, time.time()):
            return None
        data = self.codec.decode(payload)
        if isinstance(data, dict) and isinstance(data.get("result"), list):
            data = data["result"]  # the key-value backends' wrapper, if copied here
        if not isinstance(data, list):
            raise DecodeError(f"saved group {group_id!r} is not in Celery's format")
        return data

    async def _delete_group(self, group_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM celery_tasksetmeta WHERE taskset_id = ?", (group_id,))
            conn.execute("DELETE FROM aioresults_group WHERE group_id = ?", (group_id,))

        await self._transaction("deleting a group", delete)

    # ------------------------------------------------------------ chords

    async def _chord_init(self, group_id: str, size: int) -> None:
        expires_at = None if self.chord_expires is None else time.time() + self.chord_expires

        def init(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM aioresults_chord_part WHERE group_id = ?", (group_id,))
            conn.execute(
                "INSERT OR REPLACE INTO aioresults_chord VALUES (?, ?, 0, ?)",
                (group_id, size, expires_at),
            )

        await self._transaction("starting a chord", init)

    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes
    ) -> tuple[int, int] | None:
        # The size check, the deduplicating insert and the increment are one
        # transaction under the database's write lock: safe across processes.
        def count(conn: sqlite3.Connection) -> tuple[int, int] | None:
            row = conn.execute(
                "SELECT size, expires_at FROM aioresults_chord WHERE group_id = ?", (group_id,)
            ).fetchone()
            if row is None or (row[1] is not None and row[1] <= time.time()):
                return None
            size = int(row[0])
            cursor = conn.execute(
                "INSERT OR IGNORE INTO aioresults_chord_part VALUES (?, ?, ?)",
                (group_id, field, payload),
            )
            if cursor.rowcount == 0:
                return 0, size
            (counted,) = conn.execute(
                "UPDATE aioresults_chord SET count = count + 1 WHERE group_id = ? RETURNING count",
                (group_id,),
            ).fetchone()
            return int(counted), size

        return await self._transaction("counting a chord part", count)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        if self._reader is None:
            raise BackendError(f"{self!r} is closed")
        with self._errors("reading a chord"):
            rows = await self._reader.execute_fetchall(
                "SELECT payload FROM aioresults_chord_part WHERE group_id = ?", (group_id,)
            )
        return [bytes(row[0]) for row in rows]

    # ------------------------------------------------------------ housekeeping

    async def _cleanup(self) -> int:
        now = time.time()
        # A NULL cutoff (results kept forever) matches no row.
        cutoff = None
        if self.expires is not None:
            cutoff = _format_date(dt.datetime.fromtimestamp(now - self.expires, dt.UTC))
        params = {"now": now, "cutoff": cutoff}

        def clean(conn: sqlite3.Connection) -> int:
            deleted = sum(max(conn.execute(sql, params).rowcount, 0) for sql in _CLEANUP_COUNTED)
            for sql in _CLEANUP_BOOKKEEPING:
                conn.execute(sql, params)
            return deleted

        return await self._transaction("deleting expired results", clean)

    # ------------------------------------------------------------ waking

    async def _watch_files(self, ino: _inotify.Inotify) -> None:
        """Re-read the watched ids whenever the database or its WAL changes."""
        base = os.path.basename(self._key)
        names = {base, f"{base}-wal", f"{base}-journal"}
        trailing = False
        while True:
            if not self.hub.watched_ids():
                # Nobody here waits: leave the events (this process's own commits
                # among them) queued in the kernel, which merges repeats of the
                # last one, instead of waking up for each commit. A waiter that
                # registers resumes the reading before its first read of the
                # database, so no write after that read goes unseen; what was
                # queued before costs one needless re-read at most.
                trailing = False
                await self.hub.wait_watched()
            events: list[tuple[int, int, str]] | None = None
            if trailing:
                with anyio.move_on_after(_TRAILING_CHECK):
                    events = await ino.read()
                if events is None:
                    trailing = False
                    await self._refresh_watched()
                    continue
            else:
                events = await ino.read()
            if any(name in names or mask & _inotify.IN_Q_OVERFLOW for _, mask, name in events):
                self.stats["file_events"] += 1
                await self._refresh_watched()
                trailing = True

    async def _refresh_watched(self) -> None:
        if not self.hub.watched_ids():
            return
        self.stats["refreshes"] += 1
        try:
            await self.hub.refresh()
        except Exception as exc:  # the next change (or the trailing check) retries
            logger.warning(
                "re-reading %d watched results failed: %s", len(self.hub.watched_ids()), exc
            )
