"""The SQLite backend's writer: one plain :mod:`sqlite3` connection in a thread of its own.

The connection is made, used and closed only in that thread, which takes its
work from a queue, in order. A store is put on the queue by its caller itself,
with no task of the event loop in between; the thread commits every store it
finds waiting in one ``BEGIN IMMEDIATE`` transaction (group commit: while one
batch commits, the next one queues up; a lone store is one statement, its own
transaction) and answers the whole batch with one call into the event loop
(through :class:`~.._loopcalls.LoopCalls`: one eventfd write and one read).
So a store costs one hand-off to the thread and one back, as one statement of
a plain aiosqlite connection does, and the hand-back costs less. Other work
(opening, forget, groups, chords, cleanup) is one queued call each.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from ..._exceptions import (
    AioResultsError,
    BackendClosed,
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    StoreNotFound,
)
from .._loopcalls import LoopCalls, call_in_loop, open_calls
from .._support import ErrorTable, _copy
from . import _schema
from ._rows import Expired, SuccessFound, Write, most_rows, store_each, store_many, store_one

__all__ = ["FileSwapped", "Writer", "Writes"]

T = TypeVar("T")

#: The thread's signal to end (after what was queued before it).
_STOP = object()

#: One answer per write of a batch: whether it was written, that write's own
#: error, or None for a write left out (its caller had gone); or one error for all.
Outcomes = list[bool | BaseException | None] | BaseException


class FileSwapped(BackendUnavailable):
    """The database file was deleted or replaced while the backend used it."""


class Writes:
    """The store calls not answered yet: the event loop's side of the writer.

    One per backend (a reopened file gets a new :class:`Writer`, the same
    ``Writes``), so closing the backend fails every call still unanswered.

    :param stored: called in the event loop with the ids each batch stored,
        once their callers are answered.
    """

    def __init__(self, stored: Callable[[list[str]], None]) -> None:
        self._pending: set[Write] = set()
        self._idle: asyncio.Event | None = None
        self._refused: BaseException | None = None
        self._stored = stored
        #: Writes in the transaction under way (set by the writer's thread).
        self.running = 0
        #: Write transactions committed and records stored, as answered so far.
        self.commits = 0
        self.stored = 0

    def __len__(self) -> int:
        """Store calls queued or being committed."""
        return len(self._pending)

    def add(self, write: Write, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool]:
        """Give ``write`` the future its caller awaits."""
        if self._refused is not None:
            raise _copy(self._refused)
        future: asyncio.Future[bool] = loop.create_future()
        write.future = future
        self._pending.add(write)
        return future

    def settle(self, writes: list[Write], outcomes: Outcomes, commits: int) -> None:
        """Answer the callers of a batch (called in the event loop)."""
        self.commits += commits
        pending = self._pending
        shared = outcomes if isinstance(outcomes, BaseException) else None
        stored = []
        for i, write in enumerate(writes):
            pending.discard(write)
            outcome = _copy(shared) if shared is not None else outcomes[i]  # type: ignore[index]
            if outcome is True:
                stored.append(write.task_id)
            future = write.future
            if outcome is None or future is None or future.done():
                continue  # its caller has gone
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if stored:
            self.stored += len(stored)
            self._stored(stored)
        if not pending and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once every store call is answered."""
        while self._pending:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def close(self, error: BaseException, refusal: BaseException) -> None:
        """Fail every unanswered call with (a copy of) ``error`` at once, and
        later ones with ``refusal``."""
        self._refused = refusal
        pending = list(self._pending)
        self._pending.clear()
        for write in pending:
            future = write.future
            if future is not None and not future.done():
                future.set_exception(_copy(error))
                future.exception()  # a caller that has gone must not leave it "never retrieved"
        if self._idle is not None:
            self._idle.set()


def _answer(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Writer:
    """The writer connection and its thread.

    :param path: the database file.
    :param busy_timeout: seconds SQLite's busy handler waits for the write lock.
    :param synchronous: SQLite's ``synchronous`` setting.
    :param create: create the file and its tables if missing (else
        :class:`~aioresults.StoreNotFound`).
    :param writes: where the callers of stores are answered.
    :param errors: translates the driver's errors of a store.
    :param expired: whether a stored SUCCESS has expired (then it is replaced).
    :param commit_delay: after a batch of several writes, wait up to this long
        for more to join the next one.
    :param max_batch: the most writes in one transaction.
    """

    def __init__(
        self,
        path: str,
        busy_timeout: float,
        synchronous: str,
        create: bool,
        *,
        writes: Writes,
        errors: ErrorTable,
        expired: Expired,
        commit_delay: float = 0.0,
        max_batch: int = 500,
    ) -> None:
        self.path = path
        self.create = create
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._writes = writes
        self._errors = errors
        self._expired = expired
        self._commit_delay = commit_delay
        self._max_batch = max_batch
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None
        #: The way back into the event loop that opened the writer.
        self._calls: LoopCalls | None = None
        #: Used in the writer's thread only.
        self._conn: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None
        self._most_rows = 1
        #: Whether work is taken (open, and not closing).
        self.accepting = False

    async def open(self) -> None:
        """Start the thread, connect, switch to WAL and create or check the tables."""
        if not self.create and not os.path.isfile(self.path):  # noqa: ASYNC240 - one stat
            raise StoreNotFound(f"no store at {self.path}: the file does not exist")
        # A daemon: a backend never closed must not keep the interpreter from
        # exiting (SQLite rolls back a transaction cut short there; its callers
        # were never answered).
        self._thread = threading.Thread(target=self._serve, name="aioresults-sqlite", daemon=True)
        self._thread.start()
        self._calls = open_calls(asyncio.get_running_loop())  # (read by the thread as it answers)
        await self._call(self._connect)
        self.accepting = True

    def _connect(self) -> None:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,  # the busy handler retries for this long
            isolation_level=None,  # autocommit: transactions are ours to begin
        )
        try:
            self._use_wal(conn)
            _schema.prepare(conn, self.path, self._synchronous, self.create)
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._inode = (st.st_dev, st.st_ino)
        self._most_rows = most_rows(conn)

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

    # ------------------------------------------------------------ event loop side

    def _closed(self) -> BackendClosed:
        return BackendClosed(f"the writer of {self.path} is closed")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the writer's thread, after what is queued before it.

        A caller cancelled before its call started leaves it unrun; one cancelled
        later stops waiting, and the call still runs to its end.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, args, future))
        return await future

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(conn)`` in one ``BEGIN IMMEDIATE`` transaction, in the writer's thread."""
        if not self.accepting:
            raise self._closed()
        return await self._call(self._checked_transaction, work)

    def store(self, write: Write) -> asyncio.Future[bool]:
        """Queue ``write``. Its future says, once its transaction is over, whether
        it was stored (False: a SUCCESS is there), or raises its error."""
        if not self.accepting:
            raise self._closed()
        future = self._writes.add(write, asyncio.get_running_loop())
        self._queue.put(write)
        return future

    async def close(self) -> None:
        """Close the connection after everything queued, and end the thread."""
        if self._thread is None:
            return
        self._thread = None
        self.accepting = False
        try:
            await self._call(self._disconnect)
        finally:
            self._queue.put(_STOP)
            if self._calls is not None:
                self._calls.close()  # answers still to come take the loop's own way

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------ writer's thread

    def _serve(self) -> None:
        queue = self._queue
        held: Any = None
        last = 0
        while True:
            job = held if held is not None else queue.get()
            held = None
            if job is _STOP:
                return
            if type(job) is Write:
                batch = [job]
                held = self._gather(batch, last)
                last = len(batch)
                self._store(batch)
            else:
                self._run(*job)

    def _gather(self, batch: list[Write], last: int) -> Any:
        """Add the writes waiting in the queue to ``batch``; return the first
        other job met (it runs next), or None."""
        queue = self._queue
        deadline = 0.0
        linger = last > 1 and self._commit_delay > 0
        while len(batch) < self._max_batch:
            if not linger and queue.empty():
                return None  # (the common case, without raising Empty)
            try:
                job = queue.get_nowait()
            except Empty:
                # Under load (the last batch had company), wait a little for more.
                if not linger:
                    return None
                if not deadline:
                    deadline = time.monotonic() + self._commit_delay
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    job = queue.get(timeout=remaining)
                except Empty:
                    return None
            if type(job) is not Write:
                return job
            batch.append(job)
        return None

    def _to_loop(
        self, future: asyncio.Future[Any], callback: Callable[..., None], *args: Any
    ) -> None:
        """``callback(*args)`` in the event loop of ``future``."""
        call_in_loop(self._calls, future.get_loop(), callback, *args)

    def _run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], future: asyncio.Future[Any]
    ) -> None:
        if future.cancelled():
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            self._to_loop(future, _answer, future, None, exc)
        else:
            self._to_loop(future, _answer, future, result, None)

    def _store(self, batch: list[Write]) -> None:
        # A write whose caller has gone (cancelled, or failed by a close) before
        # the write was taken is left out.
        live = [w for w in batch if w.future is not None and not w.future.done()]
        outcomes: Outcomes = [None] * len(batch)
        commits = 0
        if live:
            self._writes.running = len(live)
            try:
                outcomes, commits = self._commit(live)
            except BaseException as exc:  # pragma: no cover - a bug must not hang callers
                outcomes = exc
            finally:
                self._writes.running = 0
            if not isinstance(outcomes, BaseException) and len(live) != len(batch):
                answers = dict(zip(map(id, live), outcomes, strict=True))
                outcomes = [answers.get(id(w)) for w in batch]
        future = batch[0].future
        assert future is not None  # every queued write has one
        self._to_loop(future, self._writes.settle, batch, outcomes, commits)

    def _commit(self, writes: list[Write]) -> tuple[Outcomes, int]:
        """One transaction for ``writes``; on an error that may be one record's,
        each alone, so only its caller fails. Returns the outcomes and commits."""
        try:
            try:
                if len(writes) == 1:
                    # A lone write is one statement, its own transaction.
                    if not self._checked(partial(store_one, writes[0])):
                        raise SuccessFound
                    written = [True]
                elif len({w.task_id for w in writes}) == len(writes):
                    most = self._most_rows
                    written = self._checked_transaction(partial(store_many, writes, most))
                else:
                    written = self._checked_transaction(partial(store_each, writes, self._expired))
            except SuccessFound:  # rare: decided row by row, in a new transaction
                written = self._checked_transaction(partial(store_each, writes, self._expired))
        except Exception as exc:
            error = self._translate(exc, "storing results")
            if (
                len(writes) == 1
                or not isinstance(error, BackendError)
                or isinstance(error, (BackendUnavailable, BackendCorrupted))
            ):
                return error, 0
            commits = 0
            alone: list[bool | BaseException | None] = []
            for write in writes:
                outcome, done = self._commit([write])
                commits += done
                alone.append(outcome if isinstance(outcome, BaseException) else outcome[0])
            return alone, commits
        answers: list[bool | BaseException | None] = list(written)
        return answers, 1

    def _translate(self, exc: Exception, doing: str) -> BaseException:
        if isinstance(exc, AioResultsError):
            return exc
        error = self._errors.translate(exc, doing)
        if error is None:
            return exc
        error.__cause__ = exc
        return error

    def _checked_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return self._checked(partial(_schema.run_transaction, work=work))

    def _checked(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(conn)`` (one statement, or a transaction), between two checks
        that the file at the path is still the connection's."""
        conn = self._conn
        if conn is None:
            raise self._closed()
        # Before: the old connection must not write at all once the file is
        # swapped, as its -wal and -shm files, found by name, are now the new
        # file's (its frames would land in the new database).
        self.check_file()
        result = work(conn)
        # Deleted or replaced during the transaction: never acknowledge a commit
        # into a file nobody will open again.
        self.check_file(committed=True)
        return result
