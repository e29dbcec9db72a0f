"""Redis: aioresults against the limit (asyncio.Protocol + hiredis, by hand),
redis.asyncio, the code before the transport rewrite, Celery 5.7, taskiq and arq.

Everything runs against one private server. Each client is measured in a
process of its own (``_redis_subjects.py``), the older aioresults imported
from a copy of commit ``BEFORE`` (kept under .cache/bench), and every reader is
woken by the same writer process making the same call (``_writer.py serve``:
the guarded write script aioresults uses, one EVALSHA). Each figure is taken in
at least three rounds, the clients alternating in a rotating order so that a
busy moment on this shared machine slows every client alike; a ratio is
computed within each round and reported as its median and range (min–max).
arq (it pins redis<6) runs from its own virtualenv under .cache/bench, with its
own writer.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

from benchmarks._common import (
    CACHE,
    ROOT,
    SharedWriter,
    WriterClient,
    machine,
    ms,
    peer_venv,
    percentile,
    spread,
    table,
    version,
    write_section,
)
from tests.servers import RedisServer

#: The code before the transport rewrite, for the "before" figures.
BEFORE = "0b6ff84"
#: The code before the lazy decoding of joined records, for the join table.
BEFORE_JOIN = "c668e7f"
ROUNDS = 3
#: Rounds of the many-waiters runs up to 10,000 (their last-wake figure is the noisiest).
WAITER_ROUNDS = 5
#: Rounds of the join runs (each is short, and the most sensitive to what else the
#: machine does: the garbage collector's full passes land in some rounds only).
JOIN_ROUNDS = 9
SAMPLES = 60
SIZES = (1_000, 10_000, 100_000)

# Goals of the issue (ratios to the row named).
GOAL_STORE = 0.5  # of the auto-pipelined limit, at least
GOAL_WAKE = 2.0  # in-process wake cost, at most, of the Protocol limit
GOAL_REGISTER = 1.5  # 10k waiters, at most, of redis.asyncio
GOAL_LAST_WAKE = 1.5
GOAL_MEMORY = 1.5 * 1024  # bytes of RSS per pending waiter
GOAL_JOIN = 1.0  # of redis.asyncio MGET + json.loads, at most


def before_code(commit: str = BEFORE) -> str | None:
    """A directory holding ``aioresults`` as of ``commit`` (None if git cannot give it)."""
    target = CACHE / f"aioresults-{commit}"
    if (target / "aioresults" / "__init__.py").exists():
        return str(target)
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "aioresults"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


async def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in its own process; its figures."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "benchmarks" / "_redis_subjects.py"),
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
    )
    out, err = await process.communicate()
    if process.returncode:
        raise RuntimeError(
            f"{spec['measure']} of {spec['subject']} failed:\n{err.decode()[-3000:]}"
        )
    figures: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return figures


def rotations(names: Sequence[str], rounds: int) -> list[list[str]]:
    """One order per round, each starting one further along."""
    return [[names[(r + i) % len(names)] for i in range(len(names))] for r in range(rounds)]


class Rows:
    """The clients of one table: a display name, the subject and its code."""

    def __init__(self, before: str | None) -> None:
        self.before = before
        self.rows: dict[str, tuple[str, str | None]] = {}

    def add(self, name: str, subject: str, old: bool = False, code: str | None = None) -> None:
        """A row; ``old`` runs the code of :data:`BEFORE`, ``code`` that of another tree."""
        if old and self.before is None:
            return
        self.rows[name] = (subject, self.before if old else code)

    def spec(self, name: str, **spec: Any) -> dict[str, Any]:
        subject, before = self.rows[name]
        return {"subject": subject, "before": before, **spec}


AIO = f"aioresults {version('aioresults')}"
OLD = f"aioresults before ({BEFORE})"
LIMIT = "limit: asyncio.Protocol + hiredis, auto-pipelined"
REDIS_PY = f"redis.asyncio {version('redis')}"


# ------------------------------------------------------------------ wake latency


async def wake_latency(url: str, writer: str, before: str | None) -> dict[str, Any]:
    rows = Rows(before)
    rows.add(LIMIT, "protocol")
    rows.add(f"{REDIS_PY} SUBSCRIBE + GET", "redis-asyncio")
    rows.add(f"{AIO} `await result.get()`", "aioresults")
    rows.add(f"{AIO} `result.watch()`", "aioresults-watch")
    rows.add(f"{OLD} `await result.get()`", "aioresults", old=True)
    rows.add(f"Celery {version('celery')} blocking `AsyncResult.get()`", "celery")
    rows.add(f"taskiq-redis {version('taskiq-redis')} `wait_result()` (0.2 s poll)", "taskiq")
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in rows.rows}
    for order in rotations(list(rows.rows), ROUNDS):
        for name in order:
            subject = rows.rows[name][0]
            samples = 8 if subject == "taskiq" else SAMPLES
            count = subject in ("protocol", "redis-asyncio", "aioresults", "aioresults-watch")
            first = not figures[name]
            spec = rows.spec(
                name, measure="latency", url=url, writer=writer, samples=samples,
                count_calls=count and first,
            )  # fmt: skip
            figures[name].append(await child(spec))
    peers = [
        await peer_latency(
            url, "arq", ["arq==0.28.0"], "_arq_latency.py",
            "`Job.result()` (0.5 s poll; its own writer)",
        ),
        await peer_latency(
            # saq imports typing_extensions without requiring it.
            url, "saq", ["saq[redis]==0.26.4", "typing_extensions"], "_saq_latency.py",
            "`job.refresh(until_complete=...)` (pub/sub; its own writer: a read, then `finish`)",
        ),
    ]  # fmt: skip
    return {"rows": figures, "peers": [p for p in peers if p is not None]}


async def peer_latency(
    url: str, name: str, packages: list[str], script: str, label: str
) -> tuple[str, list[list[float]]] | None:
    """A peer's rounds, from its own virtualenv and with its own writer (arq pins
    redis<6, saq redis<8); None if it cannot be installed or run."""
    try:
        python = await asyncio.to_thread(peer_venv, name, packages)
        rounds = []
        for _ in range(ROUNDS):
            out = await asyncio.to_thread(
                subprocess.run,
                [str(python), str(ROOT / "benchmarks" / script), url, "6"],
                capture_output=True, text=True, check=True, cwd=str(ROOT),
            )  # fmt: skip
            rounds.append(json.loads(out.stdout.strip().splitlines()[-1]))
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"{name} left out: {exc}", file=sys.stderr)
        return None
    found = await asyncio.to_thread(
        subprocess.run,
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return f"{name} {found.stdout.strip()} {label}", rounds


def latency_table(result: dict[str, Any]) -> tuple[list[list[Any]], dict[str, list[float]]]:
    figures: dict[str, list[dict[str, Any]]] = result["rows"]
    limit = figures[LIMIT]
    rows = []
    wake_ratios: dict[str, list[float]] = {}
    for name, rounds in figures.items():
        e2e = [v for r in rounds for v in r["e2e"]]
        e2e_ratio = [
            percentile(r["e2e"], 50) / percentile(f["e2e"], 50)
            for r, f in zip(rounds, limit, strict=True)
        ]
        inproc = [v for r in rounds for v in r["inproc"]]
        # Celery wakes in a thread, taskiq on a poll: no message to time.
        pushed = "Celery" not in name and "taskiq" not in name
        if pushed and inproc and all(r["inproc"] for r in rounds):
            ratios = [
                percentile(r["inproc"], 50) / percentile(f["inproc"], 50)
                for r, f in zip(rounds, limit, strict=True)
            ]
            wake_ratios[name] = ratios
            iterations = percentile([v for r in rounds for v in r["iterations"]], 50)
            calls = [v for r in rounds for v in r.get("calls", [])]
            cost = [
                f"{percentile(inproc, 50) * 1e6:.0f} µs",
                f"{spread(ratios)}×",
                f"{iterations:.0f}",
                f"{percentile(calls, 50):.0f}" if calls else "",
            ]
        else:
            cost = ["n/a (a thread)" if "Celery" in name else "n/a (a poll)", "", "", ""]
        rows.append(
            [name, len(e2e), ms(percentile(e2e, 50)), ms(percentile(e2e, 90)),
             f"{spread(e2e_ratio)}×", *cost]
        )  # fmt: skip
    for name, peer_rounds in result.get("peers", []):
        values = [v for r in peer_rounds for v in r]
        ratio = [
            percentile(r, 50) / percentile(f["e2e"], 50)
            for r, f in zip(peer_rounds, limit, strict=True)
        ]
        rows.append(
            [name, len(values), ms(percentile(values, 50)), ms(percentile(values, 90)),
             f"{spread(ratio)}×", "n/a", "", "", ""]
        )  # fmt: skip
    return rows, wake_ratios


# ------------------------------------------------------------------ many waiters


async def many_waiters(server: RedisServer, writer: str, before: str | None) -> dict[str, Any]:
    rows = Rows(before)
    rows.add("limit: asyncio.Protocol + hiredis", "protocol")
    rows.add(f"{REDIS_PY}, one PubSub", "redis-asyncio")
    rows.add(AIO, "aioresults")
    rows.add(OLD, "aioresults", old=True)
    out: dict[str, Any] = {"rows": list(rows.rows), "sizes": {}, "traced": {}}
    for size in SIZES:
        figures: dict[str, list[dict[str, Any]]] = {name: [] for name in rows.rows}
        for order in rotations(list(rows.rows), WAITER_ROUNDS if size <= 10_000 else 1):
            for name in order:
                server.command("FLUSHALL")
                spec = rows.spec(name, measure="waiters", url=server.url, writer=writer, count=size)
                figures[name].append(await child(spec))
        out["sizes"][size] = figures
    for name in rows.rows:
        spec = rows.spec(
            name, measure="waiters", url=server.url, writer=writer, count=10_000, tracemalloc=True
        )
        out["traced"][name] = (await child(spec))["traced"]
    server.command("FLUSHALL")
    return out


# ------------------------------------------------------------------ throughput


async def throughput(url: str, before: str | None) -> dict[str, Any]:
    store = Rows(before)
    store.add(f"{LIMIT}: the guarded write script", "protocol")
    store.add(f"{REDIS_PY}: the same script (EVALSHA, pool of 100)", "redis-asyncio")
    store.add(f"{AIO} `mark_as_done`", "aioresults")
    store.add(f"{OLD} `mark_as_done`", "aioresults", old=True)
    store.add(f"Celery {version('celery')} `store_result` (100 threads)", "celery")
    chords = Rows(before)
    chords.add(f"{LIMIT}: the chord part script", "protocol")
    chords.add(f"{REDIS_PY}: the same script (EVALSHA, pool of 100)", "redis-asyncio")
    chords.add(f"{AIO} `chord_part_return`", "aioresults")
    chords.add(f"{OLD} `chord_part_return`", "aioresults", old=True)
    out: dict[str, Any] = {}
    for key, rows, spec in (
        ("store", store, {"measure": "store", "writers": 100, "each": 50}),
        ("chord", chords, {"measure": "chord", "writers": 200, "each": 50}),
    ):
        figures: dict[str, list[dict[str, Any]]] = {name: [] for name in rows.rows}
        for order in rotations(list(rows.rows), ROUNDS):
            for name in order:
                figures[name].append(await child(rows.spec(name, url=url, **spec)))
        out[key] = figures
    return out


def rate_table(figures: dict[str, list[dict[str, Any]]]) -> tuple[list[list[Any]], list[float]]:
    names = list(figures)
    limit = figures[names[0]]
    rows = []
    ours: list[float] = []
    for name, rounds in figures.items():
        rates = [r["rate"] for r in rounds]
        ratios = [r["rate"] / f["rate"] for r, f in zip(rounds, limit, strict=True)]
        if name.startswith(AIO):
            ours = ratios
        completions = {r.get("completions") for r in rounds} - {None}
        extra = [", ".join(str(c) for c in sorted(completions))] if completions else []
        rows.append([name, f"{sorted(rates)[len(rates) // 2]:,.0f}", f"{spread(ratios)}×", *extra])
    return rows, ours


# ------------------------------------------------------------------ join


async def join(url: str, writer: WriterClient, before: str | None) -> dict[str, Any]:
    ids = [f"join-{uuid.uuid4().hex}" for _ in range(10_000)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listing:
        json.dump(ids, listing)
    try:
        await writer.bulk(listing.name)
        rows = Rows(before)
        rows.add(f"{LIMIT}: 10 MGETs + `json.loads`", "protocol")
        rows.add(f"{REDIS_PY}: 10 pipelined MGETs + `json.loads` (floor)", "redis-asyncio")
        rows.add(f"{AIO} `ResultSet.join()`", "aioresults")
        rows.add(f"{OLD} `ResultSet.join()`", "aioresults", old=True)
        earlier = await asyncio.to_thread(before_code, BEFORE_JOIN)
        if earlier is not None:
            name = f"aioresults before lazy decoding ({BEFORE_JOIN}) `ResultSet.join()`"
            rows.add(name, "aioresults", code=earlier)
        figures: dict[str, list[dict[str, Any]]] = {name: [] for name in rows.rows}
        for order in rotations(list(rows.rows), JOIN_ROUNDS):
            for name in order:
                spec = rows.spec(name, measure="join", url=url, ids=listing.name, repeat=5)
                figures[name].append(await child(spec))
        celery = f"Celery {version('celery')} `join_native()`"
        rows.add(celery, "celery")
        figures[celery] = [
            await child(rows.spec(celery, measure="join", url=url, ids=listing.name, repeat=1))
        ]
    finally:
        os.unlink(listing.name)
    return figures


def join_table(figures: dict[str, list[dict[str, Any]]]) -> tuple[list[list[Any]], list[float]]:
    floor = next(rounds for name, rounds in figures.items() if "(floor)" in name)
    rows = []
    ours: list[float] = []
    for name, rounds in figures.items():
        times = sorted(r["time"] for r in rounds)
        if len(rounds) == len(floor):
            ratios = [r["time"] / f["time"] for r, f in zip(rounds, floor, strict=True)]
            ratio = f"{spread(ratios)}×"
        else:
            ratio = f"{times[0] / sorted(f['time'] for f in floor)[len(floor) // 2]:.1f}× (1 run)"
            ratios = []
        if name.startswith(AIO):
            ours = ratios
        rows.append([name, ms(times[len(times) // 2]), ratio])
    return rows, ours


# ------------------------------------------------------------------ report


def verdict(ratios: Sequence[float], goal: float, at_least: bool = False) -> str:
    """Met or missed, on the median over rounds."""
    if not ratios:
        return "not measured"
    middle = sorted(ratios)[len(ratios) // 2]
    met = middle >= goal if at_least else middle <= goal
    return "**met**" if met else "**missed**"


def waiters_tables(result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    names: list[str] = result["rows"]
    floor = names[1]  # redis.asyncio
    lines: list[str] = []
    goals: dict[str, Any] = {}
    rows = []
    for size, figures in result["sizes"].items():
        for name in names:
            rounds = figures[name]
            register = sorted(r["register"] for r in rounds)[len(rounds) // 2]
            wake = sorted(r["last_wake"] for r in rounds)[len(rounds) // 2]
            memory = sorted(r["rss"] for r in rounds)[len(rounds) // 2]
            reg_ratio = [
                r["register"] / f["register"] for r, f in zip(rounds, figures[floor], strict=True)
            ]
            wake_ratio = [
                r["last_wake"] / f["last_wake"] for r, f in zip(rounds, figures[floor], strict=True)
            ]
            if name == AIO and int(size) == 10_000:
                goals = {"register": reg_ratio, "last_wake": wake_ratio,
                         "rss": [r["rss"] for r in rounds]}  # fmt: skip
            rows.append(
                [f"{int(size):,}", name, ms(register), f"{spread(reg_ratio)}×", ms(wake),
                 f"{spread(wake_ratio)}×", f"{memory / 1024:.2f} KiB", len(rounds)]
            )  # fmt: skip
    lines.append(
        table(
            [
                "waiters",
                "client",
                "register",
                "vs redis.asyncio",
                "last store → last wake",
                "vs redis.asyncio",
                "RSS per pending waiter",
                "rounds",
            ],
            rows,
        )  # fmt: skip
    )
    lines += [
        "",
        "Memory by `tracemalloc` at 10,000 waiters (Python allocations only; RSS adds the "
        "allocator's own overhead):",
        "",
        table(
            ["client", "bytes per pending waiter"],
            [[name, f"{value:,.0f}"] for name, value in result["traced"].items()],
        ),
    ]
    return lines, goals


async def run() -> str:
    before = await asyncio.to_thread(before_code)
    with RedisServer() as server:
        server_version = (
            server.command("INFO", "server").decode().split("redis_version:")[1].split()[0]
        )
        url = server.url
        async with SharedWriter(url) as shared:
            writer = await WriterClient(shared.path).connect()
            latency = await wake_latency(url, shared.path, before)
            server.command("FLUSHALL")
            waiters = await many_waiters(server, shared.path, before)
            rates = await throughput(url, before)
            server.command("FLUSHALL")
            joined = await join(url, writer, before)
            writer.close()
    load = os.getloadavg()
    latency_rows, wake_ratios = latency_table(latency)
    store_rows, store_ratios = rate_table(rates["store"])
    chord_rows, chord_ratios = rate_table(rates["chord"])
    join_rows, join_ratios = join_table(joined)
    waiter_lines, waiter_goals = waiters_tables(waiters)
    get_wake = wake_ratios.get(f"{AIO} `await result.get()`", [])
    watch_wake = wake_ratios.get(f"{AIO} `result.watch()`", [])
    memory = waiter_goals.get("rss", [])
    goals = [
        ["1. store, 100 writers ≥ 0.5× the auto-pipelined limit", f"{spread(store_ratios)}×",
         verdict(store_ratios, GOAL_STORE, at_least=True), LIMITS["store"]],
        ["1. chord parts, 200 writers ≥ 0.5× the limit", f"{spread(chord_ratios)}×",
         verdict(chord_ratios, GOAL_STORE, at_least=True), LIMITS["chord"]],
        ["2. in-process wake cost of `get()` ≤ 2× the Protocol limit", f"{spread(get_wake)}×",
         verdict(get_wake, GOAL_WAKE), LIMITS["wake"]],
        ["2. in-process wake cost of `watch()` ≤ 2× the limit", f"{spread(watch_wake)}×",
         verdict(watch_wake, GOAL_WAKE), LIMITS["watch"]],
        ["3. register 10k waiters ≤ 1.5× redis.asyncio",
         f"{spread(waiter_goals.get('register', []))}×",
         verdict(waiter_goals.get("register", []), GOAL_REGISTER), LIMITS["register"]],
        ["3. 10k waiters, last store → last wake ≤ 1.5× redis.asyncio",
         f"{spread(waiter_goals.get('last_wake', []))}×",
         verdict(waiter_goals.get("last_wake", []), GOAL_LAST_WAKE), LIMITS["last_wake"]],
        ["3. RSS per pending waiter ≤ 1.5 KiB",
         spread([m / 1024 for m in memory]) + " KiB",
         verdict(memory, GOAL_MEMORY), LIMITS["memory"]],
        ["4. `join()` of 10k finished ≤ 1.0× redis.asyncio MGET + `json.loads`",
         f"{spread(join_ratios)}×", verdict(join_ratios, GOAL_JOIN), LIMITS["join"]],
    ]  # fmt: skip
    lines = [
        "## Redis",
        "",
        f"Machine: {machine()}; load average {load[0]:.1f} at the end of the run (other "
        "work shares it: compare ratios within this run, not across runs). Server: redis "
        f"{server_version} on loopback, private. redis-py {version('redis')}, hiredis "
        f"{version('hiredis')}. Run: `scripts/bench redis`. {ROUNDS} rounds, the clients "
        "alternating; a ratio is computed within each round and shown as its median "
        '(min–max). The "before" rows run the code of commit '
        f"`{BEFORE}` in the same run.",
        "",
        "### Goals",
        "",
        table(["goal", "measured", "", "what limits it"], goals),
        "",
        "### Wake latency (result stored by the same writer process while waiting)",
        "",
        "End to end: from just before the writer's store call to the waiting coroutine "
        "running again. In-process: from the moment `select()` finds the message's bytes "
        "on a socket to the waiting coroutine running again, with the event-loop "
        "iterations (the message's own included) and the Python function calls in that "
        "window.",
        "",
        table(
            [
                "waiter",
                "samples",
                "p50",
                "p90",
                "p50 / limit",
                "in-process p50",
                "in-process / limit",
                "loop iterations",
                "Python calls",
            ],
            latency_rows,
        ),  # fmt: skip
        "",
        "### Many waiters in one process (each awaiting one result, `timeout=600`)",
        "",
        "Register: from creating the waiting tasks until every one is subscribed and "
        "its first read is done. Then the writer stores every result in one pipeline; "
        "last store → last wake runs from its last reply to the last waiter's wake-up. "
        "The limit and redis.asyncio rows hold a task, its coroutine, a future and a "
        "dict entry per waiter, no timeout.",
        "",
        *waiter_lines,
        "",
        "### Store throughput, 100 concurrent writers (5,000 results)",
        "",
        table(["writer", "results/s", "vs limit"], store_rows),
        "",
        "### Chord parts, 200 concurrent writers (one 10,000-part chord)",
        "",
        table(["writer", "parts/s", "vs limit", "completions reported"], chord_rows),
        "",
        "### `join()` of a finished 10,000-member group "
        f"(median of 5 per round, {JOIN_ROUNDS} rounds)",
        "",
        table(["call", "time", "vs floor"], join_rows),
    ]
    return "\n".join(lines)


#: What limits each goal, as profiling found (shown next to the figure).
LIMITS: dict[str, str] = {
    "store": "every store still checks the id and state, builds a `ResultMeta`, encodes "
    "Celery's record (dict, date, JSON) and passes through 7 coroutine frames; the limit "
    "only dumps a dict. Both leave in one write per loop iteration.",
    "chord": "the server: the part script makes 11 calls per part, for both; aioresults "
    "adds the part's payload, a receipt and the outcome per call.",
    "wake": "hub routing (dedupe against the last record, deadline bookkeeping), then in "
    "the woken task decoding into a `ResultMeta` and the waiter's teardown before `get()` "
    "returns; both wake in the same loop iteration as the limit.",
    "watch": "`watch()` is an async generator over `iter_updates()`: each record passes "
    "two generator frames and an equality check against the last one.",
    "register": "per waiter: the id check, a `Waiter` with its dict entry and deadline, "
    "and the task's first step; the SUBSCRIBE and the MGET are one batch each.",
    "last_wake": "per message: hub routing, and in each woken task the decode into a "
    "`ResultMeta` and the teardown (a queued UNSUBSCRIBE).",
    "memory": "the task (with its context and the loop's weak reference), its coroutine "
    "and a future are the limit's 1.15–1.25 KiB; a pending `get()` adds its "
    "`AsyncResult`, a `Waiter` (its own entry in the deadline heap) and a dict entry "
    "(about 160 B by tracemalloc). RSS adds the allocator's fragmentation, which varies "
    "with how registrations fall into batches.",
    "join": "the read (hiredis on the asyncio transport, one batch) and the parse (the C "
    "scanner on the decoded text) are the floor's or cheaper; then per member the id "
    "check, the plain-SUCCESS check (keys, state, id, date) and the payload kept in the "
    "member, decoded into a `ResultMeta` only if someone asks: a finished set keeps no "
    "object per member for the garbage collector, where it kept two (a `ResultMeta` "
    "and Celery's `children` list), and a collection over them landed in some rounds.",
}


def main() -> None:
    body = asyncio.run(run())
    write_section("redis", body)
    print(body)
