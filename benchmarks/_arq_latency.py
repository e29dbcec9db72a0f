"""arq's wake latency, run inside a virtualenv that has arq (it pins redis<6).

Usage: ``python benchmarks/_arq_latency.py URL SAMPLES``; prints a JSON list of
latencies in seconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arq.connections import RedisSettings, create_pool
from arq.jobs import Job

from benchmarks._common import Writer, now


async def main(url: str, samples: int) -> None:
    pool = await create_pool(RedisSettings.from_dsn(url))
    latencies = []
    async with Writer("arq", url, python=sys.executable) as writer:
        for _ in range(samples):
            task_id = uuid.uuid4().hex
            await pool.enqueue_job("bench", _job_id=task_id)
            job = Job(task_id, pool)
            woke: list[float] = []

            async def wait(job: Job = job, woke: list[float] = woke) -> None:
                await job.result(timeout=10, poll_delay=0.5)
                woke.append(now())

            waiter = asyncio.create_task(wait())
            await asyncio.sleep(random.uniform(0.02, 0.05))
            stored = await writer.store(task_id)
            await waiter
            latencies.append(woke[0] - stored)
    await pool.aclose()
    print(json.dumps(latencies))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
