"""How long the event loop was held up, to bound a timing check by it.

A check such as "the timeout fired within 0.1 s of its deadline" fails on a
loaded machine that stopped the process for a while, although nothing was
late on its own account. :func:`watching_stalls` runs a ticker beside the code
under test; the check allows for the worst stall it saw::

    async with watching_stalls() as stalls:
        await result.get(timeout=0.1)  # and time it
    assert elapsed < 0.2 + stalls.worst
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import aioresults as ar

__all__ = ["Stalls", "time_out", "watching_stalls"]

TICK = 0.005


class Stalls:
    """The stalls seen: each tick's lateness, in seconds."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    @property
    def worst(self) -> float:
        return max(self.seen, default=0.0)


@contextlib.asynccontextmanager
async def watching_stalls() -> AsyncIterator[Stalls]:
    stalls = Stalls()

    async def tick() -> None:
        last = anyio.current_time()
        while True:
            await anyio.sleep(TICK)
            now = anyio.current_time()
            stalls.seen.append(now - last - TICK)
            last = now

    async with anyio.create_task_group() as ticking:
        ticking.start_soon(tick)
        yield stalls
        ticking.cancel_scope.cancel()


async def time_out(result: ar.AsyncResult[Any], timeout: float) -> tuple[float, float]:
    """Wait on ``result`` for ``timeout`` seconds, which must end in
    :class:`~aioresults.ResultTimeout` for it alone: (seconds it took, the
    event loop's worst stall meanwhile)."""
    async with watching_stalls() as stalls:
        started = anyio.current_time()
        with pytest.raises(ar.ResultTimeout) as caught:
            await result.get(timeout=timeout)
        elapsed = anyio.current_time() - started
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.task_ids == (result.id,)
    return elapsed, stalls.worst
