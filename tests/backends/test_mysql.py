"""The MySQL/MariaDB backend: URLs, Celery's own tables with MariaDB's sequences,
the 64 KiB BLOB, the batched poller's latency model, and a server restarted
while it polls."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import celery
import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends.mysql import MySQLBackend
from aioresults.backends.mysql._connection import connection
from tests.backends.frozen import queued_callers_fail_in_time
from tests.plugins.mysql import fresh_database, mysql_sql
from tests.servers import free_port
from tests.services import MariaDBServer

SECRET = "s3cr3t-my"


def new_id() -> str:
    return str(uuid.uuid4())


async def until(condition: Any, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def celery_store(url: str, task_id: str | None = None) -> None:
    """Store a result with Celery 5.7's own database backend (SQLAlchemy +
    PyMySQL), which creates its tables first if they are missing."""

    def store() -> None:
        app = celery.Celery(backend="db+" + url.replace("://", "+pymysql://", 1))
        app.conf.result_extended = True
        try:
            app.backend.store_result(task_id or new_id(), {"by": "celery"}, "SUCCESS")
        finally:
            for engine_url in list(app.backend.session_manager._engines):
                app.backend.session_manager.invalidate(engine_url)
            app.close()

    await anyio.to_thread.run_sync(store)


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    "scheme", ["mysql", "mariadb", "db+mysql", "db+mysql+pymysql", "db+mariadb+mariadbconnector"]
)
def test_url_forms(scheme: str) -> None:
    backend = ar.connect(
        f"{scheme}://app:{SECRET}@127.0.0.1:1/results?pool_size=3&retries=1&charset=utf8mb4"
        "&connect_timeout=5"
    )
    assert isinstance(backend, MySQLBackend)
    assert (backend.pool_size, backend.retries, backend.database) == (3, 1, "results")
    assert SECRET not in repr(backend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://127.0.0.1/results?colour=blue", "colour"),
        ("mysql://127.0.0.1/results?charset=latin1", "utf8mb4"),
        ("mysql://127.0.0.1", "name the database"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ar.ConfigurationError, match=message):
        ar.connect(url)


async def test_credentials_stay_out_of_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    backend = MySQLBackend(f"mysql://app:{SECRET}@127.0.0.1:{free_port()}/results", retries=0)
    with caplog.at_level(logging.DEBUG), pytest.raises(ar.BackendUnavailable) as caught:
        await backend.mark_as_done(new_id(), 1)
    assert SECRET not in str(caught.value) and "connecting" in str(caught.value)
    assert SECRET not in caplog.text
    await backend.aclose()


async def test_ids_ending_in_a_space_are_refused(make_mysql_backend: Any) -> None:
    backend = await make_mysql_backend()
    with pytest.raises(ar.InvalidTaskId, match="space"):
        await backend.mark_as_done("a ", 1)
    await backend.mark_as_done("a b", 1)  # inside: fine


class _UnansweredPool:
    """A stand-in for asyncmy's pool making a connection to a server that
    stopped answering: the first cancellation is lost (Python 3.11's
    ``asyncio.wait_for`` drops one that lands as the TCP connection completes),
    then the handshake waits for ever, or with ``hand_over`` the connection is
    handed over anyway."""

    def __init__(self, hand_over: bool) -> None:
        self.hand_over = hand_over
        self.lost = 0
        self.closed: list[object] = []
        self.released: list[object] = []

    async def acquire(self) -> Any:
        try:
            await asyncio.sleep(3600)  # the TCP connection
        except asyncio.CancelledError:
            self.lost += 1
        conn = self
        if self.hand_over:
            return conn
        await asyncio.sleep(3600)  # the handshake
        return conn

    def close(self) -> None:  # the connection's own
        self.closed.append(self)

    def release(self, conn: object) -> None:
        self.released.append(conn)


@pytest.mark.parametrize("hand_over", [False, True], ids=["handshake", "hand-over"])
async def test_taking_a_connection_ends_at_its_deadline_past_a_lost_cancellation(
    hand_over: bool,
) -> None:
    pool = _UnansweredPool(hand_over)
    with anyio.fail_after(10):  # before: held for the hour of the handshake
        with pytest.raises(TimeoutError):
            async with connection(pool, 0.05):
                pytest.fail("no connection is handed out past its deadline")
    assert pool.lost == 1
    assert (pool.closed, pool.released) == (([pool], [pool]) if hand_over else ([], []))
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_caller_cancelled_past_its_deadline_is_cancelled_not_timed_out() -> None:
    pool = _UnansweredPool(hand_over=False)
    taking = asyncio.create_task(connection(pool, 0.05).__aenter__())
    await until(lambda: pool.lost == 1)  # the deadline's cancellation, lost
    taking.cancel()  # the caller's own, say at shutdown
    with pytest.raises(asyncio.CancelledError):
        await taking


# ------------------------------------------------------------------ tables

CATALOG = [
    "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, EXTRA, "
    "COLUMN_KEY FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
    "AND TABLE_NAME LIKE 'celery%' ORDER BY 1, ORDINAL_POSITION",
    "SELECT TABLE_NAME, INDEX_NAME, COLUMN_NAME, NON_UNIQUE FROM information_schema.STATISTICS "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME LIKE 'celery%' ORDER BY 1, 2",
    "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES "
    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME NOT LIKE 'aioresults%' ORDER BY 1",
    "SHOW CREATE SEQUENCE task_id_sequence",
    "SHOW CREATE SEQUENCE taskset_id_sequence",
]
ID_COLLATION = (
    "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
    "WHERE TABLE_SCHEMA = DATABASE() AND COLUMN_NAME IN ('task_id', 'taskset_id') "
    "AND TABLE_NAME LIKE 'celery%' ORDER BY 1"
)


async def catalog(url: str) -> list[list[tuple[Any, ...]]]:
    return [await mysql_sql(url, query) for query in CATALOG]


async def test_tables_are_the_ones_celery_makes_on_mariadb(
    mariadb_server: MariaDBServer, mariadb_database: str
) -> None:
    async with MySQLBackend(mariadb_database) as backend:
        await backend.mark_as_done(new_id(), 1)
    async with fresh_database(mariadb_server) as celerys:
        await celery_store(celerys)
        assert await catalog(mariadb_database) == await catalog(celerys)
        # The one difference, deliberate: ids compare exactly in the tables aioresults makes.
        assert sorted(await mysql_sql(celerys, ID_COLLATION)) == [
            ("task_id", "utf8mb4_unicode_ci"),
            ("taskset_id", "utf8mb4_unicode_ci"),
        ]
    assert sorted(await mysql_sql(mariadb_database, ID_COLLATION)) == [
        ("task_id", "utf8mb4_bin"),
        ("taskset_id", "utf8mb4_bin"),
    ]
    # id has no default: every row's id comes from the sequence.
    [(extra, default)] = await mysql_sql(
        mariadb_database,
        "SELECT EXTRA, COLUMN_DEFAULT FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
        "DATABASE() AND TABLE_NAME = 'celery_taskmeta' AND COLUMN_NAME = 'id'",
    )
    assert (extra, default) == ("", None)


async def test_celery_made_tables_take_ids_from_its_sequence(mariadb_database: str) -> None:
    await celery_store(mariadb_database, "celery-1")
    async with MySQLBackend(mariadb_database) as backend:
        ids = [new_id() for _ in range(3)]
        for task_id in ids:
            await backend.mark_as_started(task_id)
            await backend.mark_as_done(task_id, task_id)
        assert [m.result for m in await backend.get_many(ids)] == ids
        # Case-insensitive ids in Celery's table: only the exact id is read.
        assert (await backend.get_meta("CELERY-1")).status == states.PENDING
        assert (await backend.get_meta("celery-1")).result == {"by": "celery"}
    await celery_store(mariadb_database, "celery-2")
    rows = await mysql_sql(mariadb_database, "SELECT task_id FROM celery_taskmeta ORDER BY id")
    # One number of the sequence per record, in order: an update takes none.
    assert [t for (t,) in rows] == ["celery-1", *ids, "celery-2"]
    [(first, last)] = await mysql_sql(
        mariadb_database, "SELECT min(id), max(id) FROM celery_taskmeta"
    )
    assert last - first == 4


async def test_values_beyond_the_64_kib_blob_are_refused_before_the_write(
    mariadb_database: str,
) -> None:
    async with MySQLBackend(mariadb_database) as backend:
        task_id = new_id()
        await backend.mark_as_started(task_id, {"pid": 1})
        with pytest.raises(
            ar.ResultTooLarge, match=r"celery_taskmeta\.result \(BLOB\) holds 65,535"
        ):
            await backend.mark_as_done(task_id, "x" * 70 * 1024)
        assert (await backend.get_meta(task_id)).status == states.STARTED  # nothing written
        with pytest.raises(ar.ResultTooLarge, match="args"):
            await backend.store_result(new_id(), 1, states.SUCCESS, args=["y" * 70 * 1024])
        with pytest.raises(ar.ResultTooLarge, match="celery_tasksetmeta"):
            await backend.save_group(
                new_id(), [["g", None], [[[f"{n:0150}", None], None] for n in range(500)]]
            )
        # A long traceback is cut to fit, its end (the raise) kept.
        failed = new_id()
        trace = "".join(f"  frame {n}\n" for n in range(10_000)) + "ValueError: at the end\n"
        await backend.mark_as_failure(failed, ValueError("x"), traceback=trace)
        stored = (await backend.get_meta(failed)).traceback or ""
        assert stored.startswith("[... cut to fit") and stored.endswith("ValueError: at the end\n")
        assert len(stored.encode()) <= 65535
    await mysql_sql(mariadb_database, "ALTER TABLE celery_taskmeta MODIFY result LONGBLOB")
    async with MySQLBackend(mariadb_database) as widened:
        await widened.mark_as_done(task_id, "x" * 70 * 1024)
        assert (await widened.get_meta(task_id)).result == "x" * 70 * 1024


# ------------------------------------------------------------------ waits


async def test_poller_latency_model(mariadb_database: str) -> None:
    count = "SHOW GLOBAL STATUS LIKE 'Com_select'"
    longest = 0.4
    async with (
        MySQLBackend(mariadb_database, max_poll_interval=longest) as reader,
        MySQLBackend(mariadb_database) as writer,
    ):
        ids = [new_id() for _ in range(200)]
        waits = {i: asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=30)) for i in ids}
        await until(
            lambda: reader.wait_stats().waiters == 200 and not reader.wait_stats().unsettled
        )
        assert reader.wait_stats().mode == "poll"
        polls, [(_, selects)] = reader.wait_stats().polls, await mysql_sql(mariadb_database, count)
        await asyncio.sleep(2)
        polled = reader.wait_stats().polls - polls
        [(_, after)] = await mysql_sql(mariadb_database, count)
        # Back-off while nothing changes (0.05 s doubling to 0.4 s): a handful of
        # rounds in 2 s, each one SELECT for all 200 waiters.
        assert 3 <= polled <= 10
        assert int(after) - int(selects) <= polled + 1
        # A write of another process is seen within the current pause.
        began = time.monotonic()
        await mysql_sql(
            mariadb_database,
            "INSERT INTO celery_taskmeta (id, task_id, status, result) "
            "VALUES (NEXTVAL(task_id_sequence), ?, 'SUCCESS', '\"foreign\"')",
            ids[0],
        )
        assert await waits[ids[0]] == "foreign"
        assert time.monotonic() - began < longest + 1.5
        # One of this process, on the same store, wakes its waiters at once.
        await asyncio.sleep(1)  # the poller is back at its longest pause
        polls = reader.wait_stats().polls
        await writer.mark_as_done(ids[1], "local")
        assert await waits[ids[1]] == "local"
        assert reader.wait_stats().polls == polls  # woken, not polled
        for task in waits.values():
            task.cancel()


@pytest.fixture(scope="module")
def own_mariadb() -> Iterator[MariaDBServer]:
    """A server of this module's own, to restart."""
    with MariaDBServer() as server:
        yield server


@pytest.fixture
async def restartable(own_mariadb: MariaDBServer) -> AsyncIterator[str]:
    own_mariadb.start()
    async with fresh_database(own_mariadb) as url:
        yield url


async def test_mariadb_restarted_mid_poll(own_mariadb: MariaDBServer, restartable: str) -> None:
    options: dict[str, Any] = {"poll_interval": 0.05, "max_poll_interval": 0.2}
    async with MySQLBackend(restartable, **options) as reader:
        await reader.get_meta(new_id())
        ids = [new_id() for _ in range(100)]
        waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=60)) for i in ids]
        await until(
            lambda: reader.wait_stats().waiters == 100 and not reader.wait_stats().unsettled
        )
        polls = reader.wait_stats().polls
        await until(lambda: reader.wait_stats().polls > polls)  # polling, then:
        await anyio.to_thread.run_sync(own_mariadb.restart)
        # Another process stores the results once the server is back.
        rows = ", ".join(["(NEXTVAL(task_id_sequence), ?, 'SUCCESS', ?)"] * len(ids))
        values = [v for i in ids for v in (i, json.dumps(i).encode())]
        await mysql_sql(
            restartable, f"INSERT INTO celery_taskmeta (id, task_id, status, result) VALUES {rows}",
            *values,
        )  # fmt: skip
        assert await asyncio.gather(*waits) == ids
        assert reader.wait_stats().waiters == 0


async def test_a_frozen_server_is_unavailable_not_a_hang(
    own_mariadb: MariaDBServer, restartable: str
) -> None:
    # The server stops answering (SIGSTOP): the kernel still takes connections.
    async with MySQLBackend(restartable, command_timeout=0.5, retries=1) as backend:
        assert await backend.mark_as_done(new_id(), "before")
        own_mariadb.freeze()
        try:
            with anyio.fail_after(60):  # a hang fails here
                with pytest.raises(ar.BackendUnavailable, match="storing results"):
                    await backend.mark_as_done(new_id(), "while frozen")
                with pytest.raises(ar.BackendUnavailable, match="reading results"):
                    await backend.get_meta(new_id())
        finally:
            own_mariadb.thaw()
        task_id = new_id()
        assert await backend.mark_as_done(task_id, "after")
        assert (await backend.get_meta(task_id)).result == "after"


async def test_callers_queued_for_a_pool_connection_fail_in_time_on_a_frozen_server(
    own_mariadb: MariaDBServer, restartable: str
) -> None:
    options: dict[str, Any] = {"command_timeout": 0.5, "retries": 0, "pool_size": 2}
    async with MySQLBackend(restartable, **options) as backend:
        await queued_callers_fail_in_time(backend, own_mariadb)
