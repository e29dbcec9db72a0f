"""MySQL/MariaDB: aioresults against the plain asyncmy floor and Celery 5.7's DatabaseBackend.

One run, one private MariaDB (``tests.services.MariaDBServer``: loopback,
``innodb_flush_log_at_trx_commit=2``), used by every side alike. Ratios come
from several rounds that alternate aioresults and the floor, reported as the
median ratio and its spread (lowest-highest).

- Store throughput: the floor sends aioresults' very statements with asyncmy,
  one record per transaction (the same two requests), from this process, on
  one connection or a pool of 10 (whichever is faster); aioresults sends them
  for a whole batch of concurrent writes.
- Wake latency: MySQL tells nobody about a write, so waits are polled; a
  writer in another process stores with aioresults, 20-50 ms after the wait
  began (the poller is then at its first pauses). A write by a backend of the
  same process wakes at once.
- 10,000 waiters: connections held and statements the server runs while they
  wait (its ``Questions`` counter).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncmy
from asyncmy.constants import CLIENT

import aioresults as ar
from aioresults.backends.mysql import MySQLBackend
from benchmarks._common import (
    machine,
    ms,
    now,
    one_writer_limits,
    summary,
    table,
    version,
    wake_latencies,
    write_section,
)
from tests.services import MariaDBServer

ROUNDS = 5  # alternating rounds per ratio
SAMPLES = 40
CELERY_SAMPLES = 8


def spread(ratios: list[float]) -> str:
    """``median× (lowest–highest)``."""
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


async def admin(server: MariaDBServer, sql: str) -> list[Any]:
    conn = await asyncmy.connect(host="127.0.0.1", port=server.port, user="root", autocommit=True)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql)
            return list(await cursor.fetchall())
    finally:
        conn.close()


async def database(server: MariaDBServer, name: str) -> str:
    await admin(server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    return server.url_for(name)


def connect_options(server: MariaDBServer, name: str) -> dict[str, Any]:
    """What aioresults' connections use (autocommit, multi-statements, binary literals)."""
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "user": "root",
        "database": name,
        "charset": "utf8mb4",
        "autocommit": True,
        "client_flag": CLIENT.MULTI_STATEMENTS,
        "binary_prefix": True,
    }


async def send(conn: Any, sql: str, args: list[Any]) -> None:
    """Send ``sql`` and read every result of it (as aioresults does)."""
    cursor = conn.cursor()
    await cursor.execute(sql, args)
    while True:
        if cursor.description:
            await cursor.fetchall()
        if not await cursor.nextset():
            return


# ------------------------------------------------------------------ store throughput


async def aio_rate(backend: ar.BaseBackend, writers: int, total: int, tag: str) -> float:
    per_writer = total // writers

    async def writer(w: int) -> None:
        for n in range(per_writer):
            await backend.mark_as_done(f"{tag}-{w}-{n}", n)

    started = now()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return total / (now() - started)


async def floor_rate(
    options: dict[str, Any], store: Callable[[Any, str, int], Awaitable[None]],
    writers: int, total: int, tag: str, size: int,
) -> float:  # fmt: skip
    per_writer = total // writers
    if writers == 1:
        conn = await asyncmy.connect(**options)
        started = now()
        for n in range(total):
            await store(conn, f"{tag}-{n}", n)
        rate = total / (now() - started)
        conn.close()
        return rate
    pool = await asyncmy.create_pool(minsize=size, maxsize=size, **options)

    async def writer(w: int) -> None:
        for n in range(per_writer):
            async with pool.acquire() as conn:
                await store(conn, f"{tag}-{w}-{n}", n)

    started = now()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    rate = total / (now() - started)
    pool.close()
    await pool.wait_closed()
    return rate


async def throughput(
    server: MariaDBServer, url: str, one_writer: dict[str, float]
) -> list[list[Any]]:
    rows = []
    options = connect_options(server, url.rsplit("/", 1)[1])
    async with MySQLBackend(url, pool_size=10) as backend:
        await backend.get_meta("warm-up")
        sql = backend._live()
        expires = backend.expires or 0.0

        async def same_statements(conn: Any, task_id: str, n: int) -> None:
            # What aioresults sends for one SUCCESS record, built by plain Python.
            done = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
            values = [task_id, "SUCCESS", json.dumps(n).encode(), done, *[None] * 9]
            cutoff = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=expires)
            first = f"{sql.begin}; {sql.upsert(1)}; {sql.stored(1)}"
            await send(conn, first, [time.time(), cutoff, task_id, *values, task_id])
            side = [task_id, time.time() + expires, None, None, None]
            await send(conn, f"{sql.own_upsert(1)}; COMMIT", side)

        for writers, total in ((1, 1000), (100, 4000)):
            ratios: list[float] = []
            ours: list[float] = []
            costs: dict[str, list[float]] = {}
            floors: dict[int, list[float]] = {}
            for r in range(ROUNDS):
                cpu = time.process_time()
                ours.append(await aio_rate(backend, writers, total, f"a{writers}-{r}"))
                costs.setdefault("aioresults", []).append((time.process_time() - cpu) / total)
                best = 0.0
                for size in (1, 10) if writers > 1 else (1,):
                    cpu = time.process_time()
                    rate = await floor_rate(
                        options, same_statements, writers, total, f"f{writers}-{r}-{size}", size
                    )
                    floors.setdefault(size, []).append(rate)
                    if writers == 1:
                        costs.setdefault("floor", []).append((time.process_time() - cpu) / total)
                    best = max(best, rate)
                ratios.append(ours[-1] / best)
            celery = await asyncio.to_thread(celery_rate, url, writers)
            size = max(floors, key=lambda s: statistics.median(floors[s]))
            where = "one connection" if writers == 1 else f"pool of {size}"
            rows.append(
                [
                    writers,
                    f"{statistics.median(ours):,.0f}",
                    f"{statistics.median(floors[size]):,.0f} ({where})",
                    f"{celery:,.0f}",
                    spread(ratios),
                ]
            )
            if writers == 1:
                one_writer.update({f"{k} cpu": statistics.median(v) for k, v in costs.items()})
                one_writer["aioresults wall"] = 1 / statistics.median(ours)
                one_writer["floor wall"] = 1 / statistics.median(floors[1])
    return rows


def celery_url(url: str) -> str:
    return "db+" + url.replace("://", "+pymysql://", 1)


def celery_rate(url: str, writers: int) -> float:
    from celery import Celery

    app = Celery(broker="memory://", backend=celery_url(url))
    app.conf.result_backend_thread_safe = True
    per_writer = max(1, 500 // writers)
    app.backend.store_result("warm-up", 0, "SUCCESS")

    def writer(w: int) -> None:
        for n in range(per_writer):
            app.backend.store_result(f"c{writers}-{w}-{n}", n, "SUCCESS")

    started = now()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))
    rate = per_writer * writers / (now() - started)
    app.close()
    return rate


# ------------------------------------------------------------------ wake latency


async def wake_latency(url: str) -> list[list[Any]]:
    results: dict[str, list[float]] = {}
    async with MySQLBackend(url) as backend, MySQLBackend(url) as local:
        await backend.get_meta("warm-up")
        await local.get_meta("warm-up")
        results["aioresults `await result`, stored by another process (polled)"] = [
            value
            for _ in range(ROUNDS)
            for value in await wake_latencies(
                "aioresults",
                url,
                lambda t: ar.AsyncResult(t, backend).get(timeout=10),
                SAMPLES,
            )
        ]
        same: list[float] = []
        for _ in range(SAMPLES):
            task_id = uuid.uuid4().hex
            waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
            await asyncio.sleep(0.03)
            stored = now()
            await local.mark_as_done(task_id, 1)
            await waiting
            same.append(now() - stored)
        results["aioresults `await result`, stored by a backend of this process"] = same

    from celery import Celery
    from celery.result import AsyncResult as CeleryResult

    app = Celery(broker="memory://", backend=celery_url(url))
    app.backend.get_task_meta("warm-up")

    async def celery_wait(task_id: str) -> None:
        await asyncio.to_thread(CeleryResult(task_id, app=app).get, timeout=10)

    results[
        f"Celery {version('celery')} DatabaseBackend `get()` (polls every 0.5 s)"
    ] = await wake_latencies("aioresults", url, celery_wait, CELERY_SAMPLES)
    app.close()
    return [
        [name, len(values), ms(summary(values)[0]), ms(summary(values)[1])]
        for name, values in results.items()
    ]


# ------------------------------------------------------------------ 10,000 waiters

STORE_ALL = textwrap.dedent(
    """
    import asyncio, sys, time
    import aioresults as ar

    async def main():
        ids = sys.stdin.read().split()
        async with ar.connect(sys.argv[1]) as backend:
            await backend.get_meta("warm-up")
            started = time.monotonic()
            await asyncio.gather(*(backend.mark_as_done(i, n) for n, i in enumerate(ids)))
            print(repr(started))

    asyncio.run(main())
    """
)


async def questions(server: MariaDBServer) -> int:
    [(_, value)] = await admin(server, "SHOW GLOBAL STATUS LIKE 'Questions'")
    return int(value)


async def many_waiters(server: MariaDBServer, url: str, count: int = 10_000) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with MySQLBackend(url) as backend:
        await backend.get_meta("warm-up")
        ids = [uuid.uuid4().hex for _ in range(count)]
        tasks = [asyncio.create_task(ar.AsyncResult(i, backend).get(timeout=120)) for i in ids]
        while backend.wait_stats().waiters < count or backend.wait_stats().unsettled:
            await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # the poller backs off to its longest pause
        figures["connections"] = (
            await admin(
                server,
                "SELECT count(*) FROM information_schema.PROCESSLIST "
                f"WHERE DB = '{url.rsplit('/', 1)[1]}'",
            )
        )[0][0]
        before, polls = await questions(server), backend.wait_stats().polls
        await asyncio.sleep(5)
        # Less this measurement's own second SHOW (counted once it runs).
        figures["statements/s"] = (await questions(server) - before - 1) / 5
        figures["polls/s"] = (backend.wait_stats().polls - polls) / 5
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STORE_ALL, url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await writer.communicate("\n".join(ids).encode())
        values = await asyncio.gather(*tasks)
        assert values == list(range(count))
        figures["first store → last wake-up"] = now() - float(out)
        figures["waiters left"] = backend.wait_stats().waiters
    return figures


# ------------------------------------------------------------------ report


async def run() -> str:
    server = MariaDBServer()
    with server:
        server.start()
        one_writer: dict[str, float] = {}
        rates = await throughput(server, await database(server, "bench_store"), one_writer)
        latency = await wake_latency(await database(server, "bench_wake"))
        many = await many_waiters(server, await database(server, "bench_many"))
        [(server_version,)] = await admin(server, "SELECT VERSION()")
    one, hundred = (float(r[-1].split("×")[0]) for r in rates)
    lines = [
        "## MySQL / MariaDB",
        "",
        f"Machine: {machine()}. Server: MariaDB {server_version} on loopback, private, "
        f"innodb_flush_log_at_trx_commit=2. asyncmy {version('asyncmy')}, PyMySQL "
        f"{version('pymysql')} (Celery's). Run: `scripts/bench mysql`.",
        "",
        "### Store throughput (results/s)",
        "",
        table(
            [
                "writers",
                "aioresults `mark_as_done` (group commit)",
                "asyncmy, the same statements per record (floor)",
                f"Celery {version('celery')} `store_result` (threads)",
                f"aioresults / floor ({ROUNDS} rounds)",
            ],
            rates,
        ),
        "",
        f"Goals: ≥ 1.0× the floor with one writer (**{'met' if one >= 1.0 else 'missed'}**), "
        f"≥ 2× with 100 (**{'met' if hundred >= 2 else 'missed'}**).",
        *one_writer_limits(one_writer, one),
        "",
        "### Wake latency",
        "",
        table(["waiter", "samples", "p50", "p90"], latency),
        "",
        "The poller reads every watched id in one statement, from `poll_interval` (0.05 s) "
        "doubling to `max_poll_interval` (1 s) while nothing changes; a change or a new "
        "waiter brings it back to 0.05 s.",
        "",
        "### 10,000 waiters in one process",
        "",
        table(
            ["measure", "value"],
            [
                ["connections on the database", many["connections"]],
                ["statements/s the server runs while they wait", f"{many['statements/s']:.1f}"],
                ["poll rounds/s (one statement each)", f"{many['polls/s']:.1f}"],
                [
                    "first store → last wake-up (10,000 stored by another process)",
                    ms(many["first store → last wake-up"]),
                ],
                ["waiters left afterwards", many["waiters left"]],
            ],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    body = asyncio.run(run())
    write_section("mysql", body)
    print(body)


if __name__ == "__main__":
    main()
