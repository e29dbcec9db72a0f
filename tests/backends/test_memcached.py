"""What is specific to the memcached backend: pymemcache's key placement, URLs,
memcached's limits, the batched poller and the ``watch mutations`` hint, a
server restarted mid-wait, and chords under faults (the key layout of
``aioresults/backends/memcached/_chords.py`` is planted with the native client
to stand for workers that died at each step).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.client.murmur3 import murmur3_32 as pymemcache_murmur3

import aioresults as ar
from aioresults import states
from aioresults.backends.memcached import MemcachedBackend, parse_location
from aioresults.backends.memcached._routing import hash_input, murmur3_32
from tests.services import MemcachedCluster, MemcachedServer


def new_id() -> str:
    return str(uuid.uuid4())


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Wait until ``condition()`` holds (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def celery_json(task_id: str, value: Any, status: str = "SUCCESS") -> bytes:
    """A record as Celery's cache backend writes it."""
    record = {
        "status": status,
        "result": value,
        "traceback": None,
        "children": [],
        "date_done": "2026-12-04T10:00:00.000000+00:00",
        "task_id": task_id,
    }
    return json.dumps(record).encode()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., MemcachedBackend]]:
    """Make backends; they are closed at teardown."""
    made: list[MemcachedBackend] = []

    def make(location: str, **options: Any) -> MemcachedBackend:
        made.append(MemcachedBackend(location, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()


@pytest.fixture
def own_server() -> Iterator[MemcachedServer]:
    """A server of the test's own, to kill and restart."""
    with MemcachedServer() as server:
        yield server


@pytest.fixture
def hash_client(memcached_cluster: MemcachedCluster) -> Iterator[HashClient]:
    """Celery's client for several servers, as Celery builds it."""
    servers = [("127.0.0.1", node.port) for node in memcached_cluster]
    client = HashClient(servers, default_noreply=False, allow_unicode_keys=True, timeout=5)
    yield client
    client.close()


# ------------------------------------------------------------------ key placement


async def test_keys_land_on_the_node_pymemcache_picks(
    memcached_cluster: MemcachedCluster,
    connect: Callable[..., MemcachedBackend],
    hash_client: HashClient,
) -> None:
    backend = connect("cache+" + memcached_cluster.url)
    client = hash_client
    ids = [new_id() for _ in range(295)] + ["ünïcode-ид", "a.b", "x", "日本語", "=/+"]
    keys = [backend.task_key(i) for i in ids]
    # 300 keys, placed by pymemcache's own RendezvousHash and by the backend.
    assert [backend.server_for(k) for k in keys] == [client.hasher.get_node(k) for k in keys]
    assert len({backend.server_for(k) for k in keys}) == 3
    # Written by pymemcache, each is found by the backend (on the node it asks).
    half = len(ids) // 2
    planted = {keys[n]: celery_json(ids[n], n) for n in range(half)}
    await asyncio.to_thread(client.set_many, planted)
    metas = await backend.get_many(ids[:half])
    assert [m.result for m in metas] == list(range(half))
    # Written by the backend, each is on exactly the node pymemcache reads.
    for n, task_id in enumerate(ids[half:], half):
        await backend.mark_as_done(task_id, -n)
    by_node = {node.address: node for node in memcached_cluster}
    for task_id in ids[half:]:
        key = backend.task_key(task_id)
        for address, node in by_node.items():
            held = node.command(f"get {key}").startswith(b"VALUE ")
            assert held == (address == backend.server_for(key)), (key, address)
    found = await asyncio.to_thread(client.get_many, keys[half:])
    assert [json.loads(found[k])["result"] for k in keys[half:]] == [-n for n in range(half, 300)]


def test_murmur3_is_pymemcaches() -> None:
    rng = random.Random(7)
    texts = ["", "a", "ab", "abc", "abcd", "abcde", "ünïcode-ид", "日本語キー", "x" * 257]
    texts += [
        "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(60)))
        for _ in range(200)
    ]
    for text in texts:
        assert murmur3_32(hash_input(text)) == pymemcache_murmur3(text), text


def test_urls() -> None:
    servers, options = parse_location("cache+memcached://10.0.0.1:11211;10.0.0.2:11212/")
    assert servers == [
        ("10.0.0.1:11211", ("10.0.0.1", 11211)),
        ("10.0.0.2:11212", ("10.0.0.2", 11212)),
    ]
    assert options == {}
    servers, options = parse_location("memcached://cache/?watch=notify&timeout=2&expires=60")
    assert servers == [("cache:11211", ("cache", 11211))]
    assert options == {"watch": "notify", "timeout": 2.0, "expires": 60.0}
    assert parse_location("[::1]:11300,unix:/run/mc.sock")[0] == [
        ("::1:11300", ("::1", 11300)),
        ("/run/mc.sock", "/run/mc.sock"),
    ]
    backend = ar.connect("memcached://h1:1;h2:2/?watch=notify&global_keyprefix=app&expires=60")
    assert isinstance(backend, MemcachedBackend)
    assert backend.servers == ["h1:1", "h2:2"] and backend.watch == "notify"
    assert backend.global_keyprefix == "app_" and backend.expires == 60
    assert MemcachedBackend("h1:1", watch="poll", url="memcached://h1:1/?watch=notify").watch == (
        "poll"
    )
    for bad in ("memcached:///", "memcached://h:port/", "memcached://h:1/?nope=1"):
        with pytest.raises(ar.ConfigurationError):
            ar.connect(bad)
    with pytest.raises(ar.ConfigurationError, match="watch"):
        MemcachedBackend("h:1", watch="push")


@pytest.mark.parametrize("option", ["expires", "chord_expires"])
def test_relative_expiry_over_30_days_is_refused(option: str) -> None:
    with pytest.raises(ar.ConfigurationError, match="30-day"):
        MemcachedBackend("127.0.0.1:1", **{option: 30 * 86400 + 1})
    assert MemcachedBackend("127.0.0.1:1", **{option: 30 * 86400}).expires is not None


# ------------------------------------------------------------------ memcached's limits


async def test_values_over_the_item_limit_are_refused_before_writing(
    memcached_server: MemcachedServer, connect: Callable[..., MemcachedBackend]
) -> None:
    backend = connect(memcached_server.url)
    task_id = new_id()
    await backend.mark_as_started(task_id)
    with pytest.raises(ar.ResultTooLarge, match="item_size_max"):
        await backend.mark_as_done(task_id, "x" * (1024 * 1024))
    assert (await backend.get_meta(task_id)).status == states.STARTED
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    with pytest.raises(ar.ResultTooLarge):
        await backend.chord_part_return(group_id, new_id(), states.SUCCESS, "x" * (1024 * 1024))
    # Told a larger limit than the server's, the server's refusal is the same error.
    unaware = connect(memcached_server.url, item_size_max=8 * 1024 * 1024)
    with pytest.raises(ar.ResultTooLarge, match="too large"):
        await unaware.mark_as_done(task_id, "x" * (2 * 1024 * 1024))
    assert (await unaware.get_meta(task_id)).status == states.STARTED


async def test_ids_that_cannot_be_keys_are_refused(
    memcached_server: MemcachedServer, connect: Callable[..., MemcachedBackend]
) -> None:
    backend = connect(memcached_server.url)
    with pytest.raises(ar.InvalidTaskId, match="space"):
        await backend.mark_as_done("a b", 1)
    with pytest.raises(ar.InvalidTaskId, match="250"):
        await backend.get_meta("x" * 234)  # celery-task-meta- + 234 = 251 bytes
    longest = "y" * 233
    await backend.mark_as_done(longest, "fits")
    assert await ar.AsyncResult(longest, backend).get(timeout=5) == "fits"
    with pytest.raises(ar.InvalidTaskId, match="250"):
        await backend.set_chord_size("g" * 200, 2)
    prefixed = connect(memcached_server.url, global_keyprefix="app")
    with pytest.raises(ar.InvalidTaskId):
        await prefixed.mark_as_done(longest, 1)


# ------------------------------------------------------------------ waits


async def test_the_poller_finds_what_another_client_writes(
    memcached_cluster: MemcachedCluster,
    connect: Callable[..., MemcachedBackend],
    hash_client: HashClient,
) -> None:
    reader = connect("cache+" + memcached_cluster.url)
    ids = [new_id() for _ in range(60)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=20)) for i in ids]
    await until(lambda: reader.wait_stats().waiters == 60 and not reader.wait_stats().unsettled)
    assert reader.wait_stats().mode == "poll"
    # pymemcache writes them: nothing in this process can tell the reader.
    planted = {f"celery-task-meta-{i}": celery_json(i, i) for i in ids}
    await asyncio.to_thread(hash_client.set_many, planted)
    assert await asyncio.gather(*waits) == ids


async def test_idle_waiters_cost_one_get_per_server_per_poll(
    memcached_cluster: MemcachedCluster, connect: Callable[..., MemcachedBackend]
) -> None:
    reader = connect("cache+" + memcached_cluster.url, poll_interval=0.05, max_poll_interval=0.2)
    waits = [asyncio.create_task(ar.AsyncResult(new_id(), reader).get()) for _ in range(300)]
    await until(lambda: reader.wait_stats().waiters == 300 and not reader.wait_stats().unsettled)
    await asyncio.sleep(0.5)  # backed off to max_poll_interval
    requests, polls = reader.stats["requests"], reader.wait_stats().polls
    await asyncio.sleep(1.0)
    polls = reader.wait_stats().polls - polls
    # One multi-key get per server per poll, at most one poll per 0.2 s (and some slack).
    assert 1 <= polls <= 7
    assert abs(reader.stats["requests"] - requests - 3 * polls) <= 3
    for task in waits:
        task.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


async def test_the_mutation_watch_wakes_a_waiter_between_polls(
    memcached_server: MemcachedServer, connect: Callable[..., MemcachedBackend]
) -> None:
    reader = connect(memcached_server.url, watch="notify", poll_interval=30, max_poll_interval=30)
    task_id = "ünï code.ид"[:3] + new_id()  # the log URI-encodes keys
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=20))
    await until(lambda: reader.wait_stats().sessions == 1 and not reader.wait_stats().unsettled)
    assert reader.wait_stats().mode == "signal+poll"
    key = f"celery-task-meta-{task_id}".encode()
    value = celery_json(task_id, "hinted")
    reply = await asyncio.to_thread(
        memcached_server.command,
        (b"set %s 0 0 %d\r\n%s" % (key, len(value), value)).decode(),
    )
    assert reply == b"STORED\r\n"
    started = time.monotonic()
    assert await waiting == "hinted"
    assert time.monotonic() - started < 10  # the poller sleeps 30 s: the watch woke it


@pytest.mark.parametrize("watch", ["poll", "notify"])
async def test_waiters_complete_after_a_server_restart(
    own_server: MemcachedServer, connect: Callable[..., MemcachedBackend], watch: str
) -> None:
    writer = connect(own_server.url)
    reader = connect(own_server.url, watch=watch, poll_interval=0.02, max_poll_interval=0.2)
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=30))
    await until(
        lambda: task_id in reader.wait_stats().watched_ids and not reader.wait_stats().unsettled
    )
    await writer.mark_as_started(task_id)
    own_server.kill()
    await asyncio.sleep(0.3)  # polls (and the watch) fail meanwhile
    with pytest.raises(ar.BackendUnavailable):
        await writer.get_meta(task_id)
    await asyncio.to_thread(own_server.start)  # empty: memcached keeps nothing
    await writer.mark_as_done(task_id, "after the restart")
    assert await waiting == "after the restart"
    if watch == "notify":
        await until(lambda: reader.wait_stats().sessions >= 2)


# ------------------------------------------------------------------ chords


def part_json(task_id: str) -> bytes:
    """A chord part's payload as the backend stores it (the part's id as its value)."""
    record = {"task_id": task_id, "index": None, "state": "SUCCESS", "result": task_id, "seq": 1}
    return json.dumps(record).encode()


class ChordKeys:
    """The keys of one chord run (see the chords module's docstring)."""

    def __init__(self, client: Client, group_id: str) -> None:
        self.client = client
        self.base = f"chord-unlock-{group_id}"
        size, epoch = client.get(self.base + ".s").split()
        self.epoch = epoch.decode()

    def part(self, part_id: str) -> str:
        return f"{self.base}.{self.epoch}.p{hashlib.sha256(part_id.encode()).hexdigest()[:32]}"

    def claim(self, part_id: str, count: int = 0, age: float = 3600) -> None:
        """What a worker wrote for ``part_id`` with ``add``, ``age`` seconds ago."""
        head = f"{count} dead{uuid.uuid4().hex[:8]} {int(time.time() - age)}\n".encode()
        assert self.client.add(self.part(part_id), head + part_json(part_id), noreply=False)

    def slot(self, count: int, part_id: str) -> None:
        digest = hashlib.sha256(part_id.encode()).hexdigest()[:32]
        value = f"{digest} dead0000".encode()
        assert self.client.add(f"{self.base}.{self.epoch}.{count}", value, noreply=False)


@pytest.fixture
def memcache(memcached_server: MemcachedServer) -> Iterator[Client]:
    client = Client(("127.0.0.1", memcached_server.port), default_noreply=False)
    yield client
    client.close()


async def test_the_chord_counter_is_celerys(
    memcached_server: MemcachedServer, connect: Callable[..., MemcachedBackend], memcache: Client
) -> None:
    backend = connect(memcached_server.url)
    group_id = new_id()
    await backend.set_chord_size(group_id, 3)
    assert memcache.get(f"chord-unlock-{group_id}") == b"0"  # as _apply_chord_incr sets it
    for part in ("a", "b"):
        await backend.chord_part_return(group_id, part, states.SUCCESS, part)
    await backend.chord_part_return(group_id, "a", states.SUCCESS, "a")  # counted once
    assert memcache.get(f"chord-unlock-{group_id}") == b"2"
    assert memcache.incr(f"chord-unlock-{group_id}", 0) == 2


@pytest.mark.parametrize("died", ["after its claim", "after its incr", "after its slot"])
async def test_a_part_whose_worker_died_mid_count_is_counted_once(
    memcached_server: MemcachedServer,
    connect: Callable[..., MemcachedBackend],
    memcache: Client,
    died: str,
) -> None:
    backend = connect(memcached_server.url, chord_claim_timeout=0.5)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    chord = ChordKeys(memcache, group_id)
    chord.claim("a")
    if died != "after its claim":
        assert memcache.incr(chord.base, 1) == 1
    if died == "after its slot":
        chord.slot(1, "a")
    redelivered = await backend.chord_part_return(group_id, "a", states.SUCCESS, "a")
    assert (redelivered.count, redelivered.complete) == (1, False)
    # The slot proves the dead worker counted it; else the redelivery counts it.
    assert redelivered.counted is (died != "after its slot")
    last = await backend.chord_part_return(group_id, "b", states.SUCCESS, "b")
    assert (last.count, last.counted, last.complete) == (2, True, True)
    assert last.results == ["a", "b"]
    assert memcache.get(chord.base) == b"2"  # one incr per part
    again = await backend.chord_part_return(group_id, "a", states.SUCCESS, "a")
    assert (again.count, again.counted, again.complete) == (1, False, False)


async def test_a_part_claimed_by_a_live_worker_is_awaited_not_counted_again(
    memcached_server: MemcachedServer, connect: Callable[..., MemcachedBackend], memcache: Client
) -> None:
    backend = connect(memcached_server.url, chord_claim_timeout=30)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    chord = ChordKeys(memcache, group_id)
    chord.claim("a", age=0)  # a worker is counting "a" right now
    duplicate = asyncio.create_task(backend.chord_part_return(group_id, "a", states.SUCCESS, "a"))
    await asyncio.sleep(0.3)
    assert not duplicate.done()
    # The worker finishes: incr, slot, count.
    assert memcache.incr(chord.base, 1) == 1
    chord.slot(1, "a")
    head, _, payload = memcache.get(chord.part("a")).partition(b"\n")
    memcache.set(chord.part("a"), b"1" + head[1:] + b"\n" + payload)
    progress = await duplicate
    assert (progress.count, progress.counted, progress.complete) == (1, False, False)
    last = await backend.chord_part_return(group_id, "b", states.SUCCESS, "b")
    assert last.complete and last.results == ["a", "b"]


# ------------------------------------------------------------------ the chord fault matrix

WORKER = """
import asyncio, os, signal, sys
import aioresults as ar

async def main() -> None:
    backend = ar.connect(sys.argv[1])
    progress = await backend.chord_part_return(sys.argv[2], sys.argv[3], "SUCCESS", sys.argv[3])
    print(progress.count, progress.counted, progress.complete, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the count, before the body ran

asyncio.run(main())
"""


async def killed_worker(url: str, group_id: str, part: str) -> str:
    """Count ``part`` in another process that is killed right after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, url, group_id, part, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == -signal.SIGKILL
    return out.decode().strip()


async def test_chord_fault_matrix(
    memcached_cluster: MemcachedCluster, connect: Callable[..., MemcachedBackend]
) -> None:
    url = "cache+" + memcached_cluster.url
    one, two, three = (connect(url) for _ in range(3))
    group_id = new_id()
    parts = [f"part-{n}" for n in range(6)]
    await one.set_chord_size(group_id, len(parts))
    for part in parts[:4]:
        await one.chord_part_return(group_id, part, states.SUCCESS, part)
    # The worker of part 5 is killed right after its count: its redelivery counts nothing.
    assert await killed_worker(url, group_id, parts[4]) == "5 True False"
    late = await two.chord_part_return(group_id, parts[4], states.SUCCESS, parts[4])
    assert (late.count, late.counted, late.complete) == (5, False, False)
    # The completing call's reply is lost: it is redelivered with a new receipt.
    done = await three.chord_part_return(group_id, parts[5], states.SUCCESS, parts[5])
    assert (done.count, done.counted, done.complete) == (6, True, True)
    for backend in (one, two, three):
        again = await backend.chord_part_return(group_id, parts[5], states.SUCCESS, parts[5])
        assert (again.count, again.counted, again.complete) == (6, False, True)
        assert again.results == parts
    # The completing part killed after its count: its redelivery completes the chord.
    other = new_id()
    await one.set_chord_size(other, 2)
    await one.chord_part_return(other, "x", states.SUCCESS, "x")
    assert await killed_worker(url, other, "y") == "2 True True"
    redelivered = await two.chord_part_return(other, "y", states.SUCCESS, "y")
    assert (redelivered.counted, redelivered.complete, redelivered.results) == (
        False,
        True,
        ["x", "y"],
    )


async def test_three_clients_delivering_duplicates(
    memcached_cluster: MemcachedCluster, connect: Callable[..., MemcachedBackend]
) -> None:
    url = "cache+" + memcached_cluster.url
    clients = [connect(url) for _ in range(3)]
    group_id = new_id()
    size = 40
    await clients[0].set_chord_size(group_id, size)
    deliveries = [(n, f"p{n}", clients[(n + k) % 3]) for k in range(3) for n in range(size)]

    async def deliver(index: int, part: str, backend: MemcachedBackend) -> ar.ChordProgress:
        return await backend.chord_part_return(group_id, part, states.SUCCESS, index, index=index)

    outcomes = await asyncio.gather(*(deliver(*d) for d in deliveries))
    assert sum(o.counted for o in outcomes) == size
    assert all(o.count is not None and o.count <= size for o in outcomes)
    completing = [o for o in outcomes if o.complete]
    assert len({o.task_id for o in completing}) == 1  # only the completing part completes
    assert sum(o.counted for o in completing) == 1
    assert all(o.results == list(range(size)) for o in completing)
    counts = {o.task_id: o.count for o in outcomes if o.counted}
    assert sorted(counts.values()) == list(range(1, size + 1))


async def test_a_frozen_server_is_unavailable_not_a_hang(
    own_server: MemcachedServer, connect: Callable[..., MemcachedBackend]
) -> None:
    # The server stops answering (SIGSTOP): the kernel still takes connections.
    backend = connect(own_server.url, timeout=0.5, connect_timeout=0.5)
    assert await backend.mark_as_done(new_id(), "before")
    own_server.freeze()
    try:
        with anyio.fail_after(60):  # a hang fails here
            with pytest.raises(ar.BackendUnavailable):
                await backend.mark_as_done(new_id(), "while frozen")
            with pytest.raises(ar.BackendUnavailable):
                await backend.get_meta(new_id())
    finally:
        own_server.thaw()
    task_id = new_id()
    assert await backend.mark_as_done(task_id, "after")
    assert (await backend.get_meta(task_id)).result == "after"
