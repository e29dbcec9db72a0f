"""A real Celery 5.7 worker and aioresults on one private Redis.

One worker per module (``--pool=solo``, its own queue) runs the tasks of
:mod:`tests.interop.celery_tasks`, with Redis as both broker and result
backend. Results it stores are awaited with aioresults; results aioresults
stores are read with Celery's blocking client, called from a worker thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import celery
import celery.exceptions
import celery.result
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.redis import RedisBackend
from tests.interop import celery_tasks as tasks
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
WORKER_NAME = f"worker-{uuid.uuid4().hex[:8]}@interop"
WAIT = 20.0  # a safety net on every wait: the worker answers in well under a second


def new_id() -> str:
    return str(uuid.uuid4())


class Worker:
    """A ``celery worker`` subprocess and what the tests need to know about it."""

    def __init__(self, redis: RedisServer, queue: str, log: Path) -> None:
        self.redis = redis
        self.queue = queue
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "AIORESULTS_URL"}
        env.update({tasks.URL_VARIABLE: self.redis.url, tasks.QUEUE_VARIABLE: self.queue})
        with open(self.log.with_suffix(".err"), "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "tests.interop.celery_tasks",
                    "worker", "--pool=solo", "--concurrency=1", "--without-heartbeat",
                    "--without-gossip", "--without-mingle", "-Q", self.queue,
                    "-n", WORKER_NAME, "--loglevel=INFO", f"--logfile={self.log}",
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        # The worker logs "<name> ready." once it consumes its queue.
        deadline = time.monotonic() + 60
        while f"{WORKER_NAME} ready." not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Celery worker did not start:\n{self.output()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        """The worker's log and stderr (the tail of each)."""
        text = ""
        for path in (self.log, self.log.with_suffix(".err")):
            if path.exists():
                text += path.read_text(errors="replace")[-3000:]
        return text

    def stop(self) -> int | None:
        """SIGTERM (a warm shutdown), then SIGKILL if it lingers; always reaped."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        process.terminate()
        try:
            return process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A server of this module's own: other tests empty the session's one."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def worker(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("celery-worker") / "worker.log"
    worker = Worker(redis, f"aioresults-interop-{uuid.uuid4().hex}", log)
    worker.start()
    try:
        yield worker
    finally:
        code = worker.stop()
    assert code == 0, worker.output()


@pytest.fixture(scope="module")
def app(worker: Worker) -> Iterator[celery.Celery]:
    """The client side: the worker's app, configured alike, in this process."""
    app = tasks.create_app(worker.redis.url, worker.queue)
    try:
        yield app
    finally:
        # The result backend is shared by all threads (result_backend_thread_safe).
        backend = app.backend
        backend.result_consumer.stop()
        # Celery results still alive (its join keeps some) unsubscribe when collected,
        # after the server is gone: with nothing left subscribed, they send nothing.
        backend.result_consumer.subscribed_to.clear()
        backend.client.close()
        backend.client.connection_pool.disconnect()
        app.pool.force_close_all()
        app.close()


@pytest.fixture
async def backend(redis: RedisServer) -> AsyncIterator[RedisBackend]:
    async with ar.connect(redis.url) as backend:
        assert isinstance(backend, RedisBackend)
        yield backend


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Celery's client blocks: run it off the event loop."""
    return await anyio.to_thread.run_sync(func, *args)


def send(app: celery.Celery, name: str, *args: Any, task_id: str | None = None) -> str:
    """Send one task to the worker and return its id."""
    result = app.signature(name, args=args).apply_async(task_id=task_id)
    return str(result.id)


def celery_get(app: celery.Celery, task_id: str) -> Any:
    return celery.result.AsyncResult(task_id, app=app).get(timeout=WAIT, interval=0.05)


async def wait_for_subscriber(backend: RedisBackend, task_id: str) -> None:
    """Return once a connection listens on the task's channel (``PUBSUB NUMSUB``)."""
    channel = f"celery-task-meta-{task_id}"
    with anyio.fail_after(WAIT):
        while (await backend.client.pubsub_numsub(channel))[0][1] < 1:
            await anyio.sleep(0.01)


async def watch_from_the_start(
    app: celery.Celery, backend: RedisBackend, name: str, *args: Any
) -> tuple[str, list[ar.ResultMeta]]:
    """Watch a task id, subscribed before its task is sent; return every record seen."""
    task_id = new_id()
    seen: list[ar.ResultMeta] = []

    async def watch() -> None:
        async for meta in ar.AsyncResult(task_id, backend).watch(timeout=WAIT):
            seen.append(meta)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await wait_for_subscriber(backend, task_id)
        # A watch subscribes, then reads: its first record follows the subscription.
        with anyio.fail_after(WAIT):
            while not seen:
                await anyio.sleep(0.01)
        assert [m.status for m in seen] == [states.PENDING]  # nothing was sent yet
        await in_thread(lambda: send(app, name, *args, task_id=task_id))
    return task_id, seen


# ------------------------------------------------------------------ the worker writes, we read


async def test_we_await_the_workers_result(
    app: celery.Celery, backend: RedisBackend, worker: Worker
) -> None:
    task_id = await in_thread(send, app, tasks.ADD, 2, 3)
    assert await ar.AsyncResult(task_id, backend).get(timeout=WAIT) == 5
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS and meta.date_done is not None
    # result_extended: the worker stored who ran what, from which queue.
    assert (meta.name, meta.args, meta.kwargs) == (tasks.ADD, [2, 3], {})
    assert (meta.worker, meta.queue) == (WORKER_NAME, worker.queue)


async def test_we_await_the_workers_failure(app: celery.Celery, backend: RedisBackend) -> None:
    task_id = await in_thread(send, app, tasks.FAIL)
    with pytest.raises(ValueError) as caught:
        await ar.AsyncResult(task_id, backend).get(timeout=WAIT)
    assert type(caught.value) is ValueError
    assert caught.value.args == ("bad", 42)
    remote = caught.value.remote_traceback  # type: ignore[attr-defined]
    assert remote.startswith("Traceback (most recent call last):")
    assert "celery_tasks.py" in remote and 'raise ValueError("bad", 42)' in remote
    assert remote.rstrip().endswith("ValueError: ('bad', 42)")
    meta = await backend.get_meta(task_id)
    assert meta.status == states.FAILURE and meta.traceback == remote


async def test_watch_sees_started_then_success(
    app: celery.Celery, backend: RedisBackend, worker: Worker
) -> None:
    task_id, seen = await watch_from_the_start(app, backend, tasks.SLOW, "done", 0.3)
    assert [m.status for m in seen] == [states.PENDING, states.STARTED, states.SUCCESS]
    assert seen[1].result == {"pid": worker.pid, "hostname": WORKER_NAME}
    assert seen[2].result == "done" and seen[2].worker == WORKER_NAME
    assert all(m.task_id == task_id for m in seen)


async def test_watch_sees_progress_in_order(app: celery.Celery, backend: RedisBackend) -> None:
    _, seen = await watch_from_the_start(app, backend, tasks.PROGRESS, 3, 0.05)
    assert [m.status for m in seen] == [
        states.PENDING,
        states.STARTED,
        "PROGRESS",
        "PROGRESS",
        "PROGRESS",
        states.SUCCESS,
    ]
    assert [m.result for m in seen[2:5]] == [{"current": i, "total": 3} for i in (1, 2, 3)]
    assert seen[-1].result == 3


async def test_revoked_before_it_runs(app: celery.Celery, backend: RedisBackend) -> None:
    task_id = new_id()
    # reply=True: the worker has flagged the id once it answers, before the task is sent.
    replies = await in_thread(
        lambda: app.control.revoke(
            task_id, destination=[WORKER_NAME], reply=True, limit=1, timeout=WAIT
        )
    )
    assert [list(r) for r in replies] == [[WORKER_NAME]]
    await in_thread(lambda: send(app, tasks.ADD, 1, 1, task_id=task_id))
    with pytest.raises(ar.TaskRevokedError):
        await ar.AsyncResult(task_id, backend).get(timeout=WAIT)
    assert (await backend.get_meta(task_id)).status == states.REVOKED


# ------------------------------------------------------------------ we write, Celery reads


async def test_celery_reads_our_success_and_failure(
    app: celery.Celery, backend: RedisBackend
) -> None:
    done, failed, revoked = new_id(), new_id(), new_id()
    await backend.mark_as_done(done, {"values": [1, 2], "none": None})
    await backend.mark_as_failure(failed, ValueError("bad", 42))
    await backend.mark_as_revoked(revoked, "terminated")
    assert await in_thread(celery_get, app, done) == {"values": [1, 2], "none": None}
    with pytest.raises(ValueError) as caught:
        await in_thread(celery_get, app, failed)
    assert type(caught.value) is ValueError and caught.value.args == ("bad", 42)
    with pytest.raises(celery.exceptions.TaskRevokedError, match="terminated"):
        await in_thread(celery_get, app, revoked)


async def test_celery_waits_for_our_write(app: celery.Celery, backend: RedisBackend) -> None:
    task_id = new_id()
    await backend.mark_as_started(task_id, {"pid": 1})
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def celery_waits() -> None:
            got.append(await in_thread(celery_get, app, task_id))

        tg.start_soon(celery_waits)
        # Celery subscribes before its first read: once it listens, our PUBLISH reaches it.
        await wait_for_subscriber(backend, task_id)
        await backend.mark_as_done(task_id, "late")
    assert got == ["late"]


# ------------------------------------------------------------------ groups and chords


async def test_group_saved_by_celery_is_restored(app: celery.Celery, backend: RedisBackend) -> None:
    def run_and_save() -> tuple[str, list[str]]:
        sent = celery.group(app.signature(tasks.ADD, args=(i, i)) for i in range(3)).apply_async()
        sent.save()
        return sent.id, [r.id for r in sent.results]

    group_id, members = await in_thread(run_and_save)
    group = await ar.GroupResult.restore(group_id, backend)
    assert group is not None and group.id == group_id
    assert [r.id for r in group] == members
    assert await group.join(timeout=WAIT) == [0, 2, 4]


async def test_group_saved_by_us_is_restored_by_celery(
    app: celery.Celery, backend: RedisBackend
) -> None:
    members = [await in_thread(send, app, tasks.ADD, i, 10) for i in range(3)]
    group_id = new_id()
    saved: ar.GroupResult[int] = ar.GroupResult(
        group_id, [ar.AsyncResult(m, backend) for m in members], backend
    )
    await saved.save()

    def restore_and_join() -> tuple[str, list[str], list[Any]]:
        group = celery.result.GroupResult.restore(group_id, app=app)
        assert group is not None
        return group.id, [r.id for r in group.results], group.join(timeout=WAIT, interval=0.05)

    restored_id, ids, values = await in_thread(restore_and_join)
    assert (restored_id, ids, values) == (group_id, members, [10, 11, 12])
    assert await saved.join(timeout=WAIT) == [10, 11, 12]


async def test_celery_chord_completes_and_we_await_its_body(
    app: celery.Celery, backend: RedisBackend
) -> None:
    def run_chord() -> tuple[str, str, list[str]]:
        header = [app.signature(tasks.ADD, args=(i, 1)) for i in range(3)]
        sent = celery.chord(header)(app.signature(tasks.TOTAL))
        return sent.id, sent.parent.id, [r.id for r in sent.parent.results]

    body_id, group_id, members = await in_thread(run_chord)
    assert await ar.AsyncResult(body_id, backend).get(timeout=WAIT) == 1 + 2 + 3
    meta = await backend.get_meta(body_id)
    assert (meta.name, meta.args) == (tasks.TOTAL, [[1, 2, 3]])
    header: ar.ResultSet[int] = ar.ResultSet([ar.AsyncResult(m, backend) for m in members], backend)
    assert await header.join(timeout=WAIT) == [1, 2, 3]
    assert {m.group_id for m in await backend.get_many(members)} == {group_id}
