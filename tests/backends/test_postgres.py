"""The PostgreSQL backend: URLs, Celery's own tables, the NOTIFY trigger and the
permissions it needs, the one LISTEN connection, and faults (a LISTEN connection
killed 25 times, a server restarted under 300 waiters)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import celery
import pytest

import aioresults as ar
from aioresults.backends.postgres import PostgresBackend
from tests.backends.frozen import queued_callers_fail_in_time
from tests.faultproxy import FaultProxy
from tests.plugins.postgres import fresh_database, pg_sql
from tests.servers import free_port
from tests.services import PostgresServer

SECRET = "s3cr3t-pg"
LISTEN = "aioresults-listen"  # the LISTEN connection's application_name


def new_id() -> str:
    return str(uuid.uuid4())


async def until(condition: Any, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def celery_store(url: str, **conf: Any) -> None:
    """Store a result with Celery 5.7's own database backend (SQLAlchemy +
    psycopg), which creates its tables first if they are missing."""

    def store() -> None:
        app = celery.Celery(backend="db+" + url.replace("://", "+psycopg://", 1))
        app.conf.update(result_extended=True, **conf)
        try:
            app.backend.store_result(new_id(), {"by": "celery"}, "SUCCESS")
        finally:
            for engine_url in list(app.backend.session_manager._engines):
                app.backend.session_manager.invalidate(engine_url)
            app.close()

    await anyio.to_thread.run_sync(store)


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "scheme",
    ["postgresql", "postgres", "db+postgresql", "db+postgresql+psycopg2", "db+postgresql+psycopg"],
)
def test_url_forms(scheme: str) -> None:
    backend = ar.connect(
        f"{scheme}://app:{SECRET}@127.0.0.1:1/results?pool_size=3&notify_trigger=no"
        "&retries=1&sslmode=disable"
    )
    assert isinstance(backend, PostgresBackend)
    assert (backend.pool_size, backend.notify_trigger, backend.retries) == (3, False, 1)
    assert SECRET not in repr(backend) and "127.0.0.1:1/results" in repr(backend)


async def test_credentials_stay_out_of_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:{free_port()}/results"
    backend = PostgresBackend(url, retries=0, listen_url=url)
    with caplog.at_level(logging.DEBUG), pytest.raises(ar.BackendUnavailable) as caught:
        await backend.mark_as_done(new_id(), 1)
    assert SECRET not in str(caught.value) and "connecting" in str(caught.value)
    assert SECRET not in caplog.text
    await backend.aclose()


# ------------------------------------------------------------------ tables

CATALOG = [
    "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable, "
    "column_default FROM information_schema.columns WHERE table_schema = 'public' "
    "AND table_name LIKE 'celery%' ORDER BY 1, ordinal_position",
    "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
    "AND tablename LIKE 'celery%' ORDER BY 2",
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE conrelid::regclass::text LIKE 'celery%' ORDER BY 2",
    "SELECT sequence_name, data_type, start_value, increment, cycle_option "
    "FROM information_schema.sequences WHERE sequence_schema = 'public' ORDER BY 1",
]


async def catalog(url: str) -> list[list[tuple[Any, ...]]]:
    return [await pg_sql(url, query) for query in CATALOG]


async def test_tables_are_the_ones_celery_makes(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    async with PostgresBackend(postgres_database) as backend:
        await backend.mark_as_done(new_id(), 1)
    async with fresh_database(postgres_server) as celerys:
        await celery_store(celerys)
        assert await catalog(postgres_database) == await catalog(celerys)
    tables = await pg_sql(
        postgres_database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
    )
    assert [t for (t,) in tables] == [
        "aioresults_chord",
        "aioresults_chord_part",
        "aioresults_group",
        "aioresults_meta",
        "aioresults_schema",
        "celery_taskmeta",
        "celery_tasksetmeta",
    ]


async def test_celery_made_tables_are_used_as_they_are(postgres_database: str) -> None:
    await celery_store(postgres_database)
    before = await catalog(postgres_database)
    last = "SELECT last_value FROM task_id_sequence"
    [(first,)] = await pg_sql(postgres_database, last)
    async with PostgresBackend(postgres_database) as backend:
        ids = [new_id() for _ in range(3)]
        for task_id in ids:
            await backend.mark_as_started(task_id)
            await backend.mark_as_done(task_id, task_id)
        assert [m.result for m in await backend.get_many(ids)] == ids
    assert await catalog(postgres_database) == before
    # One number of Celery's sequence per record: an update takes none.
    assert await pg_sql(postgres_database, last) == [(first + 3,)]
    await celery_store(postgres_database)  # and Celery numbers on from there
    rows = await pg_sql(postgres_database, "SELECT id FROM celery_taskmeta ORDER BY id")
    assert [i for (i,) in rows] == list(range(first, first + 5))


async def test_table_names_and_schemas_as_celerys_options(postgres_database: str) -> None:
    await pg_sql(postgres_database, "CREATE SCHEMA results")
    names = {"task": "myapp_taskmeta", "group": "myapp_groupmeta"}
    schemas = {"task": "results", "group": "results"}
    await celery_store(
        postgres_database, database_table_names=names, database_table_schemas=schemas
    )
    async with PostgresBackend(
        postgres_database,
        table_names=names,
        table_schemas=schemas,
        poll_interval=5,
        max_poll_interval=5,
    ) as backend:
        [(celerys,)] = await pg_sql(postgres_database, "SELECT task_id FROM results.myapp_taskmeta")
        assert (await backend.get_meta(celerys)).result == {"by": "celery"}
        ours = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(ours, backend).get(timeout=10))
        await until(lambda: backend.wait_stats().watched_ids)
        await pg_sql(
            postgres_database,
            "INSERT INTO results.myapp_taskmeta (id, task_id, status, result) "
            "VALUES (nextval('results.task_id_sequence'), ?, 'SUCCESS', '\"foreign\"')",
            ours,
        )
        assert await waiting == "foreign"  # the trigger's NOTIFY, not a poll
        assert backend.wait_stats().mode == "signal" and backend.wait_stats().polls == 0
    own = await pg_sql(
        postgres_database,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'results' ORDER BY 1",
    )
    assert ("aioresults_myapp_taskmeta_meta",) in own
    assert await pg_sql(postgres_database, "SELECT count(*) FROM pg_tables WHERE tablename "
                        "LIKE 'aioresults%' AND schemaname = 'public'") == [(0,)]  # fmt: skip


async def test_create_false_creates_nothing(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    backend = PostgresBackend(postgres_database, create=False)
    with pytest.raises(ar.StoreNotFound, match="create=False"):
        await backend.get_meta(new_id())
    await backend.aclose()
    assert await pg_sql(postgres_database, "SELECT tablename FROM pg_tables "
                        "WHERE schemaname = 'public'") == []  # fmt: skip
    missing = PostgresBackend(postgres_server.url_for("no_such_database"))
    with pytest.raises(ar.StoreNotFound, match="no_such_database"):
        await missing.get_meta(new_id())
    await missing.aclose()


# ------------------------------------------------------------------ waits


async def test_trigger_wakes_waiters_on_foreign_writes(postgres_database: str) -> None:
    async with PostgresBackend(postgres_database, poll_interval=5, max_poll_interval=5) as backend:
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
        await until(lambda: backend.wait_stats().watched_ids)
        began = time.monotonic()
        await pg_sql(
            postgres_database,
            "INSERT INTO celery_taskmeta (id, task_id, status, result) "
            "VALUES (nextval('task_id_sequence'), ?, 'SUCCESS', '42')",
            task_id,
        )
        assert await waiting == 42
        assert time.monotonic() - began < 2  # polling would take 5 s
        stats = backend.wait_stats()
        assert (stats.mode, stats.polls, stats.sessions) == ("signal", 0, 1)


async def test_without_trigger_permission_foreign_writes_are_polled(
    postgres_server: PostgresServer, postgres_database: str
) -> None:
    # The tables' owner made them without the trigger; the application's role
    # may read and write them but not add a trigger.
    async with PostgresBackend(postgres_database, notify_trigger=False) as owner:
        await owner.get_meta(new_id())
    database = postgres_database.rsplit("/", 1)[1]
    role_url = await anyio.to_thread.run_sync(
        lambda: postgres_server.create_role(f"app{uuid.uuid4().hex[:8]}", database=database)
    )
    options: dict[str, Any] = {"poll_interval": 2.5, "max_poll_interval": 2.5}
    async with PostgresBackend(role_url, **options) as reader, PostgresBackend(role_url) as writer:
        ours, foreign = new_id(), new_id()
        waits = [
            asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=10)) for i in (ours, foreign)
        ]
        await until(lambda: reader.wait_stats().unsettled == 0 and reader.wait_stats().waiters)
        assert reader.wait_stats().mode == "signal+poll"
        await asyncio.sleep(0.2)  # past the poll of the registration
        began = time.monotonic()
        await writer.mark_as_done(ours, "ours")
        assert await waits[0] == "ours"
        assert time.monotonic() - began < 1.2  # our own NOTIFY, not the next poll (2.3 s)
        await pg_sql(
            postgres_database,
            "INSERT INTO celery_taskmeta (id, task_id, status, result) "
            "VALUES (nextval('task_id_sequence'), ?, 'SUCCESS', '\"polled\"')",
            foreign,
        )
        assert await waits[1] == "polled"  # found by the poller
        assert reader.wait_stats().polls >= 2
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgname = 'aioresults_notify'"
    assert await pg_sql(postgres_database, triggers) == [(0,)]


async def test_one_listen_connection_serves_every_waiter(postgres_database: str) -> None:
    database = postgres_database.rsplit("/", 1)[1]
    count = "SELECT count(*) FROM pg_stat_activity WHERE datname = ? AND application_name = ?"
    async with (
        PostgresBackend(postgres_database, pool_size=4) as reader,
        PostgresBackend(postgres_database) as writer,
    ):
        ids = [new_id() for _ in range(500)]
        waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=30)) for i in ids]
        await until(
            lambda: reader.wait_stats().waiters == 500 and not reader.wait_stats().unsettled
        )
        assert await pg_sql(postgres_database, count, database, LISTEN) == [(1,)]
        [(pooled,)] = await pg_sql(postgres_database, count, database, "aioresults")
        assert pooled <= 4 + 1  # the reader's pool (4 at most) and the writer's one
        await asyncio.gather(*(writer.mark_as_done(i, i) for i in ids))
        assert await asyncio.gather(*waits) == ids


async def test_listen_url_takes_the_listen_connection_elsewhere(postgres_database: str) -> None:
    listen_url = postgres_database + "?application_name=past-the-pooler"
    database = postgres_database.rsplit("/", 1)[1]
    async with PostgresBackend(postgres_database, listen_url=listen_url) as backend:
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
        await until(lambda: backend.wait_stats().sessions == 1)
        names = await pg_sql(
            postgres_database,
            "SELECT application_name FROM pg_stat_activity WHERE datname = ? ORDER BY 1",
            database,
        )
        assert ("past-the-pooler",) in names and (LISTEN,) not in names
        await backend.mark_as_done(task_id, "heard")
        assert await waiting == "heard"


# ------------------------------------------------------------------ faults


async def test_a_listen_left_unanswered_is_given_up_and_made_again(
    postgres_database: str,
) -> None:
    # The LISTEN connection's statements have the command timeout too: a LISTEN
    # whose reply never comes must not hold the feed (before: the reader heard
    # nothing until the reply came, 60 s later).
    url = urlsplit(postgres_database)
    assert url.hostname is not None and url.port is not None
    async with FaultProxy((url.hostname, url.port), framing="raw") as proxy:
        stuck = proxy.delay(60, lambda chunk: b"LISTEN" in chunk, reply=True, times=1)
        netloc = url.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
        listen_url = url._replace(netloc=netloc).geturl()
        async with (
            PostgresBackend(
                postgres_database, listen_url=listen_url, command_timeout=0.5
            ) as reader,
            PostgresBackend(postgres_database) as writer,
        ):
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=30))
            await stuck.wait()
            await writer.mark_as_done(task_id, "heard")
            assert await waiting == "heard"
            stats = reader.wait_stats()
            assert stats.feed_failures >= 1 and stats.sessions >= 1  # failed, then made


async def test_listen_connection_killed_25_times_loses_nothing(postgres_database: str) -> None:
    database = postgres_database.rsplit("/", 1)[1]
    kill = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = ? AND application_name = ?"
    )
    async with (
        PostgresBackend(postgres_database) as reader,
        PostgresBackend(postgres_database) as writer,
    ):
        for n in range(25):
            task_id = new_id()
            waiting = asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=30))
            await until(lambda n=n: reader.wait_stats().sessions == n + 1)
            await until(lambda: not reader.wait_stats().unsettled and reader.wait_stats().waiters)
            assert await pg_sql(postgres_database, kill, database, LISTEN) == [(1,)]
            await writer.mark_as_done(task_id, n)  # at once, while the feed is down
            assert await waiting == n
        stats = reader.wait_stats()
        assert stats.feed_failures == 25 and stats.waiters == 0
        await until(lambda: reader.wait_stats().sessions == 26)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this module's own, to restart."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
async def restartable(own_postgres: PostgresServer) -> AsyncIterator[str]:
    own_postgres.start()
    async with fresh_database(own_postgres) as url:
        yield url


async def test_restart_while_300_waiters_wait(
    own_postgres: PostgresServer, restartable: str
) -> None:
    async with PostgresBackend(restartable) as reader, PostgresBackend(restartable) as writer:
        await writer.get_meta(new_id())
        ids = [new_id() for _ in range(300)]
        waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=60)) for i in ids]
        await until(
            lambda: reader.wait_stats().waiters == 300 and not reader.wait_stats().unsettled
        )
        await anyio.to_thread.run_sync(own_postgres.restart)
        assert await asyncio.gather(*(writer.mark_as_done(i, i) for i in ids))
        assert await asyncio.gather(*waits) == ids
        stats = reader.wait_stats()
        assert stats.sessions >= 2 and stats.feed_failures >= 1 and stats.waiters == 0


async def test_a_frozen_server_is_unavailable_not_a_hang(
    own_postgres: PostgresServer, restartable: str
) -> None:
    # The server stops answering (SIGSTOP): the kernel still takes connections.
    async with PostgresBackend(restartable, command_timeout=0.5, retries=1) as backend:
        assert await backend.mark_as_done(new_id(), "before")
        await backend.get_meta(new_id())
        own_postgres.freeze()
        try:
            with anyio.fail_after(60):  # a hang fails here
                with pytest.raises(ar.BackendUnavailable, match="storing results"):
                    await backend.mark_as_done(new_id(), "while frozen")
                with pytest.raises(ar.BackendUnavailable, match="reading results"):
                    await backend.get_meta(new_id())
        finally:
            own_postgres.thaw()
        task_id = new_id()
        assert await backend.mark_as_done(task_id, "after")
        assert (await backend.get_meta(task_id)).result == "after"


async def test_callers_queued_for_a_pool_connection_fail_in_time_on_a_frozen_server(
    own_postgres: PostgresServer, restartable: str
) -> None:
    options: dict[str, Any] = {"command_timeout": 0.5, "retries": 0, "pool_size": 2}
    async with PostgresBackend(restartable, **options) as backend:
        await queued_callers_fail_in_time(backend, own_postgres)
