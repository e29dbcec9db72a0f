"""AsyncResult, ResultSet and GroupResult semantics (on the memory backend)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.memory import MemoryBackend, _Pushed
from tests.stalls import time_out


@pytest.fixture
async def backend() -> Any:
    async with MemoryBackend() as backend:
        yield backend


def test_result_identity() -> None:
    backend = MemoryBackend()
    a: ar.AsyncResult[Any] = ar.AsyncResult("id-1", backend)
    assert a == ar.AsyncResult("id-1", backend) and a == "id-1" and a != "other"
    assert hash(a) == hash("id-1") and str(a) == "id-1" and repr(a) == "<AsyncResult: id-1>"
    assert a.task_id == "id-1"
    with pytest.raises(ValueError):
        ar.AsyncResult("", backend)


async def test_await_is_get(backend: MemoryBackend) -> None:
    await backend.mark_as_done("t", [1, 2])
    assert await ar.AsyncResult("t", backend) == [1, 2]
    assert await ar.AsyncResult("t", backend).get() == [1, 2]


async def test_ready_meta_is_cached(backend: MemoryBackend) -> None:
    await backend.mark_as_done("t", "v")
    result: ar.AsyncResult[str] = ar.AsyncResult("t", backend)
    assert await result == "v"
    await backend.forget("t")
    assert await result.get(timeout=0) == "v"  # a ready record no longer changes
    await result.forget()
    assert await result.state() == states.PENDING


async def test_timeouts_are_exact(backend: MemoryBackend) -> None:
    for timeout in (0.05, 0.1, 0.3):
        elapsed, stall = await time_out(ar.AsyncResult("never", backend), timeout)
        assert timeout <= elapsed < timeout + 0.1 + stall, (timeout, elapsed)
    with pytest.raises(ValueError):
        await ar.AsyncResult("never", backend).get(timeout=-1)


async def test_watch_ends_at_ready_and_skips_repeats(backend: MemoryBackend) -> None:
    seen = []

    async def produce() -> None:
        await asyncio.sleep(0.02)
        await backend.update_state("w", "PROGRESS", {"n": 1})
        await backend.update_state("w", "PROGRESS", {"n": 1})
        await asyncio.sleep(0.02)
        await backend.mark_as_done("w", "ok")
        await backend.update_state("w", "PROGRESS", {"n": 2})  # refused: SUCCESS is kept

    task = asyncio.create_task(produce())
    async for meta in ar.AsyncResult("w", backend).watch(timeout=5):
        seen.append((meta.status, meta.result))
    await task
    assert seen == [(states.PENDING, None), ("PROGRESS", {"n": 1}), (states.SUCCESS, "ok")]


async def test_breaking_out_of_watch_unregisters(backend: MemoryBackend) -> None:
    async with contextlib.aclosing(ar.AsyncResult("b", backend).watch()) as updates:
        async for _meta in updates:
            break
    assert backend.wait_stats().waiters == 0  # closed explicitly: at once
    async for _meta in ar.AsyncResult("c", backend).watch():
        break
    # Left to the garbage collector: asyncio closes the generator a few iterations later.
    for _ in range(5):
        await asyncio.sleep(0)
    assert backend.wait_stats().waiters == 0


async def test_hub_holds_nothing_after_1000_cancelled_or_timed_out_waits(
    backend: MemoryBackend,
) -> None:
    for round_ in range(2):
        tasks = [
            asyncio.create_task(
                ar.AsyncResult(f"c{round_}-{i}", backend).get(timeout=None if i % 2 else 0.05)
            )
            for i in range(1000)
        ]
        with anyio.fail_after(10):
            while backend.wait_stats().waiters < 500:
                await asyncio.sleep(0.01)
        for task in tasks[1::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert backend.wait_stats().waiters == 0
        assert list(backend.wait_stats().watched_ids) == []


async def test_result_set_membership(backend: MemoryBackend) -> None:
    a, b = ar.AsyncResult("a", backend), ar.AsyncResult("b", backend)
    rs: ar.ResultSet[Any] = ar.ResultSet([a])
    rs.add(b)
    rs.add(b)
    assert len(rs) == 2 and list(rs) == [a, b] and rs[1] is b and "a" in rs
    rs.remove("a")
    with pytest.raises(KeyError):
        rs.remove("a")
    rs.discard("a")
    rs.update([a])
    assert [r.id for r in rs] == ["b", "a"]
    rs.clear()
    assert await rs.join() == []
    with pytest.raises(ValueError, match="same backend"):
        rs.add(ar.AsyncResult("x", MemoryBackend()))
    with pytest.raises(ValueError, match="empty"):
        _ = ar.ResultSet[Any]().backend


async def test_join_timeout_zero_and_duplicates(backend: MemoryBackend) -> None:
    await backend.mark_as_done("d1", 1)
    dup = ar.ResultSet([ar.AsyncResult("d1", backend), ar.AsyncResult("d2", backend)])
    with pytest.raises(ar.ResultTimeout) as caught:
        await dup.join(timeout=0)
    assert caught.value.task_ids == ("d2",)
    await backend.mark_as_done("d2", 2)
    assert await dup.join(timeout=0) == [1, 2]


async def test_a_finished_join_keeps_no_object_per_member(backend: MemoryBackend) -> None:
    ids = [f"j{n}" for n in range(2000)]
    for n, task_id in enumerate(ids):
        await backend.mark_as_done(task_id, n)
    group = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])
    gc.collect()
    before = len(gc.get_objects())
    assert await group.join(timeout=5) == list(range(2000))
    gc.collect()
    # Objects the collector tracks: the values list and a few of the call's own;
    # a decoded record per member would add 2,000.
    assert len(gc.get_objects()) - before < 100
    assert await group.join(timeout=0) == list(range(2000))  # from what the members hold
    member = group.results[5]
    meta = await member.meta()
    assert meta == await backend.get_meta("j5") and meta.result == 5
    assert await member.meta() is meta


async def test_a_join_that_waits_decodes_only_what_it_waits_for(
    backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"w{n}" for n in range(50)]
    for n, task_id in enumerate(ids[:-1]):
        await backend.mark_as_done(task_id, n)
    decoded: list[str] = []
    decode = backend._decode

    def counting(task_id: str, raw: Any) -> ar.ResultMeta:
        decoded.append(task_id)
        return decode(task_id, raw)

    monkeypatch.setattr(backend, "_decode", counting)
    group = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])
    joining = asyncio.create_task(group.join(timeout=5))
    await asyncio.sleep(0.05)
    assert not joining.done()
    await backend.mark_as_done(ids[-1], 49)
    assert await joining == list(range(50))
    # The 49 records read first stay as read; the late one is decoded as it arrives.
    assert set(decoded) <= {ids[-1]}
    # Asked for, a held record is decoded once; a second join reads nothing again.
    assert (await group.results[3].meta()).result == 3
    assert await group.join(timeout=0) == list(range(50))
    assert decoded.count(ids[3]) == 1


async def test_join_reads_through_a_subclass_own_get_many() -> None:
    class Counted(MemoryBackend):
        reads = 0

        async def get_many(self, task_ids: Sequence[str]) -> list[ar.ResultMeta]:
            self.reads += 1
            return await super().get_many(task_ids)

    async with Counted() as counted:
        await counted.mark_as_done("c1", 1)
        assert await ar.ResultSet([ar.AsyncResult("c1", counted)]).join(timeout=1) == [1]
        assert counted.reads == 1


class _ProtocolOnly:
    """A reader that is no BaseBackend: only what ``ResultReader`` lists."""

    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self.get_meta = backend.get_meta
        self.get_many = backend.get_many
        self.waiter = backend.waiter
        self.forget = backend.forget
        self.save_group = backend.save_group
        self.restore_group = backend.restore_group
        self.delete_group = backend.delete_group


async def test_join_over_a_reader_that_is_not_a_backend(backend: MemoryBackend) -> None:
    reader = _ProtocolOnly(backend)
    assert isinstance(reader, ar.ResultReader)
    await backend.mark_as_done("p1", 1)
    await backend.mark_as_failure("p2", KeyError("k"))
    group = ar.ResultSet([ar.AsyncResult("p1", reader), ar.AsyncResult("p2", reader)])
    with pytest.raises(KeyError):
        await group.join(timeout=1)
    values = await group.join(timeout=1, propagate=False)
    assert values[0] == 1 and isinstance(values[1], KeyError)
    assert (await group.results[0].meta()).result == 1


async def test_group_tuple_format_and_restore(backend: MemoryBackend) -> None:
    parent: ar.AsyncResult[Any] = ar.AsyncResult("p0", backend)
    group: ar.GroupResult[Any] = ar.GroupResult(
        "g-1", [ar.AsyncResult("a1", backend), ar.AsyncResult("a2", backend, parent=parent)]
    )
    assert group.as_tuple() == [
        ["g-1", None],
        [[["a1", None], None], [["a2", [["p0", None], None]], None]],
    ]
    await group.save()
    restored = await ar.GroupResult.restore("g-1", backend)
    assert restored == group and restored is not None
    assert restored.results[1].parent == "p0"
    assert await ar.GroupResult.restore("missing", backend) is None
    with pytest.raises(ar.DecodeError):
        ar.result_from_tuple("garbage", backend)


async def test_memory_and_results_under_trio() -> None:
    async def main() -> list[Any]:
        async with MemoryBackend() as backend:
            async with anyio.create_task_group() as tg:

                async def store() -> None:
                    await anyio.sleep(0.02)
                    await backend.mark_as_done("t", "trio")
                    await backend.mark_as_done("u", "too")

                tg.start_soon(store)
                value = await ar.AsyncResult("t", backend).get(timeout=5)
                joined = await ar.ResultSet(
                    [ar.AsyncResult("t", backend), ar.AsyncResult("u", backend)]
                ).join(timeout=5)
            with pytest.raises(ar.ResultTimeout):
                await ar.AsyncResult("never", backend).get(timeout=0.05)
            return [value, joined]

    assert await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio")) == [
        "trio",
        ["trio", "too"],
    ]


async def test_closing_the_backend_ends_pending_waits() -> None:
    backend = MemoryBackend()
    waiting = asyncio.create_task(ar.AsyncResult("never", backend).get())
    watching = asyncio.create_task(ar.ResultSet([ar.AsyncResult("n2", backend)]).join())
    with anyio.fail_after(5):
        while backend.wait_stats().waiters < 2:
            await asyncio.sleep(0.01)
    await backend.aclose()
    for task in (waiting, watching):
        with pytest.raises(ar.BackendError, match="closed"):
            await task
    assert backend.wait_stats().waiters == 0
    with pytest.raises(ar.BackendError):
        await ar.AsyncResult("late", backend).get(timeout=1)


async def test_timeout_covers_a_slow_watch() -> None:
    class SlowFeed(_Pushed):
        async def watch(self, task_ids: Any) -> None:
            await asyncio.sleep(5)

    class SlowWatch(MemoryBackend):
        def _feed(self) -> SlowFeed:
            return SlowFeed()

    async with SlowWatch() as backend:
        started = anyio.current_time()
        with pytest.raises(ar.ResultTimeout):
            await ar.AsyncResult("slow", backend).get(timeout=0.2)
        assert anyio.current_time() - started < 1
        assert backend.wait_stats().waiters == 0 and list(backend.wait_stats().watched_ids) == []


async def test_a_record_under_another_id_is_refused(backend: MemoryBackend) -> None:
    # Planted as a foreign writer would (the memory store has no client of its own).
    await backend._set(backend.task_key("a"), b'{"status": "SUCCESS", "task_id": "zzz"}', None)
    with pytest.raises(ar.DecodeError, match="zzz"):
        await backend.get_meta("a")


async def test_unchanged_failure_is_not_a_change(backend: MemoryBackend) -> None:
    await backend.mark_as_retry("r", ValueError("again"))
    first, second = await backend.get_meta("r"), await backend.get_meta("r")
    assert first is not second and first == second
    assert first != await backend.get_meta("other")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1, -0.5, True, "5"])
async def test_timeout_must_be_finite_and_not_negative(
    backend: MemoryBackend, timeout: Any
) -> None:
    result: ar.AsyncResult[Any] = ar.AsyncResult("t", backend)
    for wait in (
        lambda: result.get(timeout=timeout),
        lambda: result.wait_ready(timeout=timeout),
        lambda: ar.ResultSet([result]).join(timeout=timeout),
    ):
        with anyio.fail_after(2), pytest.raises(ar.ConfigurationError, match="timeout"):
            await wait()
    with anyio.fail_after(2), pytest.raises(ar.ConfigurationError, match="timeout"):
        async for _ in result.watch(timeout=timeout):
            pass


async def test_aclose_cancels_an_open_under_way() -> None:
    class SlowOpen(MemoryBackend):
        async def _open(self) -> None:
            await asyncio.sleep(30)  # a host that never answers

    backend = SlowOpen()
    waits = [asyncio.create_task(ar.AsyncResult(f"t{i}", backend).get()) for i in range(20)]
    reads = [asyncio.create_task(backend.get_meta(f"t{i}")) for i in range(20)]
    await asyncio.sleep(0.05)
    with anyio.fail_after(2):
        await backend.aclose()
        for task in [*waits, *reads]:
            with pytest.raises(ar.BackendClosed):
                await task
