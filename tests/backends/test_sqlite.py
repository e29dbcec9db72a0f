"""What is specific to the SQLite backend: its file, its writer, other processes, faults."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
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
        assert columns == CELERY_COLUMNS
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
        (writer,) = [t for t in backend._tasks if t.get_name().startswith("sqlite writer")]
        writer.cancel()
        with pytest.raises(ar.BackendError, match="closed while committing"):
            await asyncio.wait_for(write, 10)
        lock.execute("ROLLBACK")


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
    writer, reader = await make(), await make(watch_mode="inotify")
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


@pytest.mark.parametrize("watch_mode", ["inotify", "poll"])
async def test_waiter_wakes_on_write_by_another_process(
    make: BackendFactory, db_path: Path, watch_mode: str
) -> None:
    backend = await make(watch_mode=watch_mode)
    assert isinstance(backend, SQLiteBackend)
    ids = [new_id() for _ in range(3)]
    group: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])
    joined = asyncio.create_task(group.join(timeout=30))
    with anyio.fail_after(10):
        while len(list(backend.wait_stats().watched_ids)) < 3:
            await asyncio.sleep(0.01)
    await anyio.run_process(python(WRITER, str(db_path), *ids), env=child_env())
    assert await joined == [f"from {i}" for i in ids]
    if watch_mode == "inotify":
        assert backend.stats["file_events"] > 0


async def test_own_commits_wake_nothing_until_someone_waits(
    make: BackendFactory, db_path: Path
) -> None:
    backend = await make(watch_mode="inotify")
    assert isinstance(backend, SQLiteBackend)
    await asyncio.gather(*(backend.mark_as_done(new_id(), i) for i in range(50)))
    for i in range(20):
        await backend.mark_as_done(new_id(), i)
    await asyncio.sleep(0.2)
    assert backend.stats["file_events"] == 0 and backend.stats["refreshes"] == 0
    # The file events of those commits waited, unread; a waiter still wakes on the next.
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=30))
    with anyio.fail_after(10):
        while not list(backend.wait_stats().watched_ids):
            await asyncio.sleep(0.01)
    await anyio.run_process(python(WRITER, str(db_path), task_id), env=child_env())
    assert await waiting == f"from {task_id}"
    assert backend.stats["file_events"] > 0


async def test_idle_waiter_reads_nothing(make: BackendFactory) -> None:
    backend = await make(watch_mode="inotify")
    assert isinstance(backend, SQLiteBackend)
    waiting: asyncio.Task[Any] = asyncio.create_task(
        ar.AsyncResult(new_id(), backend).get(timeout=30)
    )
    with anyio.fail_after(10):
        while not list(backend.wait_stats().watched_ids):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert backend.stats["refreshes"] == 0 and backend.stats["file_events"] == 0
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


WAITER = """
import asyncio, sys
from aioresults.backends.sqlite import SQLiteBackend

async def main():
    async with SQLiteBackend(sys.argv[1], watch_mode="inotify") as backend:
        async with backend.waiter([sys.argv[2]]) as waiter:
            print("waiting", flush=True)  # registered and read: what comes next is a wake-up
            while True:
                _, meta = await asyncio.wait_for(waiter.next(), 30)
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
    print(json.dumps([[o.counted, o.complete, o.results] for o in outcomes]))

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
    assert sum(counted for counted, _, _ in outputs) == 40
    completes = [results for _, complete, results in outputs if complete]
    assert completes == [list(range(40))]


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
        own = {r[0] for r in conn.execute("SELECT task_id FROM aioresults_meta")}
        groups = conn.execute("SELECT count(*) FROM celery_tasksetmeta").fetchone()
        parts = conn.execute("SELECT count(*) FROM aioresults_chord_part").fetchone()
    assert left == {gone, kept, started}
    assert own == {gone, kept}
    assert groups == parts == (0,)
    await asyncio.sleep(0.3)  # "again" was written by `keeper`, which keeps results forever
    assert await short.cleanup() == 0
