"""Filesystem: aioresults against raw file operations, and its own earlier code.

One run, one machine, a temporary directory on local disk. Store throughput:
every contestant runs in a child process of its own, one after the other, in
alternating rounds; the floor is a plain synchronous loop of what an atomic
store must do (write a temporary file, fsync it, rename it over the result).
Wake latency: one writer process stores every result; the readers (a raw
inotify+read loop, and aioresults' waiters) are child processes served in
turn, one sample each, so all of them are measured against the same writer.
Ratios are taken within a round and reported as the median of the rounds
with their spread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Any

from benchmarks._common import machine, table, write_section
from benchmarks.sqlite_bench import (
    BEFORE,
    SERVE,
    Child,
    alternate,
    cpu_table,
    load,
    ratios,
    source_trees,
    spread,
    verdict,
)

ROUNDS = 25
#: Results stored per contestant and round (one burst), by number of concurrent writers.
STORES = {1: 60, 16: 240}
#: Wake-latency rounds.
WAKE_ROUNDS = 5
#: Wake-latency samples per reader and round.
SAMPLES = 8
STORE_GOAL = 0.9
WAKE_GOAL = 1.3

# ---------------------------------------------------------------- store throughput

#: A contestant, in a child process: ``KIND WRITERS DIRECTORY``; serves bursts (see SERVE).
THROUGHPUT = (
    textwrap.dedent(
        """
    import asyncio, collections, datetime as dt, json, os, queue, sys, threading, time, uuid
    from concurrent.futures import ThreadPoolExecutor

    KIND, WRITERS, DIRECTORY = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def raw_store(task_id, value):
        # What an atomic store must do, and nothing else.
        record = json.dumps({
            "status": "SUCCESS", "result": value, "traceback": None, "children": [],
            "date_done": dt.datetime.now(dt.UTC).isoformat(), "task_id": task_id,
        }).encode()
        temp = os.path.join(DIRECTORY, f".raw-{uuid.uuid4().hex}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, record)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, os.path.join(DIRECTORY, f"celery-task-meta-{task_id}"))

    def bursts(store):
        async def burst(count, prefix):
            per = max(1, count // WRITERS)

            async def writer(w):
                for n in range(per):
                    await store(f"{prefix}-{w}-{n}", n)

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(writer(w) for w in range(WRITERS)))
            return timing(per * WRITERS, started, cpu)

        return burst

    async def nothing():
        pass

    async def setup():
        if KIND == "aioresults":
            import aioresults as ar

            backend = ar.connect(f"file://{DIRECTORY}")
            await backend.mark_as_done("warm-up", 0)
            return bursts(backend.mark_as_done), backend.aclose
        if KIND == "raw":
            # No event loop in the way: a plain loop (a thread per writer), for reference.
            pool = ThreadPoolExecutor(WRITERS)

            def writer(w, per, prefix):
                for n in range(per):
                    raw_store(f"{prefix}-{w}-{n}", n)

            async def burst(count, prefix):
                per = max(1, count // WRITERS)
                started, cpu = time.perf_counter(), time.process_time()
                if WRITERS == 1:
                    writer(0, per, prefix)
                else:
                    list(pool.map(writer, range(WRITERS), [per] * WRITERS, [prefix] * WRITERS))
                return timing(per * WRITERS, started, cpu)

            return burst, nothing
        # The floor: the same file work from asyncio, one hop per store to a
        # thread and back (the cheapest hop: a SimpleQueue in; out, the answers
        # queued and the loop woken by an eventfd write, one read per wake-up),
        # a thread per writer.
        loop = asyncio.get_running_loop()
        jobs = queue.SimpleQueue()
        answers = collections.deque()
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def answered():
            try:
                os.eventfd_read(wake)
            except BlockingIOError:
                pass
            for _ in range(len(answers)):
                future, exc = answers.popleft()
                if exc is None:
                    future.set_result(None)
                else:
                    future.set_exception(exc)

        loop.add_reader(wake, answered)

        def serve():
            while (job := jobs.get()) is not None:
                future, task_id, value = job
                try:
                    raw_store(task_id, value)
                except BaseException as exc:
                    answers.append((future, exc))
                else:
                    answers.append((future, None))
                os.eventfd_write(wake, 1)

        for _ in range(WRITERS):
            threading.Thread(target=serve, daemon=True).start()

        async def store(task_id, value):
            future = loop.create_future()
            jobs.put((future, task_id, value))
            await future

        async def close():
            for _ in range(WRITERS):
                jobs.put(None)

        return bursts(store), close
    """
    )
    + SERVE
)


async def throughput(
    directory: Path, trees: dict[str, Path | None]
) -> tuple[dict[int, Any], dict[int, Any]]:
    """Per number of writers, per contestant: its rate, and its CPU per store,
    in each round."""
    out: dict[int, Any] = {}
    cpu: dict[int, Any] = {}
    for writers, count in STORES.items():
        kinds = {
            "now": ("aioresults", None),
            "floor": ("raw-async", None),
            "sync": ("raw", None),
            **{c: ("aioresults", tree) for c, tree in trees.items() if tree},
        }
        contestants = {}
        for name, (kind, tree) in kinds.items():
            target = directory / f"tp-{writers}-{name}"
            target.mkdir()
            contestants[name] = Child(THROUGHPUT, [kind, str(writers), str(target)], tree)
        async with contextlib.AsyncExitStack() as stack:
            for child in contestants.values():
                await stack.enter_async_context(child)
            out[writers], cpu[writers] = await alternate(contestants, ROUNDS, count)
    return out, cpu


# ---------------------------------------------------------------- wake latency

#: The one writer: ``<id>`` on stdin -> stores it with aioresults, prints the
#: monotonic time taken just before the store call.
WRITER = textwrap.dedent(
    """
    import asyncio, sys, time
    import aioresults as ar

    async def main():
        async with ar.connect(f"file://{sys.argv[1]}") as backend:
            await backend.mark_as_done("warm-up", 0)
            loop = asyncio.get_running_loop()
            stdin = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
            print("ready", flush=True)
            while line := await stdin.readline():
                started = time.monotonic()
                await backend.mark_as_done(line.decode().strip(), {"answer": 42})
                print(repr(started), flush=True)

    asyncio.run(main())
    """
)

#: A reader: ``<id>`` on stdin -> prints "waiting" once it waits, then the
#: monotonic time at which it has the record.
AIORESULTS_READER = textwrap.dedent(
    """
    import asyncio, sys, time
    import aioresults as ar

    async def main():
        async with ar.connect(f"file://{sys.argv[1]}") as backend:
            await backend.get_meta("warm-up")
            loop = asyncio.get_running_loop()
            stdin = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
            print("ready", flush=True)
            while line := await stdin.readline():
                result = ar.AsyncResult(line.decode().strip(), backend)
                wait = asyncio.ensure_future(result.get(timeout=10))
                await asyncio.sleep(0)
                print("waiting", flush=True)
                await wait
                print(repr(time.monotonic()), flush=True)

    asyncio.run(main())
    """
)

#: The floor: one inotify watch on the directory, events taken in the event
#: loop's own reader callback, the file read and decoded right there.
RAW_READER = textwrap.dedent(
    """
    import asyncio, ctypes, ctypes.util, json, os, struct, sys, time

    DIRECTORY = sys.argv[1]
    IN_CLOSE_WRITE, IN_MOVED_TO = 0x8, 0x80
    EVENT = struct.Struct("iIII")

    async def main():
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        libc.inotify_add_watch(fd, os.fsencode(DIRECTORY), IN_CLOSE_WRITE | IN_MOVED_TO)
        loop = asyncio.get_running_loop()
        wanted = {}

        def read(name):
            with open(os.path.join(DIRECTORY, name), "rb") as f:
                return json.loads(f.read())

        def events():
            data = os.read(fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, length = EVENT.unpack_from(data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\\0").decode()
                offset += 16 + length
                future = wanted.pop(name, None)
                if future is not None and read(name)["status"] == "SUCCESS":
                    future.set_result(time.monotonic())

        loop.add_reader(fd, events)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        print("ready", flush=True)
        while line := await stdin.readline():
            name = "celery-task-meta-" + line.decode().strip()
            future = wanted[name] = loop.create_future()
            if os.path.exists(os.path.join(DIRECTORY, name)):  # stored before the watch
                wanted.pop(name)
                read(name)
                future.set_result(time.monotonic())
            print("waiting", flush=True)
            print(repr(await future), flush=True)

    asyncio.run(main())
    """
)


async def wake_latency(directory: Path, trees: dict[str, Path | None]) -> dict[str, list[Any]]:
    """Per reader, per round: the latencies of its samples."""
    target = directory / "wake"
    target.mkdir()
    readers = {
        "floor": Child(RAW_READER, [str(target)]),
        "now": Child(AIORESULTS_READER, [str(target)]),
        **{c: Child(AIORESULTS_READER, [str(target)], tree) for c, tree in trees.items() if tree},
    }
    out: dict[str, list[Any]] = {name: [[] for _ in range(WAKE_ROUNDS)] for name in readers}
    async with Child(WRITER, [str(target)]) as writer:
        for reader in readers.values():
            await reader.__aenter__()
        try:
            names = list(readers)
            for number in range(WAKE_ROUNDS):
                for sample in range(SAMPLES):
                    for name in names if sample % 2 == 0 else reversed(names):
                        reader = readers[name]
                        task_id = uuid.uuid4().hex
                        await reader.send(task_id)
                        if await reader.line() != "waiting":
                            raise RuntimeError(f"reader {name} failed")
                        await asyncio.sleep(random.uniform(0.02, 0.05))
                        await writer.send(task_id)
                        stored = float(await writer.line())
                        woke = float(await reader.line())
                        out[name][number].append(woke - stored)
        finally:
            for reader in readers.values():
                await reader.__aexit__(None, None, None)
    return out


# ---------------------------------------------------------------- report


def store_limits(
    rates: dict[int, dict[str, list[float]]], cpu: dict[int, dict[str, list[float]]]
) -> list[str]:
    one = cpu[1]
    extra = statistics.median(one["now"]) - statistics.median(one["floor"])
    floor_cpu = statistics.median(one["floor"])
    return [
        "What limits it. A store's own cost is the `fsync`, whose latency on this shared "
        "disk moves from round to round by more than the whole difference between the "
        "contestants (see the spread of the per-round ratios): they are medians of "
        f"{ROUNDS} rounds for that reason, and still move by a few hundredths from run to "
        "run. What aioresults adds to the floor is work, not waiting: "
        f"{extra:.0f} µs more CPU per store (the floor's store costs {floor_cpu:.0f} µs, "
        "mostly the kernel's fsync): the record built and encoded by `store_result`, "
        "the writer's expiry attribute, and the create-only rename, which keep the "
        "meaning of a store (expiry decided by its writer, a SUCCESS never "
        "overwritten, also by another process). The hop to the thread and back is the "
        "floor's. The floor with no event loop has no hop at all: what an asyncio "
        "program pays for not blocking its loop on the `fsync` is the gap between the "
        "two floors.",
    ]


def _fs_type(path: Path) -> str:
    try:
        found = subprocess.run(
            ["df", "--output=fstype", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()
        return found[-1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def run() -> str:
    loads = [load()]
    with (
        tempfile.TemporaryDirectory(prefix="aioresults-bench-") as tmp,
        source_trees(list(BEFORE)) as trees,
    ):
        directory = Path(tmp)
        fs_type = _fs_type(directory)
        rates, cpu_per_store = await throughput(directory, trees)
        wakes = await wake_latency(directory, trees)
    loads.append(load())
    before = [c for c in BEFORE if trees.get(c)]

    def rate(values: list[float]) -> str:
        return f"{_median(values):,.0f}" if values else "n/a"

    store_rows = [
        [
            writers,
            rate(r["now"]),
            *[rate(r[c]) for c in before],
            rate(r["floor"]),
            rate(r["sync"]),
            spread(ratios(r, "now", "floor")),
            verdict(ratios(r, "now", "floor"), STORE_GOAL) if writers == 1 else "",
            spread(ratios(r, "now", "sync")),
            verdict(ratios(r, "now", "sync"), STORE_GOAL) if writers == 1 else "",
            *[spread(ratios(r, c, "floor")) for c in before],
        ]
        for writers, r in rates.items()
    ]
    round_p50 = {name: [_median(samples) for samples in rounds] for name, rounds in wakes.items()}
    wake_rows = []
    for name in wakes:
        every = [v for rounds in wakes[name] for v in rounds]
        per_round = [a / b for a, b in zip(round_p50[name], round_p50["floor"], strict=True) if b]
        extra = [(a - b) * 1e6 for a, b in zip(round_p50[name], round_p50["floor"], strict=True)]
        label = {
            "floor": "raw inotify+read loop (floor)",
            "now": "aioresults now `await result.get()`",
        }.get(name, f"aioresults {name} ({BEFORE.get(name, '')})")
        wake_rows.append(
            [
                label,
                len(every),
                f"{_median(every) * 1000:.2f} ms",
                f"{statistics.quantiles(every, n=10)[-1] * 1000:.2f} ms"
                if len(every) > 1
                else "n/a",
                "1.00×" if name == "floor" else spread(per_round),
                "" if name == "floor" else spread(extra, 0, " µs"),
            ]
        )
    now_wake = [a / b for a, b in zip(round_p50["now"], round_p50["floor"], strict=True) if b]
    lines = [
        "## Filesystem",
        "",
        f"Machine: {machine()}. Directory on local disk ({fs_type}). Run: "
        "`scripts/bench filesystem`. Load average (1/5/15 min) at the start: "
        f"{loads[0]}; at the end: {loads[1]} (the machine is shared).",
        "",
        "### Store throughput (results/s)",
        "",
        "Each contestant is a child process of its own writing to a directory of its "
        "own. A round is one burst from each in turn ("
        + " or ".join(
            f"{n:,} stores by {w} writer{'s' if w > 1 else ''}" for w, n in STORES.items()
        )
        + f"), the order reversed every other round; {ROUNDS} rounds after a warm-up "
        "burst. Rates are the median of the rounds; ratios, the median of the per-round "
        "ratios (lowest–highest round).",
        "",
        table(
            [
                "writers",
                "aioresults now",
                *[f"aioresults {c} ({BEFORE[c]})" for c in before],
                "floor: raw, from asyncio",
                "raw, no event loop",
                "now / floor",
                f"goal ≥ {STORE_GOAL}×",
                "now / no event loop",
                f"goal ≥ {STORE_GOAL}×",
                *[f"{c} / floor" for c in before],
            ],
            store_rows,
        ),
        "",
        *cpu_table(
            cpu_per_store,
            trees,
            {"floor": "floor: raw, from asyncio", "sync": "raw, no event loop"},
        ),
        "",
        "The goal is for one writer. What each side does:",
        "",
        "- **raw**: what an atomic store must do, and nothing else: write the Celery "
        "record to a new temporary file, `fsync` it, rename it over the result.",
        "- **floor: raw, from asyncio**: that, from an asyncio program, which must not "
        "block its event loop on an `fsync`: one hop per store to a thread and back, the "
        "cheapest there is (a `SimpleQueue` in; out, the answer queued and the loop woken "
        "by one eventfd write, which costs less than `call_soon_threadsafe`'s "
        "self-pipe), a thread per writer.",
        "- **raw, no event loop**: that, in a plain synchronous loop (16 threads for 16 "
        "writers): no hop at all, for reference.",
        "- **aioresults**: `mark_as_done`: the same temporary file and `fsync`, plus the "
        "writer's expiry as an extended attribute; a result with no file yet (every "
        "store here) is renamed into place with `renameat2(RENAME_NOREPLACE)`, which "
        "creates it only where none exists, so it needs neither the directory's "
        "`flock` nor a read (a store over an existing file takes both, to keep a "
        "SUCCESS from being overwritten); in the backend's worker threads (one hop each "
        "way, answered through an eventfd, as the floor's).",
        "",
        *store_limits(rates, cpu_per_store),
        "",
        "### Cross-process wake latency",
        "",
        f"One writer process (aioresults `mark_as_done`, {WAKE_ROUNDS} × {SAMPLES} samples "
        "per reader) stores every result; the readers take turns, one sample each, "
        "and a sample is the reader's wake-up time minus the moment just before the "
        "writer's store call, 20–50 ms after the reader began to wait. Ratios: the "
        "per-round p50 over the floor's p50 in that round.",
        "",
        table(["reader", "samples", "p50", "p90", "p50 / floor", "p50 − floor"], wake_rows),
        "",
        f"Goal: p50 ≤ {WAKE_GOAL}× the floor: {verdict(now_wake, WAKE_GOAL, below=True)}. "
        "The floor watches the directory with inotify and reads the file in the event "
        "loop's own reader callback. aioresults takes the event in its feed task, reads "
        "the small file that changed right there (it was just written: it is in the page "
        "cache) and hands the record to the waiting task; the re-read in a worker thread "
        "is left for what the feed cannot decide there (an error, a large file, a "
        "record Celery is still writing).",
    ]
    return "\n".join(lines)


def main() -> None:
    body = asyncio.run(run())
    write_section("filesystem", body)
    print(body)
