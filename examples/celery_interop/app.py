"""The web side: a FastAPI app that sends Celery tasks and awaits their results.

Run it from this directory, next to a Celery worker (see ``tasks.py``)::

    uvicorn app:app

The app sends task messages with a broker-only Celery app, so Celery's own
result machinery never runs in the web process; every result is awaited with
aioresults on the same Redis database, woken by Redis pub/sub without
blocking the event loop.

* ``POST /add?x=2&y=3`` and ``POST /count?n=10`` -- send a task, return its id;
* ``POST /reserve?item=chair`` -- send a task that fails;
* ``GET /results/{task_id}?timeout=10`` -- 200 with the outcome once ready,
  202 with the current state if not ready in time;
* ``GET /results/{task_id}/events`` -- server-sent events: every state change.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from celery import Celery
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, StreamingResponse

import aioresults as ar

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def describe(meta: ar.ResultMeta) -> dict[str, Any]:
    """A JSON-friendly view of a record written by a Celery worker."""
    error = meta.result if isinstance(meta.result, BaseException) else None
    return {
        "task_id": meta.task_id,
        "status": meta.status,
        "ready": meta.ready,
        "result": None if error else meta.result,
        "error": f"{type(error).__name__}: {error}" if error else None,
        "name": meta.name,
        "worker": meta.worker,
    }


def create_app(redis_url: str = REDIS_URL) -> FastAPI:
    """Build the app: one Celery producer and one aioresults backend on ``redis_url``."""
    # Broker only: no result backend here, so Celery subscribes to nothing in this process.
    producer = Celery("producer", broker=redis_url)
    producer.conf.broker_connection_retry_on_startup = True
    backend = ar.connect(redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.aclose()
        producer.close()

    app = FastAPI(title="Celery results, awaited", lifespan=lifespan)
    app.state.backend = backend
    app.state.producer = producer

    async def send(name: str, *args: Any) -> dict[str, str]:
        # Publishing a message is blocking I/O in kombu: keep it off the event loop.
        sent = await anyio.to_thread.run_sync(lambda: producer.send_task(name, args=args))
        return {"task_id": sent.id}

    @app.post("/add")
    async def add(x: int, y: int) -> dict[str, str]:
        return await send("tasks.add", x, y)

    @app.post("/count")
    async def count(n: int = Query(10, ge=1, le=1000), delay: float = 0.1) -> dict[str, str]:
        return await send("tasks.count_to", n, delay)

    @app.post("/reserve")
    async def reserve(item: str) -> dict[str, str]:
        return await send("tasks.reserve", item)

    @app.get("/results/{task_id}")
    async def result(task_id: str, timeout: float = Query(10.0, ge=0, le=60)) -> JSONResponse:
        handle: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
        try:
            meta = await handle.wait_ready(timeout=timeout)
        except ar.ResultTimeout:
            return JSONResponse(describe(await handle.meta()), status_code=202)
        return JSONResponse(describe(meta))

    @app.get("/results/{task_id}/events")
    async def events(task_id: str) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            async for meta in ar.AsyncResult(task_id, backend).watch():
                yield f"data: {json.dumps(describe(meta))}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


app = create_app()
