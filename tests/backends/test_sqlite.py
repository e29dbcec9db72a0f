"""What is specific to the SQLite backend: its file, its writer, other processes, faults."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.sqlite import SCHEMA_VERSION, SQLiteBackend
from aioresults.backends.sqlite._schema import OWN_COLUMNS
from tests.conftest import BackendFactory

ROOT = Path(__file__).resolve().parents[2]

CELERY_COLUMNS = [
    "id", "task_id", "status", "result", "date_done", "traceback", "children", "name", "args",
    "kwargs", "worker", "retries", "queue", "stamps",
]  # fmt: skip


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


@pytest.fixture
async def make(db_path: Path) -> AsyncIterator[BackendFactory]:
    """SQLite backends on one file, closed at teardown."""
    factory = BackendFactory(lambda **options: SQLiteBackend(db_path, **options))
    yield factory
    await factory.aclose()


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection in autocommit mode, closed on exit."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


def damage(path: Path, first_page: int = 2, page: int = 4096) -> None:
    """Overwrite every page of ``path`` from ``first_page`` on with a filler."""
    data = bytearray(path.read_bytes())
    for offset in range(first_page * page, len(data), page):
        data[offset : offset + page] = b"\xa5" * page
    path.write_bytes(bytes(data))


def python(code: str, *args: str) -> list[str]:
    """The command that runs ``code`` in a new interpreter that imports this checkout."""
    return [sys.executable, "-c", code, *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------ URLs


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = SQLiteBackend.from_url("sqlite:///sub/results.db")
    assert relative.path == str(tmp_path / "sub" / "results.db")
    absolute = ar.connect("sqlite:////var/tmp/x%20y.db?busy_timeout=2.5")
    assert isinstance(absolute, SQLiteBackend)
    assert (absolute.path, absolute.busy_timeout) == ("/var/tmp/x y.db", 2.5)
    celery_style = ar.connect("db+sqlite:///results.db?timeout=7")
    assert isinstance(celery_style, SQLiteBackend)
    assert (celery_style.path, celery_style.busy_timeout) == (str(tmp_path / "results.db"), 7)
    monkeypatch.delenv("AIORESULTS_URL", raising=False)
    default = ar.connect()
    assert isinstance(default, SQLiteBackend) and default.path == str(tmp_path / "aioresults.db")
    for bad in (
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite://host/x.db",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db?timeout=soon",
    ):
        with pytest.raises(ar.ConfigurationError):
            ar.connect(bad)
    with pytest.raises(ar.ConfigurationError, match="in-memory"):
        SQLiteBackend(":memory:")


async def test_many_backends_open_a_new_file_at_once(tmp_path: Path) -> None:
    # Switching a new file to WAL needs an exclusive lock; the losers of that race retry.
    for attempt in range(20):
        backends = [SQLiteBackend(tmp_path / f"new-{attempt}.db") for _ in range(4)]
        try:
            outcomes = await asyncio.gather(
                *(
                    b.mark_as_done(str(i), i) if i % 2 else b.get_meta(str(i))
                    for i, b in enumerate(backends)
                )
            )
        finally:
            for backend in backends:
                await backend.aclose()
        assert [o if isinstance(o, bool) else o.status for o in outcomes] == [
            states.PENDING,
            True,
            states.PENDING,
            True,
        ]


async def test_directory_must_exist(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "missing" / "results.db")
    with pytest.raises(ar.BackendUnavailable, match="does not exist"):
        await backend.get_meta(new_id())
    await backend.aclose()
    backend = SQLiteBackend(tmp_path)
    with pytest.raises(ar.ConfigurationError, match="directory"):
        await backend.get_meta(new_id())
    await backend.aclose()


async def test_outside_asyncio_is_a_clear_error(db_path: Path) -> None:
    async def main() -> None:
        backend = SQLiteBackend(db_path)
        try:
            await backend.get_meta(new_id())
        finally:
            await backend.aclose()

    with pytest.raises(ar.ConfigurationError, match="asyncio"):
        await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio"))


# ------------------------------------------------------------------ the file


async def test_file_has_celery_tables_in_celery_format(make: BackendFactory, db_path: Path) -> None:
    backend = await make()
    task_id, group_id = new_id(), new_id()
    await backend.store_result(
        task_id,
        {"x": [1, 2]},
        states.SUCCESS,
        name="tasks.add",
        args=[2, 3],
        kwargs={"z": 1},
        worker="w1",
        retries=1,
        queue="q",
        children=[[["c", None], None]],
    )
    await backend.save_group(group_id, [[group_id, None], [[[task_id, None], None]]])
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(celery_taskmeta)")]
        # Celery's columns, in Celery's order, then aioresults' own (Celery maps
        # only its own, so it neither reads nor writes them).
        assert columns == [*CELERY_COLUMNS, *OWN_COLUMNS]
        row = conn.execute(
            "SELECT status, result, date_done, name, args, kwargs, worker, retries, queue, "
            "children FROM celery_taskmeta WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        status, result, date_done, name, args, kwargs, worker, retries, queue, children = row
        assert status == "SUCCESS"
        assert isinstance(result, bytes) and json.loads(result) == {"x": [1, 2]}
        # SQLAlchemy's DATETIME text: naive UTC with microseconds.
        done = dt.datetime.strptime(date_done, "%Y-%m-%d %H:%M:%S.%f")
        assert abs(done - dt.datetime.now(dt.UTC).replace(tzinfo=None)) < dt.timedelta(minutes=1)
        assert (name, worker, retries, queue) == ("tasks.add", "w1", 1, "q")
        assert (json.loads(args), json.loads(kwargs)) == ([2, 3], {"z": 1})
        assert json.loads(children) == [[["c", None], None]]
        (saved,) = conn.execute(
            "SELECT result FROM celery_tasksetmeta WHERE taskset_id = ?", (group_id,)
        ).fetchone()
        # The bare tuple, as Celery's database backend stores it (no {"result": ...}).
        assert json.loads(saved) == [[group_id, None], [[[task_id, None], None]]]
        assert conn.execute("SELECT version FROM aioresults_schema").fetchall() == [
            (SCHEMA_VERSION,)
        ]


async def test_celery_rows_without_aioresults_bookkeeping_are_read(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make()
    await backend.get_meta(new_id())  # creates the tables
    task_id = new_id()
    with raw(db_path) as conn:
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result, date_done, traceback, stamps) "
            "VALUES (?, 'FAILURE', ?, '2030-01-02 03:04:05.000006', 'Traceback...', ?)",
            (
                task_id,
                b'{"exc_type": "KeyError", "exc_message": ["k"], "exc_module": "builtins"}',
                b'{"stamped_headers": ["tag"], "stamps": {"tag": "blue"}}',
            ),
        )
    meta = await backend.get_meta(task_id)
    assert meta.status == states.FAILURE and isinstance(meta.result, KeyError)
    assert meta.date_done == dt.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    assert meta.extra == {"stamped_headers": ["tag"], "tag": "blue"}
    with pytest.raises(KeyError):
        await ar.AsyncResult(task_id, backend)


async def test_stamps_round_trip_in_celerys_column(make: BackendFactory, db_path: Path) -> None:
    backend = await make()
    task_id = new_id()
    meta = ar.ResultMeta(
        task_id, states.SUCCESS, 1, extra={"stamped_headers": ["t"], "t": 2, "other": "x"}
    )
    await backend._ensure_open()
    assert await backend._write_meta(meta)  # Celery's stamps reach aioresults as `extra`
    read = await backend.get_meta(task_id)
    assert read.extra == {"stamped_headers": ["t"], "t": 2, "other": "x"}
    with raw(db_path) as conn:
        (stamps,) = conn.execute("SELECT stamps FROM celery_taskmeta").fetchone()
    assert json.loads(stamps) == {"stamped_headers": ["t"], "stamps": {"t": 2}}


# ------------------------------------------------------------------ group commit


async def test_concurrent_writes_share_commits(make: BackendFactory) -> None:
    backend = await make()
    assert isinstance(backend, SQLiteBackend)
    await backend.get_meta(new_id())
    ids = [new_id() for _ in range(100)]
    commits, writes = backend.stats["commits"], backend.stats["writes"]
    written = await asyncio.gather(*(backend.mark_as_done(t, i) for i, t in enumerate(ids)))
    assert written == [True] * 100
    assert backend.stats["writes"] - writes == 100
    # Queued together, written together: far fewer transactions than writes.
    assert backend.stats["commits"] - commits <= 5
    assert [m.result for m in await backend.get_many(ids)] == list(range(100))


async def test_each_caller_gets_its_own_outcome(make: BackendFactory) -> None:
    backend = await make()
    done, fresh, bad = new_id(), new_id(), new_id()
    await backend.mark_as_done(done, "kept")
    outcomes = await asyncio.gather(
        backend.mark_as_done(done, "late"),
        backend.update_state(fresh, states.PROGRESS, 1),
        backend.mark_as_done(bad, {1, 2}),
        backend.mark_as_done(fresh, "ok"),
        backend.update_state(fresh, states.PROGRESS, 2),  # after SUCCESS in the same batch
        return_exceptions=True,
    )
    assert outcomes[0] is False and outcomes[1] is True and outcomes[3] is True
    assert isinstance(outcomes[2], ar.SerializationError)
    assert outcomes[4] is False
    metas = await backend.get_many([done, fresh, bad])
    assert [(m.status, m.result) for m in metas] == [
        (states.SUCCESS, "kept"),
        (states.SUCCESS, "ok"),
        (states.PENDING, None),
    ]


async def test_batch_meeting_stored_successes_decides_each_write(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(expires=60)
    await backend.get_meta(new_id())
    kept, celery_old, celery_new = new_id(), new_id(), new_id()
    await backend.mark_as_done(kept, "kept")
    two_days_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S.%f")
    just_now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    with raw(db_path) as conn:  # Celery's rows expire by date_done + expires (60 s here)
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result, date_done) VALUES "
            "(?, 'SUCCESS', '\"old\"', ?), (?, 'SUCCESS', '\"new\"', ?)",
            (celery_old, two_days_ago, celery_new, just_now),
        )
    fresh = [new_id() for _ in range(20)]
    ids = [*fresh[:10], kept, celery_old, celery_new, *fresh[10:]]
    written = await asyncio.gather(*(backend.mark_as_done(t, f"v-{t}") for t in ids))
    expected = {t: True for t in fresh} | {kept: False, celery_old: True, celery_new: False}
    assert written == [expected[t] for t in ids]
    metas = {m.task_id: m.result for m in await backend.get_many(ids)}
    assert metas == {t: f"v-{t}" for t in ids} | {kept: "kept", celery_new: "new"}
    with raw(db_path) as conn:  # every stored record has its own expiry; the refused ones not
        own = {
            r[0]
            for r in conn.execute(
                "SELECT task_id FROM celery_taskmeta WHERE aioresults_expires_at IS NOT NULL"
            )
        }
    assert own >= {*fresh, kept, celery_old} and celery_new not in own


async def test_close_finishes_queued_writes(make: BackendFactory) -> None:
    backend = await make()
    await backend.get_meta(new_id())
    ids = [new_id() for _ in range(50)]
    writes = [asyncio.create_task(backend.mark_as_done(t, t)) for t in ids]
    await asyncio.sleep(0)
    await backend.aclose()
    assert await asyncio.gather(*writes) == [True] * 50
    with pytest.raises(ar.BackendError):
        await backend.mark_as_done(new_id(), 1)
    other = await make()
    assert [m.result for m in await other.get_many(ids)] == ids


async def test_close_commits_queued_writes_and_refuses_later_ones(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(busy_timeout=10)
    await backend.get_meta(new_id())
    ids = [new_id() for _ in range(20)]
    with raw(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")  # the writes queue up behind another writer's lock
        queued = [asyncio.create_task(backend.mark_as_done(t, t)) for t in ids]
        with anyio.fail_after(10):
            while len(backend._writes) < len(ids):
                await asyncio.sleep(0.01)
        closing = asyncio.create_task(backend.aclose())
        await asyncio.sleep(0)  # aclose() has begun: it waits for the queued writes
        assert not closing.done()
        with pytest.raises(ar.BackendClosed):
            await asyncio.wait_for(backend.mark_as_done(new_id(), "late"), 10)
        assert not closing.done() and not any(w.done() for w in queued)
        lock.execute("ROLLBACK")
    with anyio.fail_after(20):
        await closing
        assert await asyncio.gather(*queued) == [True] * len(ids)
    with pytest.raises(ar.BackendClosed):
        await backend.mark_as_done(new_id(), "after close")
    other = await make()
    assert [m.result for m in await other.get_many(ids)] == ids


async def test_writer_stopped_mid_commit_fails_its_callers(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(busy_timeout=10)
    assert isinstance(backend, SQLiteBackend)
    await backend.get_meta(new_id())
    with raw(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(backend.mark_as_done(new_id(), 1))
        with anyio.fail_after(10):
            while not backend._batch_running:  # its batch now waits for the lock
                await asyncio.sleep(0.01)
        # The writer is stopped: a close that will not wait any longer (a
        # shutdown's own timeout cancels it).
        closing = asyncio.create_task(backend.aclose())
        await asyncio.sleep(0.05)
        closing.cancel()
        with pytest.raises(ar.BackendError, match="closed while committing"):
            await asyncio.wait_for(write, 10)
        lock.execute("ROLLBACK")
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, 10)
    with pytest.raises(ar.BackendClosed):
        await backend.mark_as_done(new_id(), "after close")


async def test_close_leaves_no_thread_behind(make: BackendFactory) -> None:
    before = set(threading.enumerate())
    backend = await make()
    await backend.mark_as_done(new_id(), 1)
    assert len(set(threading.enumerate()) - before) == 2  # the writer's and the reader's
    await backend.aclose()
    with anyio.fail_after(10):
        while set(threading.enumerate()) - before:
            await asyncio.sleep(0.01)


async def test_watch_reports_each_write_once(make: BackendFactory) -> None:
    writer, reader = await make(), await make(watch="notify")
    task_id = new_id()
    seen: list[str] = []

    async def consume() -> None:
        async for meta in ar.AsyncResult(task_id, reader).watch(timeout=20):
            seen.append(meta.status)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    # A re-read of an unchanged record (after the file event, and the check that
    # follows it) must not look like a new state, even when it holds an exception.
    await writer.mark_as_retry(task_id, ConnectionError("flaky"))
    await asyncio.sleep(0.3)
    await writer.mark_as_done(task_id, "done")
    await asyncio.wait_for(consumer, 20)
    assert seen == [states.PENDING, states.RETRY, states.SUCCESS]


# ------------------------------------------------------------------ other processes

WRITER = """
import asyncio, sys
from aioresults.backends.sqlite import SQLiteBackend

async def main():
    async with SQLiteBackend(sys.argv[1]) as backend:
        for task_id in sys.argv[2:]:
            await backend.mark_as_done(task_id, "from " + task_id)

asyncio.run(main())
"""


@pytest.mark.parametrize("watch", ["notify", "poll"])
async def test_waiter_wakes_on_write_by_another_process(
    make: BackendFactory, db_path: Path, watch: str
) -> None:
    backend = await make(watch=watch)
    assert isinstance(backend, SQLiteBackend)
    ids = [new_id() for _ in range(3)]
    group: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])
    joined = asyncio.create_task(group.join(timeout=30))
    with anyio.fail_after(10):
        while len(list(backend.wait_stats().watched_ids)) < 3:
            await asyncio.sleep(0.01)
    await anyio.run_process(python(WRITER, str(db_path), *ids), env=child_env())
    assert await joined == [f"from {i}" for i in ids]
    stats = backend.wait_stats()
    if watch == "notify":
        # Woken by the file's events: one inotify session, and the poller never ran.
        assert (stats.mode, stats.sessions, stats.polls) == ("inotify", 1, 0)
    else:
        assert stats.mode == "poll" and stats.polls > 0 and stats.sessions == 0


async def test_own_commits_wake_nothing_until_someone_waits(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(watch="notify")
    assert isinstance(backend, SQLiteBackend)
    await asyncio.gather(*(backend.mark_as_done(new_id(), i) for i in range(50)))
    for i in range(20):
        await backend.mark_as_done(new_id(), i)
    await asyncio.sleep(0.2)
    # Nobody waits: no watch on the file, no poller, so those commits woke nothing.
    stats = backend.wait_stats()
    assert (stats.waiters, stats.sessions, stats.polls, stats.feed_failures) == (0, 0, 0, 0)
    # A waiter that comes later still wakes on the next write, by the file's events.
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=30))
    with anyio.fail_after(10):
        while not list(backend.wait_stats().watched_ids):
            await asyncio.sleep(0.01)
    await anyio.run_process(python(WRITER, str(db_path), task_id), env=child_env())
    assert await waiting == f"from {task_id}"
    stats = backend.wait_stats()
    assert (stats.mode, stats.sessions, stats.polls) == ("inotify", 1, 0)


async def test_idle_waiter_reads_nothing(make: BackendFactory) -> None:
    backend = await make(watch="notify")
    assert isinstance(backend, SQLiteBackend)
    waiting: asyncio.Task[Any] = asyncio.create_task(
        ar.AsyncResult(new_id(), backend).get(timeout=30)
    )
    with anyio.fail_after(10):
        while not list(backend.wait_stats().watched_ids) or backend.wait_stats().unsettled:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    # Its own reads wake nothing: one inotify session, never re-established, no
    # poller, no failure, and the first read long settled.
    stats = backend.wait_stats()
    assert (stats.mode, stats.sessions, stats.polls, stats.feed_failures, stats.unsettled) == (
        "inotify",
        1,
        0,
        0,
        0,
    )
    assert stats.refreshes == 0  # nothing is re-read while nothing changes
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


WAITER = """
import asyncio, sys
from aioresults.backends.sqlite import SQLiteBackend

async def main():
    async with SQLiteBackend(sys.argv[1], watch="notify") as backend:
        async with backend.waiter([sys.argv[2]]) as waiter:
            loop = asyncio.get_running_loop()
            first = await waiter.next(loop.time() + 30)  # the first read: nothing yet
            assert first is not None and not first.meta().ready
            print("waiting", flush=True)  # registered and read: what comes next is a wake-up
            while True:
                record = await waiter.next(loop.time() + 30)
                assert record is not None, "no wake-up within 30 s"
                meta = record.meta()
                if meta.ready:
                    print(meta.result, flush=True)
                    return

asyncio.run(main())
"""


async def test_another_process_wakes_on_write_here(make: BackendFactory, db_path: Path) -> None:
    backend = await make()
    await backend.get_meta(new_id())
    task_id = new_id()
    proc = await asyncio.create_subprocess_exec(
        *python(WAITER, str(db_path), task_id), env=child_env(), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            assert await proc.stdout.readline() == b"waiting\n"
            await backend.mark_as_done(task_id, "hello")
            assert await proc.stdout.readline() == b"hello\n"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


CHORD_PARTS = """
import asyncio, json, sys
from aioresults.backends.sqlite import SQLiteBackend

async def main():
    path, group_id, *ids = sys.argv[1:]
    async with SQLiteBackend(path) as backend:
        outcomes = await asyncio.gather(*(
            backend.chord_part_return(group_id, task_id, "SUCCESS", i, index=i)
            for i, task_id in enumerate(ids)
        ))
    print(json.dumps([[o.task_id, o.counted, o.complete, o.results] for o in outcomes]))

asyncio.run(main())
"""


async def test_chord_counts_exactly_once_across_processes(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make()
    group_id = new_id()
    ids = [new_id() for _ in range(40)]
    await backend.set_chord_size(group_id, len(ids))
    command = python(CHORD_PARTS, str(db_path), group_id, *ids)
    outputs: list[Any] = []

    async def deliver() -> None:
        done = await anyio.run_process(command, env=child_env())
        outputs.extend(json.loads(done.stdout))

    async with anyio.create_task_group() as tg:  # every part delivered by two processes
        tg.start_soon(deliver)
        tg.start_soon(deliver)
    assert len(outputs) == 80
    # Each part counted once: by exactly one of its two deliveries.
    for task_id in ids:
        assert [counted for t, counted, _, _ in outputs if t == task_id].count(True) == 1
    # The chord completed, through the one part that completed it: its delivery that
    # counted it, and its redelivery if that came after (never any other part).
    completes = [(t, counted, results) for t, counted, complete, results in outputs if complete]
    assert 1 <= len(completes) <= 2
    assert len({t for t, _, _ in completes}) == 1
    assert [counted for _, counted, _ in completes].count(True) == 1
    assert all(results == list(range(40)) for _, _, results in completes)


async def test_chord_redelivery_of_the_completing_part_completes_again(
    make: BackendFactory,
) -> None:
    backend = await make()
    group_id = new_id()
    ids = [new_id() for _ in range(3)]
    await backend.set_chord_size(group_id, len(ids))
    first = [
        await backend.chord_part_return(group_id, t, states.SUCCESS, i * 10, index=i)
        for i, t in enumerate(ids)
    ]
    assert [(p.counted, p.count, p.complete) for p in first] == [
        (True, 1, False),
        (True, 2, False),
        (True, 3, True),
    ]
    assert first[2].results == [0, 10, 20]
    # The worker that counted the last part died after the commit, before acting on
    # the outcome: the broker redelivers the part, to a new call (another worker).
    other = await make()
    for worker in (other, backend):
        again = await worker.chord_part_return(group_id, ids[2], states.SUCCESS, 20, index=2)
        assert (again.counted, again.count, again.size, again.complete) == (False, 3, 3, True)
        assert again.results == [0, 10, 20]
    # Any other part's redelivery keeps its count and does not complete the chord.
    for i in (0, 1):
        again = await other.chord_part_return(group_id, ids[i], states.SUCCESS, i * 10, index=i)
        assert (again.counted, again.count, again.complete, again.results) == (
            False,
            i + 1,
            False,
            None,
        )


KILLED_WRITER = """
import asyncio, sys
from aioresults.backends.sqlite import SQLiteBackend

async def writer(backend, n):
    i = 0
    while True:
        task_id = f"{n}-{i}"
        await backend.mark_as_done(task_id, "x" * 5000)
        print(task_id, flush=True)
        i += 1

async def main():
    async with SQLiteBackend(sys.argv[1]) as backend:
        await asyncio.gather(*(writer(backend, n) for n in range(4)))

asyncio.run(main())
"""


async def test_sigkill_keeps_every_committed_result(make: BackendFactory, db_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *python(KILLED_WRITER, str(db_path)), env=child_env(), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(printed) < 400:
                line = await proc.stdout.readline()
                assert line, "the writer stopped early"
                printed.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        rest = await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed += rest.decode().split()  # printed before the kill, after their commit
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    backend = await make()
    metas = await backend.get_many(printed)
    assert all(m.status == states.SUCCESS and m.result == "x" * 5000 for m in metas)


# ------------------------------------------------------------------ faults


async def test_locked_database_fails_clearly_after_busy_timeout(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(busy_timeout=0.2)
    kept = new_id()
    await backend.mark_as_done(kept, 1)
    with raw(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        with pytest.raises(ar.BackendUnavailable, match="database is locked"):
            await backend.mark_as_done(new_id(), 2)
        with pytest.raises(ar.BackendUnavailable, match="database is locked"):
            await backend.set_chord_size(new_id(), 2)
        assert (await backend.get_meta(kept)).result == 1  # WAL: reads go on
        lock.execute("ROLLBACK")
    assert await backend.mark_as_done(new_id(), 3)


async def test_lock_released_within_busy_timeout_is_waited_for(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(busy_timeout=10)
    await backend.get_meta(new_id())
    task_id = new_id()
    with raw(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, lock.execute, "ROLLBACK")
        assert await backend.mark_as_done(task_id, "after the lock")
    assert (await backend.get_meta(task_id)).result == "after the lock"


async def test_non_sqlite_file_is_reported_corrupted(make: BackendFactory, db_path: Path) -> None:
    garbage = b"this is not a database\n" * 400
    await anyio.Path(db_path).write_bytes(garbage)
    backend = await make()
    with pytest.raises(ar.BackendCorrupted, match="not a SQLite database"):
        await backend.get_meta(new_id())
    assert await anyio.Path(db_path).read_bytes() == garbage


async def test_damaged_database_is_reported_corrupted(make: BackendFactory, db_path: Path) -> None:
    writer = await make()
    ids = [new_id() for _ in range(300)]
    await asyncio.gather(*(writer.mark_as_done(t, "v" * 500) for t in ids))
    await writer.aclose()
    damage(db_path)  # keeps the header and the schema page
    reader = await make()
    with pytest.raises(ar.BackendCorrupted):
        await reader.get_many(ids)


async def test_foreign_table_is_refused_untouched(make: BackendFactory, db_path: Path) -> None:
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE celery_taskmeta (id INTEGER PRIMARY KEY, payload TEXT)")
    backend = await make()
    with pytest.raises(ar.BackendCorrupted, match="celery_taskmeta"):
        await backend.mark_as_done(new_id(), 1)
    with raw(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"celery_taskmeta"}


async def test_newer_schema_is_refused(make: BackendFactory, db_path: Path) -> None:
    first = await make()
    await first.get_meta(new_id())
    with raw(db_path) as conn:
        conn.execute("UPDATE aioresults_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ar.BackendCorrupted, match="newer aioresults"):
        await (await make()).get_meta(new_id())


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_file_deleted_or_replaced_while_open(
    make: BackendFactory, db_path: Path, tmp_path: Path, how: str
) -> None:
    backend = await make()
    before = new_id()
    assert await backend.mark_as_done(before, "in the first file")
    if how == "deleted":
        await anyio.Path(db_path).unlink()
    else:  # e.g. a backup restored over it: a copy, then a rename
        copy = tmp_path / "restored.db"
        with raw(db_path) as source, raw(copy) as target:
            source.backup(target)
        os.replace(copy, db_path)
    lost = new_id()
    # Never acknowledged into the file nobody can open any more.
    with pytest.raises(ar.BackendUnavailable, match=re.escape(str(db_path))):
        await backend.mark_as_done(lost, "into the old file")
    after = new_id()
    assert await backend.mark_as_done(after, "in the file at the path")
    assert (await backend.get_meta(after)).result == "in the file at the path"
    reader = await make()  # a new backend, as another process would open the path
    metas = await reader.get_many([before, lost, after])
    kept = (states.SUCCESS, "in the first file") if how == "replaced" else (states.PENDING, None)
    assert [(m.status, m.result) for m in metas] == [
        kept,
        (states.PENDING, None),
        (states.SUCCESS, "in the file at the path"),
    ]
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_file_deleted_during_a_commit_is_not_acknowledged(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(busy_timeout=10)
    assert isinstance(backend, SQLiteBackend)
    await backend.get_meta(new_id())
    task_id = new_id()
    with raw(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(backend.mark_as_done(task_id, "into the deleted file"))
        with anyio.fail_after(10):
            while not backend._batch_running:  # its batch now waits for the lock
                await asyncio.sleep(0.01)
        os.remove(db_path)  # after the write checked the file, before it commits
        lock.execute("ROLLBACK")
    with pytest.raises(ar.BackendUnavailable, match=re.escape(str(db_path))):
        await asyncio.wait_for(write, 10)
    assert await backend.mark_as_done(task_id, "in the file at the path")
    assert (await (await make()).get_meta(task_id)).result == "in the file at the path"


async def test_operations_that_meet_a_swap_at_once_reopen_it_once(
    make: BackendFactory, db_path: Path
) -> None:
    before = set(threading.enumerate())
    backend = await make()
    kept = new_id()
    await backend.mark_as_done(kept, 1)
    os.remove(db_path)
    ids = [new_id() for _ in range(6)]
    outcomes = await asyncio.gather(
        *(backend.get_meta(t) if i % 2 else backend.mark_as_done(t, i) for i, t in enumerate(ids)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, ar.BackendUnavailable) and str(db_path) in str(outcome)
    assert any(isinstance(o, BaseException) for o in outcomes), outcomes
    # A write acknowledged is in the file at the path.
    for i, (task_id, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        if outcome is True:
            assert (await backend.get_meta(task_id)).result == i
    # One writer and one reader, on the new file: nothing opened twice and left behind.
    assert len(set(threading.enumerate()) - before) == 2
    after = new_id()
    assert await backend.mark_as_done(after, "again")
    assert (await backend.get_meta(after)).result == "again"
    await backend.aclose()
    with anyio.fail_after(10):
        while set(threading.enumerate()) - before:
            await asyncio.sleep(0.01)


# The layout of schema 1 (aioresults 0.1): chord parts without count and receipt.
SCHEMA_1 = (
    """CREATE TABLE celery_taskmeta (
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
    "CREATE INDEX ix_celery_taskmeta_date_done ON celery_taskmeta (date_done)",
    """CREATE TABLE celery_tasksetmeta (
\tid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
\ttaskset_id VARCHAR(155),
\tresult BLOB,
\tdate_done DATETIME,
\tUNIQUE (taskset_id)
)""",
    "CREATE INDEX ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done)",
    "CREATE TABLE aioresults_schema (version INTEGER NOT NULL)",
    "CREATE TABLE aioresults_meta (task_id TEXT PRIMARY KEY, expires_at REAL, "
    "group_id TEXT, parent_id TEXT, extra BLOB)",
    "CREATE INDEX aioresults_meta_expires_at ON aioresults_meta (expires_at)",
    "CREATE TABLE aioresults_group (group_id TEXT PRIMARY KEY, expires_at REAL)",
    "CREATE TABLE aioresults_chord (group_id TEXT PRIMARY KEY, "
    "size INTEGER NOT NULL, count INTEGER NOT NULL DEFAULT 0, expires_at REAL)",
    "CREATE TABLE aioresults_chord_part (group_id TEXT NOT NULL, "
    "field TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (group_id, field))",
    "INSERT INTO aioresults_schema VALUES (1)",
)


async def test_schema_1_file_is_migrated_and_chords_work(
    make: BackendFactory, db_path: Path
) -> None:
    task_id, old_chord, old_part = new_id(), new_id(), new_id()
    with raw(db_path) as conn:  # a file written by aioresults 0.1, a chord half counted
        for statement in SCHEMA_1:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result, date_done) "
            "VALUES (?, 'SUCCESS', '\"kept\"', '2030-01-02 03:04:05.000006')",
            (task_id,),
        )
        # Written by a backend that keeps results for ever, as a group member.
        conn.execute("INSERT INTO aioresults_meta VALUES (?, NULL, 'g-1', NULL, NULL)", (task_id,))
        conn.execute("INSERT INTO aioresults_chord VALUES (?, 2, 1, NULL)", (old_chord,))
        part = {"task_id": old_part, "index": 0, "state": "SUCCESS", "result": "a", "seq": 1}
        conn.execute(
            "INSERT INTO aioresults_chord_part VALUES (?, ?, ?)",
            (old_chord, f"{old_part}:0", json.dumps(part).encode()),
        )
    backend = await make(expires=1)
    kept = await backend.get_meta(task_id)
    assert (kept.result, kept.group_id) == ("kept", "g-1")
    with raw(db_path) as conn:
        assert conn.execute("SELECT version FROM aioresults_schema").fetchall() == [(3,)]
        columns = [r[1] for r in conn.execute("PRAGMA table_info(aioresults_chord_part)")]
        (deadline,) = conn.execute(
            "SELECT aioresults_expires_at FROM celery_taskmeta WHERE task_id = ?", (task_id,)
        ).fetchone()
    assert columns == ["group_id", "field", "payload", "count", "receipt"]
    assert deadline == float("inf")  # its writer's "for ever", not this backend's 1 s
    assert SCHEMA_VERSION == 3
    # The chord counted under schema 1 goes on: its counted part stays counted.
    again = await backend.chord_part_return(old_chord, old_part, states.SUCCESS, "a", index=0)
    assert (again.counted, again.complete) == (False, False)
    last = new_id()
    done = await backend.chord_part_return(old_chord, last, states.SUCCESS, "b", index=1)
    assert (done.counted, done.count, done.complete, done.results) == (True, 2, True, ["a", "b"])
    # A chord started after the migration, its completing part redelivered.
    group_id, ids = new_id(), [new_id(), new_id()]
    await backend.set_chord_size(group_id, 2)
    outcomes = [
        await backend.chord_part_return(group_id, ids[i], states.SUCCESS, i, index=i)
        for i in (0, 1, 1)
    ]
    assert [(o.counted, o.count, o.complete) for o in outcomes] == [
        (True, 1, False),
        (True, 2, True),
        (False, 2, True),
    ]
    assert outcomes[1].results == outcomes[2].results == [0, 1]
    # A second backend opens the migrated file as it is.
    assert (await (await make()).get_meta(task_id)).result == "kept"


#: What aioresults 0.2.0 (schema 2) made: schema 1 with a chord part's count and receipt.
SCHEMA_2 = (
    *SCHEMA_1[:-2],
    "CREATE TABLE aioresults_chord_part (group_id TEXT NOT NULL, field TEXT NOT NULL, "
    "payload BLOB NOT NULL, count INTEGER, receipt TEXT, PRIMARY KEY (group_id, field))",
    "INSERT INTO aioresults_schema VALUES (2)",
)


async def test_schema_2_file_moves_its_expiry_rows_into_the_task_rows(
    make: BackendFactory, db_path: Path
) -> None:
    soon, forever, celery_row, grouped = new_id(), new_id(), new_id(), new_id()
    just_now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    with raw(db_path) as conn:
        for statement in SCHEMA_2:
            conn.execute(statement)
        for task_id in (soon, forever, celery_row, grouped):
            conn.execute(
                "INSERT INTO celery_taskmeta (task_id, status, result, date_done) "
                "VALUES (?, 'SUCCESS', ?, ?)",
                (task_id, json.dumps(task_id).encode(), just_now),
            )
        conn.executemany(
            "INSERT INTO aioresults_meta VALUES (?, ?, ?, ?, ?)",
            [
                (soon, time.time() + 0.5, None, None, None),
                (forever, None, None, None, None),  # its writer kept results for ever
                (grouped, time.time() + 3600, "g-1", "p-1", b'{"custom": 7}'),
            ],
        )
    # A reader that may not alter the file says what to do, and alters nothing.
    reader = await make(create=False)
    with pytest.raises(ar.StoreNotFound, match="older layout.*create=True"):
        await reader.get_meta(soon)
    with raw(db_path) as conn:
        assert conn.execute("SELECT version FROM aioresults_schema").fetchall() == [(2,)]
    backend = await make(expires=1)
    metas = {m.task_id: m for m in await backend.get_many([soon, forever, celery_row, grouped])}
    assert all(m.result == task_id for task_id, m in metas.items())
    held = metas[grouped]
    assert (held.group_id, held.parent_id, held.extra) == ("g-1", "p-1", {"custom": 7})
    with raw(db_path) as conn:
        assert conn.execute("SELECT version FROM aioresults_schema").fetchall() == [(3,)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        deadlines = dict(
            conn.execute("SELECT task_id, aioresults_expires_at FROM celery_taskmeta").fetchall()
        )
    assert "aioresults_meta" not in tables
    assert deadlines[forever] == float("inf") and deadlines[celery_row] is None
    await asyncio.sleep(1.2)
    # Each expires as its writer said: the short one has gone, the one kept for
    # ever has not; the row Celery wrote expires by date_done + this backend's 1 s.
    metas = {m.task_id: m for m in await backend.get_many([soon, forever, celery_row, grouped])}
    assert {t for t, m in metas.items() if m.status == states.SUCCESS} == {forever, grouped}
    assert await backend.cleanup() == 2
    assert (await (await make(create=False)).get_meta(forever)).result == forever


async def test_a_schema_table_left_empty_is_migrated_by_what_the_file_holds(
    make: BackendFactory, db_path: Path
) -> None:
    task_id = new_id()
    with raw(db_path) as conn:  # schema 2's tables, its version row missing
        for statement in SCHEMA_2[:-1]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result) VALUES (?, 'STARTED', 'null')",
            (task_id,),
        )
        conn.execute("INSERT INTO aioresults_meta VALUES (?, NULL, NULL, 'p-1', NULL)", (task_id,))
    backend = await make(expires=1)
    assert (await backend.get_meta(task_id)).parent_id == "p-1"
    with raw(db_path) as conn:
        assert conn.execute("SELECT version FROM aioresults_schema").fetchall() == [(3,)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        (deadline,) = conn.execute(
            "SELECT aioresults_expires_at FROM celery_taskmeta WHERE task_id = ?", (task_id,)
        ).fetchone()
    assert "aioresults_meta" not in tables and deadline == float("inf")


async def test_table_of_an_older_celery_gets_the_new_columns(
    make: BackendFactory, db_path: Path
) -> None:
    task_id = new_id()
    with raw(db_path) as conn:  # Celery 5.6's layout: no children, no stamps
        conn.execute(
            "CREATE TABLE celery_taskmeta (id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "
            "task_id VARCHAR(155) UNIQUE, status VARCHAR(50), result BLOB, date_done DATETIME, "
            "traceback TEXT, name VARCHAR(155), args BLOB, kwargs BLOB, worker VARCHAR(155), "
            "retries INTEGER, queue VARCHAR(155))"
        )
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result) VALUES (?, 'STARTED', ?)",
            (task_id, b'{"pid": 1}'),
        )
    backend = await make()
    assert (await backend.get_meta(task_id)).result == {"pid": 1}
    assert await backend.mark_as_done(task_id, 2, children=[[["c", None], None]])
    assert (await backend.get_meta(task_id)).children == [[["c", None], None]]
    with raw(db_path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(celery_taskmeta)")}
    assert {"children", "stamps"} <= columns


# ------------------------------------------------------------------ expiry


async def test_expiry_and_cleanup(make: BackendFactory, db_path: Path) -> None:
    short = await make(expires=0.2)
    keeper = await make(expires=None)
    gone, kept, group_id, chord_id = new_id(), new_id(), new_id(), new_id()
    await short.mark_as_done(gone, "gone")
    await short.save_group(group_id, [[group_id, None], []])
    await short.set_chord_size(chord_id, 2)
    await short.chord_part_return(chord_id, new_id(), states.SUCCESS, 1)
    await keeper.mark_as_done(kept, "kept")
    old_celery, started = new_id(), new_id()
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with raw(db_path) as conn:  # rows Celery wrote expire by date_done (none when not ready)
        conn.execute(
            "INSERT INTO celery_taskmeta (task_id, status, result, date_done) VALUES "
            "(?, 'SUCCESS', '\"celery\"', ?), (?, 'STARTED', 'null', NULL)",
            (old_celery, old, started),
        )
    await asyncio.sleep(0.3)
    metas = await short.get_many([gone, kept, old_celery, started])
    assert [m.status for m in metas] == [
        states.PENDING,
        states.SUCCESS,
        states.PENDING,
        states.STARTED,
    ]
    assert await short.restore_group(group_id) is None
    with pytest.raises(ar.ChordError):
        await short.chord_part_return(chord_id, new_id(), states.SUCCESS, 1)
    # The expired SUCCESS no longer guards its id.
    assert await keeper.mark_as_done(gone, "again")
    assert (await keeper.get_meta(gone)).result == "again"
    assert await short.cleanup() == 3  # the old Celery row, the group, the chord
    with raw(db_path) as conn:
        left = {r[0] for r in conn.execute("SELECT task_id FROM celery_taskmeta")}
        own = {
            r[0]
            for r in conn.execute(
                "SELECT task_id FROM celery_taskmeta WHERE aioresults_expires_at IS NOT NULL"
            )
        }
        groups = conn.execute("SELECT count(*) FROM celery_tasksetmeta").fetchone()
        parts = conn.execute("SELECT count(*) FROM aioresults_chord_part").fetchone()
    assert left == {gone, kept, started}
    assert own == {gone, kept}
    assert groups == parts == (0,)
    await asyncio.sleep(0.3)  # "again" was written by `keeper`, which keeps results forever
    assert await short.cleanup() == 0


async def test_create_false_opens_only_a_store_that_is_there(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    for path in (missing, tmp_path / "no" / "dir" / "r.db"):
        backend = SQLiteBackend(path, create=False)
        with pytest.raises(ar.StoreNotFound, match="no store at"):
            await backend.get_meta("t")
        await backend.aclose()
    assert not missing.exists() and not (tmp_path / "no").exists()
    sqlite3.connect(tmp_path / "empty.db").close()  # a file, but no results in it
    backend = SQLiteBackend(tmp_path / "empty.db", create=False)
    with pytest.raises(ar.StoreNotFound, match="no results table"):
        await backend.get_meta("t")
    await backend.aclose()
    async with SQLiteBackend(tmp_path / "real.db") as writer:
        await writer.mark_as_done("t", 1)
    async with SQLiteBackend(tmp_path / "real.db", create=False) as reader:
        assert (await reader.get_meta("t")).result == 1
