"""What is specific to the Redis backend: Celery's wire format, TTLs, the Lua guard,
one pub/sub connection, batching, URLs, chords and long waits."""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import celery
import celery.result
import pytest
import redis.asyncio as aioredis

import aioresults as ar
from aioresults import states
from aioresults.backends._chords import PartCount
from aioresults.backends.redis import RedisBackend, parse_url
from tests.conftest import BackendFactory
from tests.faultproxy import FaultProxy
from tests.servers import RedisSentinel, RedisServer


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at what the backend did."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make(make_redis_backend: BackendFactory) -> BackendFactory:
    return make_redis_backend


async def backend_of(make: BackendFactory, **options: Any) -> RedisBackend:
    backend = await make(**options)
    assert isinstance(backend, RedisBackend)
    return backend


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait until ``condition()`` is true (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


async def calls(raw: aioredis.Redis, command: str) -> int:
    """How many times the server has run ``command`` (INFO commandstats)."""
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def subscribed(raw: aioredis.Redis, *task_ids: str) -> bool:
    """Whether every id's channel has a subscriber."""
    counts = await raw.pubsub_numsub(*(f"celery-task-meta-{i}" for i in task_ids))
    return all(count for _, count in counts)


# ------------------------------------------------------------------ Celery's format


@pytest.fixture
def celery_app(redis_server: RedisServer) -> Iterator[celery.Celery]:
    app = celery.Celery("aioresults-tests", backend=redis_server.url)
    # One backend for every thread: Celery's per-thread backends would outlive
    # this fixture and try to unsubscribe from a stopped server when collected.
    app.conf.result_backend_thread_safe = True
    yield app
    app.backend.result_consumer.stop()
    app.backend.result_consumer.subscribed_to.clear()
    app.backend.client.close()
    app.close()


async def test_record_bytes_match_celerys(
    make: BackendFactory, raw: aioredis.Redis, celery_app: celery.Celery
) -> None:
    backend = await backend_of(make)
    ours, theirs = new_id(), new_id()
    await backend.mark_as_started(ours, {"pid": 1, "hostname": "w1"})
    await asyncio.to_thread(
        celery_app.backend.store_result, theirs, {"pid": 1, "hostname": "w1"}, states.STARTED
    )
    ours_raw = await raw.get(f"celery-task-meta-{ours}")
    theirs_raw = await raw.get(f"celery-task-meta-{theirs}")
    assert ours_raw is not None and theirs_raw is not None
    assert ours_raw.replace(ours.encode(), b"<id>") == theirs_raw.replace(theirs.encode(), b"<id>")


async def test_write_publishes_the_record_on_the_key_channel(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    backend = await backend_of(make)
    task_id = new_id()
    key = f"celery-task-meta-{task_id}"
    async with raw.pubsub() as pubsub:
        await pubsub.subscribe(key)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        await backend.mark_as_done(task_id, {"x": 1})
        message = await pubsub.get_message(timeout=5)
    assert message is not None and message["channel"] == key.encode()
    assert message["data"] == await raw.get(key)


async def test_celery_writes_and_aioresults_waits(
    make: BackendFactory, celery_app: celery.Celery
) -> None:
    backend = await backend_of(make)
    done, failed = new_id(), new_id()
    waits = [
        asyncio.create_task(ar.AsyncResult(done, backend).get(timeout=5)),
        asyncio.create_task(ar.AsyncResult(failed, backend).get(timeout=5)),
    ]

    async def watched() -> bool:
        return set(list(backend.wait_stats().watched_ids)) == {done, failed}

    await until(watched)
    await asyncio.to_thread(celery_app.backend.store_result, done, [1, "two"], states.SUCCESS)
    await asyncio.to_thread(
        celery_app.backend.mark_as_failure, failed, KeyError("missing"), traceback="tb"
    )
    assert await waits[0] == [1, "two"]
    with pytest.raises(KeyError, match="missing"):
        await waits[1]


async def test_aioresults_writes_and_celery_waits(
    make: BackendFactory, raw: aioredis.Redis, celery_app: celery.Celery
) -> None:
    backend = await backend_of(make)
    task_id = new_id()
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(celery.result.AsyncResult(task_id, app=celery_app).get(timeout=5))
    )
    thread.start()
    # Store only once Celery listens, so the value reaches it through pub/sub.
    await until(lambda: subscribed(raw, task_id))
    await backend.mark_as_done(task_id, {"answer": 42})
    await asyncio.to_thread(thread.join, 10)
    assert got == [{"answer": 42}]


async def test_celery_saved_group_restores(make: BackendFactory, celery_app: celery.Celery) -> None:
    backend = await backend_of(make)
    group_id, members = new_id(), [new_id(), new_id()]
    group = celery.result.GroupResult(
        group_id, [celery.result.AsyncResult(m, app=celery_app) for m in members], app=celery_app
    )
    await asyncio.to_thread(group.save)
    restored = await ar.GroupResult.restore(group_id, backend)
    assert restored is not None and [r.id for r in restored] == members


# ------------------------------------------------------------------ writes


async def test_ttl_is_set_with_the_value(make: BackendFactory, raw: aioredis.Redis) -> None:
    daily, forever, short = (
        await backend_of(make),
        await backend_of(make, expires=None),
        await backend_of(make, expires=0.5),
    )
    a, b, c = new_id(), new_id(), new_id()
    await daily.mark_as_done(a, 1)
    await forever.mark_as_done(b, 1)
    await short.mark_as_started(c)
    assert 86_000_000 < await raw.pttl(f"celery-task-meta-{a}") <= 86_400_000
    assert await raw.pttl(f"celery-task-meta-{b}") == -1
    assert 0 < await raw.pttl(f"celery-task-meta-{c}") <= 500
    group_id = new_id()
    await daily.save_group(group_id, [[group_id, None], []])
    assert await raw.pttl(f"celery-taskset-meta-{group_id}") > 86_000_000


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"serializer": "msgpack", "accept": ["msgpack"]},
        {"compression": "zlib"},
        {"serializer": "pickle", "accept": ["pickle"]},
    ],
    ids=["json", "msgpack", "zlib", "pickle"],
)
async def test_success_is_guarded_for_every_payload_kind(
    make: BackendFactory, options: dict[str, Any]
) -> None:
    backend = await backend_of(make, **options)
    task_id = new_id()
    outcomes = await asyncio.gather(*(backend.mark_as_done(task_id, i) for i in range(20)))
    assert outcomes.count(True) == 1
    assert (await backend.get_meta(task_id)).result == outcomes.index(True)
    assert not await backend.mark_as_failure(task_id, ValueError("late"))
    assert not await backend.store_result(task_id, None, states.STARTED)
    assert (await backend.get_meta(task_id)).status == states.SUCCESS


async def test_a_success_lookalike_is_not_a_success(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    backend = await backend_of(make)
    task_id = new_id()
    await backend.update_state(task_id, "PROGRESS", {"note": "SUCCESS soon"})
    assert await backend.mark_as_done(task_id, 1)
    # A record Lua cannot parse is judged in Python: unreadable is not SUCCESS.
    await raw.set(f"celery-task-meta-{task_id}", b'{"status": "SUCCESS", broken')
    assert await backend.mark_as_done(task_id, 2)
    assert (await backend.get_meta(task_id)).result == 2


# ------------------------------------------------------------------ waits


async def test_one_pubsub_connection_and_one_subscribe_for_1000_waiters(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    warm = new_id()
    first = asyncio.create_task(ar.AsyncResult(warm, reader).get(timeout=10))

    async def warmed_up() -> bool:
        stats = reader.wait_stats()
        return list(stats.watched_ids) == [warm] and stats.sessions > 0

    await until(warmed_up)
    subscribes, mgets = await calls(raw, "subscribe"), await calls(raw, "mget")
    ids = [new_id() for _ in range(1000)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=10)) for i in ids]
    await until(lambda: subscribed(raw, *ids))
    assert await calls(raw, "subscribe") - subscribes == 1
    # Every waiter registers, then one batched read serves all 1,000.
    assert await calls(raw, "mget") - mgets == 1
    assert len(await raw.client_list(_type="pubsub")) == 1
    assert len(await raw.client_list()) <= 6
    for i, task_id in enumerate([warm, *ids]):
        await writer.mark_as_done(task_id, i)
    assert await asyncio.gather(first, *waits) == list(range(1001))
    assert reader.wait_stats().waiters == 0


async def test_a_wait_longer_than_the_socket_timeout(make: BackendFactory) -> None:
    backend = await backend_of(make)
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=15))
    await asyncio.sleep(6.5)  # redis-py's default socket timeout is 5 s
    assert not waiting.done()
    await backend.mark_as_done(task_id, "late")
    assert await waiting == "late"


async def test_joining_10000_finished_results_is_one_batched_read(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    backend = await backend_of(make)
    ids = [new_id() for _ in range(10_000)]
    async with raw.pipeline(transaction=False) as pipe:
        for i, task_id in enumerate(ids):
            pipe.set(
                backend.task_key(task_id),
                backend.encode_meta(ar.ResultMeta(task_id, states.SUCCESS, result=i)),
            )
        await pipe.execute()
    mgets, subscribes = await calls(raw, "mget"), await calls(raw, "subscribe")
    results: ar.ResultSet[int] = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])
    assert await results.join(timeout=30) == list(range(10_000))
    assert await calls(raw, "mget") - mgets == 10  # 1,000 keys per MGET, pipelined
    assert await calls(raw, "subscribe") == subscribes


async def test_redis_socket_url_and_injected_client(redis_server: RedisServer) -> None:
    async with ar.connect(redis_server.socket_url) as over_socket:
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, over_socket).get(timeout=5))
        await asyncio.sleep(0.05)
        client = aioredis.Redis.from_url(redis_server.url)
        async with RedisBackend(client=client) as injected:
            await injected.mark_as_done(task_id, "via tcp")
        assert await waiting == "via tcp"
        assert await client.ping()  # not closed: the caller owns it
        await client.aclose()


async def test_sentinel_url_finds_the_master() -> None:
    with RedisSentinel("results") as sentinel:
        async with ar.connect(sentinel.url, master_name="results") as backend:
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=5))
            await asyncio.sleep(0.05)
            await backend.mark_as_done(task_id, 7)
            assert await waiting == 7
        assert sentinel.master.command("EXISTS", f"celery-task-meta-{task_id}") == b":1\r\n"


async def test_unreachable_server_is_backend_unavailable() -> None:
    from tests.servers import free_port

    async with RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", retries=1) as backend:
        with pytest.raises(ar.BackendUnavailable) as caught:
            await backend.get_meta(new_id())
        assert type(caught.value.__cause__).__module__.startswith("redis")
        with pytest.raises(ar.BackendUnavailable):
            await backend.mark_as_done(new_id(), 1)


# ------------------------------------------------------------------ chords


async def test_chord_keys_share_a_slot_and_expire(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    backend = await backend_of(make, chord_expires=60)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    progress = await backend.chord_part_return(group_id, new_id(), states.SUCCESS, 1)
    assert progress.count == 1
    keys = sorted(k.decode() for k in await raw.keys(f"*{group_id}*"))
    assert keys == [f"celery-taskset-meta-{{{group_id}}}.{s}" for s in "nprs"]
    for key in keys:
        assert 0 < await raw.pttl(key) <= 60_000


async def test_chord_without_expiry_never_expires_its_keys(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    backend = await backend_of(make, expires=0)
    group_id = new_id()
    await backend.set_chord_size(group_id, 1)
    assert (await backend.chord_part_return(group_id, new_id(), states.SUCCESS, 1)).complete
    keys = await raw.keys(f"*{group_id}*")
    assert len(keys) == 4
    for key in keys:
        assert await raw.pttl(key) == -1


async def test_chord_count_is_idempotent_for_a_retried_call(make: BackendFactory) -> None:
    backend = await backend_of(make)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    # A client retry resends the same call (same receipt): it gets its count back, as its own.
    assert await backend._chord_count(group_id, "a", b"part-a", "call-1") == PartCount(1, 2, True)
    assert await backend._chord_count(group_id, "a", b"part-a", "call-1") == PartCount(1, 2, True)
    # A redelivery is another call, even with the same payload: a duplicate, not its own.
    assert await backend._chord_count(group_id, "a", b"part-a", "call-2") == PartCount(1, 2, False)
    assert await backend._chord_count(group_id, "a", b"part-a", "call-3") == PartCount(1, 2, False)
    assert await backend._chord_count(group_id, "b", b"part-b", "call-4") == PartCount(2, 2, True)
    assert await backend._chord_count(new_id(), "a", b"x", "call-5") is None


# ------------------------------------------------------------------ URLs and repr


def test_parse_redis_urls() -> None:
    assert parse_url("redis://:s3cret@cache:6380/2") == {
        "password": "s3cret", "db": 2, "host": "cache", "port": 6380,
    }  # fmt: skip
    assert parse_url("redis://")["host"] == "localhost"
    assert parse_url("redis://h?virtual_host=3&socket_timeout=2.5") == {
        "db": 3, "socket_timeout": 2.5, "host": "h", "port": 6379,
    }  # fmt: skip
    socket_url = parse_url("redis+socket:///run/redis.sock?virtual_host=1")
    assert socket_url["path"] == "/run/redis.sock" and socket_url["db"] == 1
    assert socket_url["connection_class"] is aioredis.UnixDomainSocketConnection


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("required", ssl.CERT_REQUIRED),
        ("CERT_OPTIONAL", ssl.CERT_OPTIONAL),
        ("none", ssl.CERT_NONE),
        ("CERT_NONE", ssl.CERT_NONE),
    ],
)
def test_parse_rediss_urls(value: str, expected: ssl.VerifyMode) -> None:
    settings = parse_url(
        f"rediss://u:p@h:6390/0?ssl_cert_reqs={value}&ssl_ca_certs=%2Fca.pem"
        "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    )
    assert settings["ssl_cert_reqs"] == expected
    assert settings["connection_class"] is aioredis.SSLConnection
    assert (settings["ssl_ca_certs"], settings["ssl_certfile"]) == ("/ca.pem", "/c.pem")
    assert settings["ssl_keyfile"] == "/k.pem" and settings["username"] == "u"
    assert parse_url("rediss://h")["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_parse_sentinel_urls() -> None:
    settings = parse_url("sentinel://:pw@s1:26379;sentinel://s2/1?master_name=main;sentinel://s3:1")
    assert settings["sentinels"] == [("s1", 26379), ("s2", 26379), ("s3", 1)]
    assert (settings["password"], settings["db"], settings["master_name"]) == ("pw", 1, "main")
    backend = RedisBackend.from_url("sentinel://s1;sentinel://s2", master_name="m")
    assert backend.master_name == "m"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h/notanumber",
        "redis://h:port/0",
        "redis://h/0?ssl_cert_reqs=required",
        "rediss://h/0?ssl_cert_reqs=sometimes",
        "redis://h/0?unknown=1",
        "redis+socket://",
        "sentinel://s1:26379",
        "sentinel://s1;redis://s2",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ar.ConfigurationError):
        ar.connect(url)


def test_credentials_never_show_in_repr() -> None:
    for url in (
        "redis://user:hunter2@h:6379/0",
        "rediss://:hunter2@h/0?ssl_cert_reqs=none",
        "sentinel://:hunter2@s1:26379;sentinel://:hunter2@s2:26379?master_name=m",
    ):
        backend = ar.connect(url)
        assert "hunter2" not in repr(backend)
        assert "***" in repr(backend)


async def test_a_waiter_arriving_as_another_leaves_keeps_the_subscription(
    make: BackendFactory, raw: aioredis.Redis
) -> None:
    writer, reader = await backend_of(make), await backend_of(make)
    task_id = new_id()
    async with reader.waiter([task_id]) as first:
        assert (await first.next()).meta() == ar.ResultMeta.pending(task_id)
    # The first watch's end is queued; this waiter arrives before it is sent.
    async with reader.waiter([task_id]) as second:
        assert (await second.next()).meta() == ar.ResultMeta.pending(task_id)
        await until(lambda: subscribed(raw, task_id))
        await writer.mark_as_done(task_id, "kept")
        item = (await second.next()).meta()
        assert item.result == "kept"
    await until(lambda: no_channels(raw))


async def no_channels(raw: aioredis.Redis) -> bool:
    return await raw.pubsub_channels("celery-task-meta-*") == []


# ------------------------------------------------------------------ guarantees of the store


@pytest.mark.parametrize("lost", ["outcome", "one-reply", "every-reply"])
async def test_the_completing_part_redelivered_after_a_lost_reply_completes_again(
    make: BackendFactory, redis_server: RedisServer, raw: aioredis.Redis, lost: str
) -> None:
    async with (
        FaultProxy(("127.0.0.1", redis_server.port), framing="raw") as proxy,
        # The first worker reaches Redis through a proxy that can lose replies.
        RedisBackend(f"redis://127.0.0.1:{proxy.port}/0", retries=1) as first,
    ):
        second = await backend_of(make)
        group_id, ids = new_id(), [new_id() for _ in range(5)]
        await first.set_chord_size(group_id, 5)
        for index, task_id in enumerate(ids[:4]):
            progress = await first.chord_part_return(
                group_id, task_id, states.SUCCESS, index, index=index
            )
            assert (progress.counted, progress.count, progress.complete) == (
                True,
                index + 1,
                False,
            )
        if lost == "outcome":
            # The last part is counted, and its worker dies before acting on the outcome.
            done = await first.chord_part_return(group_id, ids[4], states.SUCCESS, 4, index=4)
            assert (done.complete, done.counted, done.count) == (True, True, 5)
        elif lost == "one-reply":
            # The count's reply is lost; the client's retry of that very call (same
            # receipt) is recognised: counted by this call, and complete.
            counting = proxy.drop_reply(
                lambda chunk: b"EVALSHA" in chunk and ids[4].encode() in chunk
            )
            done = await first.chord_part_return(group_id, ids[4], states.SUCCESS, 4, index=4)
            assert (done.complete, done.counted, done.count) == (True, True, 5)
            assert counting.hits == 1
        else:
            # The last part's count runs on the server, and so does the client's retry
            # of that call, but both replies are lost: the retries run out.
            counting = proxy.drop_reply(
                lambda chunk: b"EVALSHA" in chunk and ids[4].encode() in chunk, times=None
            )
            with pytest.raises(ar.BackendUnavailable):
                await first.chord_part_return(group_id, ids[4], states.SUCCESS, 4, index=4)
            assert counting.hits == 2
        # The broker redelivers it: another call with a fresh receipt, on another worker.
        # It must report the chord complete again, or the chord's body never runs.
        redeliveries = await asyncio.gather(
            *(
                second.chord_part_return(group_id, ids[4], states.SUCCESS, 4, index=4)
                for _ in range(3)
            )
        )
    for again in redeliveries:
        assert (again.complete, again.counted) == (True, False)
        assert (again.count, again.size, again.results) == (5, 5, [0, 1, 2, 3, 4])
    # Every other part redelivered keeps its own count and never completes the chord.
    for index, task_id in enumerate(ids[:4]):
        again = await second.chord_part_return(
            group_id, task_id, states.SUCCESS, index, index=index
        )
        assert (again.complete, again.counted, again.count) == (False, False, index + 1)
    # A part beyond the size is not counted: the count never passes the size.
    late = await second.chord_part_return(group_id, new_id(), states.SUCCESS, 5)
    assert (late.complete, late.counted, late.count) == (False, False, None)
    chord = f"celery-taskset-meta-{{{group_id}}}"
    assert int(await raw.get(f"{chord}.n")) == 5
    assert await raw.hlen(f"{chord}.p") == 5


@pytest.mark.parametrize("options", [{}, {"compression": "zlib"}], ids=["lua", "watch-multi"])
async def test_a_retried_guarded_write_that_finds_its_own_payload_is_stored(
    make: BackendFactory, raw: aioredis.Redis, options: dict[str, Any]
) -> None:
    backend = await backend_of(make, **options)
    task_id = new_id()
    key = backend.task_key(task_id)
    assert await backend.mark_as_done(task_id, "first")
    stored = await raw.get(key)
    assert stored is not None and backend.is_success(stored)
    # A retry after a lost reply resends the very same payload: it was stored, by this write.
    assert await backend._set_guarded(key, stored, backend.expires)
    # Any other payload is refused by the stored SUCCESS.
    other = backend.encode_meta(ar.ResultMeta(task_id, states.SUCCESS, result="second"))
    assert not await backend._set_guarded(key, other, backend.expires)
    assert await raw.get(key) == stored


async def test_closing_fails_every_waiter_whose_first_read_is_not_sent(
    make: BackendFactory,
) -> None:
    # Whatever the moment aclose() comes (waiters just registered, watched and queued
    # for their batched MGET, or that MGET in flight), every waiter ends at once.
    hung = []
    for pause in range(6):
        backend = await backend_of(make)
        ids = [new_id() for _ in range(200)]
        # Other waiters on the same ids keep them watched: new waiters go straight
        # to their read, queued for one batched MGET.
        async with backend.waiter(ids) as anchor:
            for _ in ids:
                await anchor.next()
            waits = [asyncio.create_task(ar.AsyncResult(i, backend).get(timeout=30)) for i in ids]
            for _ in range(pause):
                await asyncio.sleep(0)
            await backend.aclose()
            done, pending = await asyncio.wait(waits, timeout=5)
        for task in pending:
            task.cancel()
        hung.append(len(pending))
        if not pending:
            outcomes = [t.exception() for t in done]
            assert all(isinstance(o, ar.BackendClosed) for o in outcomes), outcomes[:3]
    assert hung == [0] * 6


async def test_backend_and_driver_options_in_the_url(
    redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    url = (
        f"{redis_server.url}?global_keyprefix=app1&expires=60&health_check_interval=5"
        "&client_name=aioresults-url-test"
    )
    settings = parse_url(url)
    assert (settings["global_keyprefix"], settings["expires"]) == ("app1", 60.0)
    assert (settings["health_check_interval"], settings["client_name"]) == (
        5.0,
        "aioresults-url-test",
    )
    async with RedisBackend(url) as backend:
        assert (backend.global_keyprefix, backend.expires) == ("app1_", 60)
        assert backend.health_check_interval == 5
        task_id = new_id()
        await backend.mark_as_done(task_id, 1)
        key = f"app1_celery-task-meta-{task_id}"
        assert 59_000 < await raw.pttl(key) <= 60_000
        assert (await backend.get_meta(task_id)).result == 1
        # redis-py's own connection options reach the connections.
        assert any(c["name"] == "aioresults-url-test" for c in await raw.client_list())
    # An argument wins over the URL.
    assert RedisBackend(url, expires=10, global_keyprefix="app2:").expires == 10
    assert RedisBackend(url, global_keyprefix="app2:").global_keyprefix == "app2:"
    with pytest.raises(ar.ConfigurationError, match="health_check_interval"):
        RedisBackend(url, health_check_interval=0)
    # An option neither the backend nor its redis-py connections know is refused, naming it.
    with pytest.raises(ar.ConfigurationError, match="made_up"):
        RedisBackend(f"{redis_server.url}?global_keyprefix=app1&made_up=1")
    with pytest.raises(ar.ConfigurationError, match="command_packer"):
        RedisBackend(f"{redis_server.url}?command_packer=x")  # the blocking client's only
