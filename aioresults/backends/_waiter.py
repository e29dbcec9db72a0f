"""A waiter (one task's watch on some ids) and the one deadline heap of a hub."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from .. import _runtime
from .._protocols import Record

if TYPE_CHECKING:
    from ._hub import WaiterHub

__all__ = ["Deadlines", "Waiter"]


class _Done:
    """An awaitable that is already done."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return (yield from ())


_DONE = _Done()


class Waiter:
    """One task's watch on some ids; an async context manager (see
    :class:`~aioresults._protocols.Watch`)."""

    # Kept small: a process may hold tens of thousands of these.
    __slots__ = ("_deadline", "_hub", "_items", "_opener", "_wake", "ids", "ready_only")

    def __init__(
        self,
        hub: WaiterHub,
        ids: Iterable[str],
        *,
        ready_only: bool = False,
        opener: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ids = tuple(dict.fromkeys(ids))
        #: Records of no state (PENDING) are not delivered: the caller waits for the end.
        self.ready_only = ready_only
        self._hub = hub
        self._opener = opener
        self._items: list[Record] | None = None
        self._wake: asyncio.Future[None] | anyio.Event | None = None
        self._deadline: list[Any] | None = None

    async def __aenter__(self) -> Waiter:
        if self._opener is not None:
            await self._opener()
        self._hub._add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unregister; idempotent, never blocks."""
        self._hub._remove(self)
        if self._deadline is not None:
            self._hub.deadlines.drop(self._deadline)
            self._deadline = None

    def _put(self, record: Record) -> None:
        if self._items is None:
            self._items = [record]
        else:
            self._items.append(record)
        wake, self._wake = self._wake, None
        if wake is None:
            return
        if isinstance(wake, anyio.Event):
            wake.set()
            return
        if self._deadline is not None:
            self._hub.deadlines.drop(self._deadline)
            self._deadline = None
        if not wake.done():
            wake.set_result(None)

    def pending(self) -> bool:
        """Whether a record is waiting to be taken."""
        return bool(self._items)

    def take(self) -> Record | None:
        """The next record if one has arrived, else None."""
        items = self._items
        if not items:
            return None
        return items.pop(0)

    def arrival(self, deadline: float | None = None) -> Awaitable[None]:
        """Ends when a record arrives or at ``deadline`` (loop time); then
        :meth:`take` tells which."""
        if self._items:
            return _DONE
        loop = _runtime._get_running_loop()
        if loop is None:
            return self._wait_anyio(deadline)
        future: asyncio.Future[None] = loop.create_future()
        self._wake = future
        if deadline is not None:
            if self._deadline is not None:
                self._hub.deadlines.drop(self._deadline)
            self._deadline = self._hub.deadlines.add(deadline, future)
        return future

    async def next(self, deadline: float | None = None) -> Record | None:
        """Wait for and return the next record; None once ``deadline`` has passed."""
        if not self._items:
            await self.arrival(deadline)
        return self.take()

    async def _wait_anyio(self, deadline: float | None) -> None:
        event = self._wake = anyio.Event()
        delay = float("inf") if deadline is None else deadline - _runtime.now()
        try:
            with anyio.move_on_after(delay):
                await event.wait()
        finally:
            self._wake = None


class Deadlines:
    """The deadlines of asyncio waiters: ``[when, seq, future]`` entries in one
    heap, one loop timer for the earliest, instead of a timer per waiter."""

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []
        self._dead = 0
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @property
    def armed(self) -> bool:
        """Whether the loop timer is set."""
        return self._timer is not None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def add(self, when: float, future: asyncio.Future[None]) -> list[Any]:
        entry = [when, next(self._seq), future]
        heapq.heappush(self.heap, entry)
        if self._timer is None or when < self._timer_at:
            self._arm(when)
        return entry

    def drop(self, entry: list[Any]) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._dead += 1
            # Entries of waiters woken early: drop them once they are half the heap.
            if self._dead * 2 > len(self.heap) > 64:
                self.heap = [e for e in self.heap if e[2] is not None]
                heapq.heapify(self.heap)
                self._dead = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        heap = self.heap
        now = asyncio.get_running_loop().time()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            future = entry[2]
            if future is None:
                self._dead -= 1
            elif not future.done():
                entry[2] = None
                future.set_result(None)
        if heap:
            self._arm(heap[0][0])
