"""What is specific to the NATS JetStream KV backend: keys as subject tokens that
cannot escape, bucket TTLs and per-record expiry, the push watch under a server
restart and a lost consumer, URLs, and chords under faults."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import nats
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.nats import NatsBackend, parse_servers
from aioresults.backends.nats._keys import decode_token, token
from tests.services import NatsServer

SECRET = "s3cr3t-token"


def new_id() -> str:
    return str(uuid.uuid4())


def new_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Wait until ``condition()`` holds (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def celery_json(task_id: str, value: Any) -> bytes:
    record = {"status": "SUCCESS", "result": value, "traceback": None, "task_id": task_id}
    return json.dumps(record).encode()


@pytest.fixture
async def connect(nats_server: NatsServer) -> AsyncIterator[Callable[..., NatsBackend]]:
    """Backends on the session's server, each test on a bucket of its own by default."""
    made: list[NatsBackend] = []
    bucket = new_bucket()

    def make(url: str | None = None, **options: Any) -> NatsBackend:
        options.setdefault("bucket", bucket)
        made.append(NatsBackend(url or nats_server.url, **options))
        return made[-1]

    yield make
    for backend in made:
        await backend.aclose()
    for name in {backend.bucket for backend in made}:
        try:
            nats_server.request(f"$JS.API.STREAM.DELETE.KV_{name}")
        except RuntimeError:
            pass


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[Any]:
    """nats-py's JetStream context on the session's server: the native client."""
    client = await nats.connect(nats_server.url)
    yield client.jetstream()
    await client.close()


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server of the test's own, to kill and restart."""
    with NatsServer() as server:
        yield server


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    "text", ["plain-id_1", "a.b", "x*", ">", "sp ace", "ünïcode-ид", "=abc", "a/b", "..", "*.>"]
)
def test_tokens_are_single_and_reversible(text: str) -> None:
    encoded = token(text)
    assert encoded and not set(encoded) & set(".*> ")
    assert all(c.isascii() and (c.isalnum() or c in "-_=") for c in encoded)
    assert decode_token(encoded) == text
    plain = all(c.isascii() and (c.isalnum() or c in "-_") for c in text)
    assert (encoded == text) == plain


async def test_ids_stay_one_token_and_never_wildcard(
    connect: Callable[..., NatsBackend], js: Any
) -> None:
    writer, reader = connect(), connect()
    ids = ["a.b", "x*", ">", "sp ace", "ünïcode-ид", "=abc", "a/b", new_id()]
    for task_id in ids:
        await writer.mark_as_done(task_id, task_id)
    assert [m.result for m in await reader.get_many(ids)] == ids
    keys = await (await js.key_value(writer.bucket)).keys()
    assert sorted(keys) == sorted(f"celery-task-meta-.{token(i)}" for i in ids)
    assert all(key.count(".") == 1 for key in keys)
    # A waiter on "a.*" is not a wildcard: "a.c" does not wake it, "a.*" does.
    waiting = asyncio.create_task(ar.AsyncResult("a.*", reader).get(timeout=20))
    await until(lambda: reader.wait_stats().waiters == 1 and not reader.wait_stats().unsettled)
    await writer.mark_as_done("a.c", "other")
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await writer.mark_as_done("a.*", "mine")
    assert await waiting == "mine"


async def test_a_write_by_another_client_is_pushed(
    connect: Callable[..., NatsBackend], js: Any
) -> None:
    reader = connect()
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=20))
    await until(lambda: reader.wait_stats().sessions == 1 and not reader.wait_stats().unsettled)
    assert reader.wait_stats().mode == "push"
    kv = await js.key_value(reader.bucket)
    await kv.put(f"celery-task-meta-.{task_id}", celery_json(task_id, "pushed"))
    assert await waiting == "pushed"
    assert reader.wait_stats().polls == 0


# ------------------------------------------------------------------ buckets and expiry


async def test_a_new_bucket_takes_its_ttl_from_expires(
    connect: Callable[..., NatsBackend], js: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = connect(expires=60, chord_expires=120)
    await backend.mark_as_done(new_id(), 1)
    info = await js.stream_info(f"KV_{backend.bucket}")
    assert info.config.max_age == 120 and backend.bucket_ttl_in_use == 120
    assert info.config.max_msgs_per_subject == 1
    # Another backend with a longer expires keeps the bucket's TTL, and says so.
    with caplog.at_level(logging.WARNING, "aioresults.backends"):
        longer = connect(expires=3600)
        await longer.mark_as_done(new_id(), 2)
    assert "removes values after 120 s" in caplog.text
    assert (await js.stream_info(f"KV_{backend.bucket}")).config.max_age == 120
    explicit = connect(bucket=new_bucket(), bucket_ttl=30, expires=10)
    await explicit.mark_as_done(new_id(), 3)
    assert explicit.bucket_ttl_in_use == 30


async def test_records_expire_by_their_own_header(
    connect: Callable[..., NatsBackend], js: Any
) -> None:
    short = connect(expires=1, bucket_ttl=None)
    kept = connect(expires=None)
    gone, rewritten, stays = new_id(), new_id(), new_id()
    await short.mark_as_done(gone, "gone")
    await short.mark_as_started(rewritten)
    await kept.mark_as_done(stays, "stays")
    await asyncio.sleep(1.2)
    await kept.mark_as_done(rewritten, "rewritten")  # a fresh revision, without expiry
    metas = await short.get_many([gone, rewritten, stays])
    assert [m.status for m in metas] == [states.PENDING, states.SUCCESS, states.SUCCESS]
    assert await short.cleanup() == 1
    assert await short.cleanup() == 0
    keys = await (await js.key_value(short.bucket)).keys()
    assert f"celery-task-meta-.{gone}" not in keys and len(keys) == 2


async def test_a_missing_bucket_is_not_created_when_create_is_false(
    connect: Callable[..., NatsBackend],
) -> None:
    backend = connect(create=False)
    with pytest.raises(ar.StoreNotFound, match="no such bucket"):
        await backend.get_meta(new_id())


async def test_many_clients_opening_one_new_bucket_at_once_all_open(
    connect: Callable[..., NatsBackend],
) -> None:
    for _ in range(40):
        bucket = new_bucket()
        backends = [connect(bucket=bucket) for _ in range(8)]
        await asyncio.gather(*(b.mark_as_done(f"t{n}", n) for n, b in enumerate(backends)))
        metas = await backends[0].get_many([f"t{n}" for n in range(8)])
        assert [m.result for m in metas] == list(range(8))


async def test_a_bucket_is_read_by_direct_gets_where_the_server_answers_them(
    connect: Callable[..., NatsBackend],
) -> None:
    backend = connect()
    assert await backend.mark_as_done("t", 1)
    assert backend._bucket.direct


#: A user the server refuses direct gets to (the JetStream API is allowed).
_NO_DIRECT_GETS = """
authorization {
  users = [
    {user: "reader", password: "secret", permissions: {publish: {deny: ["$JS.API.DIRECT.GET.>"]}}}
  ]
}
"""


async def test_a_server_that_does_not_answer_direct_gets_is_read_through_the_api(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A direct get that is never answered (a permission here; also a stream
    another client has only just created): opening tries one within
    ``timeout`` and then reads through the JetStream API, instead of letting
    every read time out."""
    with NatsServer(config=_NO_DIRECT_GETS) as server:
        url = f"nats://reader:secret@127.0.0.1:{server.port}"
        async with NatsBackend(url, bucket=new_bucket(), timeout=0.5) as backend:
            assert await backend.mark_as_done("t", 1)
            assert not backend._bucket.direct
            assert (await backend.get_meta("t")).result == 1
            assert not await backend.mark_as_started("t")  # the guard reads too
            assert (await backend.get_meta("missing")).status == states.PENDING
    assert "does not answer direct gets" in caplog.text


async def test_a_stream_of_another_name_over_the_buckets_subjects_is_an_error(
    connect: Callable[..., NatsBackend], js: Any
) -> None:
    bucket = new_bucket()
    await js.add_stream(name=f"OTHER_{bucket}", subjects=[f"$KV.{bucket}.>"])
    try:
        with pytest.raises(ar.BackendError, match="subjects overlap"):
            await connect(bucket=bucket).get_meta(new_id())
    finally:
        await js.delete_stream(f"OTHER_{bucket}")


async def test_values_over_max_payload_are_refused(connect: Callable[..., NatsBackend]) -> None:
    backend = connect()
    task_id = new_id()
    await backend.mark_as_started(task_id)
    with pytest.raises(ar.ResultTooLarge, match="max_payload"):
        await backend.mark_as_done(task_id, "x" * (1024 * 1024))
    assert (await backend.get_meta(task_id)).status == states.STARTED


def test_urls() -> None:
    servers, bucket, options = parse_servers(
        f"nats://user:{SECRET}@h1:4222,nats://h2:4223/results?heartbeat=1&expires=60"
    )
    assert servers == [f"nats://user:{SECRET}@h1:4222", "nats://h2:4223"]
    assert bucket == "results" and options == {"heartbeat": 1.0, "expires": 60.0}
    backend = ar.connect(f"nats://{SECRET}@127.0.0.1:4222?bucket=b1&global_keyprefix=app")
    assert isinstance(backend, NatsBackend)
    assert backend.bucket == "b1" and backend.global_keyprefix == "app_"
    assert SECRET not in repr(backend) and "***@127.0.0.1:4222" in repr(backend)
    assert NatsBackend("127.0.0.1:4222", bucket="mine", url="nats://h/other").bucket == "mine"
    for bad in ("nats://h:1/?nope=1", "nats://h:1/bad.bucket", "nats://"):
        with pytest.raises(ar.ConfigurationError):
            ar.connect(bad)


async def test_an_unreachable_server_is_a_clear_error() -> None:
    backend = NatsBackend("nats://127.0.0.1:1", connect_timeout=1, reconnect_wait=0.1)
    with pytest.raises(ar.BackendUnavailable, match="127.0.0.1:1"):
        await backend.get_meta(new_id())
    await backend.aclose()


def test_a_missing_driver_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "import aioresults as ar\n"
        "try:\n    ar.connect('nats://127.0.0.1:4222')\n"
        "except ar.MissingDependency as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'aioresults[nats]'" in out.stdout


# ------------------------------------------------------------------ faults


async def test_the_watch_resumes_after_a_server_restart(own_server: NatsServer) -> None:
    bucket = new_bucket()
    writer = NatsBackend(own_server.url, bucket=bucket)
    reader = NatsBackend(own_server.url, bucket=bucket, reconnect_wait=0.1)
    try:
        before, after = new_id(), new_id()
        waits = [
            asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=60)) for i in (before, after)
        ]
        await until(lambda: reader.wait_stats().sessions == 1 and not reader.wait_stats().unsettled)
        await asyncio.to_thread(own_server.restart)  # killed; the bucket is kept on disk
        await until(lambda: reader.wait_stats().sessions >= 2, timeout=60)
        # Stored after the restart: the new watch (or its re-read) delivers both.
        await writer.mark_as_done(before, "first")
        await writer.mark_as_done(after, "second")
        assert await asyncio.gather(*waits) == ["first", "second"]
        assert reader.wait_stats().feed_failures >= 1
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_deleted_consumer_is_noticed_and_replaced(
    connect: Callable[..., NatsBackend], nats_server: NatsServer
) -> None:
    writer, reader = connect(), connect(heartbeat=0.3)
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=30))
    await until(lambda: reader.wait_stats().sessions == 1 and not reader.wait_stats().unsettled)
    names = json.loads(nats_server.request(f"$JS.API.CONSUMER.NAMES.KV_{reader.bucket}"))
    for name in names["consumers"]:  # an operator deletes the watch's consumer
        nats_server.request(f"$JS.API.CONSUMER.DELETE.KV_{reader.bucket}.{name}")
    await until(lambda: reader.wait_stats().sessions >= 2)  # heartbeats stopped: a new watch
    await writer.mark_as_done(task_id, "still seen")
    assert await waiting == "still seen"


# ------------------------------------------------------------------ chords

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
    connect: Callable[..., NatsBackend], nats_server: NatsServer
) -> None:
    one, two, three = connect(), connect(), connect()
    url = f"{nats_server.url}/{one.bucket}"
    group_id = new_id()
    parts = [f"part.{n}" for n in range(6)]  # ids that are not plain tokens
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
    # Started again, the chord forgets its counted parts.
    await one.set_chord_size(other, 1)
    fresh = await one.chord_part_return(other, "y", states.SUCCESS, "y again")
    assert (fresh.counted, fresh.complete, fresh.results) == (True, True, ["y again"])


async def test_three_clients_delivering_duplicates(connect: Callable[..., NatsBackend]) -> None:
    clients = [connect() for _ in range(3)]
    group_id = new_id()
    size = 40
    await clients[0].set_chord_size(group_id, size)
    deliveries = [(n, f"p{n}", clients[(n + k) % 3]) for k in range(3) for n in range(size)]

    async def deliver(index: int, part: str, backend: NatsBackend) -> ar.ChordProgress:
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


async def test_chords_expire_with_their_keys(connect: Callable[..., NatsBackend], js: Any) -> None:
    backend = connect(chord_expires=1, bucket_ttl=None)
    group_id = new_id()
    await backend.set_chord_size(group_id, 2)
    await backend.chord_part_return(group_id, "a", states.SUCCESS, 1)
    await asyncio.sleep(1.2)
    with pytest.raises(ar.ChordError, match="set_chord_size"):
        await backend.chord_part_return(group_id, "b", states.SUCCESS, 2)
    assert await backend.cleanup() == 2  # the chord's count and its one part


async def test_a_frozen_server_is_unavailable_not_a_hang(own_server: NatsServer) -> None:
    # The server stops answering (SIGSTOP): the kernel still takes connections.
    backend = NatsBackend(own_server.url, bucket=new_bucket(), timeout=0.5)
    try:
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
        with anyio.fail_after(60):
            while True:  # the client reconnects on its own schedule
                try:
                    assert await backend.mark_as_done(task_id, "after")
                    break
                except ar.BackendUnavailable:
                    await asyncio.sleep(0.1)
        assert (await backend.get_meta(task_id)).result == "after"
    finally:
        await backend.aclose()
