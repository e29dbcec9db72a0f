"""SQLite: aioresults against plain aiosqlite and Celery 5.7's DatabaseBackend.

One run, one machine, files in a temporary directory: store throughput with 1
and 100 writers, cross-process wake latency, and the CPU a waiting process uses
while nothing changes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

import aioresults as ar
from benchmarks._common import (
    machine,
    ms,
    now,
    summary,
    table,
    version,
    wake_latencies,
    write_section,
)

PER_RUN = 2000


async def _aioresults_rate(url: str, writers: int) -> float:
    async with ar.connect(url) as backend:
        await backend.get_meta("warm-up")
        per_writer = PER_RUN // writers

        async def writer(w: int) -> None:
            for n in range(per_writer):
                await backend.mark_as_done(f"tp-{writers}-{w}-{n}", n)

        started = now()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        return per_writer * writers / (now() - started)


async def _aiosqlite_rate(path: Path, writers: int) -> float:
    async with aiosqlite.connect(path) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, v BLOB)")
        await db.commit()
        per_writer = PER_RUN // writers
        lock = asyncio.Lock()  # one connection: each writer's row is its own transaction

        async def writer(w: int) -> None:
            for n in range(per_writer):
                async with lock:
                    await db.execute(
                        "INSERT OR REPLACE INTO t VALUES (?, ?)",
                        (f"{writers}-{w}-{n}", b'{"status": "SUCCESS"}'),
                    )
                    await db.commit()

        started = now()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        return per_writer * writers / (now() - started)


def _celery_rate(url: str, writers: int) -> float:
    from celery import Celery

    app = Celery(broker="memory://", backend=url)
    app.conf.result_backend_thread_safe = True
    count = PER_RUN // 4  # Celery opens a new engine per call outside a worker: keep it short
    per_writer = max(1, count // writers)
    app.backend.store_result("warm-up", 0, "SUCCESS")

    def writer(w: int) -> None:
        for n in range(per_writer):
            app.backend.store_result(f"tp-celery-{writers}-{w}-{n}", n, "SUCCESS")

    started = now()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))
    rate = per_writer * writers / (now() - started)
    app.close()
    return rate


async def throughput(directory: Path) -> list[list[Any]]:
    rows = []
    for writers in (1, 100):
        aio = await _aioresults_rate(f"sqlite:///{directory}/tp-aio-{writers}.db", writers)
        plain = await _aiosqlite_rate(directory / f"tp-plain-{writers}.db", writers)
        celery = await asyncio.to_thread(
            _celery_rate, f"db+sqlite:///{directory}/tp-celery-{writers}.db", writers
        )
        rows.append(
            [writers, f"{aio:,.0f}", f"{plain:,.0f}", f"{celery:,.0f}", f"{aio / plain:.1f}×"]
        )
    return rows


async def wake_latency(directory: Path) -> list[list[Any]]:
    url = f"sqlite:///{directory}/wake.db"
    async with ar.connect(url) as backend:
        await backend.get_meta("warm-up")
        ours = await wake_latencies(
            "aioresults", url, lambda t: ar.AsyncResult(t, backend).get(timeout=10), 40
        )

    from celery import Celery
    from celery.result import AsyncResult as CeleryResult

    celery_url = f"db+sqlite:///{directory}/wake-celery.db"
    app = Celery(broker="memory://", backend=celery_url)
    app.backend.store_result("warm-up", 0, "SUCCESS")

    async def celery_wait(task_id: str) -> None:
        await asyncio.to_thread(CeleryResult(task_id, app=app).get, timeout=10)

    theirs = await wake_latencies("celery", celery_url, celery_wait, 12)
    app.close()
    rows = []
    for name, values in [
        ("aioresults `await result` (inotify on the WAL)", ours),
        (f"Celery {version('celery')} DatabaseBackend `get()` (polls every 0.5 s)", theirs),
    ]:
        p50, p90, _ = summary(values)
        rows.append([name, len(values), ms(p50), ms(p90)])
    return rows


IDLE_WAITER = textwrap.dedent(
    """
    import asyncio, resource, sys, uuid
    import aioresults as ar

    async def main():
        async with ar.connect(sys.argv[1]) as backend:
            tasks = [asyncio.create_task(ar.AsyncResult(uuid.uuid4().hex, backend).get())
                     for _ in range(1000)]
            while backend.wait_stats().waiters < 1000:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            before = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(10)
            after = resource.getrusage(resource.RUSAGE_SELF)
            print((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            for t in tasks:
                t.cancel()

    asyncio.run(main())
    """
)


def idle_cpu(directory: Path) -> float:
    out = subprocess.run(
        [sys.executable, "-c", IDLE_WAITER, f"sqlite:///{directory}/idle.db"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


async def run() -> str:
    with tempfile.TemporaryDirectory(prefix="aioresults-bench-") as tmp:
        directory = Path(tmp)
        rates = await throughput(directory)
        latency = await wake_latency(directory)
        cpu = await asyncio.to_thread(idle_cpu, directory)
    import sqlite3

    lines = [
        "## SQLite",
        "",
        f"Machine: {machine()}. SQLite {sqlite3.sqlite_version}, aiosqlite "
        f"{version('aiosqlite')}, files on local disk. Run: `scripts/bench sqlite`.",
        "",
        "### Store throughput (results/s)",
        "",
        table(
            [
                "writers",
                "aioresults (group commit)",
                "plain aiosqlite, one commit per row",
                f"Celery {version('celery')} DatabaseBackend",
                "aioresults / plain",
            ],
            rates,
        ),
        "",
        "### Cross-process wake latency",
        "",
        table(["waiter", "samples", "p50", "p90"], latency),
        "",
        "Goal: aioresults p50 ≤ 10 ms.",
        "",
        "### CPU used while waiting",
        "",
        table(
            ["measure", "value", "goal"],
            [
                [
                    "CPU seconds of a process waiting 10 s on 1,000 results that never arrive",
                    f"{cpu:.3f} s",
                    "≤ 0.1 s",
                ]
            ],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    body = asyncio.run(run())
    write_section("sqlite", body)
    print(body)
