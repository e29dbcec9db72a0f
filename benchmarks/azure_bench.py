"""The Azure Block Blob backend on a private Azurite: overhead, polling load, wake latency.

Usage: ``python -m benchmarks.azure_bench`` (from the repository root). Prints:

* store and read time per call, next to the same call made with the SDK alone;
* HTTP requests per second, second by second, while 1,000 waiters wait (their
  results missing, then present but not ready), with and without listings;
* how long a waiter takes to wake after a result is stored, at default
  settings, after quiet waits of several lengths.

Azurite is an emulator: its absolute speeds say little about Azure itself; the
request counts and the latency, which the poller's schedule sets, carry over.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from azure.storage.blob.aio import BlobServiceClient

import aioresults as ar
from aioresults import states
from aioresults.backends.azure_blob import AzureBlockBlobBackend
from benchmarks._common import machine, version, write_section
from tests.azurite import AZURITE_VERSION, Azurite

CALLS = 300
WAITERS = 1000
SECONDS = 8


def new_id() -> str:
    return str(uuid.uuid4())


async def timed(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


async def overhead(server: Azurite, container: str) -> None:
    print(f"\n## Overhead per call (median of {CALLS}, one at a time)\n")
    ids = [new_id() for _ in range(CALLS)]
    payload = b'{"status": "SUCCESS", "result": 1, "traceback": null, "children": []}'
    times: dict[str, list[float]] = {"sdk store": [], "store": [], "sdk read": [], "read": []}
    async with (
        BlobServiceClient.from_connection_string(
            server.connection_string(), use_env_settings=False
        ) as service,
        AzureBlockBlobBackend(server.connection_string(), container_name=container) as backend,
    ):
        raw = service.get_container_client(container)
        # Alternate the two, so that a busy machine slows both alike.
        for task_id in ids:
            blob = raw.get_blob_client(f"raw-{task_id}")
            times["sdk store"].append(await timed(blob.upload_blob(payload, overwrite=True)))
            times["store"].append(await timed(backend.mark_as_done(task_id, 1)))
        for task_id in ids:
            blob = raw.get_blob_client(f"raw-{task_id}")
            times["sdk read"].append(await timed(_read_all(blob)))
            times["read"].append(await timed(backend.get_meta(task_id)))
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print("| call | SDK alone | aioresults | requests |")
    print("|---|---|---|---|")
    store = f"{median['sdk store']:.2f} ms | {median['store']:.2f} ms"
    print(f"| store | {store} | one PUT, If-None-Match: * |")
    print(f"| read | {median['sdk read']:.2f} ms | {median['read']:.2f} ms | GET |")


async def _read_all(blob: Any) -> bytes:
    data: bytes = await (await blob.download_blob()).readall()
    return data


async def polling_load(server: Azurite, container: str, present: bool, list_threshold: int) -> None:
    writer = AzureBlockBlobBackend(server.connection_string(), container_name=container)
    reader = AzureBlockBlobBackend(
        server.connection_string(), container_name=container, list_threshold=list_threshold
    )
    async with writer, reader:
        ids = [new_id() for _ in range(WAITERS)]
        if present:
            limit = asyncio.Semaphore(32)

            async def started(task_id: str) -> None:
                async with limit:
                    await writer.mark_as_started(task_id)

            await asyncio.gather(*(started(t) for t in ids))
        waits = [asyncio.create_task(ar.AsyncResult(t, reader).get()) for t in ids]
        # Registered and read once: what follows is the poller alone.
        while reader.wait_stats().waiters < WAITERS or reader.wait_stats().unsettled:
            await asyncio.sleep(0.01)
        rates = []
        for _ in range(SECONDS):
            before = reader.stats["requests"]
            await asyncio.sleep(1)
            rates.append(reader.stats["requests"] - before)
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    what = "STARTED (present, unchanged)" if present else "missing"
    how = "listing" if list_threshold else "conditional GETs only"
    print(f"| {what} | {how} | {' '.join(map(str, rates))} |")


async def wake_latency(server: Azurite, container: str) -> None:
    print("\n## Wake latency at default settings (5 samples each)\n")
    print("| quiet wait before the store | median | max |")
    print("|---|---|---|")
    async with (
        AzureBlockBlobBackend(server.connection_string(), container_name=container) as writer,
        AzureBlockBlobBackend(server.connection_string(), container_name=container) as reader,
    ):
        for quiet in (0.0, 1.0, 4.0):
            latencies = []
            for _ in range(5):
                task_id = new_id()
                waiter = asyncio.create_task(ar.AsyncResult(task_id, reader).get())
                while task_id not in reader.wait_stats().watched_ids:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(quiet)
                await writer.store_result(task_id, 1, states.SUCCESS)
                stored = time.perf_counter()
                await waiter
                latencies.append(time.perf_counter() - stored)
            print(
                f"| {quiet:.0f} s | {statistics.median(latencies) * 1e3:.0f} ms "
                f"| {max(latencies) * 1e3:.0f} ms |"
            )


async def run() -> None:
    with Azurite() as server:
        await overhead(server, "bench-overhead")
        print(f"\n## HTTP requests per second while {WAITERS} waiters wait (default intervals)\n")
        print("| their results | reads | requests in each second |")
        print("|---|---|---|")
        for present in (False, True):
            for threshold in (16, 0):
                container = f"bench-poll-{int(present)}-{threshold}"
                await polling_load(server, container, present, threshold)
        await wake_latency(server, "bench-latency")


def main() -> None:
    """Run every measurement, print the results and write them to docs/benchmarks.md."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        asyncio.run(run())
    body = "\n".join(
        [
            "## Azure Block Blob",
            "",
            f"Machine: {machine()}. Azurite {AZURITE_VERSION} on loopback, private; "
            f"azure-storage-blob {version('azure-storage-blob')}. "
            "Run: `scripts/bench azure`.",
            captured.getvalue().replace("\n## ", "\n### "),
        ]
    )
    write_section("azure", body)
    print(body)


if __name__ == "__main__":
    main()
