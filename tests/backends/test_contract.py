"""The contract every backend passes, run against each kind on its real store."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import uuid
from typing import Any

import anyio
import pytest

import aioresults as ar
from aioresults import states
from tests.conftest import MakeBackend
from tests.stalls import time_out


class AppError(Exception):
    """A task's own exception type, unknown to the reader's builtins."""


def new_id() -> str:
    return str(uuid.uuid4())


# ------------------------------------------------------------------ reading and writing


async def test_missing_result_is_pending(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    meta = await backend.get_meta(task_id)
    assert meta.status == states.PENDING
    assert meta.task_id == task_id
    assert meta.result is None and meta.date_done is None
    assert not await ar.AsyncResult(task_id, backend).ready()


async def test_store_and_read_success(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    assert await backend.mark_as_done(task_id, {"answer": 42, "items": [1, "two", None]})
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS
    assert meta.result == {"answer": 42, "items": [1, "two", None]}
    assert meta.task_id == task_id
    assert meta.date_done is not None and meta.date_done.tzinfo is not None
    assert abs(meta.date_done - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert await ar.AsyncResult(task_id, backend) == {"answer": 42, "items": [1, "two", None]}


async def test_typed_values_round_trip(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    value = {
        "when": dt.datetime(2026, 11, 21, 9, 31, 47, 941024, tzinfo=dt.UTC),
        "day": dt.date(2026, 11, 21),
        "at": dt.time(9, 31, 47),
        "id": uuid.UUID("0560e8f4-2d0a-4b46-9d1b-2d1a6d1f3c11"),
        "price": decimal.Decimal("1.10"),
        "text": b"utf8 bytes",
        "binary": b"\xff\x00\xfe",
    }
    await backend.mark_as_done(task_id, value)
    assert await ar.AsyncResult(task_id, backend).get(timeout=5) == value


async def test_extended_fields_round_trip(backend: ar.BaseBackend) -> None:
    task_id, group_id, parent_id = new_id(), new_id(), new_id()
    await backend.store_result(
        task_id,
        5,
        states.SUCCESS,
        group_id=group_id,
        parent_id=parent_id,
        name="tasks.add",
        args=[2, 3],
        kwargs={"z": 1},
        worker="w1@host",
        retries=2,
        queue="celery",
    )
    meta = await backend.get_meta(task_id)
    assert (meta.group_id, meta.parent_id) == (group_id, parent_id)
    assert (meta.name, meta.args, meta.kwargs) == ("tasks.add", [2, 3], {"z": 1})
    assert (meta.worker, meta.retries, meta.queue) == ("w1@host", 2, "celery")


async def test_get_many_keeps_order(backend: ar.BaseBackend) -> None:
    ids = [new_id() for _ in range(5)]
    for i, task_id in enumerate(ids[::2]):
        await backend.mark_as_done(task_id, i)
    metas = await backend.get_many(ids)
    assert [m.task_id for m in metas] == ids
    assert [m.status for m in metas] == [states.SUCCESS, states.PENDING] * 2 + [states.SUCCESS]
    assert await backend.get_many([]) == []


async def test_started_and_custom_states_are_not_ready(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_started(task_id, {"pid": 7, "hostname": "w1"})
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
    assert await result.state() == states.STARTED
    assert (await result.meta()).result == {"pid": 7, "hostname": "w1"}
    await backend.update_state(task_id, states.PROGRESS, {"done": 3, "total": 10})
    meta = await result.meta()
    assert (meta.status, meta.result, meta.ready) == ("PROGRESS", {"done": 3, "total": 10}, False)
    assert meta.date_done is None
    with pytest.raises(ar.ResultTimeout):
        await result.get(timeout=0)


async def test_success_is_never_overwritten(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    assert await backend.mark_as_done(task_id, "first")
    assert not await backend.mark_as_failure(task_id, ValueError("late"))
    assert not await backend.mark_as_started(task_id)
    assert not await backend.mark_as_done(task_id, "second")
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, "first")


async def test_success_guard_under_concurrency(make_backend: MakeBackend) -> None:
    one, two = await make_backend(), await make_backend()
    task_id = new_id()
    await one.mark_as_started(task_id)

    async def write(backend: ar.BaseBackend, i: int) -> bool:
        if i % 2:
            return await backend.mark_as_done(task_id, i)
        return await backend.update_state(task_id, states.PROGRESS, i)

    written = await asyncio.gather(*(write((one, two)[i % 2], i) for i in range(40)))
    meta = await one.get_meta(task_id)
    assert meta.status == states.SUCCESS
    # Every write after the first SUCCESS was refused, and the value stored is that SUCCESS.
    successes = [i for i, ok in enumerate(written) if ok and i % 2]
    assert successes and meta.result == successes[0] or meta.result in successes


async def test_failure_with_builtin_exception(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    try:
        raise ValueError("bad", 42)
    except ValueError as exc:
        await backend.mark_as_failure(task_id, exc)
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
    with pytest.raises(ValueError) as caught:
        await result
    assert type(caught.value) is ValueError
    assert caught.value.args == ("bad", 42)
    assert "raise ValueError" in (caught.value.remote_traceback or "")  # type: ignore[attr-defined]
    returned = await result.get(propagate=False)
    assert isinstance(returned, ValueError)
    assert await result.failed() and not await result.successful() and await result.ready()


async def test_failure_with_unknown_exception_type(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_failure(task_id, AppError("nope", {"k": 1}))
    with pytest.raises(ar.RemoteTaskError) as caught:
        await ar.AsyncResult(task_id, backend).get(timeout=5)
    assert type(caught.value).__name__ == "AppError"
    assert caught.value.remote_type == "AppError"
    assert caught.value.remote_module == __name__
    assert caught.value.args == ("nope", {"k": 1})
    assert not isinstance(caught.value, AppError)


async def test_revoked_raises_task_revoked(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_revoked(task_id, "terminated")
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
    with pytest.raises(ar.TaskRevokedError, match="terminated"):
        await result
    assert await result.ready() and not await result.failed()


async def test_retry_is_not_ready(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_retry(task_id, ConnectionError("flaky"))
    meta = await backend.get_meta(task_id)
    assert meta.status == states.RETRY and not meta.ready
    assert isinstance(meta.result, ConnectionError)
    with pytest.raises(ar.ResultTimeout):
        await ar.AsyncResult(task_id, backend).get(timeout=0)


async def test_forget(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_done(task_id, 1)
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
    assert await result == 1
    await result.forget()
    assert await result.state() == states.PENDING
    await result.forget()  # a missing result is not an error
    await backend.forget(new_id())


# A lone surrogate is what any JSON body can carry: json.loads('"\\udcff"').
LONE_SURROGATE = json.loads('"\\udcff"')


@pytest.mark.parametrize(
    "bad", ["", "a\x00b", "x" * 10_000, "tab\tid", 42, LONE_SURROGATE, f"ok{LONE_SURROGATE}ok"]
)
async def test_hostile_ids_are_refused(backend: ar.BaseBackend, bad: Any) -> None:
    with pytest.raises(ar.InvalidTaskId):
        await backend.mark_as_done(bad, 1)
    with pytest.raises(ar.InvalidTaskId):
        await backend.get_meta(bad)
    with pytest.raises(ar.InvalidTaskId):
        await backend.forget(bad)
    with pytest.raises(ar.InvalidTaskId):
        await backend.save_group(bad, [[bad, None], []])
    with pytest.raises(ar.InvalidTaskId):
        await backend.chord_part_return(new_id(), bad, states.SUCCESS, 1)
    with pytest.raises(ar.InvalidTaskId):
        async with backend.waiter([bad]):
            pass


async def test_a_bad_id_fails_alone_among_concurrent_waits(make_backend: MakeBackend) -> None:
    writer, reader = await make_backend(), await make_backend()
    ids = [new_id() for _ in range(50)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=20)) for i in ids]
    bad = asyncio.create_task(ar.AsyncResult(LONE_SURROGATE, reader).get(timeout=20))
    with pytest.raises(ar.InvalidTaskId):
        await bad
    for task_id in ids:
        await writer.mark_as_done(task_id, task_id)
    assert await asyncio.gather(*waits) == ids


@pytest.mark.parametrize("odd", ["../x", "a/b", "..", "sp ace", "ünïcode-ид"])
async def test_odd_ids_round_trip_or_are_refused(backend: ar.BaseBackend, odd: str) -> None:
    try:
        await backend.mark_as_done(odd, "value")
    except ar.InvalidTaskId:
        with pytest.raises(ar.InvalidTaskId):
            await backend.get_meta(odd)
        return
    assert (await backend.get_meta(odd)).result == "value"
    await backend.forget(odd)
    assert (await backend.get_meta(odd)).status == states.PENDING


async def test_pickle_refused_unless_accepted(make_backend: MakeBackend) -> None:
    writer = await make_backend(serializer="pickle", accept=["json", "pickle"])
    reader = await make_backend()
    task_id = new_id()
    await writer.mark_as_done(task_id, {"x": 1})
    assert (await writer.get_meta(task_id)).result == {"x": 1}
    with pytest.raises(ar.ContentDisallowed, match="pickle"):
        await reader.get_meta(task_id)
    with pytest.raises(ar.ContentDisallowed):
        await ar.AsyncResult(task_id, reader).get(timeout=1)


async def test_msgpack_and_compression(make_backend: MakeBackend) -> None:
    packed = await make_backend(serializer="msgpack", accept=["msgpack", "json"])
    zipped = await make_backend(compression="zlib", accept=["json", "msgpack"])
    a, b = new_id(), new_id()
    await packed.mark_as_done(a, {"n": [1, 2, 3], "b": b"\x00\x01"})
    await zipped.mark_as_done(b, "x" * 10_000)
    assert (await zipped.get_meta(a)).result == {"n": [1, 2, 3], "b": b"\x00\x01"}
    assert (await packed.get_meta(b)).result == "x" * 10_000


async def test_oversized_value_is_refused_and_loses_nothing(make_backend: MakeBackend) -> None:
    backend = await make_backend(max_value_size=10_000)
    task_id = new_id()
    await backend.mark_as_done(task_id, "small")
    with pytest.raises(ar.ResultTooLarge):
        await backend.store_result(task_id, "x" * 20_000, states.PROGRESS)
    other = new_id()
    await backend.mark_as_started(other)
    with pytest.raises(ar.ResultTooLarge):
        await backend.mark_as_done(other, "x" * 20_000)
    assert (await backend.get_meta(task_id)).result == "small"
    assert (await backend.get_meta(other)).status == states.STARTED


async def test_unserializable_value_is_a_clear_error(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    with pytest.raises(ar.SerializationError, match="set"):
        await backend.mark_as_done(task_id, {1, 2})
    assert (await backend.get_meta(task_id)).status == states.PENDING


# ------------------------------------------------------------------ waiting


async def test_waiter_wakes_on_store_from_another_instance(make_backend: MakeBackend) -> None:
    writer, reader = await make_backend(), await make_backend()
    task_id = new_id()
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, reader)

    async def store_later() -> None:
        await asyncio.sleep(0.1)
        await writer.mark_as_done(task_id, "woken")

    task = asyncio.create_task(store_later())
    assert await result.get(timeout=10) == "woken"
    await task


async def test_many_waiters_on_one_id(make_backend: MakeBackend) -> None:
    writer, reader = await make_backend(), await make_backend()
    task_id = new_id()
    waits = [
        asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=10)) for _ in range(100)
    ]
    with anyio.fail_after(10):
        while reader.wait_stats().waiters < 100:
            await asyncio.sleep(0.01)
    assert list(reader.wait_stats().watched_ids) == [task_id]
    await writer.mark_as_done(task_id, "all")
    assert await asyncio.gather(*waits) == ["all"] * 100
    assert reader.wait_stats().waiters == 0


async def test_watch_sees_every_state_until_ready(make_backend: MakeBackend) -> None:
    writer, reader = await make_backend(), await make_backend()
    task_id = new_id()
    seen: list[tuple[str, Any]] = []
    step = asyncio.Event()

    async def consume() -> None:
        async for meta in ar.AsyncResult(task_id, reader).watch(timeout=10):
            seen.append((meta.status, meta.result))
            step.set()

    consumer = asyncio.create_task(consume())
    sequence = [
        (states.STARTED, None),
        (states.PROGRESS, {"done": 1}),
        (states.PROGRESS, {"done": 2}),
        (states.SUCCESS, "done"),
    ]
    await asyncio.wait_for(step.wait(), 10)  # the initial PENDING
    for state, value in sequence:
        step.clear()
        await writer.store_result(task_id, value, state)
        await asyncio.wait_for(step.wait(), 10)
    await asyncio.wait_for(consumer, 10)
    assert seen == [(states.PENDING, None), *sequence]


async def test_timeout_is_exact(backend: ar.BaseBackend) -> None:
    result: ar.AsyncResult[Any] = ar.AsyncResult(new_id(), backend)
    elapsed, stall = await time_out(result, 0.1)
    assert 0.1 <= elapsed < 0.2 + stall  # late by no more than the loop was held up


async def test_timeout_zero_checks_once(backend: ar.BaseBackend) -> None:
    ready, pending = new_id(), new_id()
    await backend.mark_as_done(ready, "now")
    assert await ar.AsyncResult(ready, backend).get(timeout=0) == "now"
    with pytest.raises(ar.ResultTimeout):
        await ar.AsyncResult(pending, backend).get(timeout=0)
    assert backend.wait_stats().waiters == 0


async def test_cancelled_and_timed_out_waits_leave_nothing(backend: ar.BaseBackend) -> None:
    ids = [new_id() for _ in range(500)]
    cancelled = [asyncio.create_task(ar.AsyncResult(i, backend).get()) for i in ids]
    timed_out = [asyncio.create_task(ar.AsyncResult(i, backend).get(timeout=1)) for i in ids]
    with anyio.fail_after(10):
        while backend.wait_stats().waiters < 1000:
            await asyncio.sleep(0.01)
    for task in cancelled:
        task.cancel()
    results = await asyncio.gather(*cancelled, *timed_out, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:500])
    assert all(isinstance(r, ar.ResultTimeout) for r in results[500:])
    assert backend.wait_stats().waiters == 0
    assert list(backend.wait_stats().watched_ids) == []


async def test_ready_result_needs_no_watch(backend: ar.BaseBackend) -> None:
    task_id = new_id()
    await backend.mark_as_done(task_id, 1)
    assert await ar.AsyncResult(task_id, backend).get(timeout=5) == 1
    assert list(backend.wait_stats().watched_ids) == []


async def test_concurrent_rewrites_never_show_torn_records(make_backend: MakeBackend) -> None:
    writer, reader = await make_backend(), await make_backend()
    task_id = new_id()
    values = {i: f"value-{i}-" + "x" * 2000 for i in range(200)}
    stop = False
    reads: list[ar.ResultMeta] = []

    async def read_loop() -> None:
        while not stop:
            reads.append(await reader.get_meta(task_id))
            await asyncio.sleep(0)

    readers = [asyncio.create_task(read_loop()) for _ in range(4)]
    await asyncio.gather(
        *(writer.update_state(task_id, states.PROGRESS, v) for v in values.values())
    )
    stop = True
    await asyncio.gather(*readers)
    assert reads
    for meta in reads:
        assert meta.status in (states.PENDING, states.PROGRESS)
        if meta.status == states.PROGRESS:
            assert meta.result in values.values()
    assert (await reader.get_meta(task_id)).result in values.values()


# ------------------------------------------------------------------ sets and groups


async def test_join_in_order_and_as_completed_in_completion_order(
    make_backend: MakeBackend,
) -> None:
    writer, reader = await make_backend(), await make_backend()
    ids = [new_id() for _ in range(4)]
    group: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, reader) for i in ids])
    order = [2, 0, 3, 1]
    completed: list[str] = []
    next_one = asyncio.Event()

    async def consume() -> None:
        async for result in group.as_completed(timeout=10):
            completed.append(result.id)
            assert await result == ids.index(result.id)
            next_one.set()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    for i in order:
        next_one.clear()
        await writer.mark_as_done(ids[i], i)
        woken = asyncio.create_task(next_one.wait())
        await asyncio.wait([woken, consumer], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        if consumer.done() and not next_one.is_set():
            await consumer  # its own error, if it failed
        assert next_one.is_set(), f"{ids[i]} was stored but as_completed did not yield it"
    await consumer
    assert completed == [ids[i] for i in order]
    fresh: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, reader) for i in ids])
    assert await fresh.join(timeout=5) == [0, 1, 2, 3]
    assert await fresh.completed_count() == 4
    assert await fresh.ready() and await fresh.successful() and not await fresh.failed()


async def test_join_waits_then_times_out(backend: ar.BaseBackend) -> None:
    done, missing = new_id(), new_id()
    await backend.mark_as_done(done, "ok")
    group: ar.ResultSet[Any] = ar.ResultSet(
        [ar.AsyncResult(done, backend), ar.AsyncResult(missing, backend)]
    )
    with pytest.raises(ar.ResultTimeout) as caught:
        await group.join(timeout=0.2)
    assert caught.value.task_ids == (missing,)
    assert await group.completed_count() == 1
    assert await group.waiting()


async def test_join_propagates_failure(backend: ar.BaseBackend) -> None:
    ok, bad, slow = new_id(), new_id(), new_id()
    await backend.mark_as_done(ok, 1)
    await backend.mark_as_failure(bad, KeyError("missing"))
    results = [ar.AsyncResult(i, backend) for i in (ok, bad, slow)]
    with pytest.raises(KeyError):
        await ar.ResultSet(results).join(timeout=5)
    await backend.mark_as_done(slow, 3)
    values = await ar.ResultSet(results).join(timeout=5, propagate=False)
    assert values[0] == 1 and isinstance(values[1], KeyError) and values[2] == 3
    assert await ar.ResultSet(results).failed()


async def test_joined_members_hold_the_records_they_were_read_with(
    backend: ar.BaseBackend,
) -> None:
    plain, grouped, failed = new_id(), new_id(), new_id()
    await backend.mark_as_done(plain, {"n": [1, 2]})
    await backend.store_result(grouped, 2, states.SUCCESS, group_id=new_id(), name="t.add")
    await backend.mark_as_failure(failed, KeyError("k"))
    results = [ar.AsyncResult(i, backend) for i in (plain, grouped, failed)]
    values = await ar.ResultSet(results).join(timeout=5, propagate=False)
    assert values[:2] == [{"n": [1, 2]}, 2] and isinstance(values[2], KeyError)
    stored = [await backend.get_meta(r.id) for r in results]
    for result in results:
        await backend.forget(result.id)  # what the join read is what they hold
    for result, meta in zip(results, stored, strict=True):
        held = await result.meta()
        assert held == meta and held.date_done == meta.date_done
        assert held.group_id == meta.group_id and held.name == meta.name
        assert await result.meta() is held  # decoded once
        assert await result.state() == meta.status
    assert await results[0] == {"n": [1, 2]}
    with pytest.raises(KeyError):
        await results[2]


async def test_group_save_restore_delete(make_backend: MakeBackend) -> None:
    one, two = await make_backend(), await make_backend()
    group_id = new_id()
    ids = [new_id() for _ in range(3)]
    group: ar.GroupResult[Any] = ar.GroupResult(group_id, [ar.AsyncResult(i, one) for i in ids])
    await group.save()
    restored = await ar.GroupResult.restore(group_id, two)
    assert restored is not None
    assert restored.id == group_id and [r.id for r in restored] == ids
    assert restored.backend is two
    for i, task_id in enumerate(ids):
        await one.mark_as_done(task_id, i * 10)
    assert await restored.join(timeout=5) == [0, 10, 20]
    await restored.delete()
    assert await ar.GroupResult.restore(group_id, one) is None
    await restored.delete()
    assert await ar.GroupResult.restore(new_id(), one) is None


# ------------------------------------------------------------------ chords


async def test_chord_completes_once_in_header_order(make_backend: MakeBackend) -> None:
    one, two = await make_backend(), await make_backend()
    group_id = new_id()
    parts = [new_id() for _ in range(5)]
    await one.set_chord_size(group_id, 5)
    progress = []
    for index in [3, 1, 4, 0, 2]:
        backend = (one, two)[index % 2]
        progress.append(
            await backend.chord_part_return(
                group_id, parts[index], states.SUCCESS, index * 2, index=index
            )
        )
    assert [p.complete for p in progress] == [False] * 4 + [True]
    assert [p.count for p in progress] == [1, 2, 3, 4, 5]
    final = progress[-1]
    assert final.results == [0, 2, 4, 6, 8] and not final.failed


async def test_chord_counts_redelivered_parts_once(backend: ar.BaseBackend) -> None:
    group_id = new_id()
    a, b = new_id(), new_id()
    await backend.set_chord_size(group_id, 2)
    first = await backend.chord_part_return(group_id, a, states.SUCCESS, "a")
    again = await backend.chord_part_return(group_id, a, states.SUCCESS, "a")
    assert first.counted and not again.counted and not again.complete
    last = await backend.chord_part_return(group_id, b, states.SUCCESS, "b")
    assert last.complete and last.count == 2
    # A redelivery of the completing part (its worker may have died before
    # running the body) completes again: at least once, never zero.
    late = await backend.chord_part_return(group_id, b, states.SUCCESS, "b")
    assert not late.counted and late.complete and late.count == 2
    assert late.results == ["a", "b"]
    # A redelivery of any other part never completes.
    again = await backend.chord_part_return(group_id, a, states.SUCCESS, "a")
    assert not again.counted and not again.complete and again.count == 1


async def test_chord_orders_by_saved_group(backend: ar.BaseBackend) -> None:
    group_id = new_id()
    ids = [new_id() for _ in range(3)]
    await ar.GroupResult(group_id, [ar.AsyncResult(i, backend) for i in ids]).save()
    await backend.set_chord_size(group_id, 3)
    for task_id in reversed(ids):
        outcome = await backend.chord_part_return(group_id, task_id, states.SUCCESS, task_id)
    assert outcome.complete and outcome.results == ids


async def test_chord_failed_part_completes_with_failure(backend: ar.BaseBackend) -> None:
    group_id = new_id()
    ids = [new_id() for _ in range(3)]
    await backend.set_chord_size(group_id, 3)
    await backend.chord_part_return(group_id, ids[0], states.SUCCESS, 1, index=0)
    await backend.chord_part_return(group_id, ids[1], states.FAILURE, ValueError("x"), index=1)
    outcome = await backend.chord_part_return(group_id, ids[2], states.SUCCESS, 3, index=2)
    assert outcome.complete and outcome.failed
    assert outcome.failed_task_ids == (ids[1],)
    assert isinstance(outcome.exception, ValueError) and outcome.exception.args == ("x",)
    assert outcome.results is not None and outcome.results[0] == 1


async def test_chord_concurrent_parts_complete_exactly_once(make_backend: MakeBackend) -> None:
    backends = [await make_backend() for _ in range(3)]
    group_id = new_id()
    ids = [new_id() for _ in range(50)]
    await backends[0].set_chord_size(group_id, 50)
    deliveries = [(i, task_id) for i, task_id in enumerate(ids)] * 2  # every part twice

    async def deliver(n: int, index: int, task_id: str) -> ar.ChordProgress:
        backend = backends[n % len(backends)]
        return await backend.chord_part_return(
            group_id, task_id, states.SUCCESS, index, index=index
        )

    outcomes = await asyncio.gather(*(deliver(n, i, t) for n, (i, t) in enumerate(deliveries)))
    assert sum(o.counted for o in outcomes) == 50
    # Exactly one call counted the last part; only that part's deliveries complete.
    completing = [o for o in outcomes if o.complete]
    assert sum(o.counted for o in completing) == 1
    assert len({o.task_id for o in completing}) == 1 and len(completing) <= 2
    assert all(o.count is not None and o.count <= 50 for o in outcomes)
    assert all(o.results == list(range(50)) for o in completing)


async def test_chord_without_size_is_an_error(backend: ar.BaseBackend) -> None:
    with pytest.raises(ar.ChordError, match="set_chord_size"):
        await backend.chord_part_return(new_id(), new_id(), states.SUCCESS, 1)
    with pytest.raises(ar.ConfigurationError):
        await backend.set_chord_size(new_id(), 0)


# ------------------------------------------------------------------ expiry and lifecycle


async def test_expired_results_are_never_returned(make_backend: MakeBackend) -> None:
    backend = await make_backend(expires=1)
    keeper = await make_backend(expires=None)
    short, kept = new_id(), new_id()
    await backend.mark_as_done(short, "soon gone")
    await keeper.mark_as_done(kept, "kept")
    assert (await backend.get_meta(short)).status == states.SUCCESS
    await asyncio.sleep(1.3)
    assert (await backend.get_meta(short)).status == states.PENDING
    assert await backend.cleanup() >= 0
    assert (await backend.get_meta(short)).status == states.PENDING
    assert (await keeper.get_meta(kept)).result == "kept"


async def test_backend_is_lazy_and_closes_idempotently(make_backend: MakeBackend) -> None:
    backend = await make_backend()
    task_id = new_id()
    await backend.mark_as_done(task_id, 1)  # no `async with`: connects on first use
    assert "url=" in repr(backend)
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(ar.BackendError):
        await backend.get_meta(task_id)


async def test_backend_satisfies_protocols(backend: ar.BaseBackend) -> None:
    assert isinstance(backend, ar.ResultReader) and isinstance(backend, ar.ResultWriter)
