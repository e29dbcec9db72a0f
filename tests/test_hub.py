"""The waiter hub on its own, against a fake store it reads and a fake feed.

These are unit tests of the routing, the memo, the feed loop and the poller;
every backend's behaviour on its real store is in ``tests/backends``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import pytest

from aioresults import BackendClosed, DecodeError, ResultMeta
from aioresults.backends._feeds import Feed, FeedGone
from aioresults.backends._hub import WaiterHub


class FakeStore:
    """What a backend gives its hub: raw reads (JSON bytes) and decoding."""

    def __init__(self, poll_interval: float = 0.01) -> None:
        self.data: dict[str, bytes] = {}
        self.reads: list[list[str]] = []
        self.decodes = 0
        self.fail_reads = 0
        self.read_delay = 0.0
        self.poll_interval = poll_interval
        self.max_poll_interval = poll_interval * 4
        self.tasks: set[asyncio.Task[Any]] = set()
        self.unwatched: list[str] = []

    def put(self, task_id: str, status: str, result: Any = None) -> bytes:
        payload = json.dumps({"status": status, "result": result, "task_id": task_id}).encode()
        self.data[task_id] = payload
        return payload

    async def _read_raw(self, task_ids: Sequence[str]) -> list[Any]:
        self.reads.append(list(task_ids))
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("store down")
        return [self.data.get(t) for t in task_ids]

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        self.decodes += 1
        try:
            return ResultMeta.from_dict(json.loads(raw), task_id)
        except ValueError as exc:
            raise DecodeError(f"corrupt: {exc}") from exc

    def _unwatched(self, task_ids: Sequence[str]) -> None:
        self.unwatched.extend(task_ids)

    def _start_task(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(func(*args), name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FakePush(Feed):
    """A push feed whose sessions the test controls."""

    kind = "push"

    def __init__(self) -> None:
        self.watches: list[list[str]] = []
        self.unwatches: list[str] = []
        self.fail_next: Exception | None = None
        self.drop = asyncio.Event()
        self.started = 0

    async def watch(self, task_ids: Sequence[str]) -> None:
        await super().watch(task_ids)
        self.watches.append(list(task_ids))

    def unwatch(self, task_ids: Sequence[str]) -> None:
        self.unwatches.extend(task_ids)

    async def session(self) -> None:
        self.started += 1
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.drop = asyncio.Event()
        self.resynced()
        await self.drop.wait()
        raise ConnectionError("dropped")


@pytest.fixture
async def store() -> Any:
    store = FakeStore()
    yield store
    await store.aclose()


async def next_meta(waiter: Any, timeout: float = 2.0) -> ResultMeta:
    record = await waiter.next(anyio.current_time() + timeout)
    assert record is not None, "nothing arrived"
    meta: ResultMeta = record.meta()
    return meta


async def test_one_read_for_waiters_of_one_tick_and_one_watch(store: FakeStore) -> None:
    feed = FakePush()
    hub = WaiterHub(store, feed, "hub")
    waiters = [hub.waiter([f"t{i % 10}"]) for i in range(100)]
    for w in waiters:
        await w.__aenter__()
    metas = [await next_meta(w) for w in waiters]
    assert {m.status for m in metas} == {"PENDING"}
    assert len(store.reads) == 1 and sorted(store.reads[0]) == [f"t{i}" for i in range(10)]
    assert len(feed.watches) == 1 and len(feed.watches[0]) == 10  # one watch per id
    assert len(hub) == 100 and hub.unsettled == 0
    for w in waiters:
        w.close()
    assert len(hub) == 0 and sorted(feed.unwatches) == [f"t{i}" for i in range(10)]
    assert not hub._last and not hub._versions and not hub.watched


async def test_push_is_decoded_once_for_all_its_waiters(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    waiters = [hub.waiter(["t"], ready_only=True) for _ in range(50)]
    for w in waiters:
        await w.__aenter__()
    await asyncio.sleep(0.05)
    assert not any(w.pending() for w in waiters)  # PENDING is not delivered to ready_only
    hub.deliver("t", store.put("t", "SUCCESS", 7))
    records = [w.take() for w in waiters]
    assert all(r is records[0] for r in records)  # one shared record
    assert store.decodes == 0  # nobody looked yet
    assert {r.meta().result for r in records if r is not None} == {7}
    assert store.decodes == 1


async def test_same_payload_twice_is_no_change(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["t"]) as w:
        assert (await next_meta(w)).status == "PENDING"
        payload = store.put("t", "STARTED")
        hub.deliver("t", payload)
        hub.deliver("t", payload)
        assert await hub.refresh() == 0
        assert (await next_meta(w)).status == "STARTED"
        assert not w.pending()
        hub.deliver("t", store.put("t", "SUCCESS", 1))
        assert (await next_meta(w)).result == 1


async def test_a_corrupt_record_fails_only_its_own_waiters(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["bad"], ready_only=True) as bad, hub.waiter(["good"]) as good:
        assert (await next_meta(good)).status == "PENDING"
        hub.deliver("bad", b'{"status": "SUCC')
        hub.deliver("good", store.put("good", "SUCCESS", 1))
        with pytest.raises(DecodeError):
            await next_meta(bad)
        assert (await next_meta(good)).result == 1


async def test_a_read_error_reaches_the_waiters_of_that_batch(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    store.fail_reads = 1
    async with hub.waiter(["t"]) as w:
        with pytest.raises(ConnectionError):
            await next_meta(w)
    async with hub.waiter(["t"]) as w:  # the next batch reads again
        assert (await next_meta(w)).status == "PENDING"


async def test_a_slow_read_never_overwrites_a_newer_push(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    store.read_delay = 0.1
    async with hub.waiter(["t"]) as w:
        await asyncio.sleep(0.02)  # the first read is under way (and will find nothing)
        hub.deliver("t", store.put("t", "SUCCESS", "pushed"))
        assert (await next_meta(w)).result == "pushed"
        await asyncio.sleep(0.15)
        assert not w.pending()  # the stale read's PENDING was dropped


class FakeSignal(Feed):
    """A signal feed: the test says which ids may have changed."""

    kind = "signal"

    async def session(self) -> None:
        self.resynced()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover


class SnapshotStore(FakeStore):
    """Each read waits, sees the store, then answers after a while (the next
    ``(before, after)`` of ``plan``; at once when it is used up): reads overtake
    each other, and see the store in any order of their starts, as on a pool."""

    def __init__(self, plan: list[tuple[float | asyncio.Event, float]]) -> None:
        super().__init__()
        self.plan = plan

    async def _read_raw(self, task_ids: Sequence[str]) -> list[Any]:
        self.reads.append(list(task_ids))
        before, after = self.plan.pop(0) if self.plan else (0.0, 0.0)
        if isinstance(before, asyncio.Event):
            await before.wait()
        else:
            await asyncio.sleep(before)
        seen = [self.data.get(t) for t in task_ids]
        await asyncio.sleep(after)
        return seen


@pytest.mark.parametrize("first_read", [0.05, 0.15], ids=["first-read-ends-first", "last"])
async def test_a_signal_during_the_first_read_is_never_lost(first_read: float) -> None:
    # The first read began before the write, the re-read the signal asked for
    # after it; whichever answers last, the waiter gets the result.
    store = SnapshotStore([(0, first_read), (0, 0.1)])
    try:
        hub = WaiterHub(store, FakeSignal(), "hub")
        async with hub.waiter(["t"], ready_only=True) as w:
            while not store.reads:
                await asyncio.sleep(0.001)
            store.put("t", "SUCCESS", 5)
            hub.changed(["t"])
            assert (await next_meta(w)).result == 5
            assert len(store.reads) == 2
    finally:
        await store.aclose()


async def test_a_read_that_began_before_a_change_never_undoes_it() -> None:
    store = SnapshotStore([(0, 0.2)])
    try:
        hub = WaiterHub(store, FakeSignal(), "hub")
        async with hub.waiter(["t"]) as w:
            while not store.reads:
                await asyncio.sleep(0.001)  # the first read saw no record; it answers last
            store.put("t", "SUCCESS", 5)
            hub.changed(["t"])
            assert (await next_meta(w)).result == 5
            await asyncio.sleep(0.25)
            assert not w.pending()  # the first read's PENDING was dropped
    finally:
        await store.aclose()


def statuses(waiter: Any) -> list[str]:
    """The states handed to ``waiter`` so far, in order."""
    out = []
    while (record := waiter.take()) is not None:
        out.append(record.meta().status)
    return out


async def test_a_read_that_saw_the_store_earlier_never_undoes_news() -> None:
    # The re-read a signal asked for starts first but sees the store late (it
    # finds the result); B's first read starts later but saw the store before
    # the write, and answers last. Its PENDING must not undo the SUCCESS.
    stored = asyncio.Event()
    store = SnapshotStore([(0, 0), (stored, 0), (0, 0.2)])
    try:
        hub = WaiterHub(store, FakeSignal(), "hub")
        async with hub.waiter(["t"]) as a:
            assert (await next_meta(a)).status == "PENDING"
            hub.changed(["t"])  # the re-read: it sees the store once `stored` is set
            async with hub.waiter(["t"]) as b:
                while len(store.reads) < 3:
                    await asyncio.sleep(0.001)  # B's first read has seen no record
                store.put("t", "SUCCESS", 5)
                stored.set()
                async with asyncio.timeout(5):
                    while len(store.reads) < 4:  # B's read was dropped and made again
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                assert statuses(a) == ["SUCCESS"] and statuses(b) == ["SUCCESS"]
                assert hub._last["t"].meta().result == 5
    finally:
        await store.aclose()


async def test_the_same_push_twice_during_a_first_read_leaves_it_alone(
    store: FakeStore,
) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["t"], ready_only=True) as a:
        await asyncio.sleep(0.05)
        payload = store.put("t", "SUCCESS", 1)
        hub.deliver("t", payload)  # a sibling backend's wake after the write
        assert (await next_meta(a)).result == 1
        store.read_delay = 0.1
        async with hub.waiter(["t"], ready_only=True) as b:
            while len(store.reads) < 2:
                await asyncio.sleep(0.001)
            hub.deliver("t", payload)  # the store's own push of that write: no news
            assert (await next_meta(b, 1.0)).result == 1


async def test_a_first_read_never_repeats_news_its_waiter_had() -> None:
    # Pushes of one record arrive before and while the first read is out; it
    # finds that record, which its waiter has had already as news.
    store = SnapshotStore([(0, 0.05)])
    try:
        hub = WaiterHub(store, FakePush(), "hub")
        payload = store.put("t", "STARTED")
        async with hub.waiter(["t"]) as w:
            for _ in range(10):
                hub.deliver("t", payload)
                await asyncio.sleep(0.01)
            assert len(store.reads) == 1
            assert statuses(w) == ["STARTED"]
    finally:
        await store.aclose()


class FailingReads(FakeStore):
    """Every read fails for each id it asks for (a per-id exception)."""

    async def _read_raw(self, task_ids: Sequence[str]) -> list[Any]:
        self.reads.append(list(task_ids))
        return [PermissionError("unreadable") for _ in task_ids]


async def test_a_first_reads_own_failure_reaches_a_waiter_that_had_news() -> None:
    store = FailingReads()
    try:
        hub = WaiterHub(store, FakePush(), "hub")
        w = hub.waiter(["t"])
        assert w.enter_now()
        hub.deliver("t", store.put("t", "STARTED"))  # news before the first read
        assert (await next_meta(w)).status == "STARTED"
        with pytest.raises(PermissionError):
            await next_meta(w)  # the first read's failure, not swallowed
        w.close()
    finally:
        await store.aclose()


async def test_a_waiter_that_leaves_before_its_first_read_leaves_nothing(
    store: FakeStore,
) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    w = hub.waiter(["t"], ready_only=True)
    assert w.enter_now()
    hub.deliver("t", store.put("t", "SUCCESS", 1))  # a sibling's wake in this same step
    assert (await next_meta(w)).result == 1
    w.close()
    await asyncio.sleep(0.05)
    assert len(hub) == 0 and not hub.watched and not hub._told and not hub._last


async def test_a_read_overlapped_by_news_is_read_again_only_if_it_disagrees() -> None:
    store = SnapshotStore([])
    try:
        hub = WaiterHub(store, FakePush(), "hub")
        started = store.put("t", "STARTED")
        async with hub.waiter(["t"]) as w:
            assert (await next_meta(w)).status == "STARTED"

            async def read_overlapped_by(push: bytes, seen_by_read: bytes) -> None:
                # A re-read that sees ``seen_by_read`` while ``push`` goes out.
                seen = asyncio.Event()
                store.plan = [(seen, 0.05)]
                reads = len(store.reads)
                hub.refresh_soon(["t"])
                while len(store.reads) == reads:
                    await asyncio.sleep(0.001)
                store.data["t"] = seen_by_read
                hub.deliver("t", push)
                seen.set()
                await asyncio.sleep(0.01)  # the read has seen the store
                store.data["t"] = push
                await asyncio.sleep(0.15)

            # It found the pushed record: nothing to settle, no second read.
            progress = store.put("t", "PROGRESS", 1)
            await read_overlapped_by(progress, progress)
            assert len(store.reads) == 2
            # It found an older record than the push: read again, once.
            done = store.put("t", "SUCCESS", 2)
            await read_overlapped_by(done, started)
            assert len(store.reads) == 4
            assert statuses(w) == ["PROGRESS", "SUCCESS"]
            assert hub._last["t"].meta().result == 2
    finally:
        await store.aclose()


async def test_a_later_waiters_first_read_is_news_for_earlier_waiters(store: FakeStore) -> None:
    # A's first read found nothing; the result is stored; B's first read finds
    # it before the store's push arrives. The push then finds the record known:
    # A must have had it from B's read.
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["t"], ready_only=True) as a:
        await asyncio.sleep(0.05)
        assert not a.pending()
        payload = store.put("t", "SUCCESS", 1)
        async with hub.waiter(["t"], ready_only=True) as b:
            assert (await next_meta(b)).result == 1
            hub.deliver("t", payload)  # the push, late
            assert (await next_meta(a, 0.5)).result == 1


async def test_a_reconnect_rereads_every_watched_id(store: FakeStore) -> None:
    feed = FakePush()
    hub = WaiterHub(store, feed, "hub")
    async with hub.waiter(["t"], ready_only=True) as w:
        await asyncio.sleep(0.05)
        assert hub.sessions == 1
        store.put("t", "SUCCESS", "while away")  # stored while the feed is down: no push
        feed.fail_next = ConnectionError("refused once")
        feed.drop.set()
        assert (await next_meta(w)).result == "while away"
        assert feed.started == 3 and hub.sessions == 2 and hub.feed_failures == 2


async def test_a_feed_gone_for_good_falls_back_to_polling(store: FakeStore) -> None:
    feed = FakePush()
    feed.fail_next = FeedGone("no notifications here")
    hub = WaiterHub(store, feed, "hub")
    async with hub.waiter(["t"], ready_only=True) as w:
        store.put("t", "SUCCESS", "polled")
        assert (await next_meta(w)).result == "polled"
        assert hub.mode == "poll" and hub.polls >= 1


async def test_the_poller_batches_and_backs_off_and_stops_when_idle(store: FakeStore) -> None:
    hub = WaiterHub(store, None, "hub")
    waiters = [hub.waiter([f"t{i}"], ready_only=True) for i in range(20)]
    for w in waiters:
        await w.__aenter__()
    await asyncio.sleep(0.3)
    polled = [r for r in store.reads[1:] if len(r) == 20]
    assert polled and all(len(r) == 20 for r in store.reads[1:])  # one read for all
    # Backed off: 0.01 s doubling to 0.04 s gives far fewer polls than 0.3 / 0.01.
    assert len(polled) < 15
    store.put("t3", "SUCCESS", 3)
    assert (await next_meta(waiters[3])).result == 3
    for w in waiters:
        w.close()
    reads = len(store.reads)
    await asyncio.sleep(0.2)
    assert len(store.reads) == reads  # nobody waits: nothing is read


async def test_refresh_soon_retries_until_the_store_answers(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["t"], ready_only=True) as w:
        await asyncio.sleep(0.05)
        store.put("t", "SUCCESS", 1)
        store.fail_reads = 2
        hub.changed(["t"])
        assert (await next_meta(w, timeout=5)).result == 1


async def test_deadlines_share_one_timer(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    waiters = [hub.waiter([f"t{i}"], ready_only=True) for i in range(200)]
    for w in waiters:
        await w.__aenter__()
    now = anyio.current_time()
    arrivals = [w.arrival(now + 0.05 + i * 0.0001) for i, w in enumerate(waiters)]
    assert len(hub.deadlines.heap) == 200 and hub.deadlines.armed
    await asyncio.gather(*arrivals)
    assert anyio.current_time() - now < 1
    assert all(w.take() is None for w in waiters)  # timed out, nothing arrived
    # Every deadline was met by the one timer: nothing left in the heap or armed.
    assert hub.deadlines.heap == [] and not hub.deadlines.armed
    for w in waiters:
        w.close()


async def test_closing_fails_every_waiter_and_refuses_new_ones(store: FakeStore) -> None:
    hub = WaiterHub(store, FakePush(), "hub")
    async with hub.waiter(["t"], ready_only=True) as w:
        await asyncio.sleep(0.02)
        hub.close(BackendClosed("closed"))
        with pytest.raises(BackendClosed):
            await next_meta(w)
    with pytest.raises(BackendClosed):
        async with hub.waiter(["t"]):
            pass


class SiblingHub:
    """What the sibling registry calls on a hub."""

    def __init__(self, *watching: str) -> None:
        self.watched = dict.fromkeys(watching)
        self.refreshed: list[list[str]] = []
        self.delivered: list[tuple[str, bytes]] = []

    def refresh_soon(self, task_ids: list[str]) -> None:
        self.refreshed.append(task_ids)

    def deliver(self, task_id: str, raw: bytes) -> None:
        self.delivered.append((task_id, raw))


def test_siblings_are_woken_and_leave_when_closed_or_dropped() -> None:
    import gc

    from aioresults.backends import _feeds

    key = object()
    first, second, other = SiblingHub("a"), SiblingHub(), SiblingHub("a")
    _feeds.join_siblings(key, first)  # type: ignore[arg-type]
    _feeds.join_siblings(key, second)  # type: ignore[arg-type]
    _feeds.join_siblings("another store", other)  # type: ignore[arg-type]
    _feeds.wake_siblings(key, ["a", "b"])
    assert first.refreshed == [["a"]] and second.refreshed == [] and other.refreshed == []
    _feeds.wake_siblings(key, ["a"], [b"raw"])
    assert first.delivered == second.delivered == [("a", b"raw")]
    _feeds.leave_siblings(key, first)  # type: ignore[arg-type]
    _feeds.leave_siblings(key, first)  # type: ignore[arg-type]  # again: nothing
    _feeds.wake_siblings(key, ["a"], [b"late"])
    assert first.delivered == [("a", b"raw")]
    assert key in _feeds._siblings
    del second  # dropped unclosed: its entry goes with it
    gc.collect()
    assert not _feeds._siblings.get(key)  # its entry went; the dict may stay
    _feeds.wake_siblings(key, ["a"])  # a store without hubs: nothing to do
    _feeds.leave_siblings("another store", other)  # type: ignore[arg-type]
    assert "another store" not in _feeds._siblings
