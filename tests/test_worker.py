"""The worker side: track(), progress, final states, the @task decorator and chords."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Any

import anyio
import pytest

import aioresults as ar
from aioresults import states
from tests.conftest import MakeBackend


class ResizeError(Exception):
    """A task's own error."""


def new_id() -> str:
    return str(uuid.uuid4())


async def test_track_stores_started_progress_and_success(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(
        task_id, name="images.resize", args=["cat.png"], kwargs={"size": 64}
    ) as task:
        started = await backend.get_meta(task_id)
        assert started.status == states.STARTED
        assert started.result is None
        assert (started.name, started.args, started.kwargs) == (
            "images.resize",
            ["cat.png"],
            {"size": 64},
        )
        assert await task.progress(1, 2, stage="decode")
        progress = await backend.get_meta(task_id)
        assert progress.status == states.PROGRESS
        assert progress.result == {"current": 1, "total": 2, "stage": "decode"}
        assert progress.name == "images.resize"
        task.set_result({"path": "cat-64.png"})
        assert task.result == {"path": "cat-64.png"}
        assert task.final_state is None
    assert task.final_state == states.SUCCESS
    assert task.chord_progress is None
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS
    assert meta.result == {"path": "cat-64.png"}
    assert meta.name == "images.resize"
    assert meta.args == ["cat.png"] and meta.kwargs == {"size": 64}
    assert meta.date_done is not None and meta.traceback is None
    assert await ar.AsyncResult(task_id, backend) == {"path": "cat-64.png"}


async def test_result_defaults_to_none(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(task_id):
        pass
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS and meta.result is None
    assert meta.name is None and meta.worker is None


async def test_report_worker_stores_pid_and_hostname(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(task_id, report_worker=True):
        started = await backend.get_meta(task_id)
    assert started.status == states.STARTED
    assert started.result == {"pid": os.getpid(), "hostname": socket.gethostname()}
    assert started.worker == socket.gethostname()
    assert (await backend.get_meta(task_id)).worker == socket.gethostname()


async def test_explicit_worker_name_wins(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(task_id, report_worker=True, worker="celery@box"):
        pass
    assert (await backend.get_meta(task_id)).worker == "celery@box"


async def test_custom_state(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(task_id) as task:
        assert await task.update_state("UPLOADING", {"bytes": 10})
        meta = await backend.get_meta(task_id)
        assert (meta.status, meta.result) == ("UPLOADING", {"bytes": 10})
        assert not meta.ready


async def test_exception_stores_failure_and_propagates(backend: ar.BaseBackend) -> None:
    task_id = new_id()

    async def resize_image() -> None:
        async with backend.track(task_id, name="images.resize"):
            raise ResizeError("not an image", 7)

    with pytest.raises(ResizeError) as caught:
        await resize_image()
    assert caught.value.args == ("not an image", 7)
    meta = await backend.get_meta(task_id)
    assert meta.status == states.FAILURE
    assert meta.name == "images.resize"
    assert isinstance(meta.result, Exception)
    assert type(meta.result).__name__ == "ResizeError"
    assert meta.result.args == ("not an image", 7)
    assert meta.traceback is not None
    assert "resize_image" in meta.traceback
    assert "ResizeError: ('not an image', 7)" in meta.traceback
    with pytest.raises(Exception, match="not an image") as raised:
        await ar.AsyncResult(task_id, backend).get(timeout=5)
    assert type(raised.value).__name__ == "ResizeError"


async def test_cancel_scope_stores_revoked(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    entered = False
    with anyio.CancelScope() as scope:
        async with backend.track(task_id):
            entered = True
            scope.cancel()
            await anyio.sleep(30)
    assert entered and scope.cancelled_caught
    meta = await backend.get_meta(task_id)
    assert meta.status == states.REVOKED
    assert isinstance(meta.result, ar.TaskRevokedError)
    with pytest.raises(ar.TaskRevokedError):
        await ar.AsyncResult(task_id, backend).get(timeout=5)


async def test_asyncio_cancel_stores_revoked_and_reraises(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    started = asyncio.Event()
    tracker: ar.TaskTracker | None = None

    async def work() -> None:
        nonlocal tracker
        async with backend.track(task_id) as tracker:
            started.set()
            await asyncio.sleep(30)

    job = asyncio.create_task(work())
    await started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert tracker is not None and tracker.final_state == states.REVOKED
    assert (await backend.get_meta(task_id)).status == states.REVOKED


async def test_cancel_while_started_is_stored_still_stores_revoked() -> None:
    from aioresults.backends.memory import MemoryBackend

    class SlowStart(MemoryBackend):
        """STARTED takes a while to store (a busy store)."""

        async def _write_meta(self, meta: ar.ResultMeta) -> bool:
            if meta.status == states.STARTED:
                await asyncio.sleep(1)
            return await super()._write_meta(meta)

    async with SlowStart() as backend:
        task_id = new_id()
        entered = False

        async def work() -> None:
            nonlocal entered
            async with backend.track(task_id):
                entered = True

        job = asyncio.create_task(work())
        await asyncio.sleep(0.1)  # inside track()'s STARTED store
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert not entered
        assert (await backend.get_meta(task_id)).status == states.REVOKED


async def test_client_sees_every_state_through_another_instance(
    make_backend: MakeBackend,
) -> None:
    worker_side = await make_backend()
    client_side = await make_backend()
    task_id = new_id()
    result: ar.AsyncResult[int] = ar.AsyncResult(task_id, client_side)
    seen: list[tuple[str, Any]] = []
    watching = anyio.Event()
    step = anyio.Event()

    async def watch() -> None:
        async for meta in result.watch(timeout=30):
            seen.append((meta.status, meta.result))
            watching.set()
            if meta.status != states.PENDING:
                step.set()

    async def work() -> None:
        nonlocal step
        async with worker_side.track(task_id) as task:
            for i in range(1, 4):
                # Wait until the client saw the previous state, so every one is observed.
                await step.wait()
                step = anyio.Event()
                await task.progress(i, 3)
            await step.wait()
            task.set_result(6)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await watching.wait()
        tg.start_soon(work)
    assert seen == [
        (states.PENDING, None),
        (states.STARTED, None),
        (states.PROGRESS, {"current": 1, "total": 3}),
        (states.PROGRESS, {"current": 2, "total": 3}),
        (states.PROGRESS, {"current": 3, "total": 3}),
        (states.SUCCESS, 6),
    ]
    assert await result == 6


async def test_a_success_is_not_overwritten(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    async with backend.track(task_id) as task:
        await backend.mark_as_done(task_id, "first")
        assert not await task.progress(1, 1)
        task.set_result("second")
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, "first")


# ------------------------------------------------------------------ current_task


async def test_current_task_inside_and_outside(backend: ar.BaseBackend) -> None:
    with pytest.raises(LookupError):
        ar.current_task()
    outer_id, inner_id = new_id(), new_id()
    async with backend.track(outer_id) as outer:
        assert ar.current_task() is outer
        async with backend.track(inner_id) as inner:
            assert ar.current_task() is inner
        assert ar.current_task() is outer
    with pytest.raises(LookupError):
        ar.current_task()


# ------------------------------------------------------------------ the decorator


async def test_decorated_function_is_tracked(backend: ar.BaseBackend) -> None:
    @ar.task(backend, store_args=True)
    async def add(x: int, y: int, *, scale: int = 1) -> int:
        """Add two numbers."""
        meta = await backend.get_meta(ar.current_task().task_id)
        assert meta.status == states.STARTED
        await ar.current_task().progress(1, 1)
        return (x + y) * scale

    assert add.__doc__ == "Add two numbers."
    assert add.__name__ == "add"
    task_id = new_id()
    assert await add(2, 3, task_id=task_id, scale=10) == 50
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, 50)
    assert meta.name == f"{__name__}.test_decorated_function_is_tracked.<locals>.add"
    assert (meta.args, meta.kwargs) == ([2, 3], {"scale": 10})
    other_id = new_id()
    assert await add.run(other_id, 1, 1) == 2
    assert (await backend.get_meta(other_id)).result == 2


async def test_decorator_generates_an_id_and_passes_it_on(backend: ar.BaseBackend) -> None:
    received: list[str] = []

    @ar.task(backend, name="demo.echo")
    async def echo(word: str, task_id: str) -> str:
        received.append(task_id)
        return word * 2

    assert await echo("ab") == "abab"
    (task_id,) = received
    assert uuid.UUID(task_id).version == 4
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result, meta.name) == (states.SUCCESS, "abab", "demo.echo")
    assert meta.args is None and meta.kwargs is None  # store_args is off by default


async def test_decorated_failure_propagates(backend: ar.BaseBackend) -> None:
    @ar.task(backend)
    async def broken() -> None:
        raise ResizeError("broken")

    task_id = new_id()
    with pytest.raises(ResizeError):
        await broken(task_id=task_id)
    meta = await backend.get_meta(task_id)
    assert meta.status == states.FAILURE and "broken" in (meta.traceback or "")


def test_decorator_needs_an_async_function() -> None:
    backend = ar.connect("memory://")

    def sync() -> None: ...

    with pytest.raises(TypeError, match="async function"):
        ar.task(backend)(sync)  # type: ignore[arg-type]


# ------------------------------------------------------------------ chords


async def test_chord_parts_complete_the_chord_once(make_backend: MakeBackend) -> None:
    workers = [await make_backend() for _ in range(3)]
    group_id = new_id()
    ids = [new_id() for _ in range(3)]
    await workers[0].set_chord_size(group_id, 3)
    trackers: list[ar.TaskTracker] = []

    async def part(i: int) -> None:
        async with workers[i].track(ids[i], chord=group_id, index=i) as task:
            trackers.append(task)
            await anyio.sleep(0.01 * (3 - i))  # finish in reverse order
            task.set_result(i * 10)

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(part, i)
    progress = [t.chord_progress for t in trackers]
    assert all(p is not None and p.counted for p in progress)
    complete = [p for p in progress if p is not None and p.complete]
    assert len(complete) == 1
    assert complete[0].results == [0, 10, 20]
    assert not complete[0].failed
    for task_id in ids:
        meta = await workers[0].get_meta(task_id)
        assert meta.group_id == group_id and meta.status == states.SUCCESS


async def test_a_failed_part_completes_the_chord_with_its_failure(
    backend: ar.BaseBackend,
) -> None:
    group_id = new_id()
    ok_id, bad_id = new_id(), new_id()
    await backend.set_chord_size(group_id, 2)
    async with backend.track(ok_id, chord=group_id, index=0) as ok:
        ok.set_result("fine")
    assert ok.chord_progress is not None and not ok.chord_progress.complete
    bad: ar.TaskTracker | None = None
    with pytest.raises(ResizeError):
        async with backend.track(bad_id, chord=group_id, index=1) as bad:
            raise ResizeError("part failed")
    assert bad is not None and bad.chord_progress is not None
    assert bad.chord_progress.complete and bad.chord_progress.failed
    assert bad.chord_progress.failed_task_ids == (bad_id,)
    assert isinstance(bad.chord_progress.exception, Exception)
    assert "part failed" in str(bad.chord_progress.exception)
    assert bad.chord_progress.results is not None
    assert bad.chord_progress.results[0] == "fine"


async def test_group_id_can_differ_from_chord(backend: ar.BaseBackend) -> None:
    group_id, chord_id, task_id = new_id(), new_id(), new_id()
    await backend.set_chord_size(chord_id, 1)
    async with backend.track(task_id, group_id=group_id, chord=chord_id) as task:
        pass
    assert task.chord_progress is not None and task.chord_progress.complete
    assert (await backend.get_meta(task_id)).group_id == group_id
