"""A waiter (one task's watch on some ids) and the one deadline heap of a hub."""

from __future__ import annotations

import asyncio
import heapq
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
    __slots__ = ("_at", "_hub", "_ids", "_items", "_opener", "_wake", "_when", "ready_only")

    def __init__(
        self,
        hub: WaiterHub,
        ids: Iterable[str],
        *,
        ready_only: bool = False,
        opener: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        unique = tuple(dict.fromkeys(ids))
        # One id (a get()) is kept bare: no tuple per waiter while it waits.
        self._ids: str | tuple[str, ...] = unique[0] if len(unique) == 1 else unique
        #: Records of no state (PENDING) are not delivered: the caller waits for the end.
        self.ready_only = ready_only
        self._hub = hub
        self._opener = opener
        self._items: list[Record] | None = None
        self._wake: asyncio.Future[None] | anyio.Event | None = None
        # The deadline it waits for now (None: none); the waiter is its own entry
        # in the hub's deadline heap, for the deadline ``_at`` (None: not in it).
        self._when: float | None = None
        self._at: float | None = None

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids watched, each once."""
        ids = self._ids
        return (ids,) if type(ids) is str else ids  # type: ignore[return-value]

    @ids.setter
    def ids(self, ids: tuple[str, ...]) -> None:
        self._ids = ids

    def __lt__(self, other: Waiter | _Entry) -> bool:
        # Heap order: by deadline (never changed while in the heap), then identity.
        mine, theirs = self._at, other._at
        return mine < theirs or (mine == theirs and id(self) < id(other))  # type: ignore[operator]

    async def __aenter__(self) -> Waiter:
        if self._opener is not None:
            await self._opener()
        self._hub._add(self)
        return self

    def enter_now(self) -> bool:
        """Register at once if nothing has to be awaited first (the backend is
        open): what ``async with`` does, without a task step. False if it
        must be entered with ``async with`` instead."""
        if self._opener is not None:
            return False
        self._hub._add(self)
        return True

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
        if self._when is not None:
            self._hub.deadlines.drop(self)
        self._items = None  # a dead heap entry may keep this object a while

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
        if self._when is not None:
            self._hub.deadlines.drop(self)
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
        if deadline is not None and deadline != self._when:
            self._hub.deadlines.add(deadline, self)
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


class _Entry:
    """A heap entry for a waiter whose own entry (an earlier deadline) is still
    in the heap."""

    __slots__ = ("_at", "waiter")

    def __init__(self, at: float, waiter: Waiter) -> None:
        self._at: float | None = at
        self.waiter = waiter

    __lt__ = Waiter.__lt__


class Deadlines:
    """The deadlines of asyncio waiters in one heap, with one loop timer for the
    earliest, instead of a timer per waiter.

    A waiter is its own heap entry (an :class:`_Entry` only when it is given a
    new deadline while its entry is still in the heap). An entry is live while
    its waiter's ``_when`` is the entry's deadline; a waiter woken early (or
    closed) leaves its entry behind, dead. Dead entries are dropped when the
    timer reaches them, or all at once when they are half of a heap of more
    than 64 (a wake-up costs no heap work).
    """

    def __init__(self) -> None:
        self.heap: list[Waiter | _Entry] = []
        self._dead = 0
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

    def add(self, when: float, waiter: Waiter) -> None:
        """Wake ``waiter`` (its arrival future) at ``when``, unless it is woken first."""
        if waiter._when is not None:
            self._dead += 1  # its earlier entry
        waiter._when = when
        if waiter._at is None:
            waiter._at = when
            heapq.heappush(self.heap, waiter)
        elif waiter._at == when:
            self._dead -= 1  # its own entry, still in the heap, is live again
        else:
            heapq.heappush(self.heap, _Entry(when, waiter))
        if self._timer is None or when < self._timer_at:
            self._arm(when)

    def drop(self, waiter: Waiter) -> None:
        """``waiter`` no longer needs its deadline: its entry is dead."""
        waiter._when = None
        self._dead += 1
        heap = self.heap
        if self._dead * 2 > len(heap) > 64:
            live = []
            for entry in heap:
                owner = entry if type(entry) is Waiter else entry.waiter  # type: ignore[union-attr]
                if owner._when == entry._at:
                    live.append(entry)
                elif entry is owner:
                    owner._at = None  # out of the heap
            heapq.heapify(live)
            self.heap = live
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
        while heap and heap[0]._at <= now:  # type: ignore[operator]
            entry = heapq.heappop(heap)
            at = entry._at
            if type(entry) is Waiter:
                waiter = entry
                waiter._at = None
            else:
                waiter = entry.waiter  # type: ignore[union-attr]
            if waiter._when != at:
                self._dead = max(0, self._dead - 1)
                continue
            waiter._when = None
            wake = waiter._wake
            if isinstance(wake, asyncio.Future) and not wake.done():
                waiter._wake = None
                wake.set_result(None)
        if heap:
            self._arm(heap[0]._at)  # type: ignore[arg-type]
