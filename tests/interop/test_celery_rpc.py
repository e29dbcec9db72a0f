"""A real Celery 5.7 worker, Celery's client and aioresults' rpc:// on one private RabbitMQ.

One worker per module (``--pool=solo``, its own queue, ``result_backend =
"rpc://"``) runs the tasks of :mod:`tests.interop.rpc_tasks`. Tasks reach it
from :meth:`RPCBackend.send_task` and from Celery's own
``apply_async(reply_to=backend.reply_to)``; either way the worker publishes
each state to our reply queue, and aioresults receives them. The messages
``send_task`` publishes are compared, field by field, with those of Celery's
``app.send_task``. The RabbitMQ server is the session's one (see
:func:`tests.backends.test_rpc.shared_rabbitmq`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiormq
import anyio
import anyio.to_thread
import celery
import pytest
from pamqp.commands import Basic

import aioresults as ar
from aioresults import states
from aioresults.backends.amqp import RPCBackend
from tests.backends.test_rpc import shared_rabbitmq
from tests.interop import rpc_tasks as tasks
from tests.services import RabbitMQServer

ROOT = Path(__file__).resolve().parents[2]
WORKER_NAME = f"rpc-worker-{uuid.uuid4().hex[:8]}@interop"
WAIT = 20.0  # a safety net on every wait: the worker answers in well under a second


def new_id() -> str:
    return str(uuid.uuid4())


class Worker:
    """A ``celery worker`` subprocess on the RabbitMQ server."""

    def __init__(self, url: str, queue: str, log: Path) -> None:
        self.url = url
        self.queue = queue
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "AIORESULTS_URL"}
        env.update({tasks.URL_VARIABLE: self.url, tasks.QUEUE_VARIABLE: self.queue})
        with open(self.log.with_suffix(".err"), "wb") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", "tests.interop.rpc_tasks",
                    "worker", "--pool=solo", "--concurrency=1", "--without-heartbeat",
                    "--without-gossip", "--without-mingle", "-Q", self.queue,
                    "-n", WORKER_NAME, "--loglevel=INFO", f"--logfile={self.log}",
                ],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
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


@pytest.fixture(scope="session")
def rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    return shared_rabbitmq(request.config)


@pytest.fixture(scope="module")
def worker(rabbitmq: RabbitMQServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("celery-rpc-worker") / "worker.log"
    worker = Worker(rabbitmq.url, f"aioresults-rpc-interop-{uuid.uuid4().hex}", log)
    worker.start()
    try:
        yield worker
    finally:
        code = worker.stop()
    assert code == 0, worker.output()


@pytest.fixture(scope="module")
def app(worker: Worker) -> Iterator[celery.Celery]:
    """Celery's client side, configured as the worker's app, in this process."""
    app = tasks.create_app(worker.url, worker.queue)
    try:
        yield app
    finally:
        app.pool.force_close_all()
        app.close()


@pytest.fixture
async def backend(rabbitmq: RabbitMQServer, worker: Worker) -> AsyncIterator[RPCBackend]:
    async with ar.connect("rpc://", broker_url=rabbitmq.url, default_queue=worker.queue) as backend:
        assert isinstance(backend, RPCBackend)
        yield backend


async def watch_all(result: ar.AsyncResult[Any]) -> list[ar.ResultMeta]:
    return [meta async for meta in result.watch(timeout=WAIT)]


# ------------------------------------------------------------------ the worker runs, we receive


async def test_send_task_runs_and_we_receive_started_then_success(
    backend: RPCBackend, worker: Worker
) -> None:
    result = await backend.send_task(tasks.SLOW, ("done", 0.3))
    seen = await watch_all(result)
    assert [m.status for m in seen] == [states.PENDING, states.STARTED, states.SUCCESS]
    assert seen[1].result == {"pid": worker.pid, "hostname": WORKER_NAME}
    assert seen[2].result == "done" and seen[2].date_done is not None
    # result_extended: who ran what, from which queue.
    assert (seen[2].name, seen[2].args, seen[2].kwargs) == (tasks.SLOW, ["done", 0.3], {})
    assert (seen[2].worker, seen[2].queue) == (WORKER_NAME, worker.queue)
    assert await result == "done"


async def test_we_receive_a_builtin_exception(backend: RPCBackend) -> None:
    result = await backend.send_task(tasks.FAIL)
    with pytest.raises(ValueError) as caught:
        await result.get(timeout=WAIT)
    assert type(caught.value) is ValueError and caught.value.args == ("bad", 42)
    remote = caught.value.remote_traceback  # type: ignore[attr-defined]
    assert remote.startswith("Traceback (most recent call last):")
    assert "rpc_tasks.py" in remote and 'raise ValueError("bad", 42)' in remote
    meta = await backend.get_meta(result.id)
    assert meta.status == states.FAILURE and meta.traceback == remote


async def test_celery_apply_async_with_our_reply_to(
    backend: RPCBackend, app: celery.Celery
) -> None:
    def send() -> str:
        sent = app.signature(tasks.ADD, args=(2, 3)).apply_async(reply_to=backend.reply_to)
        return str(sent.id)

    task_id = await anyio.to_thread.run_sync(send)
    result: ar.AsyncResult[int] = ar.AsyncResult(task_id, backend)
    statuses = [m.status for m in await watch_all(result)]
    assert statuses[-1] == states.SUCCESS and await result == 5
    meta = await backend.get_meta(task_id)
    assert (meta.name, meta.args) == (tasks.ADD, [2, 3])


async def test_the_worker_sees_what_celery_would_send(backend: RPCBackend, worker: Worker) -> None:
    result = await backend.send_task(
        tasks.ECHO, (1, "two"), {"three": [3]}, countdown=0.2, expires=600, priority=3,
        headers={"custom": "value"}, time_limit=30, soft_time_limit=20, retries=2,
    )  # fmt: skip
    echoed = await result.get(timeout=WAIT)
    assert (echoed["args"], echoed["kwargs"]) == ([1, "two"], {"three": [3]})
    assert echoed["id"] == echoed["correlation_id"] == echoed["root_id"] == result.id
    assert echoed["reply_to"] == backend.reply_to
    assert echoed["eta"] is not None and echoed["expires"] is not None
    assert (echoed["retries"], echoed["timelimit"], echoed["custom"]) == (2, [30, 20], "value")
    assert echoed["priority"] == 3 and echoed["origin"].startswith(f"gen{os.getpid()}@")


async def test_many_tasks_at_once(backend: RPCBackend) -> None:
    results = [await backend.send_task(tasks.ADD, (i, i)) for i in range(20)]
    assert await ar.ResultSet(results).join(timeout=WAIT) == [2 * i for i in range(20)]


# ------------------------------------------------------------------ we answer, Celery receives


async def test_celerys_client_receives_our_reply(
    backend: RPCBackend, app: celery.Celery, rabbitmq: RabbitMQServer
) -> None:
    """aioresults as the worker: Celery's own RPC client gets what we publish."""
    queue = f"aioresults-rpc-manual-{new_id()}"  # no worker consumes it: we do

    def send_and_get() -> Any:
        # One thread sends and gets: Celery's reply queue is per thread.
        sent = app.send_task(tasks.ADD, args=(2, 3), queue=queue)
        try:
            return sent.get(timeout=WAIT)
        finally:
            app.backend.result_consumer.stop()

    async def answer() -> None:
        async with aiormq.connect(rabbitmq.url) as connection:
            channel = await connection.channel()
            # Declared as Celery declares it, whoever comes first.
            await channel.queue_declare(queue, durable=True)
            with anyio.fail_after(WAIT):
                while True:
                    got = await channel.basic_get(queue, no_ack=True)
                    if isinstance(got.delivery, Basic.GetOk):
                        break
                    await anyio.sleep(0.02)
        properties = got.header.properties
        headers = properties.headers or {}
        assert properties.reply_to and properties.correlation_id == headers["id"]
        args, kwargs, _ = json.loads(got.body)
        with backend.replying_to(properties.reply_to, properties.correlation_id):
            async with backend.track(str(headers["id"]), name=str(headers["task"])) as task:
                task.set_result(sum(args))

    got: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def celery_side() -> None:
            got.append(await anyio.to_thread.run_sync(send_and_get))

        tg.start_soon(celery_side)
        await answer()
    assert got == [5]


# ------------------------------------------------------------------ the wire, field by field


async def capture(url: str, queue: str) -> tuple[Any, Any, bytes]:
    """The next message on ``queue``: (delivery, properties, body)."""
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        with anyio.fail_after(WAIT):
            while True:
                got = await channel.basic_get(queue, no_ack=True)
                if isinstance(got.delivery, Basic.GetOk):
                    return got.delivery, got.header.properties, got.body
                await anyio.sleep(0.02)


_VARYING_HEADERS = ("id", "origin", "eta", "expires")
_PROPERTIES = (
    "content_type", "content_encoding", "delivery_mode", "priority", "reply_to",
    "expiration", "user_id", "app_id", "message_type", "timestamp", "cluster_id",
)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "countdown": 30,
            "expires": 600,
            "priority": 5,
            "headers": {"custom": "value"},
            "time_limit": 10,
            "soft_time_limit": 5,
            "shadow": "shadowed",
            "retries": 1,
            "root_id": "root-1",
            "parent_id": "parent-1",
            "group_id": "group-1",
            "group_index": 2,
            "ignore_result": False,
        },
    ],
    ids=["defaults", "every-option"],
)
async def test_send_task_publishes_what_celery_publishes(
    backend: RPCBackend, app: celery.Celery, rabbitmq: RabbitMQServer, options: dict[str, Any]
) -> None:
    queue = f"aioresults-rpc-capture-{new_id()}"
    args, kwargs = (2, "three", {"four": [4.5, None]}), {"z": dt.date(2026, 1, 2)}

    def celery_sends() -> str:
        sent = app.send_task(
            tasks.ADD, args=args, kwargs=kwargs, queue=queue, reply_to=backend.reply_to, **options
        )
        return str(sent.id)

    celery_id = await anyio.to_thread.run_sync(celery_sends)
    theirs = await capture(rabbitmq.url, queue)
    ours_result = await backend.send_task(tasks.ADD, args, kwargs, queue=queue, **options)
    ours = await capture(rabbitmq.url, queue)

    for (delivery, properties, _), task_id in ((theirs, celery_id), (ours, ours_result.id)):
        assert (delivery.exchange, delivery.routing_key) == ("", queue)
        assert properties.correlation_id == properties.headers["id"] == task_id
        assert properties.headers["root_id"] == options.get("root_id", task_id)
        if "root_id" not in options:
            properties.headers["root_id"] = "<the task id>"
    their_headers, our_headers = dict(theirs[1].headers), dict(ours[1].headers)
    # The same headers; their order on the wire differs (pamqp writes a table's keys
    # sorted, py-amqp as given), which no reader of an AMQP table may depend on.
    assert sorted(our_headers) == sorted(their_headers)
    for name in _VARYING_HEADERS:
        assert (our_headers.pop(name) is None) == (their_headers.pop(name) is None), name
    assert our_headers == their_headers
    for name in _PROPERTIES:
        ours_value, theirs_value = getattr(ours[1], name), getattr(theirs[1], name)
        if name == "expiration" and theirs_value is not None:
            # Milliseconds left at publication: equal to within the time between the sends.
            assert abs(int(ours_value) - int(theirs_value)) < 5_000
        else:
            assert ours_value == theirs_value, name
    # aiormq sets message_id on every message (it matches returned messages by it);
    # Celery sends none. Workers ignore it.
    assert theirs[1].message_id is None and ours[1].message_id
    assert ours[2] == theirs[2]  # the body, byte for byte
    if "countdown" in options:
        eta = dt.datetime.fromisoformat(ours[1].headers["eta"])
        assert eta.tzinfo is not None
        assert abs((eta - dt.datetime.now(dt.UTC)).total_seconds() - 30) < 5
