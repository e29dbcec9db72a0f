"""Calls from threads into an event loop through an eventfd (the SQLite
writer's and the filesystem workers' way back), and the stores that use it."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import aioresults
from aioresults.backends._loopcalls import LoopCalls, call_in_loop, open_calls


def eventfds() -> int:
    """This process's open eventfds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except FileNotFoundError:  # the listing's own descriptor, closed since
            pass
    return count


def opened(loop: asyncio.AbstractEventLoop) -> LoopCalls:
    calls = open_calls(loop)
    assert calls is not None  # Linux, with a selector loop
    return calls


async def test_calls_from_threads_run_in_the_loop_each_once_in_order() -> None:
    loop = asyncio.get_running_loop()
    calls = opened(loop)
    seen: dict[int, list[int]] = {t: [] for t in range(4)}
    in_loop: list[bool] = []
    done = asyncio.Event()
    per = 2000

    def record(thread: int, n: int) -> None:
        in_loop.append(threading.get_ident() == loop_thread)
        seen[thread].append(n)
        if sum(map(len, seen.values())) == 4 * per:
            done.set()

    loop_thread = threading.get_ident()

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
    assert all(seen[t] == list(range(per)) for t in seen)  # each thread's calls in order


async def test_a_failing_callback_goes_to_the_handler_and_the_rest_still_run() -> None:
    loop = asyncio.get_running_loop()
    calls = opened(loop)
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    ran: list[int] = []
    done = asyncio.Event()

    def boom() -> None:
        raise ValueError("a callback's own bug")

    def after() -> None:
        ran.append(1)
        done.set()

    try:

        def send() -> None:
            calls.call(boom)
            calls.call(after)

        threading.Thread(target=send).start()
        with anyio.fail_after(5):
            await done.wait()
    finally:
        loop.set_exception_handler(None)
        calls.close()
    assert ran == [1]
    assert len(reported) == 1 and isinstance(reported[0]["exception"], ValueError)


async def test_close_runs_what_was_queued_and_later_calls_take_the_loops_way() -> None:
    loop = asyncio.get_running_loop()
    before = eventfds()
    calls = opened(loop)
    assert eventfds() == before + 1
    ran: list[str] = []
    # Queued, not yet run (the loop has not turned since), then closed.
    calls.call(ran.append, "queued before")
    calls.close()
    calls.close()  # again: nothing more happens
    assert eventfds() == before  # the descriptor is closed
    threading.Thread(target=calls.call, args=(ran.append, "after")).start()
    with anyio.fail_after(5):
        while len(ran) < 2:
            await asyncio.sleep(0.001)
    assert ran == ["queued before", "after"]


def test_a_future_of_another_loop_is_answered_in_its_own_loop() -> None:
    first, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    calls = opened(first)
    ran_in_first: list[int] = []
    try:
        future = other.create_future()

        def answer(value: int) -> None:
            if asyncio.get_running_loop() is first:
                ran_in_first.append(value)
            future.set_result(value)

        threading.Thread(target=call_in_loop, args=(calls, other, answer, 7)).start()
        assert other.run_until_complete(asyncio.wait_for(future, 5)) == 7
        first.run_until_complete(asyncio.sleep(0.01))  # nothing was queued for the first
        assert ran_in_first == []
        calls.close()
    finally:
        other.close()
        first.close()
    # A closed loop: nobody waits there, and the thread gets no error.
    call_in_loop(calls, other, print, "never")


def test_a_closed_loop_leaves_nothing_to_answer_and_nothing_open() -> None:
    before = eventfds()
    loop = asyncio.new_event_loop()
    calls = opened(loop)
    loop.close()
    call_in_loop(calls, loop, print, "never")  # queued for a loop that will not run it
    calls.close()
    assert eventfds() == before
    call_in_loop(calls, loop, print, "never")  # and after: call_soon_threadsafe refuses, quietly
    with pytest.raises(RuntimeError):
        calls.call(print, "never")


class NoReaders(asyncio.SelectorEventLoop):
    """A loop that cannot watch a file descriptor, as Windows' proactor loop."""

    def add_reader(self, *args: Any) -> Any:
        raise NotImplementedError


def test_without_add_reader_there_is_none_and_nothing_leaks() -> None:
    before = eventfds()
    loop = NoReaders()
    try:
        assert open_calls(loop) is None
        assert eventfds() == before
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["sqlite", "filesystem"])
async def test_a_store_opens_one_eventfd_and_closing_it_closes_that(
    tmp_path: Path, kind: str
) -> None:
    before = eventfds()
    url = f"sqlite:///{tmp_path}/r.db" if kind == "sqlite" else f"file://{tmp_path}/results"
    backend = aioresults.connect(url)
    for n in range(50):
        await backend.mark_as_done(f"t{n}", n)
    assert [m.result for m in await backend.get_many([f"t{n}" for n in range(50)])] == list(
        range(50)
    )
    assert eventfds() == before + 1
    await backend.aclose()
    assert eventfds() == before


def test_a_filesystem_backend_used_from_a_second_loop_answers_there(tmp_path: Path) -> None:
    before = eventfds()
    backend = aioresults.connect(f"file://{tmp_path}/results")

    async def store(n: int) -> tuple[Any, int]:
        await backend.mark_as_done(f"t{n}", n)
        return (await backend.get_meta(f"t{n}")).result, eventfds()

    assert asyncio.run(store(1)) == (1, before + 1)
    # The first loop is closed: its eventfd is closed, one for this loop opened.
    assert asyncio.run(store(2)) == (2, before + 1)
    asyncio.run(backend.aclose())
    assert eventfds() == before


async def test_a_sqlite_file_swap_reopens_with_one_eventfd(tmp_path: Path) -> None:
    before = eventfds()
    path = tmp_path / "r.db"
    backend = aioresults.connect(f"sqlite:///{path}")
    assert await backend.mark_as_done("a", 1)
    await anyio.Path(path).unlink()
    with pytest.raises(aioresults.BackendUnavailable):
        await backend.mark_as_done("b", 2)  # reported, then reopened on a new file
    assert await backend.mark_as_done("c", 3)
    assert eventfds() == before + 1  # the old writer's is closed
    await backend.aclose()
    assert eventfds() == before


async def test_calls_racing_close_each_run_once() -> None:
    loop = asyncio.get_running_loop()
    for _ in range(20):
        calls = opened(loop)
        seen: list[int] = []
        go = threading.Event()

        def send(calls: LoopCalls, go: threading.Event, seen: list[int], base: int) -> None:
            go.wait()
            for n in range(base, base + 500):
                calls.call(seen.append, n)

        threads = [threading.Thread(target=send, args=(calls, go, seen, t * 500)) for t in range(3)]
        for thread in threads:
            thread.start()
        go.set()
        await asyncio.sleep(0)
        calls.close()  # while the threads are still calling, as a rule
        for thread in threads:
            thread.join()
        with anyio.fail_after(5):
            while len(seen) < 1500:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert sorted(seen) == list(range(1500))  # every call ran, none twice


def test_keyboard_interrupt_leaves_the_loop_and_the_rest_run_at_its_next_turn() -> None:
    loop = asyncio.new_event_loop()
    calls = opened(loop)
    ran: list[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    try:
        for callback, args in ((interrupt, ()), (ran.append, ("after",))):
            thread = threading.Thread(target=calls.call, args=(callback, *args))
            thread.start()
            thread.join()
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(1))
        assert ran == []
        loop.run_until_complete(asyncio.sleep(0.01))
        assert ran == ["after"]
        calls.close()
    finally:
        loop.close()


def test_close_after_an_interrupt_runs_each_call_once() -> None:
    loop = asyncio.new_event_loop()
    calls = opened(loop)
    ran: list[str] = []
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def interrupt() -> None:
        raise KeyboardInterrupt

    try:
        for callback, args in ((interrupt, ()), (ran.append, ("a",)), (ran.append, ("b",))):
            thread = threading.Thread(target=calls.call, args=(callback, *args))
            thread.start()
            thread.join()
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(1))
        calls.close()  # schedules the rest again: each still runs once
        loop.run_until_complete(asyncio.sleep(0.01))
        assert ran == ["a", "b"] and reported == []
    finally:
        loop.close()
