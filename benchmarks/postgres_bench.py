"""PostgreSQL: aioresults against the raw asyncpg floor and Celery 5.7's DatabaseBackend.

One run, one private server (``tests.services.PostgresServer``: loopback,
``fsync=off``), used by every side alike. Ratios come from several rounds that
alternate aioresults and the floor; each is reported as the median ratio and
its spread (lowest-highest).

- Wake latency: a writer in another process stores with aioresults (whose
  statement NOTIFYs); the floor waits with raw asyncpg (LISTEN, then a SELECT
  of the row on each notification), aioresults with ``await result``, Celery
  with its blocking ``AsyncResult.get()``.
- Store throughput: the floor runs aioresults' very statement with asyncpg,
  one record per statement, from this process, on a pool of 1 or 10
  connections (whichever is faster); aioresults sends the same statement for
  a whole batch of concurrent writes.
- 10,000 waiters: connections held and statements the server runs while they
  wait (``log_statement = 'all'`` on their database, lines counted).
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

import asyncpg

import aioresults as ar
from aioresults.backends.postgres import PostgresBackend
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
from tests.services import PostgresServer

ROUNDS = 5  # alternating rounds per ratio
SAMPLES = 40
CELERY_SAMPLES = 8
# The session setting aioresults' connections use; the floor gets it too.
GENERIC = {"plan_cache_mode": "force_generic_plan"}


def spread(ratios: list[float]) -> str:
    """``median× (lowest–highest)``."""
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


async def database(server: PostgresServer, name: str) -> str:
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url_for(name)


# ------------------------------------------------------------------ wake latency


class RawWaiter:
    """The floor: one LISTEN connection, one reading connection, a future per id."""

    def __init__(self, url: str, channel: str) -> None:
        self.url, self.channel = url, channel
        self.waiting: dict[str, asyncio.Future[Any]] = {}

    async def __aenter__(self) -> RawWaiter:
        self.listen = await asyncpg.connect(self.url)
        self.reader = await asyncpg.connect(self.url)
        self.select = await self.reader.prepare(
            "SELECT status, result FROM celery_taskmeta WHERE task_id = $1"
        )
        await self.listen.add_listener(self.channel, self._notified)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listen.close()
        await self.reader.close()

    def _notified(self, conn: object, pid: int, channel: str, task_id: str) -> None:
        if task_id in self.waiting:
            asyncio.ensure_future(self._check(task_id))

    async def _check(self, task_id: str) -> None:
        row = await self.select.fetchrow(task_id)
        future = self.waiting.get(task_id)
        if row is not None and row[0] == "SUCCESS" and future is not None and not future.done():
            future.set_result(json.loads(row[1]))

    async def wait(self, task_id: str) -> Any:
        future = self.waiting[task_id] = asyncio.get_running_loop().create_future()
        try:
            await self._check(task_id)  # listening first, then reading: nothing missed
            return await asyncio.wait_for(future, 10)
        finally:
            del self.waiting[task_id]


async def wake_latency(url: str) -> tuple[list[list[Any]], list[float]]:
    floor: list[float] = []
    ours: list[float] = []
    ratios: list[float] = []
    async with PostgresBackend(url) as backend:
        await backend.get_meta("warm-up")
        async with RawWaiter(url, backend._channel) as raw:
            for _ in range(ROUNDS):
                low = await wake_latencies("aioresults", url, raw.wait, SAMPLES)
                high = await wake_latencies(
                    "aioresults",
                    url,
                    lambda t: ar.AsyncResult(t, backend).get(timeout=10),
                    SAMPLES,
                )
                floor += low
                ours += high
                ratios.append(statistics.median(high) / statistics.median(low))

    from celery import Celery
    from celery.result import AsyncResult as CeleryResult

    app = Celery(broker="memory://", backend="db+" + url.replace("://", "+psycopg://", 1))
    app.backend.get_task_meta("warm-up")

    async def celery_wait(task_id: str) -> None:
        await asyncio.to_thread(CeleryResult(task_id, app=app).get, timeout=10)

    theirs = await wake_latencies("aioresults", url, celery_wait, CELERY_SAMPLES)
    app.close()
    rows = []
    for name, values in [
        ("raw asyncpg LISTEN + SELECT (floor)", floor),
        (f"aioresults {version('aioresults')} `await result` (one LISTEN, NOTIFY)", ours),
        (f"Celery {version('celery')} DatabaseBackend `get()` (polls every 0.5 s)", theirs),
    ]:
        p50, p90, _ = summary(values)
        rows.append([name, len(values), ms(p50), ms(p90), f"{p50 / summary(floor)[0]:.2f}×"])
    return rows, ratios


# ------------------------------------------------------------------ store throughput


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The floor's pool hands connections back as they are (no RESET round trip),
    as aioresults' own pool does."""


async def aio_rate(backend: ar.BaseBackend, writers: int, total: int, tag: str) -> float:
    per_writer = total // writers

    async def writer(w: int) -> None:
        for n in range(per_writer):
            await backend.mark_as_done(f"{tag}-{w}-{n}", n)

    started = now()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return total / (now() - started)


async def floor_rate(
    url: str, run: Callable[[Any, str, int], Awaitable[Any]], writers: int, total: int,
    tag: str, size: int,
) -> float:  # fmt: skip
    """``run(connection, task_id, n)`` for ``total`` records: on one bare
    connection for one writer, else on a pool of ``size`` connections."""
    per_writer = total // writers
    if writers == 1:
        conn = await asyncpg.connect(url, server_settings=GENERIC)
        await run(conn, f"{tag}-warm-up", 0)
        started = now()
        for n in range(total):
            await run(conn, f"{tag}-{n}", n)
        rate = total / (now() - started)
        await conn.close()
        return rate
    pool = await asyncpg.create_pool(
        url, min_size=size, max_size=size, reset=_no_reset, server_settings=GENERIC
    )

    async def writer(w: int) -> None:
        for n in range(per_writer):
            async with pool.acquire() as conn:
                await run(conn, f"{tag}-{w}-{n}", n)

    started = now()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    rate = total / (now() - started)
    await pool.close()
    return rate


async def throughput(url: str, one_writer: dict[str, float]) -> list[list[Any]]:
    rows = []
    async with PostgresBackend(url, pool_size=10) as backend:
        await backend.get_meta("warm-up")
        statement, channel = backend._live()[1].store, backend._channel
        expires = backend.expires or 0.0

        async def same_statement(conn: Any, task_id: str, n: int) -> None:
            # What aioresults sends for one SUCCESS record, built by plain Python.
            done = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            values = [task_id, "SUCCESS", json.dumps(n).encode(), done, *[None] * 9]
            side = [time.time() + expires, None, None, None]
            arrays = [[v] for v in (*values, *side)]
            await conn.execute(statement, *arrays, time.time(), None, channel)

        for writers, total in ((1, 2000), (100, 6000)):
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
                        url, same_statement, writers, total, f"f{writers}-{r}-{size}", size
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


def celery_rate(url: str, writers: int) -> float:
    from celery import Celery

    app = Celery(broker="memory://", backend="db+" + url.replace("://", "+psycopg://", 1))
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


def statements_logged(server: PostgresServer) -> int:
    text = server.console_path.read_text(errors="replace")
    return sum(
        1 for line in text.splitlines() if "LOG:  statement:" in line or "LOG:  execute" in line
    )


async def many_waiters(
    server: PostgresServer, url: str, trigger: bool, count: int = 10_000
) -> dict[str, Any]:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(server.url)
    # Before the backend connects: the setting applies to new sessions.
    await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    figures: dict[str, Any] = {}
    async with PostgresBackend(url, notify_trigger=trigger) as backend:
        await backend.get_meta("warm-up")
        ids = [uuid.uuid4().hex for _ in range(count)]
        tasks = [asyncio.create_task(ar.AsyncResult(i, backend).get(timeout=120)) for i in ids]
        while backend.wait_stats().waiters < count or backend.wait_stats().unsettled:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2)  # past the poller's first pauses
        figures["mode"] = backend.wait_stats().mode
        rows = await admin.fetch(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = $1 "
            "GROUP BY 1 ORDER BY 1",
            name,
        )
        figures["connections"] = ", ".join(f"{n} {app}" for app, n in rows)
        before = statements_logged(server)
        await asyncio.sleep(5)
        figures["statements/s while idle"] = (statements_logged(server) - before) / 5
        await admin.execute(f'ALTER DATABASE "{name}" RESET log_statement')
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", STORE_ALL, url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await writer.communicate("\n".join(ids).encode())
        values = await asyncio.gather(*tasks)
        assert values == list(range(count))
        figures["first store → last wake-up"] = now() - float(out)
        figures["waiters left"] = backend.wait_stats().waiters
    await admin.close()
    return figures


# ------------------------------------------------------------------ report


async def run() -> str:
    server = PostgresServer()
    with server:
        server.start()
        wake_url = await database(server, "bench_wake")
        latency, wake_ratios = await wake_latency(wake_url)
        one_writer: dict[str, float] = {}
        rates = await throughput(await database(server, "bench_store"), one_writer)
        pushed = await many_waiters(server, await database(server, "bench_many"), True)
        polled_url = await database(server, "bench_polled")
        async with PostgresBackend(polled_url, notify_trigger=False) as made:
            await made.get_meta("warm-up")  # the tables, without the trigger
        polled = await many_waiters(server, polled_url, False)
        server_version = (await asyncpg.connect(server.url)).get_server_version()
    p50_ratio = statistics.median(wake_ratios)
    one, hundred = (float(r[-1].split("×")[0]) for r in rates)
    lines = [
        "## PostgreSQL",
        "",
        f"Machine: {machine()}. Server: PostgreSQL {server_version.major}.{server_version.minor} "
        f"on loopback, private, fsync off. asyncpg {version('asyncpg')}, psycopg "
        f"{version('psycopg')} (Celery's). Run: `scripts/bench postgres`.",
        "",
        "### Wake latency (result stored by another process while waiting)",
        "",
        table(["waiter", "samples", "p50", "p90", "p50 / floor"], latency),
        "",
        f"aioresults / floor, p50 per round over {ROUNDS} alternating rounds: "
        f"{spread(wake_ratios)}. Goal ≤ 1.3×: "
        f"**{'met' if p50_ratio <= 1.3 else 'missed'}**.",
        "",
        "### Store throughput (results/s)",
        "",
        table(
            [
                "writers",
                "aioresults `mark_as_done` (group commit)",
                "asyncpg, the same statement per record (floor)",
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
        "### 10,000 waiters in one process",
        "",
        table(
            ["measure", "with the NOTIFY trigger", "without it (foreign writes polled)"],
            [
                ["waits served by", pushed["mode"], polled["mode"]],
                ["connections on the database", pushed["connections"], polled["connections"]],
                [
                    "statements/s the server runs while they wait",
                    f"{pushed['statements/s while idle']:.1f}",
                    f"{polled['statements/s while idle']:.1f}",
                ],
                [
                    "first store → last wake-up (10,000 stored by another process)",
                    ms(pushed["first store → last wake-up"]),
                    ms(polled["first store → last wake-up"]),
                ],
                ["waiters left afterwards", pushed["waiters left"], polled["waiters left"]],
            ],
        ),
        "",
        "Goal: 0 statements/s while waiting with the trigger: "
        f"**{'met' if pushed['statements/s while idle'] == 0 else 'missed'}**.",
    ]
    return "\n".join(lines)


def main() -> None:
    body = asyncio.run(run())
    write_section("postgres", body)
    print(body)


if __name__ == "__main__":
    main()
