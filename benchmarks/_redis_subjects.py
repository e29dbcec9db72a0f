"""One measurement of one Redis client, in a process of its own (a child of the suite).

Usage: ``python benchmarks/_redis_subjects.py SPEC``, SPEC a JSON object:
``measure`` (``latency``, ``waiters``, ``store``, ``chord``, ``join``),
``subject`` (``protocol``: asyncio.Protocol + hiredis, the limit;
``redis-asyncio``; ``aioresults``; ``aioresults-watch``; ``celery``;
``taskiq``), ``url``, ``writer`` (the shared writer's socket), ``before`` (a
directory holding an older ``aioresults`` package to import instead), and the
measure's own parameters. Prints one JSON object with the figures.

**In-process wake cost.** The event loop runs on a selector that notes when
``select()`` returns with a socket ready other than the writer's line: that
is when the message's bytes are there. The wake cost is the time from then to
the waiting coroutine running again, and the loop iterations in between (the
message's own included). A second, untimed pass counts the Python function
calls in the same window.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # an older aioresults first, then this repository
    _SPEC = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if _SPEC.get("before"):
        sys.path.insert(0, _SPEC["before"])

import asyncio
import gc
import os
import random
import selectors
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from benchmarks._common import WriterClient
from benchmarks._redis_limits import RawClient, RawSubscriber, open_raw

KEY = "celery-task-meta-"
now = time.monotonic


def rss() -> int:
    """The resident set size of this process, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def port_of(url: str) -> int:
    return urlsplit(url).port or 6379


# ------------------------------------------------------------------ the timed selector


class TimedSelector(selectors.EpollSelector):
    """Notes the first ``select()`` after :meth:`arm` that finds a socket other
    than the ignored ones ready (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.armed = False
        self.ignore: set[int] = set()
        self.arrived = 0.0
        self.arrived_at_call = 0
        self.calls_counted = 0
        self.count_calls = False

    def arm(self, ignore: set[int]) -> None:
        self.ignore = ignore
        self.arrived = 0.0
        self.armed = True

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(timeout)
        self.calls += 1
        if self.armed and ready and any(key.fd not in self.ignore for key, _ in ready):
            self.arrived = now()
            self.arrived_at_call = self.calls
            self.armed = False
            if self.count_calls:
                self.calls_counted = 0
                sys.setprofile(self._profile)
        return ready

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls_counted += 1


async def latencies(
    selector: TimedSelector,
    writer: WriterClient,
    wait: Callable[[str], Awaitable[Any]],
    samples: int,
    mode: str,
    count_calls: bool = False,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"e2e": [], "inproc": [], "iterations": [], "calls": []}
    for _ in range(samples):
        task_id = uuid.uuid4().hex
        woke: list[float] = []

        async def waiter(task_id: str = task_id, woke: list[float] = woke) -> None:
            await wait(task_id)
            woke.append(now())
            if selector.count_calls:
                sys.setprofile(None)
            woke.append(selector.calls - selector.arrived_at_call + 1)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(random.uniform(0.02, 0.05))
        selector.count_calls = count_calls
        selector.arm({writer.fileno()})
        stored = await writer.store(task_id, mode)
        await asyncio.wait_for(task, 15)
        selector.armed = False
        if count_calls:
            out["calls"].append(selector.calls_counted)
            continue
        out["e2e"].append(woke[0] - stored)
        if selector.arrived:
            out["inproc"].append(woke[0] - selector.arrived)
            out["iterations"].append(woke[1])
    return out


# ------------------------------------------------------------------ subjects


class Subject:
    """One client under test; each measure uses the methods it needs."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def wait(self, task_id: str) -> Any:
        raise NotImplementedError

    def register(self, ids: list[str]) -> list[asyncio.Task[Any]]:
        raise NotImplementedError

    async def settled(self, count: int) -> None:
        raise NotImplementedError

    async def store(self, task_id: str, value: Any) -> None:
        raise NotImplementedError

    async def chord_start(self, group_id: str, size: int) -> None:
        raise NotImplementedError

    async def chord_part(self, group_id: str, index: int) -> bool:
        raise NotImplementedError

    def joiner(self, ids: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        """What joins ``ids``: called (timed) once the call is made ready."""
        raise NotImplementedError


class Protocol(Subject):
    """asyncio.Protocol + hiredis, by hand: the limit."""

    def __init__(self, url: str) -> None:
        self.port = port_of(url)

    async def open(self) -> None:
        from aioresults.backends.redis import _scripts

        self.client: RawClient = await open_raw(self.port)
        self.sub: RawSubscriber = await open_raw(self.port, RawSubscriber)
        self.write_sha = await self.client.call("SCRIPT", "LOAD", _scripts.WRITE)
        self.count_sha = await self.client.call("SCRIPT", "LOAD", _scripts.COUNT_PART)

    async def close(self) -> None:
        self.client.close()
        self.sub.close()

    async def wait(self, task_id: str) -> Any:
        channel = (KEY + task_id).encode()
        message = self.sub.expect(channel)
        await self.sub.subscribe([channel])
        value = await self.client.call("GET", channel)
        if value is None:
            value = await message
        else:
            self.sub.waiting.pop(channel, None)
        self.sub.unsubscribe([channel])
        return json.loads(value)["result"]

    def register(self, ids: list[str]) -> list[asyncio.Task[Any]]:
        channels = [(KEY + i).encode() for i in ids]

        async def wait(channel: bytes) -> Any:
            return json.loads(await self.sub.expect(channel))["result"]

        self._channels = channels
        return [asyncio.create_task(wait(c)) for c in channels]

    async def settled(self, count: int) -> None:
        await asyncio.sleep(0)  # every task has its future
        channels = self._channels
        confirmed = self.sub.subscribe(channels)
        reads = [self.client.call("MGET", *channels[i : i + 1000]) for i in range(0, count, 1000)]
        await confirmed
        for start, read in zip(range(0, count, 1000), reads, strict=True):
            for channel, value in zip(channels[start : start + 1000], await read, strict=True):
                if value is not None:
                    self.sub.waiting.pop(channel).set_result(value)

    async def store(self, task_id: str, value: Any) -> None:
        await self.client.call(
            "EVALSHA", self.write_sha, 1, KEY + task_id, celery_record(task_id, value), 86_400_000
        )

    async def chord_start(self, group_id: str, size: int) -> None:
        await self.client.call("SET", chord_key(group_id, "s"), size, "PX", 86_400_000)

    async def chord_part(self, group_id: str, index: int) -> bool:
        part = f"{group_id}-{index}:{index}"
        payload = part_payload(group_id, index)
        counted = await self.client.call(
            "EVALSHA", self.count_sha, 4, *chord_keys(group_id), part, payload, 86_400_000,
            uuid.uuid4().hex,
        )  # fmt: skip
        return bool(counted[0] == counted[1])

    def joiner(self, ids: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        keys = [KEY + i for i in ids]

        async def join() -> list[Any]:
            reads = [
                self.client.call("MGET", *keys[i : i + 1000]) for i in range(0, len(keys), 1000)
            ]
            loads = json.loads
            return [loads(v)["result"] for read in reads for v in await read]

        return join


def celery_record(task_id: str, result: Any) -> bytes:
    """A SUCCESS record as Celery writes it (what a writer must at least do)."""
    return json.dumps(
        {
            "status": "SUCCESS",
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": datetime.now(UTC).isoformat(),
            "task_id": task_id,
        }
    ).encode()


def chord_key(group_id: str, suffix: str) -> str:
    return f"celery-taskset-meta-{{{group_id}}}.{suffix}"


def chord_keys(group_id: str) -> list[str]:
    return [chord_key(group_id, s) for s in "spnr"]


def part_payload(group_id: str, index: int) -> bytes:
    return json.dumps([f"{group_id}-{index}", index, "SUCCESS", index]).encode()


class RedisAsyncio(Subject):
    """redis-py's asyncio client: the best its API allows."""

    def __init__(self, url: str, connections: int = 100) -> None:
        self.url = url
        self.connections = connections

    async def open(self) -> None:
        import redis.asyncio as redis_asyncio

        from aioresults.backends.redis import _scripts

        pool = redis_asyncio.BlockingConnectionPool.from_url(
            self.url, max_connections=self.connections
        )
        self.client = redis_asyncio.Redis.from_pool(pool)
        self.pubsub = self.client.pubsub()
        self.write = self.client.register_script(_scripts.WRITE)
        self.count = self.client.register_script(_scripts.COUNT_PART)
        await self.client.ping()

    async def close(self) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()

    async def wait(self, task_id: str) -> Any:
        key = KEY + task_id
        await self.pubsub.subscribe(key)
        value = await self.client.get(key)
        while value is None:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            if message is not None:
                value = message["data"]
        await self.pubsub.unsubscribe(key)
        return json.loads(value)["result"]

    def register(self, ids: list[str]) -> list[asyncio.Task[Any]]:
        loop = asyncio.get_running_loop()
        self.futures: dict[bytes, asyncio.Future[bytes]] = {}

        async def wait(key: bytes) -> Any:
            future = self.futures[key] = loop.create_future()
            return json.loads(await future)["result"]

        self._keys = [(KEY + i).encode() for i in ids]
        return [asyncio.create_task(wait(k)) for k in self._keys]

    async def settled(self, count: int) -> None:
        await asyncio.sleep(0)  # every task has its future
        keys = self._keys
        for start in range(0, count, 1000):
            await self.pubsub.subscribe(*keys[start : start + 1000])
        confirmed = 0
        while confirmed < count:  # the confirmations, one per channel
            message = await self.pubsub.get_message(timeout=10)
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, count, 1000):
                pipe.mget(keys[start : start + 1000])
            values = [v for chunk in await pipe.execute() for v in chunk]
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                self.futures.pop(key).set_result(value)
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while self.futures:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=10)
            if message is not None:
                future = self.futures.pop(message["channel"], None)
                if future is not None:
                    future.set_result(message["data"])

    async def store(self, task_id: str, value: Any) -> None:
        await self.write(keys=[KEY + task_id], args=[celery_record(task_id, value), 86_400_000])

    async def chord_start(self, group_id: str, size: int) -> None:
        await self.client.set(chord_key(group_id, "s"), size, px=86_400_000)

    async def chord_part(self, group_id: str, index: int) -> bool:
        part = f"{group_id}-{index}:{index}"
        args = [part, part_payload(group_id, index), 86_400_000, uuid.uuid4().hex]
        counted = await self.count(keys=chord_keys(group_id), args=args)
        return bool(counted[0] == counted[1])

    def joiner(self, ids: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        keys = [KEY + i for i in ids]

        async def join() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for start in range(0, len(keys), 1000):
                    pipe.mget(keys[start : start + 1000])
                chunks = await pipe.execute()
            loads = json.loads
            return [loads(v)["result"] for chunk in chunks for v in chunk]

        return join


class Aioresults(Subject):
    """aioresults (this repository's, or an older one: see ``before``)."""

    def __init__(self, url: str, watch: bool = False) -> None:
        self.url = url
        self.watch = watch

    async def open(self) -> None:
        import aioresults as ar

        self.ar = ar
        self.backend: Any = ar.connect(self.url)
        await self.backend.get_meta("warm-up")

    async def close(self) -> None:
        await self.backend.aclose()

    async def wait(self, task_id: str) -> Any:
        result = self.ar.AsyncResult(task_id, self.backend)
        if not self.watch:
            return await result.get(timeout=10)
        async for meta in result.watch(timeout=10):
            if meta.ready:
                return meta.result
        return None

    def register(self, ids: list[str]) -> list[asyncio.Task[Any]]:
        make = self.ar.AsyncResult
        backend = self.backend
        return [asyncio.create_task(make(i, backend).get(timeout=600)) for i in ids]

    async def settled(self, count: int) -> None:
        # Every waiter registered, subscribed and read (the old hub has no counter).
        new = hasattr(self.backend, "_hub_")
        while True:
            if new:
                hub = self.backend._hub
                if len(hub.watched) >= count and not hub.unsettled:
                    return
            else:
                old = self.backend.hub
                if len(old._by_id) >= count and not old._to_read and old._settling is None:
                    return
            await asyncio.sleep(0.002)

    async def store(self, task_id: str, value: Any) -> None:
        await self.backend.mark_as_done(task_id, value)

    async def chord_start(self, group_id: str, size: int) -> None:
        await self.backend.set_chord_size(group_id, size)

    async def chord_part(self, group_id: str, index: int) -> bool:
        progress = await self.backend.chord_part_return(
            group_id, f"{group_id}-{index}", "SUCCESS", index, index=index
        )
        return bool(progress.complete)

    def joiner(self, ids: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        make = self.ar.AsyncResult
        group = self.ar.ResultSet([make(i, self.backend) for i in ids])
        return lambda: group.join(timeout=60)  # type: ignore[no-any-return]


class Celery(Subject):
    """Celery's blocking client, from threads."""

    def __init__(self, url: str) -> None:
        from celery import Celery as App

        self.app = App(broker="memory://", backend=url)
        self.app.conf.result_backend_thread_safe = True

    async def open(self) -> None:
        self.app.backend.get_task_meta("warm-up")

    async def wait(self, task_id: str) -> Any:
        from celery.result import AsyncResult

        return await asyncio.to_thread(AsyncResult(task_id, app=self.app).get, timeout=10)

    async def store(self, task_id: str, value: Any) -> None:
        await asyncio.to_thread(self.app.backend.store_result, task_id, value, "SUCCESS")

    def joiner(self, ids: list[str]) -> Callable[[], Awaitable[list[Any]]]:
        from celery.result import AsyncResult, ResultSet

        group = ResultSet([AsyncResult(i, app=self.app) for i in ids], app=self.app)

        async def join() -> list[Any]:
            values: list[Any] = group.join_native(timeout=60)
            return values

        return join


class Taskiq(Subject):
    """taskiq-redis's result backend (it polls)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        from taskiq_redis import RedisAsyncResultBackend

        self.backend: Any = RedisAsyncResultBackend(self.url)
        await self.backend.startup()

    async def close(self) -> None:
        await self.backend.shutdown()

    async def wait(self, task_id: str) -> Any:
        from taskiq.task import AsyncTaskiqTask

        return await AsyncTaskiqTask(task_id, self.backend).wait_result(timeout=10)


def make_subject(name: str, url: str) -> Subject:
    if name == "protocol":
        return Protocol(url)
    if name == "redis-asyncio":
        return RedisAsyncio(url)
    if name == "aioresults":
        return Aioresults(url)
    if name == "aioresults-watch":
        return Aioresults(url, watch=True)
    if name == "celery":
        return Celery(url)
    if name == "taskiq":
        return Taskiq(url)
    raise SystemExit(f"unknown subject {name}")


# ------------------------------------------------------------------ measures


async def measure(spec: dict[str, Any], selector: TimedSelector) -> dict[str, Any]:
    subject = make_subject(spec["subject"], spec["url"])
    await subject.open()
    try:
        kind = spec["measure"]
        if kind == "latency":
            writer = await WriterClient(spec["writer"]).connect()
            mode = "taskiq" if spec["subject"] == "taskiq" else "celery"
            figures: dict[str, Any] = await latencies(
                selector, writer, subject.wait, spec["samples"], mode
            )
            if spec.get("count_calls"):
                counted = await latencies(selector, writer, subject.wait, 10, mode, True)
                figures["calls"] = counted["calls"]
            writer.close()
            return figures
        if kind == "waiters":
            return await many_waiters(subject, spec)
        if kind == "store":
            writers, each = spec["writers"], spec["each"]
            prefix = uuid.uuid4().hex

            async def write(w: int) -> None:
                for n in range(each):
                    await subject.store(f"{prefix}-{w}-{n}", n)

            started = now()
            await asyncio.gather(*(write(w) for w in range(writers)))
            return {"rate": writers * each / (now() - started)}
        if kind == "chord":
            writers, each = spec["writers"], spec["each"]
            group_id = uuid.uuid4().hex
            await subject.chord_start(group_id, writers * each)
            completions = 0

            async def count(w: int) -> None:
                nonlocal completions
                for n in range(each):
                    # Not `completions += await ...`: that reads the total before awaiting.
                    complete = await subject.chord_part(group_id, w * each + n)
                    completions += complete

            started = now()
            await asyncio.gather(*(count(w) for w in range(writers)))
            return {"rate": writers * each / (now() - started), "completions": completions}
        if kind == "join":
            with open(spec["ids"]) as listing:  # noqa: ASYNC230 - a small local file
                ids = json.load(listing)
            times = []
            for _ in range(spec["repeat"]):
                join = subject.joiner(ids)  # the ResultSet, made outside the timing
                started = now()
                values = await join()
                times.append(now() - started)
                assert values == list(range(len(ids))), "join returned wrong values"
            return {"time": statistics.median(times), "times": times}
        raise SystemExit(f"unknown measure {kind}")
    finally:
        await subject.close()


async def many_waiters(subject: Subject, spec: dict[str, Any]) -> dict[str, Any]:
    count = spec["count"]
    ids = [uuid.uuid4().hex for _ in range(count)]
    gc.collect()
    if spec.get("tracemalloc"):
        tracemalloc.start()
    before = rss()
    traced = tracemalloc.take_snapshot() if spec.get("tracemalloc") else None
    started = now()
    tasks = subject.register(ids)
    await subject.settled(count)
    registered = now() - started
    figures: dict[str, Any] = {"register": registered, "rss": (rss() - before) / count}
    if traced is not None:
        grown = tracemalloc.take_snapshot().compare_to(traced, "filename")
        figures["traced"] = sum(s.size_diff for s in grown) / count
        tracemalloc.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return figures
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listing:
        json.dump(ids, listing)
    writer = await WriterClient(spec["writer"]).connect()
    try:
        last_store = await writer.bulk(listing.name)
        values = await asyncio.gather(*tasks)
        figures["last_wake"] = now() - last_store
    finally:
        writer.close()
        os.unlink(listing.name)
    assert values == list(range(count)), "waiters got wrong values"
    return figures


def main() -> None:
    selector = TimedSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        figures = loop.run_until_complete(measure(_SPEC, selector))
    finally:
        loop.close()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
