"""RPC (AMQP): aioresults' rpc:// against a raw aio-pika consumer, Celery's RPC client and kombu.

Everything runs against one private RabbitMQ. Wake latency: one publisher
process, a Celery 5.7 RPC backend publishing as a worker does
(``backend.store_result(..., request=<reply_to, correlation_id>)``), serves
every reader, so they differ only in how they receive. Readers take turns in
rounds (the order alternates between rounds) and each ratio is computed per
round, so the spread shows how much the machine moved under them.

Run as ``python -m benchmarks rpc``; ``python -m benchmarks.rpc_bench
--publisher URL`` is the publisher process (internal).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aioresults as ar
from aioresults.backends.amqp import RPCBackend
from benchmarks._common import ROOT, machine, ms, now, percentile, table, version, write_section

ROUNDS = 5
SAMPLES = 50  # per reader per round
SENDERS, PER_SENDER = 100, 50  # send_task throughput: 5,000 messages a round
VALUE = {"answer": 42}
TASK = "bench.add"

Wait = Callable[[str], Awaitable[Any]]


# ------------------------------------------------------------------ the publisher process


def publisher(url: str) -> None:
    """Publish a SUCCESS for each ``<queue> <task id>`` line on stdin, as a Celery
    worker's RPC backend does, printing ``time.monotonic()`` taken just before."""
    from celery import Celery
    from celery.app.task import Context

    app = Celery("bench-worker", broker=url, backend="rpc://", set_as_current=False)
    backend = app.backend
    print("ready", flush=True)
    for line in sys.stdin:
        queue, task_id = line.split()
        request = Context(id=task_id, reply_to=queue, correlation_id=task_id)
        started = time.monotonic()
        backend.store_result(task_id, VALUE, "SUCCESS", request=request)
        print(repr(started), flush=True)
    app.close()


class Publisher:
    """The publisher process: ``await publish(queue, task_id)`` returns its timestamp."""

    async def __aenter__(self) -> Publisher:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.rpc_bench", "--publisher", self.url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
        )  # fmt: skip
        assert self.process.stdout is not None
        ready = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the publisher failed to start: {ready!r}")
        return self

    def __init__(self, url: str) -> None:
        self.url = url

    async def publish(self, queue: str, task_id: str) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{queue} {task_id}\n".encode())
        await self.process.stdin.drain()
        return float(await self.process.stdout.readline())

    async def __aexit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), 20)


# ------------------------------------------------------------------ readers


class RawConsumer:
    """The floor: one aio-pika consumer (no ack), a future per correlation id."""

    name = "raw aio-pika consumer (floor)"

    async def start(self, url: str) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(url)
        channel = await self.connection.channel()
        self.queue_obj = await channel.declare_queue(exclusive=True)
        self.queue = self.queue_obj.name
        self.futures: dict[str, asyncio.Future[bytes]] = {}

        async def on_message(message: Any) -> None:
            future = self.futures.pop(message.correlation_id, None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await self.queue_obj.consume(on_message, no_ack=True)

    async def wait(self, task_id: str) -> None:
        future = self.futures[task_id] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(future, 10)

    async def stop(self) -> None:
        await self.connection.close()


class Aioresults:
    """``await AsyncResult(task_id, backend).get()`` on an rpc:// backend."""

    name = f"aioresults {version('aioresults')} `await result.get()`"

    async def start(self, url: str) -> None:
        self.backend = await RPCBackend(url).open()
        self.queue = self.backend.reply_to

    async def wait(self, task_id: str) -> None:
        await ar.AsyncResult(task_id, self.backend).get(timeout=10)

    async def stop(self) -> None:
        await self.backend.aclose()


class CeleryClient:
    """Celery's blocking ``AsyncResult.get()`` on its RPC backend, in one thread
    (Celery's reply queue is per thread)."""

    name = f"Celery {version('celery')} RPC `AsyncResult.get()` (in a thread)"

    async def start(self, url: str) -> None:
        from celery import Celery

        self.app = Celery("bench-client", broker=url, backend="rpc://", set_as_current=False)
        self.thread = ThreadPoolExecutor(1)
        self.queue = await self._in_thread(lambda: self.app.backend.oid)
        # Declares and consumes its queue: a first get() that times out.
        await self._in_thread(self._get, "warm-up", 0.1)

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.thread, func, *args)

    def _get(self, task_id: str, timeout: float) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import AsyncResult

        try:
            return AsyncResult(task_id, app=self.app).get(timeout=timeout)
        except CeleryTimeout:
            return None

    async def wait(self, task_id: str) -> None:
        await self._in_thread(self._get, task_id, 10)

    async def stop(self) -> None:
        await self._in_thread(lambda: self.app.backend.result_consumer.stop())
        self.thread.shutdown()
        self.app.close()


async def sample(reader: Any, publisher: Publisher) -> float:
    task_id = uuid.uuid4().hex
    woke: list[float] = []

    async def wait() -> None:
        await reader.wait(task_id)
        woke.append(now())

    task = asyncio.create_task(wait())
    await asyncio.sleep(random.uniform(0.02, 0.05))
    published = await publisher.publish(reader.queue, task_id)
    await asyncio.wait_for(task, 15)
    return woke[0] - published


async def wake_latency(url: str) -> tuple[list[list[Any]], dict[str, list[float]]]:
    readers = [RawConsumer(), Aioresults(), CeleryClient()]
    for reader in readers:
        await reader.start(url)
    values: dict[str, list[float]] = {r.name: [] for r in readers}
    p50s: dict[str, list[float]] = {r.name: [] for r in readers}
    async with Publisher(url) as publisher:
        for reader in readers:  # warm every path once
            await sample(reader, publisher)
        for round_ in range(ROUNDS):
            for reader in readers if round_ % 2 == 0 else readers[::-1]:
                got = [await sample(reader, publisher) for _ in range(SAMPLES)]
                values[reader.name] += got
                p50s[reader.name].append(percentile(got, 50))
    for reader in readers:
        await reader.stop()
    floor = p50s[readers[0].name]
    rows = []
    for reader in readers:
        ratios = [p / f for p, f in zip(p50s[reader.name], floor, strict=True)]
        rows.append(
            [
                reader.name,
                len(values[reader.name]),
                ms(statistics.median(p50s[reader.name])),
                ms(percentile(values[reader.name], 90)),
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
            ]
        )
    ratios = {r.name: [p / f for p, f in zip(p50s[r.name], floor, strict=True)] for r in readers}
    return rows, ratios


# ------------------------------------------------------------------ send_task throughput


#: CPU seconds this process spent per aioresults ``send_task``, per round.
CPU_PER_SEND: list[float] = []


async def aioresults_rate(url: str, queue: str) -> float:
    async with RPCBackend(url, default_queue=queue) as backend:
        await backend.send_task(TASK, (0, 0))

        async def sender(s: int) -> None:
            for n in range(PER_SENDER):
                await backend.send_task(TASK, (s, n))

        started, cpu = now(), time.process_time()
        await asyncio.gather(*(sender(s) for s in range(SENDERS)))
        CPU_PER_SEND.append((time.process_time() - cpu) / (SENDERS * PER_SENDER))
        return SENDERS * PER_SENDER / (now() - started)


def kombu_rate(url: str, queue: str) -> float:
    """kombu's blocking ``Producer.publish`` from threads, a connection each, with
    the same protocol 2 message (headers, properties and body)."""
    import kombu

    from aioresults._serialization import Codec
    from aioresults.backends.amqp._messages import task_message

    message = task_message(Codec("json"), TASK, (1, 2), {}, task_id="x", reply_to="r")
    properties = dict(message.properties)
    headers = properties.pop("headers")
    barrier = threading.Barrier(SENDERS + 1)

    def sender() -> None:
        with kombu.Connection(url) as connection:
            producer = connection.Producer()
            producer.publish(b"warm-up", routing_key=queue, retry=True)
            barrier.wait()
            for _ in range(PER_SENDER):
                producer.publish(
                    message.body, exchange="", routing_key=queue, headers=headers,
                    content_type=properties["content_type"],
                    content_encoding=properties["content_encoding"],
                    delivery_mode=2, priority=0, correlation_id="x", reply_to="r",
                )  # fmt: skip

    with ThreadPoolExecutor(SENDERS) as pool:
        done = [pool.submit(sender) for _ in range(SENDERS)]
        barrier.wait()
        started = now()
        for future in done:
            future.result()
    return SENDERS * PER_SENDER / (now() - started)


def celery_rate(url: str, queue: str) -> float:
    """Celery's ``app.send_task`` (rpc:// results) from threads."""
    from celery import Celery

    app = Celery("bench-sender", broker=url, backend="rpc://", set_as_current=False)
    app.send_task(TASK, (0, 0), queue=queue)

    def sender(s: int) -> None:
        for n in range(PER_SENDER):
            app.send_task(TASK, (s, n), queue=queue)

    with ThreadPoolExecutor(SENDERS) as pool:
        started = now()
        list(pool.map(sender, range(SENDERS)))
        elapsed = now() - started
    app.close()
    return SENDERS * PER_SENDER / elapsed


async def throughput(url: str) -> tuple[list[list[Any]], list[float], float]:
    import aiormq

    queue = f"bench-send-{uuid.uuid4().hex}"
    names = [
        f"aioresults `send_task` ({SENDERS} coroutines, one connection, confirmed)",
        f"kombu {version('kombu')} `Producer.publish` ({SENDERS} threads, a connection each)",
        f"Celery {version('celery')} `app.send_task` ({SENDERS} threads, pooled connections)",
    ]
    rates: dict[str, list[float]] = {name: [] for name in names}
    runs: list[Callable[[], Awaitable[float]]] = [
        lambda: aioresults_rate(url, queue),
        lambda: asyncio.to_thread(kombu_rate, url, queue),
        lambda: asyncio.to_thread(celery_rate, url, queue),
    ]
    async with aiormq.connect(url) as connection:
        channel = await connection.channel()
        for round_ in range(3):
            order = list(zip(names, runs, strict=True))
            for name, run in order if round_ % 2 == 0 else order[::-1]:
                rates[name].append(await run())
                await channel.queue_purge(queue)
        await channel.queue_delete(queue)
    ours = rates[names[0]]
    rows = []
    for name in names:
        ratios = [o / r for o, r in zip(ours, rates[name], strict=True)]
        rows.append(
            [
                name,
                f"{statistics.median(rates[name]):,.0f}",
                f"{min(rates[name]):,.0f}–{max(rates[name]):,.0f}",
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
            ]
        )
    celery_ratios = [o / r for o, r in zip(ours, rates[names[2]], strict=True)]
    return rows, celery_ratios, statistics.median(ours)


# ------------------------------------------------------------------ report


async def run() -> str:
    from tests.services import RabbitMQServer

    with RabbitMQServer() as server:
        broker_version = server.rabbitmqctl("version").strip()
        latency, ratios = await wake_latency(server.url)
        sending, send_ratios, our_rate = await throughput(server.url)

    ours_name, celery_name = latency[1][0], latency[2][0]
    ours = statistics.median(ratios[ours_name])
    ours_vs_celery = statistics.median(
        [o / c for o, c in zip(ratios[ours_name], ratios[celery_name], strict=True)]
    )
    latency_goal = ours <= 1.3 and ours_vs_celery < 1
    cpu = statistics.median(CPU_PER_SEND)
    wall = 1 / our_rate
    send_goal = statistics.median(send_ratios) >= 1
    lines = [
        "## RPC (AMQP)",
        "",
        f"Machine: {machine()}. Broker: RabbitMQ {broker_version} on loopback, private. "
        f"aio-pika {version('aio-pika')}, aiormq {version('aiormq')}, kombu {version('kombu')}, "
        f"py-amqp {version('amqp')}. Run: `scripts/bench rpc`.",
        "",
        "### Wake latency (a worker's reply published by another process while waiting)",
        "",
        "One publisher process for every reader: Celery's RPC backend `store_result()`, as a "
        "worker publishes a result to the sender's `reply_to`; the clock is read just before "
        f"the call. {ROUNDS} rounds of {SAMPLES} samples per reader, the order alternating "
        "between rounds; p50 is the median of the rounds' p50s, the ratio is per round "
        "(median, and its range across rounds).",
        "",
        table(["reader", "samples", "p50", "p90", "p50 / floor (range)"], latency),
        "",
        f"Goal: aioresults p50 within 1.3× of the floor and below Celery's: "
        f"**{'met' if latency_goal else 'missed'}** ({ours:.2f}× the floor, "
        f"{ours_vs_celery:.2f}× Celery's).",
        "",
        "What aioresults adds to the floor: aiormq runs each delivery in a task of its "
        "own (the floor pays that too), then the reply is kept in the buffer, handed to the "
        "waiter hub (decoded once into a `ResultMeta`) and acknowledged (the floor consumes "
        "with `no_ack`); the waiter's future wakes the awaiting task. Celery's client "
        "blocks in a thread on `drain_events()`, and its wake-up crosses back to the event loop.",
        "",
        f"### `send_task` throughput ({SENDERS * PER_SENDER:,} messages a round, 3 rounds)",
        "",
        table(["sender", "messages/s (median)", "range", "aioresults / this (range)"], sending),
        "",
        f"Goal: aioresults at least as fast as Celery's `send_task` from threads: "
        f"**{'met' if send_goal else 'missed'}**.",
        "",
        "The guarantees differ: `send_task` returns once the broker confirmed the message "
        "(publisher confirms, `mandatory`); kombu and Celery publish without confirms by "
        "default, so their figures include no round trip per message, and a message the "
        "broker drops is not noticed. Celery's `send_task` with an rpc:// backend also declares "
        "its reply queue before every message (its `Queue` is never cached).",
        "",
        f"Where a `send_task` goes: this process spent {cpu * 1e6:.0f} µs of CPU on each "
        f"(building the protocol 2 message, pamqp encoding its 19-field header table, aiormq "
        f"and asyncio), {cpu / wall:.0%} of the {wall * 1e6:.0f} µs each took; the rest is "
        "the broker's, which shares the two cores and confirms a persistent message to a "
        "durable queue only once it has stored it. kombu's unconfirmed publishes from 100 "
        "connections wait for neither, which is why they are faster, and why a message the "
        "broker drops goes unnoticed.",
    ]
    return "\n".join(lines)


def main() -> None:
    body = asyncio.run(run())
    write_section("rpc", body)
    print(body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--publisher":
        publisher(sys.argv[2])
    else:
        main()
