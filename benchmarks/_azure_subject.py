"""One Azure measurement of one aioresults (this checkout's or an older one), in
a process of its own: a child of ``benchmarks/azure_bench.py``.

Usage: ``python benchmarks/_azure_subject.py SPEC``, SPEC a JSON object with
``measure`` (``overhead``, ``polling`` or ``wake``), ``conn`` (Azurite's
connection string), ``container`` and the measure's own parameters. The
``aioresults`` imported is whichever ``PYTHONPATH`` names. Prints one JSON
object with the figures.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from azure.storage.blob.aio import BlobServiceClient

import aioresults as ar
from aioresults import states
from aioresults.backends.azure_blob import AzureBlockBlobBackend


def new_id() -> str:
    return str(uuid.uuid4())


async def timed(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


def watched(backend: Any) -> list[str]:
    """The ids a backend's waiters wait for (older versions kept them on ``hub``)."""
    if hasattr(backend, "wait_stats"):
        return list(backend.wait_stats().watched_ids)
    return list(backend.hub.watched_ids())


def polls(backend: Any) -> int | None:
    """Rounds of the poller so far (older versions do not count them)."""
    return backend.wait_stats().polls if hasattr(backend, "wait_stats") else None


async def settled(backend: Any, count: int) -> None:
    """Return once ``count`` waiters are registered and their first reads done."""
    if hasattr(backend, "wait_stats"):
        while backend.wait_stats().waiters < count or backend.wait_stats().unsettled:
            await asyncio.sleep(0.01)
        return
    while len(backend.hub) < count:  # older versions: no count of first reads
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)


async def _read_all(blob: Any) -> bytes:
    data: bytes = await (await blob.download_blob()).readall()
    return data


async def overhead(spec: dict[str, Any]) -> dict[str, Any]:
    """Store and read one at a time, each call alternating with the SDK's own."""
    conn, container = spec["conn"], spec["container"]
    ids = [new_id() for _ in range(spec["calls"])]
    payload = b'{"status": "SUCCESS", "result": 1, "traceback": null, "children": []}'
    times: dict[str, list[float]] = {"sdk store": [], "store": [], "sdk read": [], "read": []}
    async with (
        BlobServiceClient.from_connection_string(conn, use_env_settings=False) as service,
        AzureBlockBlobBackend(conn, container_name=container) as backend,
    ):
        raw = service.get_container_client(container)
        for task_id in ids:
            blob = raw.get_blob_client(f"raw-{task_id}")
            times["sdk store"].append(await timed(blob.upload_blob(payload, overwrite=True)))
            times["store"].append(await timed(backend.mark_as_done(task_id, 1)))
        for task_id in ids:
            blob = raw.get_blob_client(f"raw-{task_id}")
            times["sdk read"].append(await timed(_read_all(blob)))
            times["read"].append(await timed(backend.get_meta(task_id)))
    return {name: statistics.median(values) for name, values in times.items()}


async def polling(spec: dict[str, Any]) -> dict[str, Any]:
    """HTTP requests in each second while ``waiters`` waiters wait."""
    conn, container, count = spec["conn"], spec["container"], spec["waiters"]
    writer = AzureBlockBlobBackend(conn, container_name=container)
    reader = AzureBlockBlobBackend(
        conn, container_name=container, list_threshold=spec["list_threshold"]
    )
    async with writer, reader:
        ids = [new_id() for _ in range(count)]
        if spec["present"]:
            limit = asyncio.Semaphore(32)

            async def started(task_id: str) -> None:
                async with limit:
                    await writer.mark_as_started(task_id)

            await asyncio.gather(*(started(t) for t in ids))
        waits = [asyncio.create_task(ar.AsyncResult(t, reader).get()) for t in ids]
        await settled(reader, count)  # what follows is the poller alone
        rates = []
        rounds = polls(reader)
        for _ in range(spec["seconds"]):
            before = reader.stats["requests"]
            await asyncio.sleep(1)
            rates.append(reader.stats["requests"] - before)
        if rounds is not None:
            rounds = polls(reader) - rounds  # type: ignore[operator]
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return {"rates": rates, "rounds": rounds}


async def wake(spec: dict[str, Any]) -> dict[str, Any]:
    """From the store's return to the waiter's, after a quiet wait of each length."""
    conn, container = spec["conn"], spec["container"]
    latencies: dict[str, list[float]] = {}
    async with (
        AzureBlockBlobBackend(conn, container_name=container) as writer,
        AzureBlockBlobBackend(conn, container_name=container) as reader,
    ):
        for quiet in spec["quiet"]:
            found = latencies.setdefault(str(quiet), [])
            for _ in range(spec["samples"]):
                task_id = new_id()
                waiter = asyncio.create_task(ar.AsyncResult(task_id, reader).get())
                while task_id not in watched(reader):
                    await asyncio.sleep(0.001)
                await asyncio.sleep(quiet)
                await writer.store_result(task_id, 1, states.SUCCESS)
                stored = time.perf_counter()
                await waiter
                found.append(time.perf_counter() - stored)
    return {"latencies": latencies}


MEASURES = {"overhead": overhead, "polling": polling, "wake": wake}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(MEASURES[spec["measure"]](spec))))
