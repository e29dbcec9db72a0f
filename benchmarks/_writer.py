"""A result writer in its own process, for wake-latency benchmarks.

Usage: ``python benchmarks/_writer.py MODE URL``; reads one task id per line
from stdin, stores a SUCCESS result for it with MODE's own storage call and
prints ``time.monotonic()`` taken just before that call.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

VALUE = {"answer": 42}


async def make_store(mode: str, url: str) -> tuple[Callable[[str], Awaitable[Any]], Any]:
    if mode == "aioresults":
        import aioresults as ar

        backend = ar.connect(url)
        await backend.get_meta("warm-up")
        return (lambda task_id: backend.mark_as_done(task_id, VALUE)), backend.aclose
    if mode == "raw":
        import json

        import redis.asyncio as redis

        client = redis.Redis.from_url(url)
        await client.ping()

        async def raw(task_id: str) -> None:
            key = f"celery-task-meta-{task_id}"
            payload = json.dumps({"status": "SUCCESS", "result": VALUE, "task_id": task_id})
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(key, payload, ex=86400).publish(key, payload)
                await pipe.execute()

        return raw, client.aclose
    if mode == "celery":
        from celery import Celery

        app = Celery(broker="memory://", backend=url)

        async def celery_store(task_id: str) -> None:
            app.backend.store_result(task_id, VALUE, "SUCCESS")

        return celery_store, None
    if mode == "taskiq":
        from taskiq import TaskiqResult
        from taskiq_redis import RedisAsyncResultBackend

        backend = RedisAsyncResultBackend(url)
        await backend.startup()

        async def taskiq_store(task_id: str) -> None:
            await backend.set_result(
                task_id, TaskiqResult(is_err=False, return_value=VALUE, execution_time=0.0)
            )

        return taskiq_store, backend.shutdown
    if mode == "arq":
        from arq.connections import RedisSettings, create_pool
        from arq.jobs import serialize_result

        pool = await create_pool(RedisSettings.from_dsn(url))

        async def arq_store(task_id: str) -> None:
            now_ms = int(time.time() * 1000)
            data = serialize_result(
                "bench",
                (),
                {},
                1,
                now_ms,
                True,
                VALUE,
                now_ms,
                now_ms,
                "bench",
                "arq:queue",
                task_id,
            )
            await pool.set(f"arq:result:{task_id}", data, px=3_600_000)

        return arq_store, pool.aclose
    raise SystemExit(f"unknown mode {mode}")


async def main(mode: str, url: str) -> None:
    store, close = await make_store(mode, url)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        task_id = line.decode().strip()
        started = time.monotonic()
        await store(task_id)
        print(repr(started), flush=True)
    if close is not None:
        await close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
