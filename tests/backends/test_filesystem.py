"""What only the filesystem backend does: Celery's files, atomic writes, inotify, flock."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sniffio

import aioresults as ar
from aioresults import states
from aioresults.backends.filesystem import FilesystemBackend
from aioresults.backends.memory import MemoryBackend
from tests.conftest import BackendFactory

ROOT = Path(__file__).resolve().parents[2]
OLD = time.time() - 7200  # an mtime two hours ago


def new_id() -> str:
    return str(uuid.uuid4())


async def make(factory: BackendFactory, **options: Any) -> FilesystemBackend:
    backend = await factory(**options)
    assert isinstance(backend, FilesystemBackend)
    return backend


def files(directory: str | Path) -> list[str]:
    return sorted(os.listdir(directory))


def tree(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


async def run_python(script: str, *args: str) -> str:
    """Run ``script`` in a new interpreter that imports this checkout; return its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = await anyio.run_process([sys.executable, "-c", script, *args], cwd=ROOT, env=env)
    return done.stdout.decode()


WRITE_SCRIPT = """
import sys, anyio
from aioresults.backends.filesystem import FilesystemBackend

async def main(path, task_id):
    async with FilesystemBackend(path, watch="poll") as backend:
        await backend.mark_as_started(task_id, {"pid": 1})
        await backend.mark_as_done(task_id, {"from": "child"})

anyio.run(main, *sys.argv[1:])
"""

CHORD_SCRIPT = """
import asyncio, json, sys, time
from aioresults.backends.filesystem import FilesystemBackend

async def main(path, group_id, start_at):
    async with FilesystemBackend(path, watch="poll") as backend:
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        outcomes = await asyncio.gather(*(
            backend.chord_part_return(group_id, f"part-{i}", "SUCCESS", i, index=i)
            for i in range(50)
        ))
    fields = ("group_id", "task_id", "counted", "count", "size", "complete", "results")
    print(json.dumps([{f: getattr(o, f) for f in fields} for o in outcomes]))

asyncio.run(main(*sys.argv[1:]))
"""


DIE_AFTER_COMMIT_SCRIPT = """
import json, os, sys, anyio
from aioresults import states
from aioresults.backends.filesystem import FilesystemBackend

async def main(path, group_id):
    async with FilesystemBackend(path, watch="poll") as backend:
        done = await backend.chord_part_return(group_id, "c", states.SUCCESS, "C", index=2)
        print(json.dumps({"counted": done.counted, "complete": done.complete,
                          "count": done.count}), flush=True)
        os._exit(3)  # dies after the commit, before running the chord's body

anyio.run(main, *sys.argv[1:])
"""


# ------------------------------------------------------------------ URLs and setup


@pytest.mark.parametrize(
    ("url", "path"),
    [("file:///srv/results", "/srv/results"), ("file://localhost/srv/results", "/srv/results")],
)
def test_urls(url: str, path: str) -> None:
    backend = ar.connect(url)
    assert isinstance(backend, FilesystemBackend)
    assert backend.path == path


@pytest.mark.parametrize(
    "url",
    [
        "file://host/srv/results",
        "file://relative/dir",
        "file://",
        "file:///srv?x=1",
        "file:///srv#frag",
    ],
)
def test_other_urls_are_refused(url: str) -> None:
    with pytest.raises(ar.ConfigurationError, match="file:///abs/dir"):
        FilesystemBackend.from_url(url)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ar.ConfigurationError):
        FilesystemBackend(tmp_path, poll_interval=2, max_poll_interval=1)
    with pytest.raises(ar.ConfigurationError):
        FilesystemBackend(tmp_path, global_keyprefix="../up")


async def test_missing_directory_is_created(make_file_backend: BackendFactory) -> None:
    backend = await make(make_file_backend)
    assert not await anyio.Path(backend.path).exists()
    await backend.mark_as_done("t", 1)
    assert "celery-task-meta-t" in files(backend.path)


async def test_unusable_path_is_a_configuration_error(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_bytes(b"")
    for path in (regular, regular / "below"):
        backend = FilesystemBackend(path)
        with pytest.raises(ar.ConfigurationError, match="directory"):
            await backend.get_meta("t")
        await backend.aclose()


async def test_vanished_directory_is_unavailable(make_file_backend: BackendFactory) -> None:
    """A directory replaced by something else cannot be used: writes and reads say
    so. (A directory that is merely removed is created again: see the next test.)"""
    backend = await make(make_file_backend)
    await backend.mark_as_done("t", 1)
    shutil.rmtree(backend.path)
    await anyio.Path(backend.path).write_bytes(b"")
    unavailable = f"cannot use result directory {re.escape(backend.path)}"
    with pytest.raises(ar.BackendUnavailable, match=unavailable):
        await backend.mark_as_done("u", 1)
    with pytest.raises(ar.BackendUnavailable, match=unavailable):
        await backend.get_meta("t")
    assert await anyio.Path(backend.path).read_bytes() == b""


async def test_removed_directory_is_created_again_and_watched_again(
    make_file_backend: BackendFactory,
) -> None:
    """The directory is removed while a backend is open and a waiter waits through
    inotify: the next write creates it again, and the feed, told by IN_IGNORED that
    its watch is gone, watches the new directory, so a record stored there by
    another process wakes the waiter."""
    backend = await make(make_file_backend, watch="notify")
    await backend.mark_as_done("before", 1)
    task_id = new_id()
    async with backend.waiter([task_id]) as waiter:
        with anyio.fail_after(5):
            first = await waiter.next()
        assert first is not None and first.meta().status == states.PENDING
        shutil.rmtree(backend.path)
        with anyio.fail_after(5):
            while backend.wait_stats().feed_failures < 1:  # IN_IGNORED has been read
                await anyio.sleep(0.01)
        assert await backend.mark_as_done("after", 2)
        assert "celery-task-meta-after" in files(backend.path)
        assert (await backend.get_meta("after")).result == 2
        await run_python(WRITE_SCRIPT, backend.path, task_id)
        with anyio.fail_after(5):
            while True:
                record = await waiter.next()
                assert record is not None
                if record.meta().ready:
                    break
        assert record.meta().result == {"from": "child"}
    stats = backend.wait_stats()
    # Woken by inotify on the new directory (or by the re-read once it watched it
    # again), never by a poller.
    assert stats.mode == "inotify" and stats.sessions == 2 and stats.polls == 0


# ------------------------------------------------------------------ Celery's files


async def test_file_names_and_bytes(make_file_backend: BackendFactory) -> None:
    backend = await make(make_file_backend)
    await backend.store_result("t1", {"a": [1, 2]}, states.SUCCESS, name="tasks.add", args=[1])
    await ar.GroupResult("g1", [ar.AsyncResult("t1", backend)], backend).save()
    raw = await anyio.Path(backend.path, "celery-task-meta-t1").read_bytes()
    meta = await backend.get_meta("t1")
    assert raw == backend.encode_meta(meta)
    assert list(json.loads(raw)) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "name",
        "args",
        "kwargs",
        "worker",
        "retries",
        "queue",
        "task_id",
    ]
    group = json.loads(await anyio.Path(backend.path, "celery-taskset-meta-g1").read_bytes())
    assert group == {"result": [["g1", None], [[["t1", None], None]]]}
    # Nothing else is visible: the lock is hidden and no temporary file is left.
    assert files(backend.path) == [
        ".aioresults.lock",
        "celery-task-meta-t1",
        "celery-taskset-meta-g1",
    ]


async def test_empty_file_reads_as_pending(make_file_backend: BackendFactory) -> None:
    backend = await make(make_file_backend)
    await backend.mark_as_done("other", 1)  # creates the directory
    await anyio.Path(backend.path, "celery-task-meta-t").write_bytes(b"")
    assert (await backend.get_meta("t")).status == states.PENDING


async def test_half_written_celery_file_is_read_again(make_file_backend: BackendFactory) -> None:
    """Celery truncates then writes in place; a fresh unreadable file is re-read."""
    backend = await make(make_file_backend)
    await backend.mark_as_done("other", 1)
    path = anyio.Path(backend.path, "celery-task-meta-t")
    whole = json.dumps({"status": "SUCCESS", "result": 7, "task_id": "t"}).encode()
    await path.write_bytes(whole[:10])

    async def finish() -> None:
        await anyio.sleep(0.005)
        await path.write_bytes(whole)

    async with anyio.create_task_group() as tg:
        tg.start_soon(finish)
        assert (await backend.get_meta("t")).result == 7
    # An old unreadable file is corrupt, not being written.
    await path.write_bytes(whole[:10])
    os.utime(path, (OLD, OLD))
    with pytest.raises(ar.DecodeError):
        await backend.get_meta("t")


async def test_reads_allocate_by_file_size_not_by_the_limit(
    make_file_backend: BackendFactory,
) -> None:
    """A 10-byte record under a 2 GiB max_value_size is read with a buffer of its
    own size (a read sized by the limit would allocate 2 GiB); a file larger than
    max_value_size is still refused."""
    backend = await make(make_file_backend, max_value_size=2**31)
    await backend.mark_as_done("other", 1)  # creates the directory
    tiny = anyio.Path(backend.path, "celery-task-meta-tiny")
    await tiny.write_bytes(b'{"x":1234}')
    assert (await tiny.stat()).st_size == 10
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        meta = await backend.get_meta("tiny")
        other = await backend.get_meta("other")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meta.status == states.PENDING and meta.extra == {"x": 1234}
    assert other.result == 1
    assert peak < 16 * 2**20, f"reading two small files peaked at {peak} bytes"
    small = await make(make_file_backend, max_value_size=100)
    await anyio.Path(backend.path, "celery-task-meta-big").write_bytes(
        json.dumps({"status": "SUCCESS", "result": "x" * 200, "task_id": "big"}).encode()
    )
    with pytest.raises(ar.ResultTooLarge):
        await small.get_meta("big")
    with pytest.raises(ar.ResultTooLarge):
        await small.get_many(["other", "big"])
    assert (await backend.get_meta("big")).result == "x" * 200


async def test_a_cancelled_store_waits_for_its_file_operation(
    make_file_backend: BackendFactory,
) -> None:
    """A store cancelled while its write runs in a worker thread (here: waiting
    for the directory's lock, held as another writer would: a write over a
    stored record takes it) returns only once the write is done: no file
    operation outlives the call that asked for it."""
    import fcntl

    backend = await make(make_file_backend)
    await backend.mark_as_started("t")
    lock = os.open(os.path.join(backend.path, ".aioresults.lock"), os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = asyncio.create_task(backend.mark_as_done("t", "stored"))
        await asyncio.sleep(0.1)
        store.cancel()
        await asyncio.sleep(0.2)
        assert not store.done()
    finally:
        os.close(lock)  # releases the lock
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(store, 10)
    assert (await backend.get_meta("t")).result == "stored"


# ------------------------------------------------------------------ atomic writes


async def test_concurrent_rewrites_are_never_torn(make_file_backend: BackendFactory) -> None:
    """200 writers rewrite one 200 KB record while threads and a backend read it."""
    writer, reader = await make(make_file_backend), await make(make_file_backend)
    task_id = new_id()

    def value(i: int) -> dict[str, Any]:
        return {"writer": i, "blob": f"{i:04d}" * 50_000}

    await writer.update_state(task_id, "PROGRESS", value(-1))
    path = Path(writer.path, writer.task_key(task_id))
    bad: list[str] = []
    seen: set[int] = set()
    counts = {"file": 0, "backend": 0}
    stop = threading.Event()

    def check(record: Any) -> None:
        result = record["result"]
        assert record["status"] == "PROGRESS", record["status"]
        assert -1 <= result["writer"] < 200
        assert result == value(result["writer"])
        seen.add(result["writer"])

    def read_file() -> None:
        while not stop.is_set():
            counts["file"] += 1
            try:
                check(json.loads(path.read_bytes()))
            except Exception as exc:  # every failure is recorded, none may happen
                bad.append(repr(exc)[:200])

    async def read_backend() -> None:
        while not stop.is_set():
            counts["backend"] += 1
            try:
                meta = await reader.get_meta(task_id)
                check({"status": meta.status, "result": meta.result})
            except Exception as exc:
                bad.append(repr(exc)[:200])
            await anyio.lowlevel.checkpoint()

    threads = [threading.Thread(target=read_file) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_backend)
            async with anyio.create_task_group() as writers:
                for i in range(200):
                    writers.start_soon(writer.update_state, task_id, "PROGRESS", value(i))
            stop.set()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert bad == []
    assert counts["file"] > 0 and counts["backend"] > 0
    assert len(seen) > 1  # the readers saw rewrites, not only the first record
    assert [n for n in files(writer.path) if n.endswith(".tmp")] == []


# ------------------------------------------------------------------ ids


HOSTILE = [
    "../x",
    "a/b",
    "/etc/passwd",
    "a\\b",
    ".hidden",
    ".",
    "..",
    "x\x00y",
    "x" * 10_000,
    "é" * 120,
    "\ud800",
]


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda s: repr(s)[:20])
async def test_hostile_ids_write_nothing(tmp_path: Path, bad: str) -> None:
    async with FilesystemBackend(tmp_path / "results") as backend:
        await backend.mark_as_done("fine", 1)
        before = tree(tmp_path)
        with pytest.raises(ar.InvalidTaskId):
            await backend.mark_as_done(bad, 1)
        with pytest.raises(ar.InvalidTaskId):
            await backend.get_meta(bad)
        with pytest.raises(ar.InvalidTaskId):
            await backend.forget(bad)
        with pytest.raises(ar.InvalidTaskId):
            backend.waiter([bad])
        with pytest.raises(ar.InvalidTaskId):
            await backend.save_group(bad, [[bad, None], []])
        with pytest.raises(ar.InvalidTaskId):
            await backend.set_chord_size(bad, 2)
        await backend.set_chord_size("g", 2)
        with pytest.raises(ar.InvalidTaskId):
            await backend.chord_part_return("g", bad, states.SUCCESS, 1)
        with pytest.raises(ar.InvalidTaskId):
            await backend.mark_as_done("fine2", 1, group_id=bad)
        after = [p for p in tree(tmp_path) if "celery-taskset-meta-g" not in p]
        assert after == before


async def test_id_length_is_counted_in_file_name_bytes(make_file_backend: BackendFactory) -> None:
    backend = await make(make_file_backend)
    longest_task = 255 - len("celery-task-meta-")
    longest_group = 255 - len(".celery-taskset-meta-.p")
    await backend.mark_as_done("t" * longest_task, 1)
    await backend.mark_as_done("é" * (longest_task // 2), 1)  # two bytes each
    with pytest.raises(ar.InvalidTaskId, match="256-byte"):
        await backend.mark_as_done("t" * (longest_task + 1), 1)
    with pytest.raises(ar.InvalidTaskId):
        await backend.mark_as_done("é" * (longest_task // 2 + 1), 1)
    await backend.set_chord_size("g" * longest_group, 1)
    progress = await backend.chord_part_return("g" * longest_group, "t", states.SUCCESS, 1)
    assert progress.complete
    with pytest.raises(ar.InvalidTaskId):
        await backend.save_group("g" * (longest_group + 1), [])


# ------------------------------------------------------------------ expiry and forgetting


async def test_writer_decides_expiry_and_cleanup_deletes(
    make_file_backend: BackendFactory,
) -> None:
    short = await make(make_file_backend, expires=0.3)
    keeper = await make(make_file_backend, expires=None)
    await short.mark_as_done("t1", 1)
    await short.save_group("g1", [["g1", None], []])
    await short.set_chord_size("c1", 2)
    await short.chord_part_return("c1", "p1", states.SUCCESS, 1)
    await keeper.mark_as_done("t2", 2)
    await anyio.sleep(0.5)
    assert (await short.get_meta("t1")).status == states.PENDING
    assert (await keeper.get_meta("t1")).status == states.PENDING  # as a Redis TTL would
    assert await short.restore_group("g1") is None
    with pytest.raises(ar.ChordError):
        await short.chord_part_return("c1", "p2", states.SUCCESS, 2)
    # t1, g1, the chord's size, counter and parts; never t2, whoever cleans up.
    assert await keeper.cleanup() == 5
    assert await keeper.cleanup() == 0
    assert files(keeper.path) == [".aioresults.lock", "celery-task-meta-t2"]
    assert (await short.get_meta("t2")).result == 2


async def test_celery_files_expire_by_age(make_file_backend: BackendFactory) -> None:
    hourly = await make(make_file_backend, expires=3600)
    forever = await make(make_file_backend, expires=None)
    await hourly.mark_as_done("fresh", 1)
    directory = Path(hourly.path)
    record = {"status": "SUCCESS", "result": 1, "task_id": "old"}
    for name in ("celery-task-meta-old", "notes.txt", ".aioresults-dead.tmp"):
        (directory / name).write_bytes(json.dumps(record).encode())
        os.utime(directory / name, (OLD, OLD))
    (directory / ".aioresults-live.tmp").write_bytes(b"being written")
    assert (await hourly.get_meta("old")).status == states.PENDING
    assert (await forever.get_meta("old")).result == 1
    assert await forever.cleanup() == 0
    assert await hourly.cleanup() == 1
    assert files(directory) == [
        ".aioresults-live.tmp",
        ".aioresults.lock",
        "celery-task-meta-fresh",
        "notes.txt",
    ]


async def test_forget_missing_is_a_no_op(make_file_backend: BackendFactory) -> None:
    backend = await make(make_file_backend)
    await backend.forget("never-stored")
    await backend.mark_as_done("t", 1)
    await backend.forget("t")
    await backend.forget("t")
    await backend.delete_group("never-saved")
    assert (await backend.get_meta("t")).status == states.PENDING


# ------------------------------------------------------------------ waiting


async def test_inotify_wakes_a_waiter_for_another_instance(
    make_file_backend: BackendFactory,
) -> None:
    waiting = await make(make_file_backend, watch="notify")
    writing = await make(make_file_backend, watch="poll")
    task_id = new_id()

    async def store_later() -> None:
        await anyio.sleep(0.1)
        await writing.mark_as_done(task_id, "pushed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(store_later)
        assert await ar.AsyncResult(task_id, waiting).get(timeout=10) == "pushed"
    stats = waiting.wait_stats()
    assert stats.mode == "inotify" and stats.polls == 0  # no poller runs


@pytest.mark.parametrize("watch", ["notify", "poll"], ids=["inotify", "polling"])
async def test_store_from_another_process_wakes_a_waiter(
    make_file_backend: BackendFactory, watch: str
) -> None:
    backend = await make(make_file_backend, watch=watch, poll_interval=0.02, max_poll_interval=0.1)
    task_id = new_id()
    async with backend.waiter([task_id]) as waiter:
        first = await waiter.next()
        assert first is not None and first.meta().status == states.PENDING
        await run_python(WRITE_SCRIPT, backend.path, task_id)
        with anyio.fail_after(10):
            while True:
                record = await waiter.next()
                assert record is not None
                meta = record.meta()
                if meta.ready:
                    break
    assert meta.result == {"from": "child"}
    stats = backend.wait_stats()
    if watch == "notify":
        assert stats.mode == "inotify" and stats.polls == 0
    else:
        assert stats.mode == "poll" and stats.polls > 0


async def _waiting_for(backend: FilesystemBackend, task_id: str) -> asyncio.Task[Any]:
    """A get() of ``task_id`` that is registered and has done its first read."""
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
    with anyio.fail_after(10):
        while not (backend.wait_stats().waiters == 1 and backend.wait_stats().unsettled == 0):
            await asyncio.sleep(0.005)
    return waiting


async def test_a_record_written_meanwhile_comes_with_its_event(
    make_file_backend: BackendFactory,
) -> None:
    """inotify reports a watched file: the feed reads it and hands it over itself,
    with no re-read of the watched ids."""
    backend = await make(make_file_backend, watch="notify")
    await backend.mark_as_done("other", 1)
    waiting = await _waiting_for(backend, "t")
    temp = anyio.Path(backend.path, ".foreign.tmp")  # as another atomic writer would
    await temp.write_bytes(json.dumps({"status": "SUCCESS", "result": 7, "task_id": "t"}).encode())
    await temp.rename(anyio.Path(backend.path, "celery-task-meta-t"))
    assert await asyncio.wait_for(waiting, 10) == 7
    assert backend.wait_stats().refreshes == 0


async def test_a_half_written_celery_record_is_not_handed_over(
    make_file_backend: BackendFactory,
) -> None:
    """Celery truncates and then writes in place: the feed sees the file half
    written, leaves it to the re-read, and the waiter gets the whole record."""
    backend = await make(make_file_backend, watch="notify")
    await backend.mark_as_done("other", 1)
    waiting = await _waiting_for(backend, "t")
    path = anyio.Path(backend.path, "celery-task-meta-t")
    whole = json.dumps({"status": "SUCCESS", "result": 7, "task_id": "t"}).encode()
    await path.write_bytes(whole[:10])
    await asyncio.sleep(0.005)
    await path.write_bytes(whole)
    assert await asyncio.wait_for(waiting, 10) == 7


def plant(directory: str, records: list[tuple[str, Any]]) -> None:
    """Store records as another process's atomic writer would (blocking: called
    from a test, it holds the event loop until every file is there)."""
    for task_id, result in records:
        temp = os.path.join(directory, f".planted-{task_id}")
        with open(temp, "wb") as f:
            f.write(
                json.dumps({"status": "SUCCESS", "result": result, "task_id": task_id}).encode()
            )
        os.replace(temp, os.path.join(directory, f"celery-task-meta-{task_id}"))


async def test_a_flood_of_changes_is_read_in_batches(make_file_backend: BackendFactory) -> None:
    """Thousands of watched results stored at once: the feed reads a few itself
    and leaves the rest to batched re-reads in a worker thread (it never holds
    the event loop for long); every waiter gets its record."""
    backend = await make(make_file_backend, watch="notify")
    await backend.mark_as_done("other", 1)
    ids = [new_id() for _ in range(300)]
    gets = [asyncio.create_task(ar.AsyncResult(t, backend).get(timeout=30)) for t in ids]
    with anyio.fail_after(10):
        while not (
            backend.wait_stats().waiters == len(ids) and backend.wait_stats().unsettled == 0
        ):
            await asyncio.sleep(0.005)
    plant(backend.path, [(t, n) for n, t in enumerate(ids)])
    assert await asyncio.wait_for(asyncio.gather(*gets), 30) == list(range(len(ids)))
    assert backend.wait_stats().refreshes >= 1


async def test_polling_wakes_its_own_writes_at_once(make_file_backend: BackendFactory) -> None:
    # A poller this slow would not see the write within the timeout: the store delivers it.
    backend = await make(make_file_backend, watch="poll", poll_interval=600, max_poll_interval=600)
    task_id = new_id()

    async def store_later() -> None:
        await anyio.sleep(0.1)
        await backend.mark_as_done(task_id, "local")

    async with anyio.create_task_group() as tg:
        tg.start_soon(store_later)
        assert await ar.AsyncResult(task_id, backend).get(timeout=10) == "local"
    assert backend.wait_stats().mode == "poll"


async def test_unchanged_records_are_not_delivered_again(
    make_file_backend: BackendFactory,
) -> None:
    backend = await make(
        make_file_backend, watch="poll", poll_interval=0.01, max_poll_interval=0.01
    )
    other = await make(make_file_backend, watch="poll")
    failed, pending = new_id(), new_id()
    async with backend.waiter([failed, pending]) as waiter:
        await waiter.next()
        await waiter.next()
        await other.mark_as_failure(failed, ValueError("once"))
        with anyio.fail_after(10):
            record = await waiter.next()
        assert record is not None and record.task_id == failed
        assert isinstance(record.meta().result, ValueError)
        polls = backend.wait_stats().polls
        await anyio.sleep(0.2)  # many polls; the failure (a new exception each read) is old news
        assert backend.wait_stats().polls > polls
        assert not waiter.pending()


async def test_waiting_survives_the_directory_being_replaced(
    make_file_backend: BackendFactory,
) -> None:
    """The watched directory is removed and made again by someone else: the feed
    sees its watch go (IN_IGNORED), watches the new directory, and a record stored
    there by another process wakes the waiter."""
    backend = await make(make_file_backend, poll_interval=0.02, max_poll_interval=0.1)
    task_id = new_id()
    async with backend.waiter([task_id]) as waiter:
        await waiter.next()
        assert backend.wait_stats().mode == "inotify"
        assert backend.wait_stats().sessions == 1
        shutil.rmtree(backend.path)
        with anyio.fail_after(10):
            while backend.wait_stats().feed_failures < 1:
                await anyio.sleep(0.01)
        os.makedirs(backend.path)
        await run_python(WRITE_SCRIPT, backend.path, task_id)
        with anyio.fail_after(10):
            while True:
                record = await waiter.next()
                assert record is not None
                meta = record.meta()
                if meta.ready:
                    break
        assert meta.result == {"from": "child"}
    stats = backend.wait_stats()
    assert stats.mode == "inotify" and stats.sessions == 2 and stats.polls == 0


def inotify_fds() -> int:
    return sum(
        os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


async def test_aclose_stops_the_watcher_then_closes_inotify(tmp_path: Path) -> None:
    before = inotify_fds()
    backend = FilesystemBackend(tmp_path)

    def feed_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == f"{backend!r} feed"]

    # The watch is set up for the first waiter (an idle backend holds no inotify).
    await backend.get_meta("t")
    assert inotify_fds() == before and not feed_tasks()
    async with backend.waiter(["t"]) as waiter:
        with anyio.fail_after(5):
            assert await waiter.next() is not None
    assert backend.wait_stats().sessions == 1
    assert inotify_fds() == before + 1
    assert len(feed_tasks()) == 1
    await backend.aclose()
    assert inotify_fds() == before
    assert not feed_tasks()


# ------------------------------------------------------------------ chords


def check_duplicate_deliveries(outcomes: list[ar.ChordProgress], size: int) -> None:
    """Every part counted once; only the completing part's deliveries complete, all
    with the results, and exactly one of them is the call that counted it."""
    assert sum(o.counted for o in outcomes) == size
    completing = [o for o in outcomes if o.complete]
    assert sum(o.counted for o in completing) == 1
    assert len({o.task_id for o in completing}) == 1
    assert all(o.results == list(range(size)) for o in completing)
    assert all(o.count is not None and o.count <= size for o in outcomes)


async def test_chord_parts_counted_once_across_instances(
    make_file_backend: BackendFactory,
) -> None:
    first, second = await make(make_file_backend), await make(make_file_backend)
    group_id = new_id()
    await first.set_chord_size(group_id, 50)
    deliveries = [(b, i) for i in range(50) for b in (first, second)]  # each part twice
    outcomes = await asyncio.gather(
        *(
            b.chord_part_return(group_id, f"part-{i}", states.SUCCESS, i, index=i)
            for b, i in deliveries
        )
    )
    check_duplicate_deliveries(outcomes, 50)
    assert 1 <= sum(o.complete for o in outcomes) <= 2


async def test_chord_parts_counted_once_across_processes(
    make_file_backend: BackendFactory,
) -> None:
    backend = await make(make_file_backend)
    group_id = new_id()
    await backend.set_chord_size(group_id, 50)
    start_at = time.time() + 1.5  # the children start together with this process
    outcomes: list[ar.ChordProgress] = []

    async def child() -> None:
        report = await run_python(CHORD_SCRIPT, backend.path, group_id, str(start_at))
        outcomes.extend(ar.ChordProgress(**o) for o in json.loads(report))

    async def here() -> None:
        await anyio.sleep(start_at - time.time())
        outcomes.extend(
            await asyncio.gather(
                *(
                    backend.chord_part_return(group_id, f"part-{i}", states.SUCCESS, i, index=i)
                    for i in range(50)
                )
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
        tg.start_soon(child)
        tg.start_soon(here)
    assert len(outcomes) == 150  # each part delivered three times, once per process
    check_duplicate_deliveries(outcomes, 50)
    assert 1 <= sum(o.complete for o in outcomes) <= 3


async def test_chord_part_whose_file_never_landed_is_counted_again(
    make_file_backend: BackendFactory,
) -> None:
    """A worker bumped the counter for part B and died (or hit ENOSPC) before B's
    own file was renamed into place: the counter names B as its last part and B's
    file is missing. The next count, of any part, rolls the counter back; B's
    redelivery is then counted and the chord completes with every result.

    The reverse, a part file whose count the counter does not hold, cannot
    happen: under the directory's lock the counter is renamed into place
    *before* the part file, each rename is atomic, and nothing else writes
    either file while the lock is held. So a crash can only leave the counter one
    ahead, naming the one part whose file is missing, which the next count sees.
    """
    backend = await make(make_file_backend)
    group_id = new_id()
    await backend.set_chord_size(group_id, 3)
    a = await backend.chord_part_return(group_id, "a", states.SUCCESS, "A", index=0)
    assert a.counted and a.count == 1
    # What the dying worker left: the counter bumped for B ("<count> <part hash>"),
    # written as the backend writes it, and no file for B.
    directory = anyio.Path(backend.path)
    parts = directory / f".celery-taskset-meta-{group_id}.p"
    counter = directory / f"celery-taskset-meta-{group_id}.n"
    b_hash = hashlib.sha256(b"b:1").hexdigest()
    await counter.write_bytes(f"2 {b_hash}".encode())
    assert not await (parts / b_hash).exists()
    # The next part takes B's place in the count: B was never counted.
    c = await backend.chord_part_return(group_id, "c", states.SUCCESS, "C", index=2)
    assert c.counted and c.count == 2 and not c.complete
    c_hash = hashlib.sha256(b"c:2").hexdigest()
    assert await counter.read_bytes() == f"2 {c_hash}".encode()
    # B's redelivery is counted, and completes the chord.
    b = await backend.chord_part_return(group_id, "b", states.SUCCESS, "B", index=1)
    assert b.counted and b.count == 3 and b.complete
    assert b.results == ["A", "B", "C"]
    assert await counter.read_bytes() == f"3 {b_hash}".encode()
    assert sorted([p.name async for p in parts.iterdir()]) == sorted(
        hashlib.sha256(p.encode()).hexdigest() for p in ("a:0", "b:1", "c:2")
    )


async def test_chord_dead_worker_last_part_rolled_back_on_its_own_redelivery(
    make_file_backend: BackendFactory,
) -> None:
    """The same crash on the part that would complete the chord: its redelivery
    rolls the counter back, is counted, and completes it."""
    backend = await make(make_file_backend)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    await backend.chord_part_return(group_id, "a", states.SUCCESS, "A", index=0)
    b_hash = hashlib.sha256(b"b:1").hexdigest()
    counter = anyio.Path(backend.path, f"celery-taskset-meta-{group_id}.n")
    await counter.write_bytes(f"2 {b_hash}".encode())
    b = await backend.chord_part_return(group_id, "b", states.SUCCESS, "B", index=1)
    assert b.counted and b.count == 2 and b.complete and b.results == ["A", "B"]


async def test_chord_completing_part_redelivered_after_its_worker_died(
    make_file_backend: BackendFactory,
) -> None:
    """A worker in another process counts the chord's last part, learns it is
    complete, and dies before running the body. The broker redelivers that part
    (a new call, a new receipt): it reports complete again, with the results, so
    the body still runs. A redelivery of another part does not complete."""
    backend = await make(make_file_backend)
    group_id = new_id()
    await backend.set_chord_size(group_id, 3)
    first = await backend.chord_part_return(group_id, "a", states.SUCCESS, "A", index=0)
    await backend.chord_part_return(group_id, "b", states.SUCCESS, "B", index=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    died = await anyio.run_process(
        [sys.executable, "-c", DIE_AFTER_COMMIT_SCRIPT, backend.path, group_id],
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert died.returncode == 3, died.stderr.decode()
    assert json.loads(died.stdout) == {"counted": True, "complete": True, "count": 3}
    again = await backend.chord_part_return(group_id, "c", states.SUCCESS, "C", index=2)
    assert again.complete and not again.counted and again.count == 3
    assert again.results == ["A", "B", "C"] and not again.failed
    other = await backend.chord_part_return(group_id, "a", states.SUCCESS, "A", index=0)
    assert not other.complete and not other.counted
    assert other.count == first.count == 1 and other.results is None


# ------------------------------------------------------------------ trio


async def _trio_scenario(directory: Path) -> None:
    assert sniffio.current_async_library() == "trio"
    shared = f"trio-{uuid.uuid4().hex}"
    pairs: list[tuple[ar.BaseBackend, ar.BaseBackend]] = [
        (MemoryBackend(shared), MemoryBackend(shared)),
        (FilesystemBackend(directory, watch="notify"), FilesystemBackend(directory)),
        (
            FilesystemBackend(directory / "p", watch="poll", poll_interval=0.01),
            FilesystemBackend(directory / "p", watch="poll"),
        ),
    ]
    for waiting, writing in pairs:
        async with waiting, writing:
            task_id, group_id = new_id(), new_id()

            async def store_later(writer: ar.BaseBackend = writing, tid: str = task_id) -> None:
                await anyio.sleep(0.05)
                await writer.mark_as_done(tid, "trio")

            async with anyio.create_task_group() as tg:
                tg.start_soon(store_later)
                assert await ar.AsyncResult(task_id, waiting).get(timeout=10) == "trio"
            if isinstance(waiting, FilesystemBackend):
                assert waiting.wait_stats().mode == (
                    "poll" if waiting.watch == "poll" else "inotify"
                )
            await writing.set_chord_size(group_id, 2)
            await writing.chord_part_return(group_id, "a", states.SUCCESS, 1, index=0)
            done = await waiting.chord_part_return(group_id, "b", states.SUCCESS, 2, index=1)
            assert done.complete and done.results == [1, 2]


def test_memory_and_filesystem_under_trio(tmp_path: Path) -> None:
    # A plain test running trio itself: with asyncio_mode=auto, pytest-asyncio would
    # claim an `@pytest.mark.anyio` coroutine test and run it on asyncio instead.
    anyio.run(_trio_scenario, tmp_path, backend="trio")


async def test_first_success_wins_across_instances(make_file_backend: BackendFactory) -> None:
    instances = [await make(make_file_backend) for _ in range(3)]
    for _ in range(8):
        task_id = new_id()
        # Every writer first reads a large STARTED record: a wide read-check-replace
        # window that only the lock closes.
        await instances[0].mark_as_started(task_id, {"pad": "x" * 500_000})
        stored = await asyncio.gather(
            *(instances[i % 3].mark_as_done(task_id, i) for i in range(60))
        )
        winners = [i for i, ok in enumerate(stored) if ok]
        assert len(winners) == 1
        meta = await instances[0].get_meta(task_id)
        assert meta.status == states.SUCCESS and meta.result == winners[0]


async def test_first_success_wins_on_a_new_result(make_file_backend: BackendFactory) -> None:
    """Writers of a result that has no file yet race through the lock-free
    create and the locked check at once: one SUCCESS wins, and a late STARTED
    never replaces it."""
    instances = [await make(make_file_backend) for _ in range(3)]
    for _ in range(8):
        task_id = new_id()
        writes = [instances[i % 3].mark_as_done(task_id, i) for i in range(30)]
        writes += [instances[i % 3].mark_as_started(task_id) for i in range(30)]
        stored = await asyncio.gather(*writes)
        winners = [i for i, ok in enumerate(stored[:30]) if ok]
        assert len(winners) == 1
        meta = await instances[1].get_meta(task_id)
        assert meta.status == states.SUCCESS and meta.result == winners[0]
    assert [n for n in files(instances[0].path) if n.endswith(".tmp")] == []


@contextlib.contextmanager
def holding_the_lock(directory: str) -> Any:
    """Hold the directory's lock as another writer would."""
    import fcntl

    lock = os.open(os.path.join(directory, ".aioresults.lock"), os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


async def test_a_new_result_is_created_without_the_lock(
    make_file_backend: BackendFactory,
) -> None:
    """The lock is taken only where a file is already there: a first write goes
    by while another writer holds it; a rewrite and a delete wait for it."""
    backend = await make(make_file_backend)
    await backend.mark_as_started("old")
    await backend.mark_as_started("gone")
    with holding_the_lock(backend.path):
        assert await asyncio.wait_for(backend.mark_as_done("new", 1), 10)
        rewrite = asyncio.create_task(backend.mark_as_done("old", 2))
        forget = asyncio.create_task(backend.forget("gone"))
        await asyncio.sleep(0.2)
        assert not rewrite.done() and not forget.done()
        assert (await backend.get_meta("gone")).status == states.STARTED
    assert await asyncio.wait_for(rewrite, 10)
    await asyncio.wait_for(forget, 10)
    assert (await backend.get_meta("new")).result == 1
    assert (await backend.get_meta("old")).result == 2
    assert (await backend.get_meta("gone")).status == states.PENDING


async def test_a_file_gone_while_the_lock_was_awaited_is_created(
    make_file_backend: BackendFactory,
) -> None:
    """A write that found a file, and found it gone once it held the lock,
    creates it as a first write does (and still never over a SUCCESS)."""
    backend = await make(make_file_backend)
    await backend.mark_as_started("t")
    with holding_the_lock(backend.path):
        store = asyncio.create_task(backend.mark_as_done("t", "mine"))
        await asyncio.sleep(0.2)
        assert not store.done()
        os.unlink(os.path.join(backend.path, backend.task_key("t")))
    assert await asyncio.wait_for(store, 10)
    assert (await backend.get_meta("t")).result == "mine"
    assert not await backend.mark_as_done("t", "later")
    assert (await backend.get_meta("t")).result == "mine"


async def test_a_dangling_link_at_a_result_is_replaced(make_file_backend: BackendFactory) -> None:
    """A name that reads as missing but exists (a dangling symlink) is decided
    by one more read under the lock, and replaced: the write does not spin."""
    backend = await make(make_file_backend)
    await backend.mark_as_done("warm", 0)  # the directory is made on opening
    os.symlink("nowhere", os.path.join(backend.path, backend.task_key("t")))
    assert await asyncio.wait_for(backend.mark_as_done("t", 1), 10)
    assert (await backend.get_meta("t")).result == 1


def refuse_renameat2(monkeypatch: pytest.MonkeyPatch, code: int) -> list[Any]:
    """Make renameat2 fail with ``code``; returns the calls made to it."""
    import ctypes

    from aioresults.backends.filesystem import _files

    calls: list[Any] = []

    def refused(*args: Any) -> int:
        calls.append(args)
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(_files, "_renameat2", refused)
    return calls


def temp_files(directory: str) -> list[str]:
    return [name for name in files(directory) if name.endswith(".tmp")]


@pytest.mark.parametrize("code", ["EINVAL", "EPERM"])
async def test_without_renameat2_a_new_result_is_linked_into_place(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """A file system, C library or sandbox that refuses RENAME_NOREPLACE: a new
    result is hard-linked into place, which also creates it only where none is,
    so it still needs no lock (EINVAL turns renameat2 off for the directory,
    EPERM, which a sandbox may give for one call, is tried again)."""
    import errno

    calls = refuse_renameat2(monkeypatch, getattr(errno, code))
    backend = await make(make_file_backend)
    assert backend._dir.noreplace and backend._dir.links
    assert await backend.mark_as_done("first", 1)
    assert len(calls) == 1 and backend._dir.noreplace == (code == "EPERM")
    with holding_the_lock(backend.path):
        assert await asyncio.wait_for(backend.mark_as_done("second", 2), 10)
        assert await asyncio.wait_for(backend.mark_as_started("third"), 10)
        again = asyncio.create_task(backend.mark_as_done("third", 3))
        await asyncio.sleep(0.2)
        assert not again.done()  # a file is there: the lock decides
    assert await asyncio.wait_for(again, 10)
    assert not await backend.mark_as_started("first")  # never over a SUCCESS
    assert [(await backend.get_meta(t)).result for t in ("first", "second", "third")] == [1, 2, 3]
    assert len(calls) == (5 if code == "EPERM" else 1)  # one per guarded write
    assert temp_files(backend.path) == []
    for name in ("first", "second"):
        assert os.stat(os.path.join(backend.path, backend.task_key(name))).st_nlink == 1


@pytest.mark.parametrize("code", ["EPERM", "EACCES"])
async def test_without_renameat2_or_links_every_write_takes_the_lock(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """A file system with neither RENAME_NOREPLACE nor hard links (EPERM), or a
    security policy refusing links (EACCES): every write takes the lock, and
    no longer tries either."""
    import errno

    calls = refuse_renameat2(monkeypatch, errno.EINVAL)
    links: list[Any] = []

    def no_links(*args: Any, **kwargs: Any) -> None:
        links.append(args)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "link", no_links)
    backend = await make(make_file_backend)
    assert await backend.mark_as_done("first", 1)
    assert (len(calls), len(links)) == (1, 1)
    assert not backend._dir.noreplace and not backend._dir.links
    with holding_the_lock(backend.path):
        store = asyncio.create_task(backend.mark_as_done("second", 2))
        await asyncio.sleep(0.2)
        assert not store.done()
    assert await asyncio.wait_for(store, 10)
    assert not await backend.mark_as_started("first")
    assert (len(calls), len(links)) == (1, 1)
    assert [(await backend.get_meta(t)).result for t in ("first", "second")] == [1, 2]
    assert temp_files(backend.path) == []


async def test_a_link_that_fails_otherwise_is_the_callers_error(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another error of link() (here: no space) fails that store, leaves no
    temporary file, and does not turn links off."""
    import errno

    refuse_renameat2(monkeypatch, errno.EINVAL)
    real = os.link
    failing = [True]

    def full(*args: Any, **kwargs: Any) -> None:
        if failing.pop(0) if failing else False:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(os, "link", full)
    backend = await make(make_file_backend)
    with pytest.raises(ar.BackendError):
        await backend.mark_as_done("t", 1)
    assert backend._dir.links and temp_files(backend.path) == []
    assert (await backend.get_meta("t")).status == states.PENDING
    assert await backend.mark_as_done("t", 2)
    assert (await backend.get_meta("t")).result == 2


async def test_a_link_answered_exists_after_it_was_made_is_a_store(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS a retransmitted link() that had succeeded answers EEXIST: the name
    is then this write's file, so the store succeeded and its temporary name
    goes; a name that is another file is still "exists"."""
    import errno

    refuse_renameat2(monkeypatch, errno.EINVAL)
    real = os.link

    def retransmitted(src: Any, dst: Any, **kwargs: Any) -> None:
        real(src, dst, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists", dst)

    backend = await make(make_file_backend)
    await backend.mark_as_done("warm", 0)  # the directory is made on opening
    monkeypatch.setattr(os, "link", retransmitted)
    with holding_the_lock(backend.path):  # created without the lock
        assert await asyncio.wait_for(backend.mark_as_done("t", 1), 10)
    assert (await backend.get_meta("t")).result == 1
    assert temp_files(backend.path) == []
    assert os.stat(os.path.join(backend.path, backend.task_key("t"))).st_nlink == 1
    monkeypatch.setattr(os, "link", real)
    assert not await backend.mark_as_done("t", 2)  # EEXIST for another file
    assert (await backend.get_meta("t")).result == 1
    assert temp_files(backend.path) == []


@pytest.mark.parametrize("moment", ["before the link", "after a read"])
async def test_writers_with_and_without_renameat2_never_replace_a_success(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """One directory, two processes' ways of creating: A renames with
    RENAME_NOREPLACE (no lock), B cannot and links. A's SUCCESS lands at the
    worst moment of B's SUCCESS of the same new id: exactly one of them is
    stored, and its value is the one in the file."""
    from aioresults.backends.filesystem import _files

    a = await make(make_file_backend)
    b = await make(make_file_backend)
    await a.mark_as_done("warm", 0)
    await b.get_meta("warm")
    b._dir.noreplace = False  # as a process whose renameat2 is refused
    loop = asyncio.get_running_loop()
    stored_a: list[bool] = []

    def a_lands() -> None:  # in B's worker thread, at the chosen moment
        if not stored_a:
            stored_a.append(
                asyncio.run_coroutine_threadsafe(a.mark_as_done("t", "A"), loop).result(10)
            )

    if moment == "before the link":
        real_link = os.link

        def link(*args: Any, **kwargs: Any) -> None:
            a_lands()
            real_link(*args, **kwargs)

        monkeypatch.setattr(os, "link", link)
    else:
        real_read = _files.ResultDirectory.read

        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            found = real_read(self, *args, **kwargs)
            if self is b._dir:
                a_lands()
            return found

        monkeypatch.setattr(_files.ResultDirectory, "read", read)
    stored_b = await b.mark_as_done("t", "B")
    if not stored_a:
        stored_a.append(await a.mark_as_done("t", "A"))
    assert [stored_a[0], stored_b].count(True) == 1
    winner = "A" if stored_a[0] else "B"
    assert (await a.get_meta("t")).result == winner
    assert (await b.get_meta("t")).result == winner
    assert temp_files(a.path) == []


async def test_create_false_never_makes_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    backend = FilesystemBackend(missing, create=False)
    with pytest.raises(ar.StoreNotFound, match="no store at"):
        await backend.get_meta("t")
    await backend.aclose()
    assert not missing.exists()
    async with FilesystemBackend(tmp_path / "real") as writer:
        await writer.mark_as_done("t", 1)
    async with FilesystemBackend(tmp_path / "real", create=False) as reader:
        assert (await reader.get_meta("t")).result == 1
        (tmp_path / "real" / "celery-task-meta-t").unlink()
        for entry in (tmp_path / "real").iterdir():
            entry.unlink() if entry.is_file() else None
        (tmp_path / "real").rmdir()
        with pytest.raises(ar.BackendUnavailable):
            await reader.mark_as_done("u", 2)  # not created again either
        assert not (tmp_path / "real").exists()


def synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the directories fsynced from now on (the fsync itself still runs),
    and, as ``"-> name"``, every ``os.replace`` onto a name, in order."""
    import stat as stat_module

    real_fsync, real_replace = os.fsync, os.replace
    synced: list[str] = []

    def fsync(fd: int) -> None:
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        synced.append(f"-> {os.path.basename(dst)}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return synced


async def test_synchronous_full_fsyncs_each_name_change_with_its_directory(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """synchronous="FULL": a store (also a refused one), a chord's start and
    parts, and a delete each return after the directory holding the name they
    changed is fsynced; a chord's counter is on disk before its part; a
    directory made on opening is fsynced into each new parent.
    synchronous="NORMAL" fsyncs no directory."""
    normal = await make(make_file_backend, location=tmp_path / "normal")
    synced = synced_directories(monkeypatch)
    await normal.mark_as_done("t", 1)
    await normal.set_chord_size("g", 2)
    await normal.chord_part_return("g", "p1", states.SUCCESS, 1)
    await normal.forget("t")
    assert [s for s in synced if not s.startswith("->")] == []

    where = tmp_path / "new" / "full"
    full = await make(make_file_backend, location=where, synchronous="FULL")
    synced.clear()
    await full.get_meta("nothing")  # opens: makes both directories
    assert synced == [str(tmp_path), str(tmp_path / "new")]
    synced.clear()
    assert await full.mark_as_done("t", 1)  # created with renameat2 (not os.replace)
    assert synced == [str(where)]
    synced.clear()
    assert not await full.mark_as_started("t")
    assert synced == [str(where)]
    synced.clear()
    await full.set_chord_size("g", 2)
    size = f"{full.group_key('g')}.s"
    counter = f"{full.group_key('g')}.n"
    assert synced == [f"-> {size}", str(where)]
    synced.clear()
    await full.chord_part_return("g", "p1", states.SUCCESS, 1)
    parts = str(where / f".{full.group_key('g')}.p")
    part = hashlib.sha256(b"p1").hexdigest()
    # the counter and the new parts directory's name on disk, then the part
    assert synced == [f"-> {counter}", str(where), f"-> {part}", parts]
    synced.clear()
    await full.chord_part_return("g", "p2", states.SUCCESS, 2)
    assert synced[:2] == [f"-> {counter}", str(where)] and synced[-1] == parts
    synced.clear()
    await full.forget("t")
    assert synced == [str(where)]
    assert (await full.get_meta("t")).status == states.PENDING


@pytest.mark.parametrize("code", ["EIO", "EINVAL"])
async def test_a_directory_fsync_that_fails(
    make_file_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """A directory fsync that fails with EIO: the store raises BackendError
    saying the record is there but may not survive a power loss, and it is
    there. A file system that cannot fsync a directory (EINVAL): stores go on."""
    import errno
    import stat as stat_module

    backend = await make(make_file_backend, synchronous="FULL")
    await backend.get_meta("warm")
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat_module.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if code == "EIO":
        with pytest.raises(ar.BackendError, match="is made, but .* may not survive a power loss"):
            await backend.mark_as_done("t", 1)
    else:
        assert await backend.mark_as_done("t", 1)
    assert (await backend.get_meta("t")).result == 1
    assert temp_files(backend.path) == []


async def test_synchronous_is_normal_or_full(make_file_backend: BackendFactory) -> None:
    assert (await make(make_file_backend)).synchronous == "NORMAL"
    assert (await make(make_file_backend, synchronous="full")).synchronous == "FULL"
    with pytest.raises(ar.ConfigurationError, match='"NORMAL" or "FULL"'):
        await make(make_file_backend, synchronous="EXTRA")
