"""The rpc:// backend on a private RabbitMQ: the contract where it applies, and RPC itself.

The contract suite (``tests/backends/test_contract.py``) cannot run on RPC as
it is: its factory's backends "share one store", and RPC has none. A result is
a message to the one process that sent the task; it is received by that
backend alone (never by a second instance), and it arrives after the write
returns, not with it. So this module runs the contract's tests here, each
with a *writer* (a backend storing as a worker does, within
``writer.replying_to(reader.reply_to)``) and a *reader* (the sender, which
receives), and reads once the reply has arrived. These contract tests are
ported, checking what the original checks:

missing_result_is_pending, store_and_read_success, typed_values_round_trip,
extended_fields_round_trip, get_many_keeps_order,
started_and_custom_states_are_not_ready, success_is_never_overwritten and
success_guard_under_concurrency (the receiver keeps the first SUCCESS; a writer
cannot see what a receiver holds, so its store_result reports True for every
reply the broker took), failure_with_builtin_exception,
failure_with_unknown_exception_type, revoked_raises_task_revoked,
retry_is_not_ready, forget (drops the received record), hostile_ids_are_refused
(and ids over 255 bytes: an AMQP correlation_id), a_bad_id_fails_alone_among_concurrent_waits,
odd_ids_round_trip_or_are_refused (all of them round-trip), pickle_refused_unless_accepted,
msgpack_and_compression,
oversized_value_is_refused_and_loses_nothing, unserializable_value_is_a_clear_error,
waiter_wakes_on_store_from_another_instance, many_waiters_on_one_id,
watch_sees_every_state_until_ready, timeout_is_exact, timeout_zero_checks_once,
cancelled_and_timed_out_waits_leave_nothing, ready_result_needs_no_watch,
concurrent_rewrites_never_show_torn_records,
join_in_order_and_as_completed_in_completion_order, join_waits_then_times_out,
join_propagates_failure, expired_results_are_never_returned (the received
record expires after ``expires``), backend_is_lazy_and_closes_idempotently,
backend_satisfies_protocols.

These do not apply, because Celery's RPC backend has no groups and no chords
(a group or a chord needs a store that every worker and client reads; RPC
results reach one process only); test_groups_and_chords_are_refused_at_once
checks instead that each call is refused at once, with a clear error: group_save_restore_delete,
chord_completes_once_in_header_order, chord_counts_redelivered_parts_once,
chord_orders_by_saved_group, chord_failed_part_completes_with_failure,
chord_concurrent_parts_complete_exactly_once, chord_without_size_is_an_error.

The RabbitMQ server is started once per test session (it takes several
seconds) and shared with ``tests/interop/test_celery_rpc.py``: see
:func:`shared_rabbitmq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiormq
import anyio
import anyio.to_thread
import pytest
from aiormq import exceptions as amqp_errors
from pamqp.commands import Basic

import aioresults as ar
from aioresults import states
from aioresults.backends.amqp import RPCBackend
from aioresults.backends.amqp._connection import error_table
from aioresults.backends.amqp._messages import Outgoing
from aioresults.backends.amqp._publisher import Publisher
from tests.servers import free_port
from tests.services import RabbitMQServer
from tests.stalls import time_out

WAIT = 20.0  # a safety net on every wait: replies arrive in milliseconds
_SERVER = pytest.StashKey[RabbitMQServer]()


def shared_rabbitmq(config: pytest.Config) -> RabbitMQServer:
    """The session's private RabbitMQ, started on first use and stopped when the
    session ends, whichever test module asks first."""
    server = config.stash.get(_SERVER, None)
    if server is None:
        server = RabbitMQServer().start()
        config.stash[_SERVER] = server
        config.add_cleanup(lambda: server.__exit__(None, None, None))
    return server


@pytest.fixture(scope="session")
def rabbitmq(request: pytest.FixtureRequest) -> RabbitMQServer:
    return shared_rabbitmq(request.config)


Make = Callable[..., Awaitable[RPCBackend]]


@pytest.fixture
async def make(rabbitmq: RabbitMQServer) -> AsyncIterator[Make]:
    """Backends on the session's broker, opened, closed at teardown."""
    made: list[RPCBackend] = []

    async def create(**options: Any) -> RPCBackend:
        backend = RPCBackend(rabbitmq.url, **options)
        made.append(backend)
        return await backend.open()

    yield create
    for backend in reversed(made):
        await backend.aclose()


@pytest.fixture
async def reader(make: Make) -> RPCBackend:
    """The sender of the tasks: it receives their results."""
    return await make()


@pytest.fixture
async def writer(make: Make) -> RPCBackend:
    """A worker's backend: it publishes results (see :func:`replying`)."""
    return await make()


@contextlib.contextmanager
def replying(writer: RPCBackend, reader: RPCBackend) -> Iterator[None]:
    """Stores through ``writer`` reach ``reader``, as a worker's reach the task's sender."""
    with writer.replying_to(reader.reply_to):
        yield


async def received(reader: RPCBackend, task_id: str, status: str | None = None) -> ar.ResultMeta:
    """The record of ``task_id`` once a reply (with ``status``, if given) has arrived."""
    async for meta in ar.AsyncResult(task_id, reader).watch(timeout=WAIT):
        if meta.status != states.PENDING and status in (None, meta.status):
            return meta
    raise AssertionError(f"{task_id} became ready before {status} arrived")


async def drained(writer: RPCBackend, reader: RPCBackend) -> None:
    """Return once every reply ``writer`` published to ``reader`` so far has arrived:
    one queue, one channel, so a marker sent last arrives last."""
    marker = new_id()
    with replying(writer, reader):
        await writer.mark_as_done(marker, "marker")
    assert await ar.AsyncResult(marker, reader).get(timeout=WAIT) == "marker"


class AppError(Exception):
    """A task's own exception type, unknown to the reader's builtins."""


def new_id() -> str:
    return str(uuid.uuid4())


# ------------------------------------------------------------------ URLs and options


def test_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIORESULTS_BROKER_URL", raising=False)
    named = ar.connect("rpc://user:p%40ss@broker.internal:5673/jobs")
    assert isinstance(named, RPCBackend)
    broker = named.broker
    assert (broker.host, broker.port, broker.user, broker.password, broker.vhost) == (
        "broker.internal",
        5673,
        "user",
        "p@ss",
        "jobs",
    )
    assert "p@ss" not in repr(named) and "p%40ss" not in repr(named)
    for url in ("rpc://h//", "rpc://h/", "rpc://h", "rpc://h/%2F"):
        assert RPCBackend(url).broker.vhost == "/", url
    bare = ar.connect("rpc://", broker_url="pyamqp://guest:secret@rabbit:5672//")
    assert isinstance(bare, RPCBackend)
    assert (bare.broker.host, bare.broker.vhost, bare.broker.tls) == ("rabbit", "/", False)
    assert "secret" not in repr(bare) and "rabbit:5672" in repr(bare)
    monkeypatch.setenv("AIORESULTS_BROKER_URL", "amqps://u:p@tls-host/v")
    from_env = RPCBackend("rpc://")
    assert (from_env.broker.host, from_env.broker.port, from_env.broker.tls) == (
        "tls-host",
        5671,
        True,
    )
    with_options = RPCBackend("rpc://h/?expires=60&max_buffered=5&heartbeat=3&ssl=true")
    assert (with_options.expires, with_options.max_buffered, with_options.heartbeat) == (60, 5, 3)
    assert with_options.broker.tls and with_options.broker.port == 5671
    monkeypatch.delenv("AIORESULTS_BROKER_URL")
    with pytest.raises(ar.ConfigurationError, match="AIORESULTS_BROKER_URL"):
        ar.connect("rpc://")
    for bad in ("rpc://h/?nonsense=1", "rpc://a;rpc://b", "redis://h", "rpc://h/?max_buffered=x"):
        with pytest.raises(ar.ConfigurationError):
            RPCBackend(bad)


async def test_reply_to_needs_an_open_backend(rabbitmq: RabbitMQServer) -> None:
    backend = RPCBackend(rabbitmq.url)
    with pytest.raises(ar.BackendError, match="open"):
        backend.reply_to  # noqa: B018 - the property raises
    async with backend:
        assert uuid.UUID(backend.reply_to)
    await backend.aclose()


async def test_unreachable_broker_is_a_clear_error() -> None:
    backend = RPCBackend(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=2)
    with pytest.raises(ar.BackendUnavailable, match="cannot reach"):
        await backend.open()
    with pytest.raises(ar.BackendUnavailable):
        await backend.send_task("tasks.add", (1, 2))
    await backend.aclose()


async def test_wrong_password_is_a_clear_error(rabbitmq: RabbitMQServer) -> None:
    backend = RPCBackend(rabbitmq.url.replace("guest:guest", "guest:wrong"))
    with pytest.raises(ar.BackendError) as caught:
        await backend.open()
    assert "wrong" not in str(caught.value)
    await backend.aclose()


async def test_reply_queue_is_declared_as_documented(make: Make, rabbitmq: RabbitMQServer) -> None:
    backend = await make(expires=120)
    queue = backend.reply_to
    rows = {
        row[0]: row[1:]
        for row in rabbitmq.list_queues("name", "durable", "auto_delete", "arguments", "consumers")
    }
    assert rows[queue] == ["true", "false", '[{"x-expires",120000}]', "1"]
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        # Declared exactly so: the same declaration is accepted, an auto-delete one refused.
        await channel.queue_declare(queue, durable=True, arguments={"x-expires": 120000})
        with pytest.raises(amqp_errors.ChannelPreconditionFailed, match="auto_delete"):
            await channel.queue_declare(
                queue, durable=True, auto_delete=True, arguments={"x-expires": 120000}
            )
    await backend.aclose()
    # aclose() deletes a queue it named itself.
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        with pytest.raises(amqp_errors.ChannelNotFoundEntity):
            await channel.queue_declare(queue, passive=True)


async def test_named_reply_queue_survives_a_restart_and_has_one_consumer(
    make: Make, writer: RPCBackend
) -> None:
    name = f"aioresults-test-{new_id()}"
    first = await make(reply_queue=name)
    assert first.reply_to == name
    with pytest.raises(ar.BackendError, match="access refused"):
        await make(reply_queue=name)  # one consumer at a time: never half the replies
    await first.aclose()
    task_id = new_id()
    with writer.replying_to(name):
        assert await writer.mark_as_done(task_id, "kept while away")
    second = await make(reply_queue=name)
    assert await ar.AsyncResult(task_id, second).get(timeout=WAIT) == "kept while away"


async def test_store_needs_a_reply_to(writer: RPCBackend) -> None:
    with pytest.raises(ar.ConfigurationError, match="replying_to"):
        await writer.mark_as_done(new_id(), 1)
    with pytest.raises(ar.ConfigurationError, match="replying_to"):
        async with writer.track(new_id()):
            pass


async def test_reply_to_a_missing_queue_is_dropped(writer: RPCBackend) -> None:
    with writer.replying_to(f"no-such-queue-{new_id()}"):
        assert not await writer.mark_as_done(new_id(), 1)


async def test_send_task_refuses_what_amqp_cannot_carry(rabbitmq: RabbitMQServer) -> None:
    backend = RPCBackend(rabbitmq.url)  # refused before connecting
    for bad in (
        {"queue": "q" * 256},
        {"exchange": LONE_SURROGATE},
        {"routing_key": 42},
        {"priority": 256},
        {"headers": {"when": object()}},
    ):
        with pytest.raises(ar.ConfigurationError):
            await backend.send_task("tasks.add", **bad)
    with pytest.raises(ar.ConfigurationError):
        await backend.send_task("", (1, 2))
    with pytest.raises(ar.ConfigurationError):
        await backend.send_task("tasks.add", args=5)  # type: ignore[arg-type]
    with pytest.raises(ar.ConfigurationError), backend.replying_to("r" * 300):
        pass
    with pytest.raises(ar.BackendError, match="not open"):
        backend.reply_to  # noqa: B018 - every refusal came before connecting
    await backend.aclose()


async def test_send_task_routes_as_celery_and_refuses_the_unroutable(
    make: Make, rabbitmq: RabbitMQServer
) -> None:
    backend = await make(task_serializer="msgpack")
    queue = f"aioresults-fresh-{new_id()}"
    result = await backend.send_task("tasks.add", (1, 2), queue=queue)
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        # Declared as Celery declares a queue: a direct exchange of its name, bound.
        await channel.exchange_declare(queue, exchange_type="direct", durable=True, passive=True)
        await channel.queue_declare(queue, passive=True)
        got = await channel.basic_get(queue, no_ack=True)
        assert isinstance(got.delivery, Basic.GetOk)
        properties = got.header.properties
        assert (properties.content_type, properties.content_encoding) == (
            "application/x-msgpack",
            "binary",
        )
        assert properties.correlation_id == result.id and properties.reply_to == backend.reply_to
        # Through the exchange too, with the routing key it was bound with.
        await backend.send_task("tasks.add", (3, 4), exchange=queue, routing_key=queue)
        assert isinstance((await channel.basic_get(queue, no_ack=True)).delivery, Basic.GetOk)
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)
    with pytest.raises(ar.BackendError, match="NO_ROUTE"):
        await backend.send_task("tasks.add", exchange="amq.direct", routing_key="nobody-binds-this")
    with pytest.raises(ar.BackendError, match="no such queue or exchange"):
        await backend.send_task("tasks.add", exchange=f"missing-{new_id()}")
    # Still usable after a refused call; a queue deleted since is declared again.
    await backend.send_task("tasks.add", queue=queue)
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    await backend.send_task("tasks.add", queue=queue)
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        assert (await channel.queue_declare(queue, passive=True)).message_count == 1
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)


# ------------------------------------------------------------------ what the receiver keeps


async def test_a_buffered_result_is_returned_at_once(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_done(task_id, "early")
    await drained(writer, reader)
    assert reader.wait_stats().waiters == 0
    # Nobody waited when it arrived: it was kept, and a check (timeout=0) finds it.
    assert await ar.AsyncResult(task_id, reader).get(timeout=0) == "early"
    assert reader.buffered >= 1


async def test_replies_before_any_wait_are_kept_quietly(
    reader: RPCBackend, writer: RPCBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing has waited on this reader yet: replies are kept, and nothing fails.
    ids = [new_id() for _ in range(3)]
    with caplog.at_level(logging.DEBUG), replying(writer, reader):
        for task_id in ids:
            await writer.mark_as_done(task_id, task_id)
        with anyio.fail_after(WAIT):
            while reader.buffered < len(ids):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the replies' acknowledgements have run
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [await ar.AsyncResult(i, reader).get(timeout=0) for i in ids] == ids


async def test_buffer_bound_evicts_the_oldest(make: Make, writer: RPCBackend) -> None:
    reader = await make(max_buffered=3)
    ids = [new_id() for _ in range(5)]
    waited = asyncio.create_task(ar.AsyncResult(ids[0], reader).get(timeout=WAIT))
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 1:
            await asyncio.sleep(0.01)
    with replying(writer, reader):
        for n, task_id in enumerate(ids):
            await writer.mark_as_done(task_id, n)
    assert await waited == 0  # it was waiting when its reply arrived
    await received(reader, ids[-1])
    metas = await reader.get_many(ids)
    assert [m.status for m in metas] == [states.PENDING] * 2 + [states.SUCCESS] * 3
    assert [m.result for m in metas[2:]] == [2, 3, 4]
    assert (reader.buffered, reader.evicted) == (3, 2)


async def test_a_newer_state_makes_a_task_the_youngest(make: Make, writer: RPCBackend) -> None:
    reader = await make(max_buffered=3)
    a, b, c, d = (new_id() for _ in range(4))
    with replying(writer, reader):
        for task_id in (a, b, c):
            await writer.mark_as_started(task_id)
        await writer.update_state(a, states.PROGRESS, 1)  # a is now the youngest
        await writer.mark_as_started(d)  # evicts b, the oldest
    await received(reader, d)
    statuses = [m.status for m in await reader.get_many([a, b, c, d])]
    assert statuses == [states.PROGRESS, states.PENDING, states.STARTED, states.STARTED]
    assert reader.evicted == 1


async def test_a_task_it_did_not_send_stays_pending(
    reader: RPCBackend, writer: RPCBackend, make: Make
) -> None:
    other = await make()
    task_id = new_id()
    with writer.replying_to(other.reply_to):  # the result goes to its sender, not to us
        await writer.mark_as_done(task_id, "not ours")
    assert await ar.AsyncResult(task_id, other).get(timeout=WAIT) == "not ours"
    with pytest.raises(ar.ResultTimeout):
        await ar.AsyncResult(task_id, reader).get(timeout=0.3)
    assert (await reader.get_meta(task_id)).status == states.PENDING


async def test_aclose_fails_waiters_with_backend_closed(reader: RPCBackend) -> None:
    waits = [asyncio.create_task(ar.AsyncResult(new_id(), reader).get()) for _ in range(10)]
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 10:
            await asyncio.sleep(0.01)
    await reader.aclose()
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, ar.BackendClosed) for r in results), results
    with pytest.raises(ar.BackendClosed):
        await reader.send_task("tasks.add", (1, 2))


async def test_groups_and_chords_are_refused_at_once(rabbitmq: RabbitMQServer) -> None:
    # Not even opened: the refusal needs no broker.
    backend = RPCBackend(rabbitmq.url)
    group_id = new_id()
    with pytest.raises(ar.ConfigurationError, match="no groups"):
        await ar.GroupResult(group_id, [ar.AsyncResult(new_id(), backend)]).save()
    with pytest.raises(ar.ConfigurationError, match="no groups"):
        await ar.GroupResult.restore(group_id, backend)
    with pytest.raises(ar.ConfigurationError, match="no groups"):
        await backend.delete_group(group_id)
    with pytest.raises(ar.ChordError, match="chords"):
        await backend.set_chord_size(group_id, 2)
    with pytest.raises(ar.ChordError, match="chords"):
        await backend.chord_part_return(group_id, new_id(), states.SUCCESS, 1)
    with pytest.raises(ar.ChordError, match="chords"):
        await backend.send_task("tasks.add", (1, 2), chord={"task": "tasks.total"})
    with pytest.raises(ar.InvalidTaskId):
        await backend.chord_part_return(group_id, "a\x00b", states.SUCCESS, 1)
    with pytest.raises(ar.BackendError, match="not open"):
        backend.reply_to  # noqa: B018 - refused before connecting: still not open
    await backend.aclose()


# ------------------------------------------------------------------ reconnecting


async def test_no_result_lost_when_connections_are_killed(
    reader: RPCBackend, writer: RPCBackend, rabbitmq: RabbitMQServer
) -> None:
    ids = [new_id() for _ in range(100)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=60)) for i in ids]
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 100:
            await asyncio.sleep(0.01)
    sessions = reader.wait_stats().sessions
    published = 0
    killed = anyio.Event()

    async def publish() -> None:
        # A stream of results, as a worker publishes them: 30 before the kill, 30
        # during it, the other 40 once it is done (while the reader reconnects).
        nonlocal published
        with replying(writer, reader):
            for n, task_id in enumerate(ids):
                if n == 60:
                    await killed.wait()
                await writer.mark_as_done(task_id, n)
                published += 1
                await asyncio.sleep(0.01)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(publish)
        with anyio.fail_after(WAIT):
            while published < 30:
                await asyncio.sleep(0.005)
        # Every connection: the reader's consumer and the writer's publisher.
        await anyio.to_thread.run_sync(rabbitmq.close_all_connections)
        killed.set()
    assert published == 100  # the writer published across the kill (it reconnected)
    assert await asyncio.gather(*waits) == list(range(100))
    stats = reader.wait_stats()
    assert stats.sessions > sessions and stats.feed_failures >= 1
    assert stats.waiters == 0


async def test_replies_published_while_away_wait_in_the_queue(
    reader: RPCBackend, rabbitmq: RabbitMQServer
) -> None:
    ids = [new_id() for _ in range(20)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=60)) for i in ids]
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 20:
            await asyncio.sleep(0.01)
    sessions = reader.wait_stats().sessions
    ctl = rabbitmq.rabbitmqctl
    # No "configure" permission: the backend cannot declare its queue again, so it
    # stays away, for sure, until the permission is back.
    await anyio.to_thread.run_sync(ctl, "set_permissions", "-p", "/", "guest", "^$", ".*", ".*")
    try:
        await anyio.to_thread.run_sync(rabbitmq.close_all_connections)
        async with aiormq.connect(rabbitmq.url) as connection:  # a worker, publishing
            channel = await connection.channel()
            for n, task_id in enumerate(ids):
                body = {"status": "SUCCESS", "result": n, "traceback": None, "children": []}
                await channel.basic_publish(
                    json.dumps({**body, "date_done": None, "task_id": task_id}).encode(),
                    routing_key=reader.reply_to,
                    properties=Basic.Properties(
                        content_type="application/json",
                        content_encoding="utf-8",
                        correlation_id=task_id,
                        delivery_mode=1,
                    ),
                )
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waits)  # it really was away
        assert reader.wait_stats().sessions == sessions
    finally:
        await anyio.to_thread.run_sync(ctl, "set_permissions", "-p", "/", "guest", ".*", ".*", ".*")
    assert await asyncio.gather(*waits) == list(range(20))
    assert reader.wait_stats().sessions > sessions


# ------------------------------------------------------------------ the contract, ported


async def test_missing_result_is_pending(reader: RPCBackend) -> None:
    task_id = new_id()
    meta = await reader.get_meta(task_id)
    assert meta.status == states.PENDING
    assert meta.task_id == task_id
    assert meta.result is None and meta.date_done is None
    assert not await ar.AsyncResult(task_id, reader).ready()


async def test_store_and_read_success(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    value = {"answer": 42, "items": [1, "two", None]}
    with replying(writer, reader):
        assert await writer.mark_as_done(task_id, value)
    assert await ar.AsyncResult(task_id, reader) == value
    meta = await reader.get_meta(task_id)
    assert meta.status == states.SUCCESS and meta.result == value and meta.task_id == task_id
    assert meta.date_done is not None and meta.date_done.tzinfo is not None
    assert abs(meta.date_done - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)


async def test_typed_values_round_trip(reader: RPCBackend, writer: RPCBackend) -> None:
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
    with replying(writer, reader):
        await writer.mark_as_done(task_id, value)
    assert await ar.AsyncResult(task_id, reader).get(timeout=WAIT) == value


async def test_extended_fields_round_trip(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id, group_id, parent_id = new_id(), new_id(), new_id()
    with replying(writer, reader):
        await writer.store_result(
            task_id, 5, states.SUCCESS, group_id=group_id, parent_id=parent_id,
            name="tasks.add", args=[2, 3], kwargs={"z": 1}, worker="w1@host", retries=2,
            queue="celery",
        )  # fmt: skip
    meta = await received(reader, task_id)
    assert (meta.group_id, meta.parent_id) == (group_id, parent_id)
    assert (meta.name, meta.args, meta.kwargs) == ("tasks.add", [2, 3], {"z": 1})
    assert (meta.worker, meta.retries, meta.queue) == ("w1@host", 2, "celery")


async def test_get_many_keeps_order(reader: RPCBackend, writer: RPCBackend) -> None:
    ids = [new_id() for _ in range(5)]
    with replying(writer, reader):
        for i, task_id in enumerate(ids[::2]):
            await writer.mark_as_done(task_id, i)
    await drained(writer, reader)
    metas = await reader.get_many(ids)
    assert [m.task_id for m in metas] == ids
    assert [m.status for m in metas] == [states.SUCCESS, states.PENDING] * 2 + [states.SUCCESS]
    assert await reader.get_many([]) == []


async def test_started_and_custom_states_are_not_ready(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    task_id = new_id()
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, reader)
    with replying(writer, reader):
        await writer.mark_as_started(task_id, {"pid": 7, "hostname": "w1"})
        await received(reader, task_id, states.STARTED)
        assert await result.state() == states.STARTED
        assert (await result.meta()).result == {"pid": 7, "hostname": "w1"}
        await writer.update_state(task_id, states.PROGRESS, {"done": 3, "total": 10})
    meta = await received(reader, task_id, states.PROGRESS)
    assert (meta.status, meta.result, meta.ready) == ("PROGRESS", {"done": 3, "total": 10}, False)
    assert meta.date_done is None
    with pytest.raises(ar.ResultTimeout):
        await result.get(timeout=0)


async def test_success_is_never_overwritten(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        assert await writer.mark_as_done(task_id, "first")
        # The writer cannot see what the receiver holds: the broker took each reply.
        assert await writer.mark_as_failure(task_id, ValueError("late"))
        assert await writer.mark_as_started(task_id)
        assert await writer.mark_as_done(task_id, "second")
    await drained(writer, reader)
    meta = await reader.get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, "first")


async def test_success_guard_under_concurrency(make: Make, reader: RPCBackend) -> None:
    one, two = await make(), await make()
    task_id = new_id()

    async def write(backend: RPCBackend, i: int) -> None:
        with backend.replying_to(reader.reply_to):
            if i % 2:
                await backend.mark_as_done(task_id, i)
            else:
                await backend.update_state(task_id, states.PROGRESS, i)

    seen: list[ar.ResultMeta] = []

    async def watch() -> None:
        async for meta in ar.AsyncResult(task_id, reader).watch(timeout=WAIT):
            seen.append(meta)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        await asyncio.gather(*(write((one, two)[i % 2], i) for i in range(40)))
    await drained(one, reader)
    await drained(two, reader)
    meta = await reader.get_meta(task_id)
    assert meta.status == states.SUCCESS
    # The first SUCCESS received is kept: the one the watch saw last.
    assert seen[-1].status == states.SUCCESS and meta.result == seen[-1].result
    assert meta.result % 2 == 1


async def test_failure_with_builtin_exception(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        try:
            raise ValueError("bad", 42)
        except ValueError as exc:
            await writer.mark_as_failure(task_id, exc)
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, reader)
    with pytest.raises(ValueError) as caught:
        await result
    assert type(caught.value) is ValueError and caught.value.args == ("bad", 42)
    assert "raise ValueError" in (caught.value.remote_traceback or "")  # type: ignore[attr-defined]
    assert isinstance(await result.get(propagate=False), ValueError)
    assert await result.failed() and not await result.successful() and await result.ready()


async def test_failure_with_unknown_exception_type(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_failure(task_id, AppError("nope", {"k": 1}))
    with pytest.raises(ar.RemoteTaskError) as caught:
        await ar.AsyncResult(task_id, reader).get(timeout=WAIT)
    assert type(caught.value).__name__ == "AppError"
    assert (caught.value.remote_type, caught.value.remote_module) == ("AppError", __name__)
    assert caught.value.args == ("nope", {"k": 1}) and not isinstance(caught.value, AppError)


async def test_revoked_raises_task_revoked(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_revoked(task_id, "terminated")
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, reader)
    with pytest.raises(ar.TaskRevokedError, match="terminated"):
        await result
    assert await result.ready() and not await result.failed()


async def test_retry_is_not_ready(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_retry(task_id, ConnectionError("flaky"))
    meta = await received(reader, task_id)
    assert meta.status == states.RETRY and not meta.ready
    assert isinstance(meta.result, ConnectionError)
    with pytest.raises(ar.ResultTimeout):
        await ar.AsyncResult(task_id, reader).get(timeout=0)


async def test_forget(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_done(task_id, 1)
    result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, reader)
    assert await result.get(timeout=WAIT) == 1
    await result.forget()
    assert await result.state() == states.PENDING
    await result.forget()  # a missing result is not an error
    await reader.forget(new_id())


LONE_SURROGATE = json.loads('"\\udcff"')


@pytest.mark.parametrize(
    "bad",
    # The last: 200 characters, but 400 bytes, too long for an AMQP correlation_id.
    ["", "a\x00b", "x" * 10_000, "tab\tid", 42, LONE_SURROGATE, "ид" * 100],
)
async def test_hostile_ids_are_refused(reader: RPCBackend, writer: RPCBackend, bad: Any) -> None:
    with replying(writer, reader), pytest.raises(ar.InvalidTaskId):
        await writer.mark_as_done(bad, 1)
    with pytest.raises(ar.InvalidTaskId):
        await reader.get_meta(bad)
    with pytest.raises(ar.InvalidTaskId):
        await reader.forget(bad)
    with pytest.raises(ar.InvalidTaskId):
        await reader.save_group(bad, [[bad, None], []])
    with pytest.raises(ar.InvalidTaskId):
        await reader.chord_part_return(new_id(), bad, states.SUCCESS, 1)
    with pytest.raises(ar.InvalidTaskId):
        async with reader.waiter([bad]):
            pass
    with pytest.raises(ar.InvalidTaskId):
        await reader.send_task("tasks.add", task_id=bad)


async def test_a_bad_id_fails_alone_among_concurrent_waits(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    ids = [new_id() for _ in range(50)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=WAIT)) for i in ids]
    bad = asyncio.create_task(ar.AsyncResult(LONE_SURROGATE, reader).get(timeout=WAIT))
    with pytest.raises(ar.InvalidTaskId):
        await bad
    with replying(writer, reader):
        for task_id in ids:
            await writer.mark_as_done(task_id, task_id)
    assert await asyncio.gather(*waits) == ids


@pytest.mark.parametrize("odd", ["../x", "a/b", "..", "sp ace", "ünïcode-ид"])
async def test_odd_ids_round_trip(reader: RPCBackend, writer: RPCBackend, odd: str) -> None:
    with replying(writer, reader):
        await writer.mark_as_done(odd, "value")
    assert await ar.AsyncResult(odd, reader).get(timeout=WAIT) == "value"
    await reader.forget(odd)
    assert (await reader.get_meta(odd)).status == states.PENDING


async def test_pickle_refused_unless_accepted(make: Make, reader: RPCBackend) -> None:
    writer = await make(serializer="pickle", accept=["json", "pickle"])
    trusting = await make(accept=["json", "pickle"])
    refused, accepted = new_id(), new_id()
    with writer.replying_to(reader.reply_to):
        await writer.mark_as_done(refused, {"x": 1})
    with writer.replying_to(trusting.reply_to):
        await writer.mark_as_done(accepted, {"x": 1})
    assert await ar.AsyncResult(accepted, trusting).get(timeout=WAIT) == {"x": 1}
    with pytest.raises(ar.ContentDisallowed):
        await ar.AsyncResult(refused, reader).get(timeout=WAIT)
    with pytest.raises(ar.ContentDisallowed, match="pickle"):
        await reader.get_meta(refused)


async def test_msgpack_and_compression(make: Make) -> None:
    packed = await make(serializer="msgpack", accept=["msgpack", "json"])
    zipped = await make(compression="zlib", accept=["json", "msgpack"])
    a, b = new_id(), new_id()
    with packed.replying_to(zipped.reply_to):
        await packed.mark_as_done(a, {"n": [1, 2, 3], "b": b"\x00\x01"})
    with zipped.replying_to(packed.reply_to):
        await zipped.mark_as_done(b, "x" * 10_000)
    assert await ar.AsyncResult(a, zipped).get(timeout=WAIT) == {"n": [1, 2, 3], "b": b"\x00\x01"}
    assert await ar.AsyncResult(b, packed).get(timeout=WAIT) == "x" * 10_000


async def test_oversized_value_is_refused_and_loses_nothing(make: Make, reader: RPCBackend) -> None:
    writer = await make(max_value_size=10_000)
    task_id, other = new_id(), new_id()
    with writer.replying_to(reader.reply_to):
        await writer.mark_as_done(task_id, "small")
        with pytest.raises(ar.ResultTooLarge):
            await writer.store_result(task_id, "x" * 20_000, states.PROGRESS)
        await writer.mark_as_started(other)
        with pytest.raises(ar.ResultTooLarge):
            await writer.mark_as_done(other, "x" * 20_000)
    await drained(writer, reader)
    assert (await reader.get_meta(task_id)).result == "small"
    assert (await reader.get_meta(other)).status == states.STARTED


async def test_unserializable_value_is_a_clear_error(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    task_id = new_id()
    with replying(writer, reader), pytest.raises(ar.SerializationError, match="set"):
        await writer.mark_as_done(task_id, {1, 2})
    await drained(writer, reader)
    assert (await reader.get_meta(task_id)).status == states.PENDING


async def test_waiter_wakes_on_store_from_another_instance(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    task_id = new_id()

    async def store_later() -> None:
        await asyncio.sleep(0.1)
        with replying(writer, reader):
            await writer.mark_as_done(task_id, "woken")

    task = asyncio.create_task(store_later())
    assert await ar.AsyncResult(task_id, reader).get(timeout=WAIT) == "woken"
    await task


async def test_many_waiters_on_one_id(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    waits = [
        asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=WAIT)) for _ in range(100)
    ]
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 100:
            await asyncio.sleep(0.01)
    assert list(reader.wait_stats().watched_ids) == [task_id]
    with replying(writer, reader):
        await writer.mark_as_done(task_id, "all")
    assert await asyncio.gather(*waits) == ["all"] * 100
    assert reader.wait_stats().waiters == 0


async def test_watch_sees_every_state_until_ready(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    seen: list[tuple[str, Any]] = []
    step = asyncio.Event()

    async def consume() -> None:
        async for meta in ar.AsyncResult(task_id, reader).watch(timeout=WAIT):
            seen.append((meta.status, meta.result))
            step.set()

    consumer = asyncio.create_task(consume())
    sequence = [
        (states.STARTED, None),
        (states.PROGRESS, {"done": 1}),
        (states.PROGRESS, {"done": 2}),
        (states.SUCCESS, "done"),
    ]
    await asyncio.wait_for(step.wait(), WAIT)  # the initial PENDING
    with replying(writer, reader):
        for state, value in sequence:
            step.clear()
            await writer.store_result(task_id, value, state)
            await asyncio.wait_for(step.wait(), WAIT)
    await asyncio.wait_for(consumer, WAIT)
    assert seen == [(states.PENDING, None), *sequence]


async def test_timeout_is_exact(reader: RPCBackend) -> None:
    result: ar.AsyncResult[Any] = ar.AsyncResult(new_id(), reader)
    elapsed, stall = await time_out(result, 0.1)
    assert 0.1 <= elapsed < 0.5 + stall  # late by no more than the loop was held up


async def test_timeout_zero_checks_once(reader: RPCBackend, writer: RPCBackend) -> None:
    ready, pending = new_id(), new_id()
    with replying(writer, reader):
        await writer.mark_as_done(ready, "now")
    await drained(writer, reader)
    assert await ar.AsyncResult(ready, reader).get(timeout=0) == "now"
    with pytest.raises(ar.ResultTimeout):
        await ar.AsyncResult(pending, reader).get(timeout=0)
    assert reader.wait_stats().waiters == 0


async def test_cancelled_and_timed_out_waits_leave_nothing(reader: RPCBackend) -> None:
    ids = [new_id() for _ in range(500)]
    cancelled = [asyncio.create_task(ar.AsyncResult(i, reader).get()) for i in ids]
    timed_out = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=1)) for i in ids]
    with anyio.fail_after(WAIT):
        while reader.wait_stats().waiters < 1000:
            await asyncio.sleep(0.01)
    for task in cancelled:
        task.cancel()
    results = await asyncio.gather(*cancelled, *timed_out, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:500])
    assert all(isinstance(r, ar.ResultTimeout) for r in results[500:])
    assert reader.wait_stats().waiters == 0
    assert list(reader.wait_stats().watched_ids) == []


async def test_ready_result_needs_no_watch(reader: RPCBackend, writer: RPCBackend) -> None:
    task_id = new_id()
    with replying(writer, reader):
        await writer.mark_as_done(task_id, 1)
    await drained(writer, reader)
    assert await ar.AsyncResult(task_id, reader).get(timeout=WAIT) == 1
    assert list(reader.wait_stats().watched_ids) == []


async def test_concurrent_rewrites_never_show_torn_records(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    task_id = new_id()
    values = {i: f"value-{i}-" + "x" * 2000 for i in range(200)}
    stop = False
    reads: list[ar.ResultMeta] = []

    async def read_loop() -> None:
        while not stop:
            reads.append(await reader.get_meta(task_id))
            await asyncio.sleep(0)

    readers = [asyncio.create_task(read_loop()) for _ in range(4)]
    with replying(writer, reader):
        await asyncio.gather(
            *(writer.update_state(task_id, states.PROGRESS, v) for v in values.values())
        )
    await drained(writer, reader)
    stop = True
    await asyncio.gather(*readers)
    assert reads
    for meta in reads:
        assert meta.status in (states.PENDING, states.PROGRESS)
        if meta.status == states.PROGRESS:
            assert meta.result in values.values()
    assert (await reader.get_meta(task_id)).result in values.values()


async def test_join_in_order_and_as_completed_in_completion_order(
    reader: RPCBackend, writer: RPCBackend
) -> None:
    ids = [new_id() for _ in range(4)]
    group: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, reader) for i in ids])
    order = [2, 0, 3, 1]
    completed: list[str] = []
    next_one = asyncio.Event()

    async def consume() -> None:
        async for result in group.as_completed(timeout=WAIT):
            completed.append(result.id)
            assert await result == ids.index(result.id)
            next_one.set()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    with replying(writer, reader):
        for i in order:
            next_one.clear()
            await writer.mark_as_done(ids[i], i)
            await asyncio.wait_for(next_one.wait(), WAIT)
    await consumer
    assert completed == [ids[i] for i in order]
    fresh: ar.ResultSet[Any] = ar.ResultSet([ar.AsyncResult(i, reader) for i in ids])
    assert await fresh.join(timeout=WAIT) == [0, 1, 2, 3]
    assert await fresh.completed_count() == 4
    assert await fresh.ready() and await fresh.successful() and not await fresh.failed()


async def test_join_waits_then_times_out(reader: RPCBackend, writer: RPCBackend) -> None:
    done, missing = new_id(), new_id()
    with replying(writer, reader):
        await writer.mark_as_done(done, "ok")
    await drained(writer, reader)
    group: ar.ResultSet[Any] = ar.ResultSet(
        [ar.AsyncResult(done, reader), ar.AsyncResult(missing, reader)]
    )
    with pytest.raises(ar.ResultTimeout) as caught:
        await group.join(timeout=0.2)
    assert caught.value.task_ids == (missing,)
    assert await group.completed_count() == 1
    assert await group.waiting()


async def test_join_propagates_failure(reader: RPCBackend, writer: RPCBackend) -> None:
    ok, bad, slow = new_id(), new_id(), new_id()
    with replying(writer, reader):
        await writer.mark_as_done(ok, 1)
        await writer.mark_as_failure(bad, KeyError("missing"))
    results = [ar.AsyncResult(i, reader) for i in (ok, bad, slow)]
    with pytest.raises(KeyError):
        await ar.ResultSet(results).join(timeout=WAIT)
    with replying(writer, reader):
        await writer.mark_as_done(slow, 3)
    values = await ar.ResultSet(results).join(timeout=WAIT, propagate=False)
    assert values[0] == 1 and isinstance(values[1], KeyError) and values[2] == 3
    assert await ar.ResultSet(results).failed()


async def test_expired_results_are_never_returned(make: Make, writer: RPCBackend) -> None:
    short_lived = await make(expires=1)
    keeper = await make(expires=None)
    short, kept = new_id(), new_id()
    with writer.replying_to(short_lived.reply_to):
        await writer.mark_as_done(short, "soon gone")
    with writer.replying_to(keeper.reply_to):
        await writer.mark_as_done(kept, "kept")
    assert (await received(short_lived, short)).status == states.SUCCESS
    assert (await received(keeper, kept)).result == "kept"
    await asyncio.sleep(1.3)
    assert (await short_lived.get_meta(short)).status == states.PENDING
    assert await short_lived.cleanup() >= 0
    assert (await short_lived.get_meta(short)).status == states.PENDING
    assert (await keeper.get_meta(kept)).result == "kept"


async def test_backend_is_lazy_and_closes_idempotently(
    rabbitmq: RabbitMQServer, reader: RPCBackend
) -> None:
    backend = RPCBackend(rabbitmq.url)
    task_id = new_id()
    with backend.replying_to(reader.reply_to):
        await backend.mark_as_done(task_id, 1)  # no `async with`: connects on first use
    assert await ar.AsyncResult(task_id, reader).get(timeout=WAIT) == 1
    assert "url=" in repr(backend)
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(ar.BackendError):
        await backend.get_meta(task_id)


async def test_backend_satisfies_protocols(reader: RPCBackend) -> None:
    assert isinstance(reader, ar.ResultReader) and isinstance(reader, ar.ResultWriter)


# ------------------------------------------------------------------ the raw wire


async def test_reply_is_celerys_format(rabbitmq: RabbitMQServer, writer: RPCBackend) -> None:
    """What a Celery worker's RPC backend publishes: checked by a raw consumer."""
    queue = f"aioresults-raw-{new_id()}"
    async with aiormq.connect(rabbitmq.url) as connection:
        channel = await connection.channel()
        await channel.queue_declare(queue, exclusive=True)
        with writer.replying_to(queue, "corr-1"):
            await writer.store_result("t-1", {"v": 1}, states.SUCCESS, name="tasks.x")
        got = await channel.basic_get(queue, no_ack=True)
    assert isinstance(got.delivery, Basic.GetOk)
    assert (got.delivery.exchange, got.delivery.routing_key) == ("", queue)
    properties = got.header.properties
    assert (properties.content_type, properties.content_encoding) == ("application/json", "utf-8")
    assert (properties.correlation_id, properties.delivery_mode, properties.priority) == (
        "corr-1",
        1,
        0,
    )
    assert properties.headers == {}
    body = json.loads(got.body)
    assert list(body)[:5] == ["status", "result", "traceback", "children", "date_done"]
    assert (body["status"], body["result"], body["task_id"], body["name"]) == (
        "SUCCESS",
        {"v": 1},
        "t-1",
        "tasks.x",
    )


@pytest.fixture(scope="module")
def own_rabbitmq() -> Iterator[RabbitMQServer]:
    """A broker of this module's own, to freeze."""
    with RabbitMQServer() as server:
        yield server


async def test_a_frozen_broker_is_unavailable_not_a_hang(own_rabbitmq: RabbitMQServer) -> None:
    # The broker stops answering (SIGSTOP): the kernel still takes connections.
    own_rabbitmq.start()
    options: dict[str, Any] = {"command_timeout": 0.5, "connect_timeout": 0.5}
    async with RPCBackend(own_rabbitmq.url, publish_retries=1, **options) as backend:
        with backend.replying_to(backend.reply_to):
            assert await backend.mark_as_done(new_id(), "before")
        own_rabbitmq.freeze()
        try:
            with anyio.fail_after(60):  # a hang fails here
                with backend.replying_to(backend.reply_to):
                    with pytest.raises(ar.BackendUnavailable, match="publishing"):
                        await backend.mark_as_done(new_id(), "while frozen")
                with pytest.raises(ar.BackendUnavailable, match="publishing"):
                    await backend.send_task("tasks.add", args=(1, 2))
        finally:
            own_rabbitmq.thaw()
        task_id = new_id()
        with backend.replying_to(backend.reply_to), anyio.fail_after(60):
            while True:  # a new connection once the broker answers again
                try:
                    assert await backend.mark_as_done(task_id, "after")
                    break
                except ar.BackendUnavailable:
                    await asyncio.sleep(0.1)
        assert await ar.AsyncResult(task_id, backend).get(timeout=WAIT) == "after"


async def test_a_slow_confirmation_is_not_published_again_nor_closes_the_connection() -> None:
    # The publisher's policy alone, on a stand-in connection: a healthy broker
    # that confirms a burst in order, 2 ms apart, past the publish timeout for
    # most of it. Each message must reach it once, on one connection; those
    # confirmed late fail with BackendUnavailable (they may still arrive).
    published: list[int] = []
    connections: list[object] = []

    class Channel:
        is_closed = False

        async def basic_publish(self, body: bytes, **_: Any) -> None:
            published.append(1)
            confirmed = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(
                0.002 * len(published), lambda: confirmed.done() or confirmed.set_result(None)
            )
            await confirmed

    class Connection:
        is_closed = False

        async def channel(self, publisher_confirms: bool = True) -> Channel:
            return Channel()

        async def close(self) -> None:
            self.is_closed = True

    async def connect() -> Any:
        connections.append(Connection())
        return connections[-1]

    async def declare_own(channel: Any) -> None:
        pass

    publisher = Publisher(connect, declare_own, error_table(lambda: "broker"), 3, timeout=0.1)
    message = Outgoing(body=b"{}", properties={})
    outcomes = await asyncio.gather(
        *(publisher.publish(message, exchange="", routing_key="q") for _ in range(200)),
        return_exceptions=True,
    )
    assert len(published) == 200 and len(connections) == 1
    late = [o for o in outcomes if o is not None]
    assert late and all(isinstance(o, ar.BackendUnavailable) for o in late)
    assert "may still arrive" in str(late[0])
