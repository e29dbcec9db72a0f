"""The Redis backend's own connections: one multiplexed command connection whose
writes of one event-loop iteration leave together, TLS, AUTH/SELECT/CLIENT
SETNAME, Sentinel failover, reconnection with commands in flight, errors that
reach only their callers, EVALSHA without the script, and redis-py kept where
it earns its place (``backend.client``).

Each test runs its own server (or proxy), since it reconfigures, kills or
counts what reaches it.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

import aioresults as ar
from aioresults import states
from aioresults.backends.redis import RedisBackend
from tests.faultproxy import FaultProxy
from tests.servers import RedisSentinel, RedisServer, free_port


def new_id() -> str:
    return str(uuid.uuid4())


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    """Wait until ``condition()`` is true (a safety net, not a speed assertion)."""
    with anyio.fail_after(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def calls(raw: aioredis.Redis, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# ------------------------------------------------------------------ one connection


async def test_writes_of_one_iteration_leave_in_one_write_on_one_connection(
    server: RedisServer, raw: aioredis.Redis
) -> None:
    async with (
        FaultProxy(("127.0.0.1", server.port), framing="raw") as proxy,
        RedisBackend(f"redis://127.0.0.1:{proxy.port}/0") as backend,
    ):
        assert backend.pipelined
        await backend.get_meta(new_id())  # connected
        sent, scripts = len(proxy.requests), await calls(raw, "evalsha")
        ids = [new_id() for _ in range(200)]
        group_id = new_id()
        await backend.set_chord_size(group_id, 50)
        stored, parts, read = await asyncio.gather(
            asyncio.gather(*(backend.mark_as_done(t, n) for n, t in enumerate(ids))),
            asyncio.gather(
                *(
                    backend.chord_part_return(group_id, t, states.SUCCESS, n, index=n)
                    for n, t in enumerate(ids[:50])
                )
            ),
            backend.get_many(ids[:10]),
        )
        assert stored == [True] * 200
        assert sorted(p.count for p in parts if p.counted) == list(range(1, 51))
        assert sum(p.complete for p in parts) == 1
        assert len(read) == 10
        # One command per store and per part, all sent in a handful of writes:
        # the chord's start, then one for everything else (which the proxy reads
        # in 64 KiB chunks), then the completing part's read of the parts.
        assert await calls(raw, "evalsha") - scripts == 250
        assert await calls(raw, "eval") == 0  # the scripts came with the connection
        assert len(proxy.requests) - sent <= 8
        assert proxy.accepted == 1  # one connection for everything
        assert [m.result for m in await backend.get_many(ids)] == list(range(200))


async def test_an_error_reaches_only_the_caller_whose_command_failed(
    server: RedisServer, raw: aioredis.Redis
) -> None:
    async with RedisBackend(server.url) as backend:
        bad = new_id()
        # A foreign writer left a hash where a record belongs: the script's GET fails.
        await raw.hset(backend.task_key(bad), "field", "value")
        ids = [new_id() for _ in range(50)]
        outcomes = await asyncio.gather(
            *(backend.mark_as_done(t, n) for n, t in enumerate(ids[:25])),
            backend.mark_as_done(bad, "x"),
            *(backend.mark_as_done(t, n) for n, t in enumerate(ids[25:], 25)),
            backend.get_many(ids[:5]),
            return_exceptions=True,
        )
        failed = outcomes[25]
        assert isinstance(failed, ar.BackendError) and "WRONGTYPE" in str(failed)
        assert not isinstance(failed, ar.BackendUnavailable)
        assert outcomes[:25] == [True] * 25 and outcomes[26:51] == [True] * 25
        assert not any(isinstance(o, BaseException) for o in outcomes[51:])
        # The connection goes on serving everyone.
        assert [m.result for m in await backend.get_many(ids)] == list(range(50))


async def test_commands_in_flight_when_the_connection_drops_are_retried(
    server: RedisServer, raw: aioredis.Redis
) -> None:
    async with (
        FaultProxy(("127.0.0.1", server.port), framing="raw") as proxy,
        RedisBackend(f"redis://127.0.0.1:{proxy.port}/0") as backend,
    ):
        await backend.get_meta(new_id())
        group_id = new_id()
        await backend.set_chord_size(group_id, 100)
        ids = [new_id() for _ in range(100)]
        held = proxy.delay(0.5, reply=True)  # the replies of what is sent next wait
        stores = asyncio.gather(*(backend.mark_as_done(t, n) for n, t in enumerate(ids)))
        parts = asyncio.gather(
            *(
                backend.chord_part_return(group_id, t, states.SUCCESS, n, index=n)
                for n, t in enumerate(ids)
            )
        )
        reads = backend.get_many(ids)
        await held.wait()
        # Everything was sent and run by the server; the replies are lost with the connection.
        assert proxy.reset_all() == 1
        proxy.clear()
        assert await stores == [True] * 100  # each retry finds its own payload
        progress = await parts
        assert sum(p.complete for p in progress) == 1
        assert all(p.counted for p in progress)  # each retry recognised by its receipt
        assert sorted(p.count for p in progress) == list(range(1, 101))
        assert len(await reads) == 100
        assert proxy.accepted == 2
        assert [m.result for m in await backend.get_many(ids)] == list(range(100))
        assert int(await raw.get(f"celery-taskset-meta-{{{group_id}}}.n")) == 100


async def test_closing_fails_the_commands_in_flight(server: RedisServer) -> None:
    async with FaultProxy(("127.0.0.1", server.port), framing="raw") as proxy:
        backend = RedisBackend(f"redis://127.0.0.1:{proxy.port}/0")
        await backend.get_meta(new_id())
        held = proxy.delay(5, reply=True)
        stores = asyncio.gather(
            *(backend.mark_as_done(new_id(), n) for n in range(20)), return_exceptions=True
        )
        await held.wait()
        await backend.aclose()
        with anyio.fail_after(2):
            outcomes = await stores
        assert all(isinstance(o, ar.BackendClosed) for o in outcomes), outcomes[:3]


async def test_a_script_the_server_forgot_is_sent_again(
    server: RedisServer, raw: aioredis.Redis
) -> None:
    async with RedisBackend(server.url) as backend:
        assert await backend.mark_as_done(new_id(), 1)
        await raw.script_flush()
        evals = await calls(raw, "eval")
        assert await backend.mark_as_done(new_id(), 2)  # NOSCRIPT, then EVAL
        assert await calls(raw, "eval") == evals + 1
        assert await backend.mark_as_done(new_id(), 3)  # EVALSHA works again
        assert await calls(raw, "eval") == evals + 1


async def test_the_redis_py_client_is_there_for_those_who_use_it(
    server: RedisServer,
) -> None:
    async with RedisBackend(f"{server.url}?client_name=aioresults-client-test") as backend:
        task_id = new_id()
        await backend.mark_as_done(task_id, "x")
        client = backend.client
        assert isinstance(client, aioredis.Redis)
        assert await client.get(backend.task_key(task_id)) is not None
        assert backend.client is client
        names = [c["name"] for c in await client.client_list()]
        assert names.count("aioresults-client-test") >= 2  # the backend's and the client's
    with pytest.raises(ar.BackendError):
        _ = backend.client  # closed with the backend


def test_options_only_redis_py_knows_take_the_redis_py_path() -> None:
    assert RedisBackend("redis://h/0?client_name=x&socket_keepalive=true").pipelined
    assert RedisBackend("rediss://h/0?ssl_cert_reqs=none").pipelined
    assert RedisBackend("redis+socket:///tmp/r.sock").pipelined
    assert RedisBackend("sentinel://s1;sentinel://s2", master_name="m").pipelined
    assert not RedisBackend("redis://h/0?retry_on_timeout=true").pipelined
    assert not RedisBackend("redis://h/0", redis_options={"encoding": "latin-1"}).pipelined
    assert not RedisBackend("redis://h:7000/0?cluster=true").pipelined
    assert not RedisBackend(client=aioredis.Redis()).pipelined


async def test_options_only_redis_py_knows_still_work(server: RedisServer) -> None:
    async with RedisBackend(f"{server.url}?retry_on_timeout=true") as backend:
        assert not backend.pipelined
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
        await asyncio.sleep(0.1)
        await backend.mark_as_done(task_id, "through redis-py")
        assert await waiting == "through redis-py"


# ------------------------------------------------------------------ AUTH, SELECT, names


async def test_credentials_database_and_client_name(server: RedisServer) -> None:
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser("app", enabled=True, passwords=["+app-secret"], keys="*",
                            channels="*", commands=["+@all"])  # fmt: skip
    await admin.config_set("requirepass", "default-secret")
    await admin.aclose()
    admin = aioredis.Redis.from_url(f"redis://:default-secret@127.0.0.1:{server.port}/0")
    try:
        url = f"redis://app:app-secret@127.0.0.1:{server.port}/3?client_name=aio-auth"
        async with RedisBackend(url) as backend:
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
            await until(lambda: has_subscriber(admin, backend.task_key(task_id)))
            await backend.mark_as_done(task_id, "authenticated")
            assert await waiting == "authenticated"
            third = aioredis.Redis.from_url(f"redis://:default-secret@127.0.0.1:{server.port}/3")
            assert await third.exists(backend.task_key(task_id)) == 1
            await third.aclose()
            clients = [c for c in await admin.client_list() if c["name"] == "aio-auth"]
            assert len(clients) == 2  # commands and pub/sub
            assert {c["user"] for c in clients} == {"app"} and {c["db"] for c in clients} == {"3"}
        # The default user, by password alone.
        async with RedisBackend(f"redis://:default-secret@127.0.0.1:{server.port}/0") as backend:
            assert await backend.mark_as_done(new_id(), 1)
        for wrong in (f"redis://app:nope@127.0.0.1:{server.port}/0",
                      f"redis://127.0.0.1:{server.port}/0"):  # fmt: skip
            async with RedisBackend(wrong, retries=3) as backend:
                with anyio.fail_after(5), pytest.raises(ar.BackendError) as caught:
                    await backend.mark_as_done(new_id(), 1)
                assert not isinstance(caught.value, ar.BackendUnavailable)
                assert "nope" not in str(caught.value)
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def has_subscriber(admin: aioredis.Redis, channel: str) -> bool:
    return bool((await admin.pubsub_numsub(channel))[0][1])


# ------------------------------------------------------------------ TLS


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key), made by openssl."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """The server's certificate, and another one nobody trusts."""
    directory = tmp_path_factory.mktemp("tls")
    return [make_certificate(directory, "server"), make_certificate(directory, "other")]


async def test_tls(certificates: list[tuple[Path, Path]]) -> None:
    (cert, key), (other, _) = certificates
    port = free_port()
    tls = ("--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")  # fmt: skip
    with RedisServer(args=tls) as server:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}&client_name=aio-tls"
        async with RedisBackend(url) as backend:
            assert backend.pipelined
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
            plain = aioredis.Redis.from_url(server.url)
            await until(lambda: has_subscriber(plain, backend.task_key(task_id)))
            await backend.mark_as_done(task_id, "over TLS")
            assert await waiting == "over TLS"
            names = [c["name"] for c in await plain.client_list()]
            assert names.count("aio-tls") == 2
            await plain.aclose()
        # A certificate the client does not trust is refused.
        async with RedisBackend(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other}",
                                retries=0) as untrusting:  # fmt: skip
            with pytest.raises(ar.BackendUnavailable, match="(?i)certificate"):
                await untrusting.get_meta(new_id())


# ------------------------------------------------------------------ Sentinel


def _role(server: RedisServer) -> bytes:
    """The server's replication role; empty when it gave none (during a failover
    Sentinel closes the clients of the servers it reconfigures)."""
    _, found, rest = server.command("INFO", "replication").partition(b"role:")
    return rest.split(b"\r\n")[0] if found else b""


async def test_sentinel_failover_moves_commands_and_waits_to_the_new_master() -> None:
    sentinel = RedisSentinel("results")
    try:
        sentinel.master.start()
        replica = RedisServer(args=("--replicaof", "127.0.0.1", str(sentinel.master.port)))
        with replica:

            async def replicating() -> bool:
                return b"master_link_status:up" in replica.command("INFO", "replication")

            await until(replicating)
            sentinel.start()  # it finds the replica in the master's INFO

            async def known() -> bool:
                reply = sentinel_command(sentinel, "SENTINEL", "replicas", "results")
                return str(replica.port).encode() in reply

            await until(known, timeout=30)
            async with ar.connect(sentinel.url, master_name="results") as backend:
                assert isinstance(backend, RedisBackend) and backend.pipelined
                first, second = new_id(), new_id()
                await backend.mark_as_done(first, "before")
                waiting = asyncio.create_task(ar.AsyncResult(second, backend).get(timeout=60))
                await asyncio.sleep(0.2)
                assert sentinel_command(sentinel, "SENTINEL", "FAILOVER", "results").startswith(
                    b"+OK"
                )

                async def failed_over() -> bool:
                    return _role(replica) == b"master" and _role(sentinel.master) == b"slave"

                await until(failed_over, timeout=60)
                # Commands and pub/sub follow the new master.
                assert await backend.mark_as_done(second, "after")
                assert await waiting == "after"
                assert replica.command("EXISTS", backend.task_key(second)) == b":1\r\n"
                assert (await backend.get_meta(first)).result == "before"
                assert backend.wait_stats().sessions >= 2
    finally:
        sentinel.close()


def sentinel_command(sentinel: RedisSentinel, *args: str) -> bytes:
    from tests.servers import _command

    return _command(sentinel.port, *args)


# ------------------------------------------------------------------ deadlines at scale


async def test_thousands_of_deadlines_none_early_none_missed(server: RedisServer) -> None:
    # One heap of deadlines serves every waiter: woken early by a result, or
    # re-armed by watch() after each state, each ends at its own deadline.
    async with RedisBackend(server.url) as reader, RedisBackend(server.url) as writer:
        await reader.get_meta(new_id())
        loop = asyncio.get_running_loop()
        ids = [new_id() for _ in range(1500)]
        timeouts = [0.3 + (n % 10) * 0.1 for n in range(len(ids))]

        async def get(task_id: str, timeout: float) -> Any:
            started = loop.time()
            try:
                return await ar.AsyncResult(task_id, reader).get(timeout=timeout)
            except ar.ResultTimeout:
                return loop.time() - started - timeout

        async def watch(task_id: str, timeout: float) -> Any:
            started = loop.time()
            seen = []
            try:
                async for meta in ar.AsyncResult(task_id, reader).watch(timeout=timeout):
                    seen.append(meta.status)
                return seen
            except ar.ResultTimeout:
                return loop.time() - started - timeout

        waits = [asyncio.create_task(get(t, s)) for t, s in zip(ids[:1000], timeouts, strict=False)]
        waits += [
            asyncio.create_task(watch(t, s))
            for t, s in zip(ids[1000:], timeouts[1000:], strict=True)
        ]
        await asyncio.sleep(0.1)
        done = set(range(0, len(ids), 3))
        for n in sorted(done):
            if n >= 1000:
                await writer.update_state(ids[n], states.PROGRESS, n)
            await writer.mark_as_done(ids[n], n)
        with anyio.fail_after(10):
            outcomes = await asyncio.gather(*waits)
    for n, outcome in enumerate(outcomes):
        if isinstance(outcome, float):  # timed out: never before its deadline
            assert 0 <= outcome < 1.0, (n, outcome)
        elif n < 1000:
            assert n in done and outcome == n
        else:
            assert n in done and outcome[-1] == states.SUCCESS
    assert sum(not isinstance(o, float) for o in outcomes) >= len(done) // 2
    assert reader.wait_stats().waiters == 0
