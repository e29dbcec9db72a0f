"""Shared pieces of the benchmarks: statistics, the report file, peer processes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
CACHE = ROOT / ".cache" / "bench"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """One line naming the machine and interpreter."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str) -> None:
    """Replace the section ``name`` of docs/benchmarks.md (between its markers)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)


def peer_venv(name: str, requirements: Sequence[str]) -> Path:
    """A virtualenv under .cache/bench for a peer whose pins clash with ours; its python."""
    venv = CACHE / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = "\n".join(requirements)
    if not (stamp.exists() and stamp.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
        stamp.write_text(wanted)
    return python


class Writer:
    """A writer in another process: ``await writer.store(task_id)`` makes it store
    now and returns ``time.monotonic()`` taken just before its store call
    (CLOCK_MONOTONIC is shared by every process on Linux)."""

    def __init__(self, mode: str, url: str, python: str = sys.executable) -> None:
        self.args = [python, str(ROOT / "benchmarks" / "_writer.py"), mode, url]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Writer:
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert self.process.stdout is not None
        ready = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"writer {self.args[2]} failed to start: {ready!r}")
        return self

    async def store(self, task_id: str) -> float:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.process.stdin.write(task_id.encode() + b"\n")
        await self.process.stdin.drain()
        return float(await self.process.stdout.readline())

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def now() -> float:
    return time.monotonic()


async def wake_latencies(
    mode: str, url: str, wait: Callable[[str], Awaitable[Any]], samples: int = 40
) -> list[float]:
    """Wake latencies: ``wait(task_id)`` here, the store by a ``mode`` writer in
    another process, 20-50 ms after the wait began."""
    out = []
    async with Writer(mode, url) as writer:
        for _ in range(samples):
            task_id = uuid.uuid4().hex
            woke: list[float] = []

            async def waiter(task_id: str = task_id, woke: list[float] = woke) -> None:
                await wait(task_id)
                woke.append(now())

            task = asyncio.create_task(waiter())
            await asyncio.sleep(random.uniform(0.02, 0.05))
            stored = await writer.store(task_id)
            await asyncio.wait_for(task, 15)
            out.append(woke[0] - stored)
    return out


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    return percentile(values, 50), percentile(values, 90), statistics.fmean(values)


# ------------------------------------------------------------------ one writer, many readers


class SharedWriter:
    """The one writer process of a run (``_writer.py serve``): reader processes
    reach it over a Unix socket with :class:`WriterClient`, so every reader is
    measured against the same process and the same storage call."""

    def __init__(self, url: str) -> None:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="aioresults-writer-")
        self.path = str(Path(self._tmp.name) / "writer.sock")
        self.args = [
            sys.executable,
            str(ROOT / "benchmarks" / "_writer.py"),
            "serve",
            url,
            self.path,
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> SharedWriter:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT)
        )
        assert self.process.stdout is not None
        ready = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the writer failed to start: {ready!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._tmp.cleanup()


class WriterClient:
    """A reader's line to the :class:`SharedWriter`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> WriterClient:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
        return self

    def fileno(self) -> int:
        assert self._writer is not None
        sock = self._writer.get_extra_info("socket")
        return int(sock.fileno())

    async def request(self, line: str) -> float:
        assert self._reader is not None and self._writer is not None
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()
        return float(await self._reader.readline())

    async def store(self, task_id: str, mode: str = "celery") -> float:
        """Have the writer store ``task_id`` now; the time just before its store call."""
        return await self.request(f"{mode} {task_id}")

    async def bulk(self, path: str) -> float:
        """Have the writer store every id listed in ``path``; the time the last is stored."""
        return await self.request(f"bulk {path}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``median (min–max)`` of per-round values, e.g. ratios."""
    if not values:
        return "n/a"
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def one_writer_limits(figures: dict[str, float], ratio: float) -> list[str]:
    """What limits a single sequential writer against a floor sending the same
    statement: a paragraph, when the goal of 1.0× is missed."""
    if ratio >= 1.0 or not figures:
        return []

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f} µs"

    ours, floor = figures["aioresults cpu"], figures["floor cpu"]
    return [
        "",
        "What limits one writer: each store waits for its own round trip, so a store "
        "costs the round trip plus the client's own work. Per store (medians of the "
        f"rounds): {us(figures['aioresults wall'])} for aioresults against "
        f"{us(figures['floor wall'])} for the floor, of which this process's CPU is "
        f"{us(ours)} against {us(floor)}. The difference in CPU, {us(ours - floor)}, is "
        "aioresults' own work: the id and state checked, the record built and encoded "
        "as Celery's, the hand-off to the group-commit task and back. The floor sends "
        "the same statements with their values built by a few lines of plain Python, over "
        "the same round trips: 1.0× would need that work to cost nothing.",
    ]
