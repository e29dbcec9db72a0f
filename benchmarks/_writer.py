"""A result writer in its own process, for wake-latency benchmarks.

Usage: ``python benchmarks/_writer.py MODE URL``; reads one task id per line
from stdin, stores a SUCCESS result for it with MODE's own storage call and
prints ``time.monotonic()`` taken just before that call.

``python benchmarks/_writer.py serve URL SOCKET`` is the one writer process of
the Redis suite, shared by every reader process of a run: it listens on the
Unix socket ``SOCKET``, and each line it reads is a request answered with one
line (``time.monotonic()``):

* ``celery <task_id>``: store a SUCCESS record in Celery's format with the
  guarded write script aioresults uses (one EVALSHA); the time just before.
* ``taskiq <task_id>``: taskiq-redis's own ``set_result``; the time just before.
* ``bulk <path>``: store a SUCCESS record (result: its index) for every id in
  the JSON list at ``path``, pipelined in one write; the time the last reply
  came back.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

VALUE = {"answer": 42}
ROOT = str(Path(__file__).resolve().parent.parent)


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
    if mode == "saq":
        from saq import Queue, Status

        queue = Queue.from_url(url, name="bench")
        await queue.connect()

        async def saq_store(task_id: str) -> None:
            job = await queue.job(task_id)
            assert job is not None
            await queue.finish(job, Status.COMPLETE, result=VALUE)

        return saq_store, queue.disconnect
    raise SystemExit(f"unknown mode {mode}")


def celery_record(task_id: str, result: Any) -> bytes:
    """A SUCCESS record as Celery writes it."""
    import datetime as dt
    import json

    return json.dumps(
        {
            "status": "SUCCESS",
            "result": result,
            "traceback": None,
            "children": [],
            "date_done": dt.datetime.now(dt.UTC).isoformat(),
            "task_id": task_id,
        }
    ).encode()


async def serve(url: str, path: str) -> None:
    import json
    from urllib.parse import urlsplit

    sys.path.insert(0, ROOT)
    from aioresults.backends.redis._scripts import WRITE
    from benchmarks._redis_limits import open_raw

    client = await open_raw(urlsplit(url).port or 6379)
    sha = await client.call("SCRIPT", "LOAD", WRITE)
    stores: dict[str, Callable[[str], Awaitable[Any]]] = {}

    async def celery(task_id: str) -> None:
        key = f"celery-task-meta-{task_id}"
        await client.call("EVALSHA", sha, 1, key, celery_record(task_id, VALUE), 86_400_000)

    stores["celery"] = celery
    taskiq_close = None
    try:
        stores["taskiq"], taskiq_close = await make_store("taskiq", url)
    except ImportError:
        pass

    async def bulk(source: str) -> float:
        with open(source) as listing:  # noqa: ASYNC230 - a small local file
            ids = json.load(listing)
        replies = [
            client.call("EVALSHA", sha, 1, f"celery-task-meta-{i}", celery_record(i, n), 86_400_000)
            for n, i in enumerate(ids)
        ]
        await replies[-1]
        return time.monotonic()

    lines: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.add(writer)
        while line := await reader.readline():
            mode, _, argument = line.decode().strip().partition(" ")
            if mode == "bulk":
                answer = await bulk(argument)
            else:
                answer = time.monotonic()
                await stores[mode](argument)
            writer.write(f"{answer!r}\n".encode())
            await writer.drain()
        writer.close()
        lines.discard(writer)

    server = await asyncio.start_unix_server(handle, path)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # until the parent closes it
    server.close()
    for line in list(lines):
        line.close()  # its handler reads the end and returns
    for _ in range(100):
        if not lines:
            break
        await asyncio.sleep(0.01)
    client.close()
    if taskiq_close is not None:
        await taskiq_close()


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
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
