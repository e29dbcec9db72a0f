"""Memcached: wake latency at the default poll settings and idle load with 1,000 waiters.

Usage: ``python -m benchmarks memcached`` (from the repository root). Memcached
sends no notifications, so these figures measure the poller's schedule next to
the same schedule written by hand (the floor), Celery 5.7's own polling, and
the ``watch mutations`` hint:

* wake latency, the result stored by one writer process (pymemcache, as
  Celery's worker stores it) 20-50 ms after the wait began, and after quiet
  waits of 1 s and 4 s (the poller has backed off by then); every contender
  runs in each of three alternating rounds, and ratios to the floor are given
  as the median of the rounds with their spread;
* memcached requests and keys read per second while 1,000 results are awaited
  and none arrives.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aioresults as ar
from aioresults.backends.memcached import MemcachedBackend
from benchmarks._common import Writer, machine, ms, summary, table, version, write_section
from tests.services import MemcachedServer

ROUNDS = 3
SAMPLES = 30
QUIET_SAMPLES = 4
WAITERS = 1000
SECONDS = 5
VALUE = {"answer": 42}


# ------------------------------------------------------------------ the writer process


def celery_record(task_id: str) -> bytes:
    return json.dumps(
        {"status": "SUCCESS", "result": VALUE, "traceback": None, "children": [],
         "date_done": "2026-12-04T10:00:00+00:00", "task_id": task_id}
    ).encode()  # fmt: skip


def writer_main(port: int) -> None:
    """Store each task id read from stdin with pymemcache (Celery's client); print
    ``time.monotonic()`` taken just before each store."""
    from pymemcache.client.base import Client

    client = Client(("127.0.0.1", port), default_noreply=False)
    client.version()
    print("ready", flush=True)
    for line in sys.stdin:
        task_id = line.strip()
        started = time.monotonic()
        client.set(f"celery-task-meta-{task_id}", celery_record(task_id), 86400)
        print(repr(started), flush=True)


class PymemcacheWriter(Writer):
    """The one writer process every reader is measured against."""

    def __init__(self, port: int) -> None:
        super().__init__("pymemcache", "")
        self.args = [sys.executable, "-m", "benchmarks.memcached_bench", "--writer", str(port)]


# ------------------------------------------------------------------ wake latency


async def latencies(
    writer: Writer, wait: Callable[[str], Awaitable[Any]], samples: int, quiet: float
) -> list[float]:
    """Wake latencies: ``wait(task_id)`` here, the store ``quiet`` seconds (or
    20-50 ms) after the wait began."""
    out: list[float] = []
    for _ in range(samples):
        task_id = uuid.uuid4().hex
        woke: list[float] = []

        async def waiter(task_id: str = task_id, woke: list[float] = woke) -> None:
            await wait(task_id)
            woke.append(time.monotonic())

        task = asyncio.create_task(waiter())
        await asyncio.sleep(quiet or 0.02 + 0.03 * (len(out) % 7) / 6)
        stored = await writer.store(task_id)
        await asyncio.wait_for(task, 30)
        out.append(woke[0] - stored)
    return out


async def hand_poll(client: Any, task_id: str) -> None:
    """The floor: a loop on the raw protocol polling one key on the poller's
    schedule (every 50 ms, doubling to 0.5 s while nothing changes)."""
    key = f"celery-task-meta-{task_id}".encode()
    pause = 0.05
    while True:
        client[1].write(b"get " + key + b"\r\n")
        reply = await client[0].readuntil(b"END\r\n")
        if reply.startswith(b"VALUE "):
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.5)


async def wake_latency(
    server: MemcachedServer,
) -> tuple[list[list[Any]], list[list[Any]], dict[str, float]]:
    from celery import Celery
    from celery.result import AsyncResult as CeleryResult

    raw = await asyncio.open_connection("127.0.0.1", server.port)
    poll = MemcachedBackend(server.url)
    notify = MemcachedBackend(server.url, watch="notify")
    app = Celery(broker="memory://", backend=f"cache+memcached://{server.address}/")
    app.conf.result_backend_thread_safe = True
    app.backend.get_task_meta("warm-up")

    def celery_wait(task_id: str) -> Awaitable[Any]:
        return asyncio.to_thread(CeleryResult(task_id, app=app).get, timeout=30)

    floor = "raw protocol, same schedule by hand (floor)"
    contenders: dict[str, Callable[[str], Awaitable[Any]]] = {
        floor: lambda t: hand_poll(raw, t),
        "aioresults `await result`, defaults (poll)": lambda t: ar.AsyncResult(t, poll).get(
            timeout=30
        ),
        'aioresults, `watch="notify"`': lambda t: ar.AsyncResult(t, notify).get(timeout=30),
        f"Celery {version('celery')} `AsyncResult.get()` (0.5 s interval)": celery_wait,
    }
    await poll.get_meta("warm-up")
    await notify.get_meta("warm-up")
    short: dict[str, list[list[float]]] = {name: [] for name in contenders}
    quiet: dict[tuple[str, float], list[float]] = {}
    async with PymemcacheWriter(server.port) as writer:
        for _ in range(ROUNDS):  # alternating: a busy moment slows every contender alike
            for name, wait in contenders.items():
                short[name].append(await latencies(writer, wait, SAMPLES, 0))
        for name in list(contenders)[:3]:
            for pause in (1.0, 4.0):
                quiet[(name, pause)] = await latencies(
                    writer, contenders[name], QUIET_SAMPLES, pause
                )
    raw[1].close()
    await poll.aclose()
    await notify.aclose()
    app.backend.client.close()
    app.close()

    rows = []
    figures: dict[str, float] = {}
    for name, rounds in short.items():
        values = [v for r in rounds for v in r]
        ratios = [
            statistics.median(r) / statistics.median(f)
            for r, f in zip(rounds, short[floor], strict=True)
        ]
        p50, p90, _ = summary(values)
        figures[f"{name} ratio"], figures[f"{name} p50"] = statistics.median(ratios), p50
        rows.append(
            [
                name,
                len(values),
                ms(p50),
                ms(p90),
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
            ]
        )
    quiet_rows = [
        [name, f"{pause:.0f} s", ms(statistics.median(v)), ms(max(v))]
        for (name, pause), v in quiet.items()
    ]
    return rows, quiet_rows, figures


# ------------------------------------------------------------------ idle load


def server_gets(server: MemcachedServer) -> int:
    stats = server.command("stats").decode().split("\r\n")
    return next(int(line.split()[2]) for line in stats if line.startswith("STAT cmd_get "))


async def idle_load(server: MemcachedServer) -> list[list[Any]]:
    from celery import Celery
    from celery.result import AsyncResult as CeleryResult, ResultSet

    rows = []
    async with MemcachedBackend(server.url) as backend:
        await backend.get_meta("warm-up")
        ids = [uuid.uuid4().hex for _ in range(WAITERS)]
        tasks = [asyncio.create_task(ar.AsyncResult(i, backend).get()) for i in ids]
        while backend.wait_stats().waiters < WAITERS or backend.wait_stats().unsettled:
            await asyncio.sleep(0.01)
        await asyncio.sleep(2)  # backed off to max_poll_interval
        requests, keys = backend.stats["requests"], server_gets(server)
        await asyncio.sleep(SECONDS)
        rows.append(
            [
                "aioresults, 1,000 `await result` (defaults)",
                f"{(backend.stats['requests'] - requests) / SECONDS:.1f}",
                f"{(server_gets(server) - keys) / SECONDS:,.0f}",
            ]
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        requests, keys = backend.stats["requests"], server_gets(server)
        await asyncio.sleep(2)
        rows.append(
            [
                "aioresults, no waiter",
                f"{(backend.stats['requests'] - requests) / 2:.1f}",
                f"{(server_gets(server) - keys) / 2:,.0f}",
            ]
        )

    app = Celery(broker="memory://", backend=f"cache+memcached://{server.address}/")
    app.conf.result_backend_thread_safe = True
    ids = [uuid.uuid4().hex for _ in range(WAITERS)]
    results = ResultSet([CeleryResult(i, app=app) for i in ids], app=app)
    waiting = asyncio.create_task(asyncio.to_thread(_join_quietly, results))
    await asyncio.sleep(1)
    keys = server_gets(server)
    await asyncio.sleep(SECONDS)
    rows.append(
        [
            f"Celery {version('celery')} `ResultSet.join_native()` of 1,000 (0.5 s interval)",
            "(not counted)",
            f"{(server_gets(server) - keys) / SECONDS:,.0f}",
        ]
    )
    await waiting
    app.backend.client.close()
    app.close()
    return rows


def _join_quietly(results: Any) -> None:
    try:
        results.join_native(timeout=SECONDS + 1.5, interval=0.5)
    except Exception:  # it times out: nothing arrives
        pass


# ------------------------------------------------------------------ report


def goals(figures: dict[str, float], load: list[list[Any]]) -> list[str]:
    """Each goal with what was measured, met or missed."""
    poll = figures["aioresults `await result`, defaults (poll) ratio"]
    notify = figures['aioresults, `watch="notify"` p50']
    busy, idle = float(load[0][1]), float(load[1][1])
    return [
        f"p50 within 1.3× of the hand-written poll on the same schedule: {poll:.2f}× "
        + ("**met**" if poll <= 1.3 else "**missed**"),
        f'`watch="notify"` p50 ≤ 5 ms: {notify * 1e3:.2f} ms '
        + (
            "**met**"
            if notify <= 0.005
            else "**missed** (memcached's logger thread, which writes the `watch` lines, "
            "sleeps longer the quieter the server: the lines come late at this cadence)"
        ),
        f"at most 2 requests/s with 1,000 waiters: {busy:.1f} "
        + ("**met**" if busy <= 2.0 else "**missed**"),
        f"none without waiters: {idle:.1f} " + ("**met**" if idle == 0 else "**missed**"),
    ]


async def run() -> str:
    with MemcachedServer() as server:
        latency, quiet, figures = await wake_latency(server)
        load = await idle_load(server)
        server_version = server.version().removeprefix("VERSION ")
    lines = [
        "## Memcached",
        "",
        f"Machine: {machine()}. Server: memcached {server_version} on loopback, private. "
        f"Writer: pymemcache {version('pymemcache')} in another process. "
        "Run: `scripts/bench memcached`.",
        "",
        "### Wake latency at the default poll settings",
        "",
        f"Stored 20–50 ms after the wait began; {ROUNDS} alternating rounds of {SAMPLES}; "
        "the ratio is the median over rounds of p50 / floor p50, with its spread.",
        "",
        table(["waiter", "samples", "p50", "p90", "p50 / floor"], latency),
        "",
        "After a quiet wait (the poller has backed off to `max_poll_interval`, 0.5 s):",
        "",
        table(["waiter", "quiet wait", "median", "max"], quiet),
        "",
        f"### Load while {WAITERS:,} results are awaited and none arrives",
        "",
        table(["waiters", "requests/s", "keys read/s (server `cmd_get`)"], load),
        "",
        "Goals: " + "; ".join(goals(figures, load)) + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run every measurement, print the results and write them to docs/benchmarks.md."""
    body = asyncio.run(run())
    write_section("memcached", body)
    print(body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        writer_main(int(sys.argv[2]))
    else:
        main()
