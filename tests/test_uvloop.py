"""The embedded stores on uvloop's event loop (what ``uvicorn[standard]`` runs
a web app on): the way back from their threads (an eventfd watched with the
loop's ``add_reader``), stores, pushed waits, and closing mid-wait."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvloop

import aioresults as ar
from aioresults.backends._loopcalls import open_calls
from tests.test_loopcalls import eventfds

URLS = {
    "sqlite": lambda tmp: f"sqlite:///{tmp}/r.db",
    "filesystem": lambda tmp: f"file://{tmp}/results",
}


def on_uvloop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, uvloop.Loop)
        return runner.run(main())


def test_threads_answer_a_uvloop_loop_through_the_eventfd() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls = open_calls(loop)
        assert calls is not None  # uvloop watches descriptors: the eventfd is used
        seen: dict[int, list[int]] = {t: [] for t in range(4)}
        loop_thread = threading.get_ident()
        in_loop: list[bool] = []
        done = asyncio.Event()
        per = 2000

        def record(thread: int, n: int) -> None:
            in_loop.append(threading.get_ident() == loop_thread)
            seen[thread].append(n)
            if sum(map(len, seen.values())) == 4 * per:
                done.set()

        def send(thread: int) -> None:
            for n in range(per):
                calls.call(record, thread, n)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        with anyio.fail_after(10):
            await done.wait()
        for thread in threads:
            thread.join()
        calls.close()
        assert all(in_loop) and len(in_loop) == 4 * per
        assert all(seen[t] == list(range(per)) for t in seen)

    on_uvloop(main)


@pytest.mark.parametrize("kind", sorted(URLS))
def test_stores_and_pushed_waits_on_uvloop(tmp_path: Path, kind: str) -> None:
    url = URLS[kind](tmp_path)

    async def main() -> None:
        before = eventfds()
        async with ar.connect(url) as backend, ar.connect(url) as other:
            for n in range(100):  # one writer
                assert await backend.mark_as_done(f"one-{n}", n)
            ids = [f"many-{n}" for n in range(300)]  # many at once
            assert all(await asyncio.gather(*(backend.mark_as_done(t, t) for t in ids)))
            assert [m.result for m in await other.get_many(ids)] == ids
            assert eventfds() == before + 2  # one per backend

            # Waits pushed by the other backend's stores, one of them before
            # the waiter has begun.
            await other.mark_as_done("early", "e")
            waits = [
                asyncio.create_task(ar.AsyncResult(t, backend=backend).get(timeout=10))
                for t in ("early", "late-1", "late-2")
            ]
            await asyncio.sleep(0.05)
            assert not any(w.done() for w in waits[1:])
            await asyncio.gather(other.mark_as_done("late-1", 1), other.mark_as_done("late-2", 2))
            with anyio.fail_after(10):
                assert await asyncio.gather(*waits) == ["e", 1, 2]

            # A SUCCESS is never overwritten, here either.
            assert not await other.mark_as_started("early")
            assert (await backend.get_meta("early")).result == "e"

            # Closed mid-wait: the waiter fails at once, not at its timeout.
            pending = asyncio.create_task(ar.AsyncResult("never", backend=backend).get(timeout=30))
            await asyncio.sleep(0.05)
            await backend.aclose()
            with anyio.fail_after(5), pytest.raises(ar.BackendClosed):
                await pending
            with pytest.raises(ar.BackendClosed):
                await backend.mark_as_done("after", 0)
        assert eventfds() == before

    on_uvloop(main)
