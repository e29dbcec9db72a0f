"""The ``aioresults`` command, run as a real subprocess against a store in tmp_path."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioresults as ar
from aioresults import states
from tests.servers import RedisServer

CLI = [sys.executable, "-m", "aioresults._cli"]


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIORESULTS_URL"}
    env.update(extra or {})
    return env


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Completed:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(), err.decode())


class Running:
    """A command left running so the test can act while it waits."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert raw, "the command ended early"
        return raw.decode()

    async def finish(self) -> Completed:
        out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode is not None
        return Completed(self.proc.returncode, out.decode(), err.decode())


async def start_cli(*args: str) -> Running:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env()
    )
    return Running(proc)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'results'}"


@pytest.fixture
async def store(url: str) -> AsyncIterator[ar.BaseBackend]:
    async with ar.connect(url) as backend:
        yield backend


def new_id() -> str:
    return str(uuid.uuid4())


async def wait_until_watched(backend: ar.BaseBackend, running: Running, task_id: str) -> None:
    """Return once the command has read the (still PENDING) record and is waiting."""
    # `wait` prints nothing before the result, so watch the process instead:
    # give it time to start, and make sure it is still waiting.
    for _ in range(10):
        await asyncio.sleep(0.05)
        assert running.proc.returncode is None
    assert (await backend.get_meta(task_id)).status == states.PENDING


# ------------------------------------------------------------------ get


async def test_get_success(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_done(task_id, {"answer": 42}, name="demo.answer")
    done = await run_cli("--url", url, "get", task_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"task:      {task_id}"
    assert lines[1] == "state:     SUCCESS"
    assert lines[2] == 'result:    {"answer": 42}'
    assert "name:      demo.answer" in lines


async def test_get_json_of_a_failure_exits_1(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_failure(task_id, ValueError("bad input", 3), traceback="Traceback: x")
    done = await run_cli("get", task_id, "--url", url, "--json")  # options after the command
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["task_id"] == task_id and data["status"] == "FAILURE" and data["ready"] is True
    assert data["result"]["exc_type"] == "ValueError"
    assert data["result"]["exc_message"] == ["bad input", 3]
    assert data["traceback"] == "Traceback: x"
    text = await run_cli("--url", url, "get", task_id)
    assert text.returncode == 1
    assert "result:    ValueError: ('bad input', 3)" in text.stdout
    assert "traceback:\n  Traceback: x" in text.stdout


async def test_get_pending_uses_aioresults_url(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_done(task_id, "from the env's store")
    env = {"AIORESULTS_URL": url}
    done = await run_cli("--json", "get", task_id, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == "from the env's store"
    pending = await run_cli("--json", "get", "never-stored", env=env)
    assert pending.returncode == 0, pending.stderr
    assert json.loads(pending.stdout)["status"] == "PENDING"


async def test_default_url_is_the_embedded_sqlite(tmp_path: Path) -> None:
    # Looking at results in a directory without a store creates none.
    done = await run_cli("--json", "get", "x", cwd=tmp_path)
    assert done.returncode == 2
    assert f"no store at {tmp_path / 'aioresults.db'}" in done.stderr
    assert done.stdout == ""
    assert [entry async for entry in anyio.Path(tmp_path).iterdir()] == []
    # Once a program has stored results there, the default finds them.
    async with ar.connect(f"sqlite:///{tmp_path / 'aioresults.db'}") as backend:
        await backend.mark_as_done("x", 42)
    done = await run_cli("--json", "get", "x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 42


READ_COMMANDS = [
    ["get", "x"],
    ["wait", "x", "--timeout", "5"],
    ["watch", "x", "--timeout", "5"],
    ["group", "g", "--timeout", "5"],
    ["forget", "x"],
    ["forget", "--group", "g"],
    ["cleanup"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda args: "-".join(args[:2]))
@pytest.mark.parametrize("kind", ["file", "sqlite", "sqlite-in-missing-dir"])
async def test_a_missing_store_is_exit_2_and_never_created(
    tmp_path: Path, kind: str, command: list[str]
) -> None:
    where = {
        "file": tmp_path / "no" / "such" / "dir",
        "sqlite": tmp_path / "results.db",
        "sqlite-in-missing-dir": tmp_path / "no" / "such" / "results.db",
    }[kind]
    url = f"file://{where}" if kind == "file" else f"sqlite:///{where}"
    done = await run_cli("--url", url, *command)
    assert done.returncode == 2, done.stderr
    assert f"no store at {where}" in done.stderr
    assert done.stdout == ""
    assert [entry async for entry in anyio.Path(tmp_path).iterdir()] == []  # no file, no directory


async def test_revoked_exits_1(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_revoked(task_id, "terminated")
    done = await run_cli("--url", url, "wait", task_id)
    assert done.returncode == 1
    assert "state:     REVOKED" in done.stdout


# ------------------------------------------------------------------ wait


async def test_wait_returns_when_the_result_arrives(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    running = await start_cli("--url", url, "--json", "wait", task_id, "--timeout", "60")
    await wait_until_watched(store, running, task_id)
    await store.mark_as_done(task_id, [1, 2, 3])
    done = await running.finish()
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning (it used the deprecated wait() once)
    data = json.loads(done.stdout)
    assert (data["status"], data["result"]) == ("SUCCESS", [1, 2, 3])


async def test_wait_timeout_exits_3(url: str, store: ar.BaseBackend) -> None:
    done = await run_cli("--url", url, "wait", new_id(), "--timeout", "0.3")
    assert done.returncode == 3
    assert "not ready after 0.3 s" in done.stderr
    assert done.stdout == ""


# ------------------------------------------------------------------ watch


async def test_watch_prints_each_change_as_it_happens(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    running = await start_cli("--url", url, "--json", "watch", task_id)
    first = json.loads(await running.line())
    assert (first["task_id"], first["status"]) == (task_id, "PENDING")
    async with store.track(task_id) as task:
        assert json.loads(await running.line())["status"] == "STARTED"
        for i in (1, 2):
            await task.progress(i, 2)
            line = json.loads(await running.line())
            assert (line["status"], line["result"]) == ("PROGRESS", {"current": i, "total": 2})
        task.set_result("done")
    last = json.loads(await running.line())
    assert (last["status"], last["result"], last["ready"]) == ("SUCCESS", "done", True)
    done = await running.finish()
    assert done.returncode == 0 and done.stdout == ""


async def test_watch_text_of_a_failure(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_failure(task_id, KeyError("missing"))
    done = await run_cli("--url", url, "watch", task_id)
    assert done.returncode == 1
    assert done.stdout == "FAILURE  KeyError: 'missing'\n"


async def test_watch_timeout_exits_3(url: str, store: ar.BaseBackend) -> None:
    task_id = new_id()
    await store.mark_as_started(task_id)
    done = await run_cli("--url", url, "watch", task_id, "--timeout", "0.3")
    assert done.returncode == 3
    assert done.stdout == "STARTED  null\n"


# ------------------------------------------------------------------ group


async def save_group(store: ar.BaseBackend, size: int) -> tuple[str, list[str]]:
    group_id, ids = new_id(), [new_id() for _ in range(size)]
    await ar.GroupResult(group_id, [ar.AsyncResult(i, store) for i in ids], store).save()
    return group_id, ids


async def test_group_follows_members_until_done(url: str, store: ar.BaseBackend) -> None:
    group_id, ids = await save_group(store, 3)
    await store.mark_as_done(ids[0], 0)
    running = await start_cli("--url", url, "group", group_id)
    assert await running.line() == "1/3 finished\n"
    await store.mark_as_done(ids[2], 2)
    assert await running.line() == "2/3 finished\n"
    await store.mark_as_done(ids[1], 1)
    assert await running.line() == "3/3 finished\n"
    done = await running.finish()
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"group {group_id}: 3 results\n  SUCCESS  3\n"


async def test_group_json_summary_with_a_failure_exits_1(url: str, store: ar.BaseBackend) -> None:
    group_id, ids = await save_group(store, 3)
    await store.mark_as_done(ids[0], 0)
    await store.mark_as_failure(ids[1], RuntimeError("no"))
    await store.mark_as_revoked(ids[2])
    done = await run_cli("--url", url, "--json", "group", group_id)
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    assert summary["group_id"] == group_id and summary["total"] == 3
    assert summary["states"] == {"SUCCESS": 1, "FAILURE": 1, "REVOKED": 1}
    assert sorted(summary["failed"]) == sorted(ids[1:])


async def test_group_timeout_exits_3(url: str, store: ar.BaseBackend) -> None:
    group_id, ids = await save_group(store, 2)
    await store.mark_as_done(ids[0], 0)
    done = await run_cli("--url", url, "group", group_id, "--timeout", "0.3")
    assert done.returncode == 3
    assert ids[1] in done.stderr


async def test_unknown_group_exits_2(url: str, store: ar.BaseBackend) -> None:
    done = await run_cli("--url", url, "group", "no-such-group")
    assert done.returncode == 2
    assert "no saved group 'no-such-group'" in done.stderr


def test_group_draws_a_live_bar_on_a_terminal(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'results'}"

    async def seed() -> str:
        async with ar.connect(url) as store:
            group_id, ids = await save_group(store, 4)
            for i, task_id in enumerate(ids):
                await store.mark_as_done(task_id, i)
            return group_id

    group_id = asyncio.run(seed())
    # rich draws its bar only on a terminal: give the command a pseudo-terminal.
    master, slave = pty.openpty()
    env = _env({"TERM": "xterm-256color", "COLUMNS": "100"})
    proc = subprocess.Popen(
        [*CLI, "--url", url, "group", group_id], stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "━" in screen  # the bar itself
    assert "4/4" in screen
    assert "finished\r\n" not in screen  # not the plain-text fallback
    assert f"group {group_id}: 4 results" in screen


# ------------------------------------------------------------------ forget and cleanup


async def test_forget_tasks_and_groups(url: str, store: ar.BaseBackend) -> None:
    first, second = new_id(), new_id()
    await store.mark_as_done(first, 1)
    await store.mark_as_done(second, 2)
    done = await run_cli("--url", url, "forget", first, second)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"forgot {first}\nforgot {second}\n"
    assert [m.status for m in await store.get_many([first, second])] == ["PENDING", "PENDING"]

    group_id, ids = await save_group(store, 2)
    for task_id in ids:
        await store.mark_as_done(task_id, "x")
    done = await run_cli("--url", url, "--json", "forget", "--group", group_id)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"forgotten": group_id, "group": True}
    assert await store.restore_group(group_id) is None
    assert {m.status for m in await store.get_many(ids)} == {"PENDING"}
    missing = await run_cli("--url", url, "forget", "--group", group_id)
    assert missing.returncode == 2


async def test_cleanup_deletes_expired_records(url: str, store: ar.BaseBackend) -> None:
    old, fresh = new_id(), new_id()
    async with ar.connect(url, expires=0.05) as short_lived:
        await short_lived.mark_as_done(old, "old")
    await store.mark_as_done(fresh, "fresh")
    assert isinstance(store, ar.KeyValueBackend)
    path = Path(url.removeprefix("file://")) / store.task_key(old)
    # Also age the file past the default expiry (one day), for stores that
    # judge a record by its modification time.
    two_days_ago = time.time() - 2 * 86400
    os.utime(path, (two_days_ago, two_days_ago))
    await asyncio.sleep(0.1)
    done = await run_cli("--url", url, "--json", "cleanup")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"deleted": 1}
    assert not path.exists()
    assert (await store.get_meta(fresh)).status == states.SUCCESS
    again = await run_cli("--url", url, "cleanup")
    assert (again.returncode, again.stdout) == (0, "deleted 0 expired records\n")


# ------------------------------------------------------------------ usage and store errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "required: COMMAND"),
        (["get"], "required: id"),
        (["explode", "x"], "invalid choice"),
        (["wait", "x", "--timeout", "soon"], "not a number of seconds"),
        (["wait", "x", "--timeout", "-1"], "cannot be negative"),
        (["--url", "nosuch://x", "get", "x"], "no result backend for URL scheme 'nosuch'"),
        (["--url", "not a url", "get", "x"], "scheme://"),
        (["--url", "memory://", "get", "bad\x01id"], "control characters"),
    ],
)
async def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = await run_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""


async def test_help_and_version_exit_0() -> None:
    done = await run_cli("--help")
    assert done.returncode == 0
    assert "exit codes: 0 success" in done.stdout
    for command in ("get", "wait", "watch", "group", "forget", "cleanup"):
        assert command in done.stdout
    version = await run_cli("--version")
    assert (version.returncode, version.stdout) == (0, f"aioresults {ar.__version__}\n")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nobody listens on it once the socket is closed


async def test_unreachable_store_exits_4() -> None:
    done = await run_cli("--url", f"redis://127.0.0.1:{closed_port()}/0", "get", "x")
    assert done.returncode == 4
    assert "cannot reach" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["wait", "watch", "group"])
async def test_unreachable_store_is_exit_4_even_when_the_timeout_runs_out(command: str) -> None:
    # The wait reconnects until its deadline: that the store never answered,
    # not that the result was not ready, is what the command reports.
    url = f"redis://127.0.0.1:{closed_port()}/0"
    started = time.monotonic()
    done = await run_cli("--url", url, command, "x", "--timeout", "2")
    assert done.returncode == 4, done.stderr
    assert "cannot reach" in done.stderr
    assert "not ready" not in done.stderr
    assert done.stdout == ""
    assert time.monotonic() - started < 20


async def test_a_store_lost_during_a_wait_is_exit_4_at_the_deadline() -> None:
    with RedisServer() as redis:
        async with ar.connect(redis.url) as store:
            await store.mark_as_done("other", 1)  # the store is there and answers
            running = await start_cli("--url", redis.url, "wait", "x", "--timeout", "3")
            await wait_until_watched(store, running, "x")
        redis.kill()
        done = await running.finish()
    assert done.returncode == 4, done.stderr
    assert "cannot reach" in done.stderr


async def test_console_script(url: str, store: ar.BaseBackend) -> None:
    script = Path(sys.executable).with_name("aioresults")
    task_id = new_id()
    await store.mark_as_done(task_id, "via the script")
    proc = await asyncio.create_subprocess_exec(
        str(script), "--url", url, "--json", "get", task_id, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    data: dict[str, Any] = json.loads(out)
    assert data["result"] == "via the script"
