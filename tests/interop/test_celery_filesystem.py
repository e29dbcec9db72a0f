"""Celery 5.7's FilesystemBackend and aioresults share one result directory."""

from __future__ import annotations

import datetime as dt
import json
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import celery
import celery.result
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.filesystem import FilesystemBackend

OLD = 0.0  # an mtime long past


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "results"
    path.mkdir()  # Celery's backend requires it to exist
    return path


@pytest.fixture
def app(directory: Path) -> Iterator[celery.Celery]:
    app = celery.Celery("interop", broker="memory://", backend=f"file://{directory}")
    yield app
    app.close()


@pytest.fixture
async def backend(directory: Path) -> AsyncIterator[FilesystemBackend]:
    backend = FilesystemBackend.from_url(f"file://{directory}")
    async with backend:
        yield backend


def celery_get(app: celery.Celery, task_id: str) -> Any:
    """Celery's blocking client read, polling every 50 ms."""
    return celery.result.AsyncResult(task_id, app=app).get(timeout=5, interval=0.05)


def stored_failure(app: celery.Celery, task_id: str) -> None:
    try:
        raise ValueError("bad", 42)
    except ValueError as exc:
        app.backend.store_result(task_id, exc, states.FAILURE, traceback=traceback.format_exc())


# ------------------------------------------------------------------ Celery writes, we read


async def test_we_read_celerys_success(app: celery.Celery, backend: FilesystemBackend) -> None:
    task_id = new_id()
    value = {"n": 1, "when": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)}
    app.backend.store_result(task_id, value, states.SUCCESS)
    assert await ar.AsyncResult(task_id, backend).get(timeout=5) == value
    # The bytes are the ones this backend would have written for the same record.
    raw = await anyio.Path(backend.path, f"celery-task-meta-{task_id}").read_bytes()
    assert raw == backend.encode_meta(await backend.get_meta(task_id))


async def test_we_read_celerys_failure(app: celery.Celery, backend: FilesystemBackend) -> None:
    task_id = new_id()
    stored_failure(app, task_id)
    with pytest.raises(ValueError) as caught:
        await ar.AsyncResult(task_id, backend).get(timeout=5)
    assert caught.value.args == ("bad", 42)
    meta = await backend.get_meta(task_id)
    assert meta.traceback is not None and "ValueError" in meta.traceback


async def test_celerys_write_wakes_our_waiter(
    app: celery.Celery, backend: FilesystemBackend
) -> None:
    task_id = new_id()

    async def store_later() -> None:
        await anyio.sleep(0.1)
        await anyio.to_thread.run_sync(app.backend.store_result, task_id, "pushed", "SUCCESS")

    async with anyio.create_task_group() as tg:
        tg.start_soon(store_later)
        assert await ar.AsyncResult(task_id, backend).get(timeout=10) == "pushed"
    assert backend.wait_stats().mode == "inotify"


# ------------------------------------------------------------------ we write, Celery reads


async def test_celery_reads_our_success(app: celery.Celery, backend: FilesystemBackend) -> None:
    task_id = new_id()
    await backend.mark_as_done(task_id, {"a": [1, 2], "b": None})
    assert await anyio.to_thread.run_sync(celery_get, app, task_id) == {"a": [1, 2], "b": None}


async def test_celery_reads_our_failure(app: celery.Celery, backend: FilesystemBackend) -> None:
    task_id = new_id()
    await backend.mark_as_failure(task_id, ValueError("bad", 42))
    with pytest.raises(ValueError) as caught:
        await anyio.to_thread.run_sync(celery_get, app, task_id)
    assert caught.value.args == ("bad", 42)


async def test_celery_waits_for_our_write(app: celery.Celery, backend: FilesystemBackend) -> None:
    task_id = new_id()
    await backend.mark_as_started(task_id, {"pid": 1})
    async with anyio.create_task_group() as tg:

        async def store_later() -> None:
            await anyio.sleep(0.2)
            await backend.mark_as_done(task_id, "late")

        tg.start_soon(store_later)
        assert await anyio.to_thread.run_sync(celery_get, app, task_id) == "late"


# ------------------------------------------------------------------ groups


async def test_group_saved_by_celery_is_restored(
    app: celery.Celery, backend: FilesystemBackend
) -> None:
    group_id, members = new_id(), [new_id(), new_id()]
    saved = celery.result.GroupResult(
        group_id, [celery.result.AsyncResult(m, app=app) for m in members], app=app
    )
    saved.save()
    for member in members:
        app.backend.store_result(member, member[:4], states.SUCCESS)
    group = await ar.GroupResult.restore(group_id, backend)
    assert group is not None and [r.id for r in group] == members
    assert await group.join(timeout=5) == [m[:4] for m in members]


async def test_group_saved_by_us_is_restored_by_celery(
    app: celery.Celery, backend: FilesystemBackend
) -> None:
    group_id, members = new_id(), [new_id(), new_id()]
    await ar.GroupResult(group_id, [ar.AsyncResult(m, backend) for m in members], backend).save()
    for member in members:
        await backend.mark_as_done(member, member[:4])

    def restore() -> tuple[list[str], list[Any]]:
        group = celery.result.GroupResult.restore(group_id, app=app)
        assert group is not None
        return [r.id for r in group.results], group.join(timeout=5, interval=0.05)

    ids, values = await anyio.to_thread.run_sync(restore)
    assert ids == members and values == [m[:4] for m in members]


# ------------------------------------------------------------------ housekeeping


async def test_celerys_cleanup_handles_our_files(
    app: celery.Celery, backend: FilesystemBackend, directory: Path
) -> None:
    """Celery's cleanup() unlinks every old file with its prefixes; ours must not
    trip it (the chord's parts directory is hidden from it)."""
    task_id, group_id = new_id(), new_id()
    await backend.mark_as_done(task_id, 1)
    await backend.set_chord_size(group_id, 2)
    await backend.chord_part_return(group_id, "p1", states.SUCCESS, 1)
    for name in os.listdir(directory):
        os.utime(directory / name, (OLD, OLD))
    await anyio.to_thread.run_sync(app.backend.cleanup)
    assert sorted(os.listdir(directory)) == [
        ".aioresults.lock",
        f".celery-taskset-meta-{group_id}.p",
    ]
    # The parts keep the expiry their writer stamped on them (a day), whatever their age.
    assert await backend.cleanup() == 0


async def test_compressed_results_cross_both_ways(directory: Path) -> None:
    app = celery.Celery("interop", broker="memory://", backend=f"file://{directory}")
    app.conf.result_compression = "zlib"
    try:
        async with FilesystemBackend(directory, compression="zlib") as backend:
            ours, theirs = new_id(), new_id()
            await backend.mark_as_done(ours, {"x": "y" * 100})
            app.backend.store_result(theirs, [1, 2, 3], states.SUCCESS)
            raw = await anyio.Path(directory, f"celery-task-meta-{ours}").read_bytes()
            assert raw.startswith(b"\x00celery-compressed\x00")
            assert await anyio.to_thread.run_sync(celery_get, app, ours) == {"x": "y" * 100}
            assert await ar.AsyncResult(theirs, backend).get(timeout=5) == [1, 2, 3]
    finally:
        app.close()


def test_celery_stores_what_we_decode(directory: Path) -> None:
    """The record Celery writes is JSON with its field order, which we read as is."""
    app = celery.Celery("interop", broker="memory://", backend=f"file://{directory}")
    try:
        app.backend.store_result("t", {"k": 1}, states.SUCCESS)
        record = json.loads(Path(directory, "celery-task-meta-t").read_bytes())
        assert list(record)[:2] == ["status", "result"] and record["task_id"] == "t"
    finally:
        app.close()
