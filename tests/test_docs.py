"""The documentation builds with ``mkdocs build --strict``, its Python runs, and it
says what the code does.

Every ```` ```python ```` block of the README and of ``docs/`` runs here, each on
its own, in a fresh working directory (so ``ar.connect()`` is the embedded
default store there) with ``AIORESULTS_URL`` unset and warnings as errors. A
block may use top-level ``await``, and the names its page's text gives it
(``ar``, the ``backend`` it is talking about, a ``task_id``...): the page's
entry in :data:`GIVEN` provides them, and checks afterwards what the block
did. A block that cannot run on purpose is marked on the line before it with
``<!-- fragment: why -->``; it must still compile.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import aioresults as ar
from aioresults import _cli
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    api = (site / "api" / "index.html").read_text()
    # The API reference is generated from the docstrings.
    for name in (
        "AsyncResult.get",
        "TaskTracker.progress",
        "BaseBackend.chord_part_return",
        "register_backend",
    ):
        assert f'id="aioresults.{name}"' in api, name
    assert "Create the backend a URL names." in api
    for page in ("backends/redis", "backends/sqlite", "cli", "errors", "benchmarks"):
        assert (site / page / "index.html").is_file(), page


def test_cli_exit_codes_are_documented_as_implemented() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d) \|", text, re.MULTILINE)}
    implemented = {
        _cli.EXIT_OK,
        _cli.EXIT_FAILED,
        _cli.EXIT_USAGE,
        _cli.EXIT_TIMEOUT,
        _cli.EXIT_UNAVAILABLE,
    }
    assert documented == implemented == {0, 1, 2, 3, 4}
    assert "exit codes: 0 success" in (ROOT / "aioresults" / "_cli.py").read_text()


# ------------------------------------------------------------------ the Python blocks


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    code: str
    fragment: str | None  # why it does not run, if it is marked as a fragment

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


_FRAGMENT = re.compile(r"^<!--\s*fragment:\s*(.+?)\s*-->$")


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        if lines[index].strip() in ("```python", "```py"):
            start = index
            index += 1
            body = []
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            marker = _FRAGMENT.match(lines[start - 1].strip()) if start else None
            page = str(path.relative_to(ROOT))
            blocks.append(
                Block(page, start + 1, "\n".join(body) + "\n", marker[1] if marker else None)
            )
        index += 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]
RUNNABLE = [block for block in BLOCKS if block.fragment is None]


def test_the_blocks_are_found() -> None:
    assert len(RUNNABLE) >= 25
    assert {block.page for block in RUNNABLE} >= {"README.md", "docs/web.md", "docs/index.md"}
    # Every page that has blocks has an entry in GIVEN (backend pages share one),
    # so a new page is looked at when its blocks are first run.
    pages = {block.page for block in RUNNABLE if not block.page.startswith("docs/backends/")}
    assert pages <= set(GIVEN), "add the page to GIVEN"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.fragment], ids=str)
def test_fragments_compile(block: Block) -> None:
    compile(textwrap.dedent(block.code), str(block), "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    excerpt = re.fullmatch(r"an excerpt of (\S+)", block.fragment or "")
    if excerpt:  # the excerpt is still what the file says
        source = (ROOT / excerpt[1]).read_text()
        lines = [line.strip() for line in block.code.splitlines() if line.strip()]
        assert all(line in source for line in lines), f"{block} no longer matches {excerpt[1]}"


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIORESULTS_URL", raising=False)
    with asyncio.Runner() as runner:
        given = GIVEN.get(block.page, backend_page)(block)
        namespace = runner.run(given.__aenter__())  # the block's globals; checked after it
        namespace.setdefault("__name__", "__main__")
        namespace.setdefault("ar", ar)
        code = block.code
        for old, new in namespace.pop("__replace__", {}).items():
            code = code.replace(old, new)
        compiled = compile(code, str(block), "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        try:
            if compiled.co_flags & inspect.CO_COROUTINE:
                runner.run(asyncio.wait_for(eval(compiled, namespace), 60))
            else:
                exec(compiled, namespace)  # e.g. asyncio.run(main()): outside the loop
        except BaseException as exc:
            runner.run(given.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        namespace["__output__"] = capsys.readouterr().out
        runner.run(given.__aexit__(None, None, None))


# ------------------------------------------------------------------ what each page gives


Given = Callable[[Block], contextlib.AbstractAsyncContextManager[dict[str, Any]]]


@asynccontextmanager
async def nothing(block: Block) -> AsyncIterator[dict[str, Any]]:
    """A whole program: it needs nothing."""
    yield {}


@asynccontextmanager
async def backend_page(block: Block) -> AsyncIterator[dict[str, Any]]:
    """Backend pages: their blocks make backends from URLs (which connect lazily,
    so no server is needed), with the page's class and ``connection_url``."""
    from aioresults.backends.memcached import MemcachedBackend
    from aioresults.backends.nats import NatsBackend

    # rpc.md: `ar.connect("rpc://")` takes the broker from the environment.
    os.environ["AIORESULTS_BROKER_URL"] = "amqp://guest:guest@rabbitmq//"
    try:
        yield {
            "MemcachedBackend": MemcachedBackend,
            "NatsBackend": NatsBackend,
            "connection_url": "azureblockblob://DefaultEndpointsProtocol=https;AccountName=acct;"
            "AccountKey=a2V5;EndpointSuffix=core.windows.net",
        }
    finally:
        del os.environ["AIORESULTS_BROKER_URL"]


@asynccontextmanager
async def quickstart_program(block: Block) -> AsyncIterator[dict[str, Any]]:
    """A whole program on the embedded default: it prints what its comment says."""
    namespace: dict[str, Any] = {}
    yield namespace
    if "asyncio.run(main())" in block.code:
        assert namespace["__output__"] == "{'answer': 42}\n"
        assert await anyio.Path("aioresults.db").is_file()


def new_id() -> str:
    return str(uuid.uuid4())


@asynccontextmanager
async def stored_results(block: Block) -> AsyncIterator[dict[str, Any]]:
    """The quickstart's, errors' and groups' reader: a backend on the default
    store, a ``task_id`` whose result (42) is stored, ``ids`` of stored results."""
    async with ar.connect() as backend:
        task_id, ids = new_id(), [new_id() for _ in range(3)]
        await backend.mark_as_done(task_id, 42)
        for i, member in enumerate(ids):
            await backend.mark_as_done(member, i)
        ran: list[Any] = []

        async def run_body(results: list[Any]) -> None:
            ran.append(results)

        namespace: dict[str, Any] = {
            "backend": backend,
            "task_id": task_id,
            "ids": ids,
            # groups.md: a group of stored results, and the chord of one header part.
            "group_id": new_id(),
            "results": [ar.AsyncResult(i, backend) for i in ids],
            "header_ids": [task_id],
            "state": ar.states.SUCCESS,
            "value": 42,
            "i": 0,
            "run_body": run_body,
        }
        yield namespace
        if "chord_part_return" in block.code:
            assert ran == [[42]]  # the one header part completed the chord
        if "GroupResult.restore" in block.code:
            assert namespace["values"] == [0, 1, 2]
            assert await backend.restore_group(namespace["group_id"]) is None  # deleted
        if "await group.join" in block.code:
            assert namespace["values"] == [0, 1, 2]


@asynccontextmanager
async def a_worker(block: Block) -> AsyncIterator[dict[str, Any]]:
    """workers.md: the task's inputs, and a result to watch that a worker finishes."""
    async with ar.connect() as backend:
        task_id = new_id()

        async def process(chunk: bytes) -> None:
            await asyncio.sleep(0)

        async def finish() -> None:  # the worker the watching block waits for
            await asyncio.sleep(0.05)
            await backend.update_state(task_id, ar.states.PROGRESS, {"current": 1, "total": 2})
            await asyncio.sleep(0.05)
            await backend.mark_as_done(task_id, "done")

        worker = asyncio.create_task(finish()) if ".watch()" in block.code else None
        namespace: dict[str, Any] = {
            "backend": backend,
            "task_id": task_id,
            "path": "cat.png",
            "chunks": [b"cat", b"png"],
            "process": process,
            "thumbnail_path": "cat-64.png",
            "thumbnail": "cat-128.png",
            "group_id": new_id(),
            "i": 0,
            "value": "part",
            "run_body": None,  # set_chord_size is not called: the part is no chord's
        }
        if "chord=group_id" in block.code:
            await backend.set_chord_size(namespace["group_id"], 1)
            ran: list[Any] = []

            async def run_body(results: list[Any]) -> None:
                ran.append(results)

            namespace["run_body"] = run_body
        yield namespace
        if worker is not None:
            await worker
            assert "1/2" in namespace["__output__"]
        if "chord=group_id" in block.code:
            assert ran == [["part"]]
        meta = await backend.get_meta(task_id)
        assert meta.status == ar.states.SUCCESS, meta


@asynccontextmanager
async def celery_redis(block: Block) -> AsyncIterator[dict[str, Any]]:
    """README and celery.md: Celery's Redis is the test's private server, where a
    Celery app has stored results; ``app`` is a FastAPI app (celery.md)."""
    from celery import Celery
    from celery.result import AsyncResult as CeleryResult
    from fastapi import FastAPI

    with RedisServer() as redis:
        celery = Celery("tests", broker=redis.url, backend=redis.url)
        done, failed = new_id(), new_id()
        celery.backend.store_result(done, 7, "SUCCESS")
        celery.backend.mark_as_failure(failed, KeyError("no such item"))
        app = FastAPI()
        namespace: dict[str, Any] = {
            "__replace__": {
                "redis://localhost:6379/0": redis.url,
                "redis://127.0.0.1:6379/0": redis.url,
            },
            "celery_task": CeleryResult(done, app=celery),
            "app": app,
        }
        try:
            yield namespace
            if "celery_task" in block.code:
                assert namespace["value"] == 7
            if "@app.get" in block.code:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    sent = await client.post("/add", params={"x": 2, "y": 3})
                    assert sent.status_code == 200 and sent.json()["task_id"]
                    ok = await client.get(f"/results/{done}", params={"timeout": 5})
                    assert ok.status_code == 200 and ok.json()["result"] == 7
                    bad = await client.get(f"/results/{failed}", params={"timeout": 5})
                    assert bad.status_code == 200, bad.text
                    assert bad.json()["state"] == "FAILURE"
                    assert bad.json()["result"]["type"] == "KeyError"
                    waiting = await client.get(f"/results/{new_id()}", params={"timeout": 0})
                    assert waiting.status_code == 202, waiting.text
        finally:
            if "backend" in namespace:
                await namespace["backend"].aclose()
            celery.close()


@asynccontextmanager
async def web_app(block: Block) -> AsyncIterator[dict[str, Any]]:
    """web.md: the app and backend of its first block; then its routes are called."""
    from fastapi import FastAPI

    async with ar.connect() as backend:
        namespace: dict[str, Any] = {"app": FastAPI(), "backend": backend}
        if "app = FastAPI(" in block.code:
            namespace = {}  # the block that makes them
        yield namespace
        app = namespace["app"]
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            if "/results/{task_id}" in block.code:
                await check_result_route(client, backend)
            if "/groups/{group_id}/events" in block.code:
                await check_events_route(client, backend)


async def check_result_route(client: httpx.AsyncClient, backend: ar.BaseBackend) -> None:
    done, failed, pending = new_id(), new_id(), new_id()
    await backend.mark_as_done(done, {"answer": 42})
    await backend.mark_as_failure(failed, ValueError("bad input"), traceback="Traceback: x")
    bad = await client.get(f"/results/{failed}", params={"timeout": 5})
    assert bad.status_code == 200, bad.text  # a failed task is an answer, not a server error
    assert bad.json()["state"] == "FAILURE" and bad.json()["ready"] is True
    assert bad.json()["result"]["type"] == "ValueError"
    assert "traceback" not in bad.json()  # server internals stay on the server
    ok = await client.get(f"/results/{done}", params={"timeout": 5})
    assert ok.status_code == 200
    assert (ok.json()["state"], ok.json()["result"]) == ("SUCCESS", {"answer": 42})
    waiting = await client.get(f"/results/{pending}", params={"timeout": 0.05})
    assert waiting.status_code == 202
    assert waiting.json()["state"] == "PENDING"
    invalid = await client.get("/results/bad%01id", params={"timeout": 0})  # a control character
    assert invalid.status_code == 422


async def check_events_route(client: httpx.AsyncClient, backend: ar.BaseBackend) -> None:
    unknown = await client.get(f"/groups/{new_id()}/events")
    assert unknown.status_code == 404  # not a crash on None
    ids = [new_id() for _ in range(3)]
    group = ar.GroupResult(new_id(), [ar.AsyncResult(i, backend) for i in ids], backend)
    await group.save()
    await backend.mark_as_done(ids[0], 0)
    await backend.mark_as_failure(ids[1], RuntimeError("no"))
    await backend.mark_as_done(ids[2], 2)
    stream = await client.get(f"/groups/{group.id}/events")
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("data: ", 1)[1]))
        for block in stream.text.strip().split("\n\n")
    ]
    assert [name for name, _ in events] == ["progress"] * 3 + ["done"]
    assert [data["completed"] for _, data in events[:3]] == [1, 2, 3]
    assert {data["task_id"]: data["state"] for _, data in events[:3]}[ids[1]] == "FAILURE"


GIVEN: dict[str, Given] = {
    "README.md": lambda block: (
        celery_redis(block) if "celery_task" in block.code else quickstart_program(block)
    ),
    "docs/index.md": quickstart_program,
    "docs/quickstart.md": stored_results,
    "docs/errors.md": stored_results,
    "docs/groups.md": stored_results,
    "docs/workers.md": a_worker,
    "docs/web.md": web_app,
    "docs/celery.md": celery_redis,
    "docs/writing-a-backend.md": nothing,
    # docs/backends/*.md: backend_page
}


# ------------------------------------------------------------------ the README's promises


def test_readme_has_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c] == ["scripts/quickstart", "scripts/test"]
    for command in ("scripts/quickstart", "scripts/test"):
        assert os.access(ROOT / command, os.X_OK), command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "scripts/test || status=$?" in ci  # the README's command, as it is
