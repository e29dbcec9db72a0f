"""The examples run as written: as scripts, through ASGI, and in a real browser."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

import aioresults as ar
from tests.browser import open_page
from tests.servers import RedisServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without AIORESULTS_URL, so examples use the true default."""
    env = {k: v for k, v in os.environ.items() if k != "AIORESULTS_URL"}
    env.update(extra)
    return env


def run_example(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load_example(name: str) -> ModuleType:
    module_name = "example_" + name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ scripts


def test_quickstart_runs_on_the_embedded_default(tmp_path: Path) -> None:
    out = run_example("quickstart.py", cwd=tmp_path)
    assert "store: <SQLiteBackend url='sqlite:///aioresults.db'>" in out
    assert "sum = 10" in out
    assert "joined in order: [0, 1, 4]" in out
    assert "task failed: ValueError('bad input', 42)" in out
    assert (tmp_path / "aioresults.db").is_file()


def test_async_worker_demo(tmp_path: Path) -> None:
    out = run_example("async_worker.py", cwd=tmp_path)
    lines = out.splitlines()
    # A watcher sees the latest state when it looks: fast updates may coalesce,
    # so only the order and the end are certain.
    shown = [line for line in lines if "primes so far" in line]
    assert 1 <= len(shown) <= 9
    assert shown == sorted(shown, key=lambda line: int(line.split("%")[0].split()[-1]))
    assert lines[-2:] == ["  SUCCESS", "2262 primes below 20000"]


def test_async_worker_halves_in_two_processes(tmp_path: Path) -> None:
    task_id = str(uuid.uuid4())
    example = str(EXAMPLES / "async_worker.py")
    client = subprocess.Popen(
        [sys.executable, example, "client", task_id],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline() == "  PENDING\n"  # the client is waiting
        run_example("async_worker.py", "worker", task_id, "1000", cwd=tmp_path)
        out, _ = client.communicate(timeout=60)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 0
    assert out.endswith("  SUCCESS\nresult: 168\n")


# ------------------------------------------------------------------ FastAPI through ASGI


@pytest.fixture
def fastapi_example() -> ModuleType:
    return load_example("fastapi_app")


@pytest.fixture
async def app_client(
    fastapi_example: ModuleType, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, ar.BaseBackend]]:
    app = fastapi_example.create_app(f"sqlite:///{tmp_path / 'results.db'}")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        yield client, app.state.backend
    # ASGITransport runs no lifespan: stop the demo jobs and the backend here.
    for job in list(app.state.jobs):
        job.cancel()
    await asyncio.gather(*app.state.jobs, return_exceptions=True)
    await app.state.backend.aclose()


def parse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_fastapi_group_progress_stream(
    app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, backend = app_client
    started = await client.post("/groups", params={"size": 3, "delay": 0.01, "fail": 1})
    assert started.status_code == 201
    group_id, ids = started.json()["group_id"], started.json()["task_ids"]
    assert len(ids) == 3
    events = await client.get(f"/groups/{group_id}/events")
    assert events.status_code == 200
    assert events.headers["content-type"].startswith("text/event-stream")
    parsed = parse_events(events.text)
    assert parsed[0] == ("progress", {"completed": 0, "total": 3})
    steps = parsed[1:-1]
    assert [data["completed"] for _, data in steps] == [1, 2, 3]
    assert sorted(data["task_id"] for _, data in steps) == sorted(ids)
    assert {data["task_id"]: data["status"] for _, data in steps}[ids[0]] == "FAILURE"
    assert parsed[-1] == ("done", {"completed": 3, "total": 3, "failed": [ids[0]]})
    # Each member reported its progress on the way.
    meta = await backend.get_meta(ids[1])
    assert (meta.status, meta.result, meta.name) == ("SUCCESS", 1, "demo.square")


async def test_fastapi_awaits_a_result(
    app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, backend = app_client
    started = await client.post("/groups", params={"size": 2, "delay": 0.01, "fail": 1})
    failing, succeeding = started.json()["task_ids"]
    done = await client.get(f"/results/{succeeding}", params={"timeout": 30})
    assert done.status_code == 200
    assert done.json() == {
        "task_id": succeeding,
        "status": "SUCCESS",
        "ready": True,
        "result": 1,
        "error": None,
    }
    failed = await client.get(f"/results/{failing}", params={"timeout": 30})
    assert failed.status_code == 200
    assert failed.json()["status"] == "FAILURE"
    assert failed.json()["error"] == "RuntimeError: member 0 failed on purpose"


async def test_fastapi_reports_a_result_not_ready_yet(
    app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, backend = app_client
    task_id = str(uuid.uuid4())
    pending = await client.get(f"/results/{task_id}", params={"timeout": 0.1})
    assert pending.status_code == 202
    assert pending.json()["status"] == "PENDING" and pending.json()["ready"] is False
    await backend.update_state(task_id, "PROGRESS", {"current": 1, "total": 4})
    running = await client.get(f"/results/{task_id}", params={"timeout": 0})
    assert running.status_code == 202
    assert running.json()["result"] == {"current": 1, "total": 4}
    assert (await client.get(f"/results/{task_id}", params={"timeout": -1})).status_code == 422
    assert (await client.get("/groups/nope/events")).status_code == 404


async def test_fastapi_page(app_client: tuple[httpx.AsyncClient, ar.BaseBackend]) -> None:
    client, _ = app_client
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'new EventSource("/groups/" + group_id + "/events")' in page.text
    assert '<progress id="bar" max="100" value="0">' in page.text


def test_fastapi_shutdown_revokes_running_tasks(
    fastapi_example: ModuleType, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    app = fastapi_example.create_app(url)
    # TestClient runs the app's lifespan: leaving it shuts the app down.
    with TestClient(app) as client:
        ids = client.post("/groups", params={"size": 2, "delay": 5}).json()["task_ids"]
        assert client.get(f"/results/{ids[0]}", params={"timeout": 0}).json()["status"] in (
            "STARTED",
            "PENDING",
        )

    async def states() -> list[str]:
        async with ar.connect(url) as backend:
            return [m.status for m in await backend.get_many(ids)]

    assert asyncio.run(states()) == ["REVOKED", "REVOKED"]


# ------------------------------------------------------------------ FastAPI in a browser


@pytest.fixture
def served_app(tmp_path: Path) -> Iterator[str]:
    """The example app served by uvicorn on a free loopback port, on the default store."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(EXAMPLES),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "fastapi_app:app",
        ],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/results/x?timeout=0").status_code == 202:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.05)
        else:
            raise AssertionError("uvicorn did not start")
        yield base
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Application shutdown complete" in err


async def test_page_bar_reaches_100_percent_in_chromium(served_app: str, tmp_path: Path) -> None:
    async with open_page(f"{served_app}/?size=4&delay=0.05") as page:
        # The page may still be loading: `document.body` is null until it is parsed.
        assert await page.wait_for("document.body?.dataset.state === 'done'", timeout=60)
        assert await page.evaluate("document.getElementById('bar').value") == 100
        assert await page.evaluate("document.getElementById('percent').textContent") == "100%"
        assert await page.evaluate("document.getElementById('status').textContent") == (
            "all succeeded"
        )
        log = await page.evaluate("document.getElementById('log').textContent")
        assert log.count("SUCCESS ") == 4
        await page.screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "aioresults.db").is_file()  # the server used the default store


# ------------------------------------------------------------------ Celery interop


@pytest.fixture(scope="module")
def celery_worker() -> Iterator[str]:
    """A private Redis and a real Celery worker running examples/celery_interop/tasks.py."""
    with RedisServer() as redis:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tasks",
                "worker",
                "--pool=solo",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=warning",
            ],
            cwd=EXAMPLES / "celery_interop",
            env=clean_env(REDIS_URL=redis.url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield redis.url
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err[-3000:]


@pytest.fixture
async def celery_app_client(
    celery_worker: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, ar.BaseBackend]]:
    module = load_example("celery_interop/app")
    app = module.create_app(celery_worker)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://demo"
    ) as client:
        yield client, app.state.backend
    await app.state.backend.aclose()
    app.state.producer.close()


async def test_celery_result_awaited_from_fastapi(
    celery_app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, _ = celery_app_client
    sent = await client.post("/add", params={"x": 2, "y": 3})
    assert sent.status_code == 200
    task_id = sent.json()["task_id"]
    done = await client.get(f"/results/{task_id}", params={"timeout": 30})
    assert done.status_code == 200
    body = done.json()
    assert (body["status"], body["result"], body["name"]) == ("SUCCESS", 5, "tasks.add")
    assert body["worker"].startswith("celery@")


async def test_celery_progress_streamed(
    celery_app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, _ = celery_app_client
    task_id = (await client.post("/count", params={"n": 3, "delay": 0.05})).json()["task_id"]
    stream = await client.get(f"/results/{task_id}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    records = [
        json.loads(line.removeprefix("data: "))
        for line in stream.text.splitlines()
        if line.startswith("data: ")
    ]
    progress = [r["result"] for r in records if r["status"] == "PROGRESS"]
    assert progress == [{"current": i, "total": 3} for i in (1, 2, 3)]
    assert (records[-1]["status"], records[-1]["result"]) == ("SUCCESS", 3)


async def test_celery_failure_comes_back_as_an_exception(
    celery_app_client: tuple[httpx.AsyncClient, ar.BaseBackend],
) -> None:
    client, backend = celery_app_client
    task_id = (await client.post("/reserve", params={"item": "chair"})).json()["task_id"]
    failed = await client.get(f"/results/{task_id}", params={"timeout": 30})
    assert failed.json()["status"] == "FAILURE"
    assert failed.json()["error"] == "InventoryError: chair is out of stock"
    with pytest.raises(ar.RemoteTaskError) as raised:
        await ar.AsyncResult(task_id, backend).get(timeout=5)
    assert raised.value.remote_type == "InventoryError"
    assert raised.value.remote_module == "tasks"
    meta = await backend.get_meta(task_id)
    assert meta.traceback is not None and "out of stock" in meta.traceback
