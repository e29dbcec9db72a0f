"""The Redis backend on a three-master Redis Cluster: keys spread over every master,
reads split per slot, sharded pub/sub (SPUBLISH / SSUBSCRIBE on the channel's own
master), chords in one slot, and waiters that follow a moved slot or a restarted master.

The session's cluster (``tests/plugins/redis_cluster.py``) is emptied before each test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

import aioresults as ar
from aioresults import states
from aioresults.backends.redis import RedisBackend
from tests.conftest import BackendFactory
from tests.servers import RedisCluster, RedisServer, free_port


def new_id() -> str:
    return str(uuid.uuid4())


def channel(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def slot_of(task_id: str) -> int:
    return key_slot(channel(task_id).encode())


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait until ``condition()`` is true (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


class Masters:
    """Plain clients, one per master, to look at what the backend did on each."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.clients = [aioredis.Redis(host="127.0.0.1", port=n.port) for n in cluster.nodes]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def owner(self, slot: int) -> int:
        """The index of the master serving ``slot``, as the cluster says now."""
        ports = [n.port for n in self.cluster.nodes]
        for first, last, (_, port, *_) in await self.clients[0].execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return ports.index(port)
        raise AssertionError(f"slot {slot} is not served")

    async def shard_subscribers(self, task_ids: Sequence[str]) -> list[list[int]]:
        """Per master, the SSUBSCRIBE count of each id's channel."""
        counts = []
        for client in self.clients:
            reply = await client.execute_command(
                "PUBSUB", "SHARDNUMSUB", *(channel(i) for i in task_ids)
            )
            counts.append([int(n) for n in reply[1::2]])
        return counts

    async def plain_subscribers(self, task_ids: Sequence[str]) -> int:
        """Classic SUBSCRIBEs to these channels, on every master together."""
        total = 0
        for client in self.clients:
            total += sum(n for _, n in await client.pubsub_numsub(*map(channel, task_ids)))
        return total

    async def shard_channels(self) -> list[bytes]:
        found: list[bytes] = []
        for client in self.clients:
            found += await client.execute_command("PUBSUB", "SHARDCHANNELS")
        return found

    async def calls(self, command: str) -> list[int]:
        """How many times each master has run ``command`` (INFO commandstats)."""
        counts = []
        for client in self.clients:
            stats = await client.info("commandstats")
            counts.append(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)))
        return counts


@pytest.fixture
async def masters(redis_cluster: RedisCluster) -> AsyncIterator[Masters]:
    found = Masters(redis_cluster)
    yield found
    await found.aclose()


@pytest.fixture
async def make(make_redis_cluster_backend: BackendFactory) -> BackendFactory:
    return make_redis_cluster_backend


async def backend_of(make: BackendFactory, **options: Any) -> RedisBackend:
    backend = await make(**options)
    assert isinstance(backend, RedisBackend) and backend.cluster
    return backend


def subscribed_where_they_live(
    masters: Masters, task_ids: Sequence[str], owners: Sequence[int]
) -> Callable[[], Awaitable[bool]]:
    """Every channel SSUBSCRIBEd once on its own master and nowhere else."""

    async def check() -> bool:
        counts = await masters.shard_subscribers(task_ids)
        return all(
            counts[m][n] == (1 if owners[n] == m else 0)
            for m in range(len(counts))
            for n in range(len(task_ids))
        )

    return check


# ------------------------------------------------------------------ keys and reads


async def test_results_land_on_every_master_and_read_back(
    make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    ids = [new_id() for _ in range(300)]
    await asyncio.gather(*(writer.mark_as_done(t, n) for n, t in enumerate(ids)))
    owners = [await masters.owner(slot_of(t)) for t in ids]
    assert set(owners) == {0, 1, 2}
    for task_id, owner in zip(ids, owners, strict=True):
        assert await masters.clients[owner].exists(channel(task_id)) == 1
    assert [await masters.clients[m].dbsize() for m in range(3)] == [
        owners.count(m) for m in range(3)
    ]
    metas = await reader.get_many(ids)
    assert [m.result for m in metas] == list(range(300))
    assert await ar.AsyncResult(ids[-1], reader).get(timeout=5) == 299


async def test_join_reads_one_mget_per_slot_and_waits_on_every_master(
    make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    done = [new_id() for _ in range(2000)]
    await asyncio.gather(*(writer.mark_as_done(t, n) for n, t in enumerate(done)))
    mgets, ssubscribes = await masters.calls("mget"), await masters.calls("ssubscribe")
    finished: ar.ResultSet[int] = ar.ResultSet([ar.AsyncResult(t, reader) for t in done])
    assert await finished.join(timeout=30) == list(range(2000))
    # One batched read, split into one MGET per slot: a cross-slot MGET would be refused.
    per_master = [a - b for a, b in zip(await masters.calls("mget"), mgets, strict=True)]
    owners = [await masters.owner(s) for s in {slot_of(t) for t in done}]
    assert per_master == [owners.count(m) for m in range(3)]
    assert await masters.calls("ssubscribe") == ssubscribes  # nothing left to wait for

    pending = [new_id() for _ in range(300)]
    joining = asyncio.create_task(
        ar.ResultSet([ar.AsyncResult(t, reader) for t in pending]).join(timeout=30)
    )
    await until(lambda: all_subscribed(masters, pending))
    await asyncio.gather(*(writer.mark_as_done(t, -n) for n, t in enumerate(pending)))
    assert await joining == [-n for n in range(300)]


async def all_subscribed(masters: Masters, task_ids: Sequence[str]) -> bool:
    counts = await masters.shard_subscribers(task_ids)
    return all(sum(column) == 1 for column in zip(*counts, strict=True))


async def test_success_guard_for_payloads_lua_cannot_read(
    make: BackendFactory, masters: Masters
) -> None:
    # Over a compressed record the guard is WATCH/MULTI (SET + SPUBLISH) on the key's master.
    writer, reader = await backend_of(make, compression="zlib"), await backend_of(make)
    ids = [new_id() for _ in range(30)]
    assert {await masters.owner(slot_of(t)) for t in ids} == {0, 1, 2}
    waits = [asyncio.create_task(ar.AsyncResult(t, reader).get(timeout=10)) for t in ids]
    await until(lambda: all_subscribed(masters, ids))
    for n, task_id in enumerate(ids):
        await writer.update_state(task_id, states.PROGRESS, n)
        outcomes = await asyncio.gather(*(writer.mark_as_done(task_id, n) for _ in range(5)))
        assert outcomes.count(True) == 1
        assert not await writer.mark_as_failure(task_id, ValueError("late"))
    assert await asyncio.gather(*waits) == list(range(30))
    assert [m.status for m in await reader.get_many(ids)] == [states.SUCCESS] * 30


# ------------------------------------------------------------------ sharded pub/sub


async def test_waiters_are_woken_through_sharded_pubsub(
    make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    ids = [new_id() for _ in range(60)]
    owners = [await masters.owner(slot_of(t)) for t in ids]
    assert set(owners) == {0, 1, 2}
    publishes, spublishes = await masters.calls("publish"), await masters.calls("spublish")
    waits = [asyncio.create_task(ar.AsyncResult(t, reader).get(timeout=10)) for t in ids]
    await until(subscribed_where_they_live(masters, ids, owners))
    # Sharded, not classic pub/sub; one pub/sub connection per master.
    assert await masters.plain_subscribers(ids) == 0
    for client in masters.clients:
        assert len(await client.client_list(_type="pubsub")) == 1
    for n, task_id in enumerate(ids):
        await writer.mark_as_done(task_id, n)
    assert await asyncio.gather(*waits) == list(range(60))
    assert await masters.calls("publish") == publishes
    spublished = [a - b for a, b in zip(await masters.calls("spublish"), spublishes, strict=True)]
    assert spublished == [owners.count(m) for m in range(3)]  # each on its key's master
    assert reader.wait_stats().waiters == 0
    await until(lambda: no_shard_channels(masters))


async def no_shard_channels(masters: Masters) -> bool:
    return await masters.shard_channels() == []


async def test_cancelling_1000_waiters_leaves_no_shard_subscription(
    make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    ids = [new_id() for _ in range(1000)]
    waits = [asyncio.create_task(ar.AsyncResult(t, reader).get()) for t in ids]
    await until(lambda: all_subscribed(masters, ids))
    assert len(await masters.shard_channels()) == 1000
    for task in waits:
        task.cancel()
    outcomes = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    stats = reader.wait_stats()
    assert stats.waiters == 0 and stats.watched_ids == ()
    await until(lambda: no_shard_channels(masters))
    # The connections still serve new waiters.
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=5))
    await until(lambda: all_subscribed(masters, [task_id]))
    await writer.mark_as_done(task_id, "still works")
    assert await waiting == "still works"


async def test_a_waiter_follows_its_slot_to_another_master(
    redis_cluster: RedisCluster, make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    task_id = new_id()
    slot = slot_of(task_id)
    source = await masters.owner(slot)
    target = (source + 1) % 3
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=10))
    await until(subscribed_where_they_live(masters, [task_id], [source]))
    # Stored without a message, as if published while the channel was moving: only
    # the re-read after the waiter's SSUBSCRIBE on the new master can find it.
    record = writer.encode_meta(ar.ResultMeta(task_id, states.SUCCESS, result="moved"))
    await masters.clients[source].set(channel(task_id), record)
    nodes = redis_cluster.nodes
    redis_cluster.move_slot(slot, nodes[source], nodes[target], keys=(channel(task_id),))
    try:
        assert await waiting == "moved"
        # A waiter on a backend that never saw the slot move back: its SSUBSCRIBE
        # to the old master is answered with MOVED, and it subscribes on the new one.
        late = await backend_of(make)
        await late.get_meta(new_id())  # reads the slot map now
        await give_back(redis_cluster, masters, slot, source)
        other = next(i for i in iter(new_id, None) if slot_of(i) == slot)
        # A waiter subscribes before it reads, so no read has corrected the map yet.
        async with late.waiter([other]) as waiter:
            assert (await waiter.next()).meta() == ar.ResultMeta.pending(other)
            await until(subscribed_where_they_live(masters, [other], [source]))
            await writer.mark_as_done(other, "found")
            item = (await waiter.next()).meta()
        assert item.result == "found"
    finally:
        await give_back(redis_cluster, masters, slot, source)


async def give_back(cluster: RedisCluster, masters: Masters, slot: int, owner: int) -> None:
    """Empty ``slot`` and return it to master ``owner`` if it is elsewhere."""
    now = await masters.owner(slot)
    if now != owner:
        keys = await masters.clients[now].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        if keys:
            await masters.clients[now].delete(*keys)
        cluster.move_slot(slot, cluster.nodes[now], cluster.nodes[owner])


async def test_waiters_survive_a_master_restart(
    redis_cluster: RedisCluster, make: BackendFactory, masters: Masters
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    ids = [new_id() for _ in range(90)]
    owners = [await masters.owner(slot_of(t)) for t in ids]
    waits = [asyncio.create_task(ar.AsyncResult(t, reader).get(timeout=20)) for t in ids]
    await until(subscribed_where_they_live(masters, ids, owners))

    async def settled() -> bool:
        # Every master's confirmation read by the reader, every first read done.
        stats = reader.wait_stats()
        sessions = stats.sessions_by_node
        return len(sessions) == 3 and all(sessions.values()) and stats.unsettled == 0

    await until(settled)
    victim: RedisServer = redis_cluster.nodes[0]
    victim.restart()  # same port, same nodes.conf, no data: its subscriptions are gone
    redis_cluster.wait_ok()
    for n, task_id in enumerate(ids):
        await writer.mark_as_done(task_id, n)
    assert await asyncio.gather(*waits) == list(range(90))
    sessions = reader.wait_stats().sessions_by_node
    assert sessions[f"127.0.0.1:{victim.port}"] >= 2
    assert all(n == 1 for name, n in sessions.items() if str(victim.port) not in name)


# ------------------------------------------------------------------ chords


async def test_chord_keys_share_one_slot_and_complete_once(
    make: BackendFactory, masters: Masters
) -> None:
    backends = [await backend_of(make) for _ in range(3)]
    group_id = new_id()
    ids = [new_id() for _ in range(50)]
    await backends[0].set_chord_size(group_id, 50)
    deliveries = [(i, t) for i, t in enumerate(ids)] * 2  # every part twice

    async def deliver(n: int, index: int, task_id: str) -> ar.ChordProgress:
        await backends[n % 3].mark_as_done(task_id, index)
        return await backends[(n + 1) % 3].chord_part_return(
            group_id, task_id, states.SUCCESS, index, index=index
        )

    outcomes = await asyncio.gather(*(deliver(n, i, t) for n, (i, t) in enumerate(deliveries)))
    # Each part is delivered twice: both deliveries of the part that completed the
    # chord report it complete (the redelivery with counted=False); no other part does.
    complete = [o for o in outcomes if o.complete]
    assert len({o.task_id for o in complete}) == 1
    assert len(complete) == 2 and sum(o.counted for o in complete) == 1
    assert all(o.count == o.size == 50 for o in complete)
    assert all(o.results == list(range(50)) for o in complete)
    assert sorted(o.count for o in outcomes if o.counted) == list(range(1, 51))
    others = [o for o in outcomes if o.task_id != complete[0].task_id]
    assert all(not o.complete and o.count is not None and o.count < 50 for o in others)
    keys = [k for c in masters.clients for k in await c.keys(f"*{group_id}*")]
    assert len(keys) == 4
    assert {key_slot(k) for k in keys} == {key_slot(group_id.encode())}
    # The parts' own results are spread as usual.
    assert len({await masters.owner(slot_of(t)) for t in ids}) == 3


# ------------------------------------------------------------------ URLs and clients


def test_cluster_urls_and_options() -> None:
    backend = RedisBackend.from_url("redis://u:pw@h:7000/0?cluster=true&socket_timeout=2")
    assert backend.cluster and backend._settings["host"] == "h"
    assert backend._settings["port"] == 7000 and "db" not in backend._settings
    secure = ar.connect("rediss://h:7000?cluster=true&ssl_cert_reqs=none")
    assert isinstance(secure, RedisBackend) and secure.cluster
    assert secure._settings["ssl"] is True and "connection_class" not in secure._settings
    assert RedisBackend.from_url("redis://h:7000", cluster=True).cluster
    assert not RedisBackend.from_url("redis://h:7000?cluster=true", cluster=False).cluster
    assert not RedisBackend.from_url("redis://h:7000?cluster=false").cluster
    assert "pw" not in repr(backend)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:7000/1?cluster=true",
        "redis+socket:///run/redis.sock?cluster=true",
        "sentinel://s1:26379?master_name=m&cluster=true",
        "redis://h:7000?cluster=maybe",
    ],
)
def test_bad_cluster_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ar.ConfigurationError):
        ar.connect(url)


def test_cluster_needs_a_cluster_client() -> None:
    with pytest.raises(ar.ConfigurationError, match="RedisCluster"):
        RedisBackend(client=aioredis.Redis(), cluster=True)


async def test_an_injected_cluster_client(redis_cluster: RedisCluster) -> None:
    client = ClusterClient.from_url(redis_cluster.url)
    try:
        async with RedisBackend(client=client) as backend:
            assert backend.cluster
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=5))
            await until(lambda: has_waiter(backend, task_id))
            await backend.mark_as_done(task_id, "injected")
            assert await waiting == "injected"
        assert await client.get(channel(task_id)) is not None  # not closed: the caller owns it
    finally:
        await client.aclose()


async def has_waiter(backend: RedisBackend, task_id: str) -> bool:
    stats = backend.wait_stats()
    return any(stats.sessions_by_node.values()) and task_id in stats.watched_ids


async def test_an_unreachable_cluster_is_backend_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?cluster=true"
    backend = RedisBackend.from_url(url, retries=1)
    try:
        with pytest.raises(ar.BackendUnavailable) as caught:
            await backend.get_meta(new_id())
        assert type(caught.value.__cause__).__module__.startswith("redis")
        with pytest.raises(ar.BackendUnavailable):
            await backend.mark_as_done(new_id(), 1)
    finally:
        await backend.aclose()
