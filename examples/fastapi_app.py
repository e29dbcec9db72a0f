"""A FastAPI app that awaits results, runs a demo group and streams its progress.

Run it (``pip install fastapi uvicorn``) and open http://127.0.0.1:8000/::

    uvicorn --app-dir examples fastapi_app:app

Routes:

* ``GET /`` -- a page with a progress bar fed by server-sent events;
* ``POST /groups?size=5`` -- start a demo group of ``size`` tasks that a
  background coroutine completes over time, reporting progress;
* ``GET /groups/{group_id}/events`` -- server-sent events: one ``progress``
  event each time a member finishes, then one ``done`` event;
* ``GET /results/{task_id}?timeout=10`` -- wait up to ``timeout`` seconds for a
  result: 200 with the result once ready, 202 with the current state if not.

The store is ``AIORESULTS_URL``, else the embedded default
(``sqlite:///aioresults.db`` in the current directory). Workers in other
processes can write to the same store: the routes wait for any task id.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

import aioresults as ar

STEPS = 4  # progress reports per demo task


def describe(meta: ar.ResultMeta) -> dict[str, Any]:
    """A JSON-friendly view of a record."""
    failed = isinstance(meta.result, BaseException)
    return {
        "task_id": meta.task_id,
        "status": meta.status,
        "ready": meta.ready,
        "result": None if failed else meta.result,
        "error": f"{type(meta.result).__name__}: {meta.result}" if failed else None,
    }


async def run_demo_group(backend: ar.BaseBackend, ids: list[str], delay: float, fail: int) -> None:
    """Stand-in for real workers: every member reports progress, then finishes."""

    async def member(index: int, task_id: str) -> None:
        async with backend.track(task_id, name="demo.square", args=[index]) as task:
            for step in range(1, STEPS + 1):
                await asyncio.sleep(delay * (1 + index % 3))
                await task.progress(step, STEPS)
            if index < fail:
                raise RuntimeError(f"member {index} failed on purpose")
            task.set_result(index * index)

    # A failed member has already stored its FAILURE; the others carry on.
    await asyncio.gather(*(member(i, t) for i, t in enumerate(ids)), return_exceptions=True)


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def create_app(url: str | None = None) -> FastAPI:
    """Build the app around one backend (``url``, else ``AIORESULTS_URL`` or the default)."""
    backend = ar.connect(url)  # connects lazily, on first use
    jobs: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for job in jobs:
            job.cancel()  # tracked tasks store REVOKED as they stop
        await asyncio.gather(*jobs, return_exceptions=True)
        await backend.aclose()

    app = FastAPI(title="aioresults demo", lifespan=lifespan)
    app.state.backend = backend
    app.state.jobs = jobs

    @app.get("/results/{task_id}")
    async def get_result(task_id: str, timeout: float = Query(10.0, ge=0, le=60)) -> JSONResponse:
        """Wait up to ``timeout`` seconds: 200 once ready, else 202 with the current state."""
        result: ar.AsyncResult[Any] = ar.AsyncResult(task_id, backend)
        try:
            meta = await result.wait_ready(timeout=timeout)
        except ar.ResultTimeout:
            return JSONResponse(describe(await result.meta()), status_code=202)
        except ar.InvalidTaskId as exc:
            raise HTTPException(422, str(exc)) from exc
        return JSONResponse(describe(meta))

    @app.post("/groups", status_code=201)
    async def start_group(
        size: int = Query(5, ge=1, le=100),
        delay: float = Query(0.25, ge=0, le=5),
        fail: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Start a demo group; its first ``fail`` members fail on purpose."""
        group: ar.GroupResult[int] = ar.GroupResult(
            str(uuid.uuid4()),
            [ar.AsyncResult(str(uuid.uuid4()), backend) for _ in range(size)],
            backend,
        )
        await group.save()  # so /groups/{id}/events can restore it, in any process
        ids = [r.id for r in group]
        job = asyncio.create_task(run_demo_group(backend, ids, delay, fail))
        jobs.add(job)
        job.add_done_callback(jobs.discard)
        return {"group_id": group.id, "task_ids": ids}

    @app.get("/groups/{group_id}/events")
    async def group_events(group_id: str) -> StreamingResponse:
        """Stream the group's progress as server-sent events until every member is done."""
        group = await ar.GroupResult.restore(group_id, backend)
        if group is None:
            raise HTTPException(404, f"no saved group {group_id!r}")

        async def events() -> AsyncIterator[str]:
            total, completed, failed = len(group), 0, []
            yield sse("progress", {"completed": 0, "total": total})
            # Members come in completion order; the wait is pushed by the store.
            async for member in group.as_completed():
                meta = await member.meta()
                completed += 1
                if meta.status != ar.states.SUCCESS:
                    failed.append(member.id)
                yield sse(
                    "progress",
                    {
                        "completed": completed,
                        "total": total,
                        "task_id": member.id,
                        "status": meta.status,
                    },
                )
            yield sse("done", {"completed": completed, "total": total, "failed": failed})

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        """The demo page: starts a group and shows its progress."""
        return PAGE

    return app


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>aioresults demo</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 36rem; margin: 3rem auto; }
  progress { width: 100%; height: 1.5rem; }
  #log { font-family: monospace; font-size: 0.9rem; white-space: pre-line; }
</style>
</head>
<body data-state="idle">
<h1>aioresults demo</h1>
<p>A group of tasks runs in the background; each finished member moves the bar.</p>
<progress id="bar" max="100" value="0"></progress>
<p><span id="percent">0%</span> <span id="status"></span></p>
<button id="again" type="button">Run again</button>
<div id="log"></div>
<script>
const bar = document.getElementById("bar");
const percent = document.getElementById("percent");
const status = document.getElementById("status");
const log = document.getElementById("log");

function show(completed, total) {
  const value = Math.round((100 * completed) / total);
  bar.value = value;
  percent.textContent = value + "%";
}

async function start() {
  document.body.dataset.state = "running";
  show(0, 1);
  log.textContent = "";
  // The page's own query string (e.g. ?size=8&delay=0.1) configures the demo group.
  const response = await fetch("/groups" + location.search, { method: "POST" });
  const { group_id } = await response.json();
  status.textContent = "group " + group_id;
  const events = new EventSource("/groups/" + group_id + "/events");
  events.addEventListener("progress", (event) => {
    const data = JSON.parse(event.data);
    show(data.completed, data.total);
    if (data.task_id) log.textContent += data.status + " " + data.task_id + "\\n";
  });
  events.addEventListener("done", (event) => {
    const data = JSON.parse(event.data);
    events.close();  // else EventSource reconnects when the stream ends
    status.textContent = data.failed.length ? data.failed.length + " failed" : "all succeeded";
    document.body.dataset.state = "done";
  });
}

document.getElementById("again").addEventListener("click", start);
start();
</script>
</body>
</html>
"""

app = create_app()
