"""NATS JetStream KV: wake latency against a raw nats-py KV watch.

Usage: ``python -m benchmarks nats`` (from the repository root). One writer
process (nats-py's ``kv.put`` of Celery's JSON) stores every result, 20-50 ms
after the wait began; the readers in this process are:

* the floor: nats-py's own ``kv.watch(key)``, started per wait, which wakes
  on the update its ordered consumer delivers;
* aioresults ``await result``: one shared consumer over every task record,
  the record handed to the waiter by the hub.

Each reader runs in each of three alternating rounds; the ratio to the floor
is the median of the rounds' p50 ratios, with its spread.
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

import nats

import aioresults as ar
from aioresults.backends.nats import NatsBackend
from benchmarks._common import Writer, machine, ms, summary, table, version, write_section
from tests.services import NatsServer

ROUNDS = 3
SAMPLES = 50
BUCKET = "bench"


async def writer_main(url: str) -> None:
    """Store each task id read from stdin with ``kv.put``; print ``time.monotonic()``
    taken just before each store."""
    client = await nats.connect(url)
    kv = await client.jetstream().key_value(BUCKET)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        task_id = line.decode().strip()
        record = {"status": "SUCCESS", "result": 42, "traceback": None, "task_id": task_id}
        payload = json.dumps(record).encode()
        started = time.monotonic()
        await kv.put(f"celery-task-meta-.{task_id}", payload)
        print(repr(started), flush=True)
    await client.close()


class NatsWriter(Writer):
    """The one writer process every reader is measured against."""

    def __init__(self, url: str) -> None:
        super().__init__("nats", url)
        self.args = [sys.executable, "-m", "benchmarks.nats_bench", "--writer", url]


async def latencies(
    writer: Writer, wait: Callable[[str], Awaitable[Any]], samples: int
) -> list[float]:
    out = []
    for n in range(samples):
        task_id = uuid.uuid4().hex
        woke: list[float] = []

        async def waiter(task_id: str = task_id, woke: list[float] = woke) -> None:
            await wait(task_id)
            woke.append(time.monotonic())

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.02 + 0.03 * (n % 7) / 6)
        stored = await writer.store(task_id)
        await asyncio.wait_for(task, 30)
        out.append(woke[0] - stored)
    return out


async def run() -> str:
    with NatsServer() as server:
        backend = NatsBackend(server.url, bucket=BUCKET)
        await backend.get_meta("warm-up")  # creates the bucket
        client = await nats.connect(server.url)
        kv = await client.jetstream().key_value(BUCKET)

        async def raw_watch(task_id: str) -> None:
            watcher = await kv.watch(f"celery-task-meta-.{task_id}")
            try:
                async for entry in watcher:
                    if entry is not None and entry.value:
                        return
            finally:
                await watcher.stop()

        floor = f"raw nats-py {version('nats-py')} `kv.watch(key)` per wait (floor)"
        readers: dict[str, Callable[[str], Awaitable[Any]]] = {
            floor: raw_watch,
            f"aioresults {version('aioresults')} `await result`": lambda t: ar.AsyncResult(
                t, backend
            ).get(timeout=30),
        }
        rounds: dict[str, list[list[float]]] = {name: [] for name in readers}
        async with NatsWriter(server.url) as writer:
            for _ in range(ROUNDS):  # alternating: a busy moment slows both alike
                for name, wait in readers.items():
                    rounds[name].append(await latencies(writer, wait, SAMPLES))
        stats = backend.wait_stats()
        await backend.aclose()
        await client.close()
        server_version = server.info()["version"]

    rows = []
    ours = 1.0
    for name, values in rounds.items():
        ratios = [
            statistics.median(r) / statistics.median(f)
            for r, f in zip(values, rounds[floor], strict=True)
        ]
        if name != floor:
            ours = statistics.median(ratios)
        p50, p90, _ = summary([v for r in values for v in r])
        rows.append(
            [
                name,
                sum(map(len, values)),
                ms(p50),
                ms(p90),
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
            ]
        )
    lines = [
        "## NATS JetStream KV",
        "",
        f"Machine: {machine()}. Server: nats-server {server_version} with JetStream (file "
        f"store) on loopback, private; nats-py {version('nats-py')}. Writer: `kv.put` in "
        "another process. Run: `scripts/bench nats`.",
        "",
        "### Wake latency (result stored by another process while waiting)",
        "",
        f"{ROUNDS} alternating rounds of {SAMPLES}; the ratio is the median over rounds of "
        "p50 / floor p50, with its spread.",
        "",
        table(["waiter", "samples", "p50", "p90", "p50 / floor"], rows),
        "",
        f"aioresults served every wait from one consumer (`mode={stats.mode!r}`, "
        f"{stats.sessions} session, {stats.polls} polls).",
        "",
        f"Goal: aioresults p50 within 1.3× of the floor: {ours:.2f}×, "
        + ("**met**." if ours <= 1.3 else "**missed**."),
    ]
    return "\n".join(lines)


def main() -> None:
    """Run every measurement, print the results and write them to docs/benchmarks.md."""
    body = asyncio.run(run())
    write_section("nats", body)
    print(body)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        asyncio.run(writer_main(sys.argv[2]))
    else:
        main()
