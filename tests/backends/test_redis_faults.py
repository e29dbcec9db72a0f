"""The Redis backend under faults: a server killed and restarted, pub/sub connections
killed right before a store, mass timeouts and cancellations, corrupt payloads.

Each test runs its own server, since it kills it or counts every channel on it.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioresults as ar
from aioresults import states
from aioresults.backends.redis import RedisBackend
from tests.servers import RedisServer


def new_id() -> str:
    return str(uuid.uuid4())


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait until ``condition()`` is true (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def connect(server: RedisServer) -> AsyncIterator[Callable[..., RedisBackend]]:
    """Make backends on the test's server; they are closed at teardown."""
    made: list[RedisBackend] = []

    def make(**options: Any) -> RedisBackend:
        made.append(RedisBackend.from_url(server.url, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


@pytest.fixture
def pair(connect: Callable[..., RedisBackend]) -> tuple[RedisBackend, RedisBackend]:
    """A writer and a reader, as a worker and a web app would be."""
    return connect(), connect()


def subscribed(raw: aioredis.Redis, task_ids: list[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        counts = await raw.pubsub_numsub(*(f"celery-task-meta-{i}" for i in task_ids))
        return all(count for _, count in counts)

    return check


def settled(backend: RedisBackend) -> Callable[[], Awaitable[bool]]:
    """Whether the backend's pub/sub session is confirmed and every waiter has its first read."""

    async def check() -> bool:
        stats = backend.wait_stats()
        return stats.sessions >= 1 and stats.unsettled == 0

    return check


async def test_waiters_survive_a_server_restart(
    server: RedisServer, raw: aioredis.Redis, pair: tuple[RedisBackend, RedisBackend]
) -> None:
    writer, reader = pair
    ids = [new_id() for _ in range(1000)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=30)) for i in ids]
    await until(subscribed(raw, ids))
    # The server has the channels; the reader may still be reading its confirmation.
    await until(settled(reader))
    server.kill()
    await asyncio.sleep(0.3)  # the reader notices and retries against a dead port
    assert not any(w.done() for w in waits)
    server.start()  # same port, empty: the stored scripts are gone too
    # Stores race the reconnect: early ones are found by the re-read, later ones pushed.
    for n, task_id in enumerate(ids):
        await writer.mark_as_done(task_id, n)
    assert await asyncio.gather(*waits) == list(range(1000))
    assert reader.wait_stats().sessions >= 2
    assert reader.wait_stats().waiters == 0


async def test_a_waiter_entering_during_an_outage_recovers(
    server: RedisServer, connect: Callable[..., RedisBackend]
) -> None:
    writer, reader = connect(), connect(retries=1)
    await reader.get_meta(new_id())  # connected once
    server.kill()
    task_id = new_id()
    # A read during the outage fails once the client's brief retries are spent...
    with pytest.raises(ar.BackendUnavailable):
        await reader.get_meta(task_id)

    # ...but a registered watch waits for the server to come back.
    async def wait_for_it() -> ar.ResultMeta:
        async with reader.waiter([task_id]) as waiter:
            while True:
                record = await waiter.next()
                assert record is not None
                item = record.meta()  # raises a read error delivered instead
                if item.ready:
                    return item

    waiting = asyncio.create_task(wait_for_it())
    await asyncio.sleep(0.3)
    server.start()
    await writer.mark_as_done(task_id, "after the outage")
    with anyio.fail_after(10):
        assert (await waiting).result == "after the outage"


async def test_a_silent_server_is_detected_by_the_health_check(
    server: RedisServer, raw: aioredis.Redis, connect: Callable[..., RedisBackend]
) -> None:
    writer, reader = connect(), connect(health_check_interval=0.2)
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=15))
    await until(subscribed(raw, [task_id]))
    assert server.process is not None
    # A frozen server keeps its sockets open and answers nothing, like a vanished host.
    server.process.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(1.6)  # one PING interval plus its 1 s reply timeout, and more
    finally:
        server.process.send_signal(signal.SIGCONT)
    await writer.mark_as_done(task_id, "thawed")
    assert await waiting == "thawed"
    assert reader.wait_stats().sessions >= 2  # the silent connection was replaced


async def test_pubsub_killed_right_before_each_store_loses_nothing(
    raw: aioredis.Redis, pair: tuple[RedisBackend, RedisBackend]
) -> None:
    writer, reader = pair
    for n in range(50):
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=5))
        await until(subscribed(raw, [task_id]))
        # The store lands while the reader is disconnected and not yet resubscribed.
        await raw.client_kill_filter(_type="pubsub")
        await writer.mark_as_done(task_id, n)
        assert await waiting == n
    assert reader.wait_stats().sessions >= 51  # every kill was noticed and healed


async def test_timed_out_and_cancelled_waiters_leave_no_subscription(
    raw: aioredis.Redis, pair: tuple[RedisBackend, RedisBackend]
) -> None:
    writer, reader = pair
    ids = [new_id() for _ in range(10_000)]
    timing_out = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=1)) for i in ids[:5000]]
    cancelled = [asyncio.create_task(ar.AsyncResult(i, reader).get()) for i in ids[5000:8000]]
    # Some are cancelled while their subscription is being set up.
    early = [asyncio.create_task(ar.AsyncResult(i, reader).get()) for i in ids[8000:]]
    for n, task in enumerate(early):
        if n % 100 == 0:
            await asyncio.sleep(0)
        task.cancel()
    await until(subscribed(raw, ids[5000:8000]))
    for task in cancelled:
        task.cancel()
    outcomes = await asyncio.gather(*timing_out, *cancelled, *early, return_exceptions=True)
    assert all(isinstance(o, ar.ResultTimeout) for o in outcomes[:5000])
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[5000:])
    assert reader.wait_stats().waiters == 0

    async def no_channels() -> bool:
        return await raw.pubsub_channels("celery-task-meta-*") == []

    await until(no_channels)
    # The connection still serves new waiters.
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=5))
    await until(subscribed(raw, [task_id]))
    await writer.mark_as_done(task_id, "still works")
    assert await waiting == "still works"


async def test_a_corrupt_payload_fails_only_its_own_waiters(
    raw: aioredis.Redis, pair: tuple[RedisBackend, RedisBackend]
) -> None:
    writer, reader = pair
    bad, good = new_id(), [new_id() for _ in range(100)]
    bad_waits = [asyncio.create_task(ar.AsyncResult(bad, reader).get(timeout=5)) for _ in range(3)]
    good_waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=5)) for i in good]
    await until(subscribed(raw, [bad, *good]))
    # A foreign writer stores and publishes garbage, as a broken producer would.
    key = f"celery-task-meta-{bad}"
    await raw.set(key, b'{"status": "SUCCESS", "result": ')
    await raw.publish(key, b'{"status": "SUCCESS", "result": ')
    for n, task_id in enumerate(good):
        await writer.mark_as_done(task_id, n)
    for waiting in bad_waits:
        with pytest.raises(ar.DecodeError):
            await waiting
    assert await asyncio.gather(*good_waits) == list(range(100))
    assert (await reader.get_meta(good[0])).status == states.SUCCESS
    assert reader.wait_stats().waiters == 0


@pytest.fixture
async def black_hole() -> AsyncIterator[str]:
    """The URL of a server that accepts connections and never answers, as a host
    behind a dropping firewall or a hung process looks to a client."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("query", "options", "attempts"),
    [
        ("", {"command_timeout": 1, "retries": 0}, 1),
        # A timeout is not retried however many retries connection errors get.
        ("", {"command_timeout": 1}, 1),
        ("", {"command_timeout": 1, "retries": 1}, 2),
        ("?command_timeout=1&retries=1", {}, 2),
        ("?command_timeout=60", {"command_timeout": 1, "retries": 1}, 2),  # the argument wins
    ],
    ids=["no-retry", "default-retries", "one-retry", "url", "argument-over-url"],
)
async def test_a_black_holed_server_fails_writes_instead_of_blocking(
    black_hole: str, query: str, options: dict[str, Any], attempts: int
) -> None:
    async with RedisBackend(black_hole + query, **options) as backend:
        started = asyncio.get_running_loop().time()
        with anyio.fail_after(10), pytest.raises(ar.BackendUnavailable) as caught:
            await backend.mark_as_done(new_id(), "lost")
        elapsed = asyncio.get_running_loop().time() - started
        assert type(caught.value.__cause__).__module__.startswith("redis")
        # One command timeout per attempt, and the retries' short pauses.
        assert 1 <= elapsed < attempts + 2
        with anyio.fail_after(10), pytest.raises(ar.BackendUnavailable):
            await backend.get_meta(new_id())
