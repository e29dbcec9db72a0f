"""saq's wake latency, run inside a virtualenv that has saq (it pins redis<8).

Usage: ``python benchmarks/_saq_latency.py URL SAMPLES``; prints a JSON list of
latencies in seconds. The waiter enqueues a job and awaits it with
``job.refresh(until_complete=...)`` (saq's pub/sub notification, then a
read); the writer, a process of its own in the same virtualenv, finishes it
with ``queue.finish(job, COMPLETE)``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saq import Queue

from benchmarks._common import Writer, now


async def main(url: str, samples: int) -> None:
    queue = Queue.from_url(url, name="bench")
    await queue.connect()
    latencies = []
    async with Writer("saq", url, python=sys.executable) as writer:
        for _ in range(samples):
            task_id = uuid.uuid4().hex
            job = await queue.enqueue("bench", key=task_id)
            assert job is not None
            woke: list[float] = []

            async def wait(job: object = job, woke: list[float] = woke) -> None:
                await job.refresh(until_complete=10)  # type: ignore[attr-defined]
                woke.append(now())

            waiter = asyncio.create_task(wait())
            await asyncio.sleep(random.uniform(0.02, 0.05))
            stored = await writer.store(task_id)
            await waiter
            latencies.append(woke[0] - stored)
    await queue.disconnect()
    print(json.dumps(latencies))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
