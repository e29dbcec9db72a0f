"""The waiter hub: one per backend, routing stored results to waiting tasks.

A waiter registers *before* the store is read, so a result stored between the
read and the wake-up is never missed. Waiters arriving together are settled in
one batch: one ``_watch`` call (one SUBSCRIBE on Redis) and one ``_read_metas``
call (one MGET) for all of them. Many waiters on one id share one watch; the
last one to leave, by any route (result, timeout, cancellation), ends it, and
nothing of it stays behind.

Backends feed the hub in one of three ways:

* :meth:`WaiterHub.deliver` when the store pushes the new record itself
  (Redis pub/sub carries the payload; the memory backend calls it directly);
* :meth:`WaiterHub.refresh` when the store only says that something changed
  (file-system notifications): the hub re-reads the watched ids in one batch;
* :meth:`WaiterHub.run_poller` for a store with no notification at all: one
  shared, batched poller with back-off.

After a reconnect a backend re-establishes its watches first and then calls
:meth:`WaiterHub.refresh`, so a result stored while it was away is not lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Protocol, Union

import anyio
import anyio.lowlevel
import sniffio

from .._meta import ResultMeta
from ..states import PENDING

__all__ = ["HubSource", "Item", "Waiter", "WaiterHub"]

logger = logging.getLogger("aioresults.backends")

#: What a waiter receives for an id: its current record, or the error reading it.
Item = Union["ResultMeta", Exception]


class HubSource(Protocol):
    """What the hub needs from its backend."""

    async def _watch(self, task_ids: Sequence[str]) -> None: ...

    def _unwatch(self, task_ids: Sequence[str]) -> None: ...

    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]: ...


class Waiter:
    """One task's interest in a set of ids; an async context manager.

    ``async with hub.waiter(ids) as w`` registers, watches and reads; then
    ``await w.next()`` returns ``(task_id, item)`` pairs: first the record read
    after registering, then each change. Leaving the block unregisters.
    """

    # Kept small: a process may hold tens of thousands of these.
    __slots__ = ("_hub", "_items", "_timer", "_wake", "ids")

    def __init__(self, hub: WaiterHub, ids: Iterable[str]) -> None:
        self.ids = tuple(dict.fromkeys(ids))
        self._hub = hub
        self._items: list[tuple[str, Item]] | None = None
        self._wake: asyncio.Future[None] | anyio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Waiter:
        self._hub._add(self)
        try:
            await self._hub._settle(self)
        except BaseException:
            self._hub._remove(self)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Unregister (what leaving ``async with`` does); idempotent, never blocks."""
        self._hub._remove(self)
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _put(self, task_id: str, item: Item) -> None:
        if self._items is None:
            self._items = []
        self._items.append((task_id, item))
        wake, self._wake = self._wake, None
        if wake is None:
            return
        if isinstance(wake, anyio.Event):
            wake.set()
        else:
            self._stop_timer()
            if not wake.done():
                wake.set_result(None)

    def pending(self) -> bool:
        """Whether an item is waiting to be taken."""
        return bool(self._items)

    def take(self) -> tuple[str, Item] | None:
        """The next ``(task_id, item)`` if one has arrived, else None."""
        return self._items.pop(0) if self._items else None

    def arrival(self, deadline: float | None = None) -> Awaitable[None]:
        """An awaitable that ends when an item arrives or at ``deadline``
        (an :func:`anyio.current_time`); then :meth:`take` tells which.

        On asyncio it is a bare future with one timer: far lighter than an
        anyio Event, a cancel scope and a coroutine, at 10,000 waiters.
        """
        if self._items or sniffio.current_async_library() != "asyncio":
            return self._wait_anyio(deadline)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._wake = future
        self._stop_timer()
        if deadline is not None:
            self._timer = loop.call_at(deadline, _expire, future)
        return future

    async def next(self, deadline: float | None = None) -> tuple[str, Item] | None:
        """Wait for and return the next ``(task_id, item)``.

        :param deadline: give up at this :func:`anyio.current_time`; then
            return None.
        """
        if not self._items:
            await self.arrival(deadline)
        return self.take()

    async def _wait_anyio(self, deadline: float | None) -> None:
        if self._items:
            return
        event = self._wake = anyio.Event()
        delay = float("inf") if deadline is None else deadline - anyio.current_time()
        try:
            with anyio.move_on_after(delay):
                await event.wait()
        finally:
            self._wake = None


_PENDING = object()


def _token(item: Item) -> object:
    """What the hub remembers of a record: most waiting ids have none yet,
    and one shared marker costs nothing, where a meta per id would not."""
    if (
        isinstance(item, ResultMeta)
        and item.status == PENDING
        and item == ResultMeta.pending(item.task_id)
    ):
        return _PENDING
    return item


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class WaiterHub:
    """Routes records to waiters; see the module docstring."""

    def __init__(self, source: HubSource) -> None:
        self._source = source
        # Usually one waiter per id: kept bare, a list only when there are more.
        self._by_id: dict[str, Waiter | list[Waiter]] = {}
        # The last record seen per id, to deliver each change once.
        self._last: dict[str, object] = {}
        self._versions: dict[str, int] = {}
        self._to_watch: set[str] = set()
        self._in_flight: set[str] = set()
        self._to_read: set[Waiter] = set()
        self._settling: anyio.Event | None = None
        self._watched_event: anyio.Event | None = None
        self._registrations = 0
        self._closed: Exception | None = None

    # ------------------------------------------------------------ inspection

    def __len__(self) -> int:
        """The number of registered waiters."""
        return len({w for task_id in self._by_id for w in self._waiters(task_id)})

    def watched_ids(self) -> list[str]:
        """The ids at least one waiter is waiting for."""
        return list(self._by_id)

    def has_waiters(self, task_id: str) -> bool:
        """Whether any waiter waits for ``task_id``.

        A backend that ends watches later than :meth:`HubSource._unwatch` is
        called (from a queue, say) checks this first, so a waiter that arrived
        in the meantime keeps its watch.
        """
        return task_id in self._by_id

    def waiter(self, task_ids: Iterable[str]) -> Waiter:
        """A waiter for ``task_ids``, to be entered with ``async with``."""
        return Waiter(self, task_ids)

    # ------------------------------------------------------------ registration

    def _waiters(self, task_id: str) -> Sequence[Waiter]:
        found = self._by_id.get(task_id)
        if found is None:
            return ()
        return (found,) if isinstance(found, Waiter) else found

    def close(self, error: Exception) -> None:
        """Give ``error`` to every waiter and refuse new ones (the backend closed)."""
        self._closed = error
        for task_id in list(self._by_id):
            for waiter in self._waiters(task_id):
                waiter._put(task_id, error)

    def _add(self, waiter: Waiter) -> None:
        if self._closed is not None:
            raise self._closed
        for task_id in waiter.ids:
            found = self._by_id.get(task_id)
            if found is None:
                self._by_id[task_id] = waiter
                self._versions[task_id] = 0
                self._to_watch.add(task_id)
            elif isinstance(found, Waiter):
                self._by_id[task_id] = [found, waiter]
            else:
                found.append(waiter)
        self._to_read.add(waiter)
        self._registrations += 1
        if self._watched_event is not None:
            self._watched_event.set()

    def _remove(self, waiter: Waiter) -> None:
        self._to_read.discard(waiter)
        gone = []
        for task_id in waiter.ids:
            found = self._by_id.get(task_id)
            if isinstance(found, list):
                if waiter in found:
                    found.remove(waiter)
                if len(found) > 1:
                    continue
                self._by_id[task_id] = found[0]
                continue
            if found is waiter:
                del self._by_id[task_id]
                self._versions.pop(task_id, None)
                self._last.pop(task_id, None)
                if task_id in self._to_watch:
                    self._to_watch.discard(task_id)  # never watched: nothing to end
                elif task_id not in self._in_flight:
                    gone.append(task_id)
        if gone:
            self._unwatch(gone)

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        try:
            self._source._unwatch(task_ids)
        except Exception:  # pragma: no cover - a backend bug must not break waiters
            logger.exception("ending the watch of %d ids failed", len(task_ids))

    async def _settle(self, waiter: Waiter) -> None:
        """Watch and read for ``waiter`` and whoever arrived with it."""
        while waiter in self._to_read:
            if self._settling is not None:
                await self._settling.wait()
                continue
            self._settling = done = anyio.Event()
            try:
                await self._settle_batch()
            finally:
                self._settling = None
                done.set()

    async def _settle_batch(self) -> None:
        # Let the waiters created in the same tick join this batch.
        await anyio.lowlevel.checkpoint()
        batch, self._to_watch = self._to_watch, set()
        readers = set(self._to_read)
        self._in_flight = batch
        try:
            if batch:
                await self._source._watch(sorted(batch))
        except BaseException:
            # The watch may be half set up: end it, and let the next settler
            # watch again whatever still has waiters.
            self._in_flight = set()
            self._unwatch(sorted(batch))
            self._to_watch |= {i for i in batch if i in self._by_id}
            raise
        finally:
            self._in_flight = set()
        # Ids whose waiters all left while their watch was being set up.
        abandoned = [i for i in batch if i not in self._by_id]
        if abandoned:
            self._unwatch(abandoned)

        ids = list(dict.fromkeys(i for w in readers for i in w.ids if i in self._by_id))
        versions = {i: self._versions[i] for i in ids}
        items = await self._source._read_metas(ids) if ids else []
        self._to_read -= readers
        for task_id, item in zip(ids, items, strict=True):
            if self._versions.get(task_id) != versions[task_id]:
                continue  # a newer record was delivered while we read
            if task_id in self._last and self._last[task_id] != _token(item):
                # Earlier waiters hold an older record and no push may follow
                # (a poller compares with _last): this read is news for them too.
                self.deliver(task_id, item)
                continue
            self._last[task_id] = _token(item)
            # A refresh that started before this read must not deliver its older record.
            self._versions[task_id] += 1
            for w in self._waiters(task_id):
                if w in readers:
                    w._put(task_id, item)

    # ------------------------------------------------------------ feeding

    def deliver(self, task_id: str, item: Item) -> None:
        """Hand a new record (or the error decoding it) to the waiters of ``task_id``."""
        waiters = self._waiters(task_id)
        if not waiters:
            return
        token = _token(item)
        if self._last.get(task_id) == token:
            return
        self._last[task_id] = token
        self._versions[task_id] += 1
        for w in waiters:
            w._put(task_id, item)

    async def refresh(self, task_ids: Iterable[str] | None = None) -> int:
        """Re-read watched ids (all of them by default) and deliver what changed.

        :returns: the number of ids whose record changed.
        """
        wanted = self._by_id if task_ids is None else task_ids
        ids = [i for i in dict.fromkeys(wanted) if i in self._by_id]
        if not ids:
            return 0
        versions = {i: self._versions[i] for i in ids}
        items = await self._source._read_metas(ids)
        changed = 0
        for task_id, item in zip(ids, items, strict=True):
            if self._versions.get(task_id) != versions[task_id]:
                continue
            if self._last.get(task_id) != _token(item):
                changed += 1
                self.deliver(task_id, item)
        return changed

    async def wait_watched(self) -> None:
        """Return once at least one id is watched."""
        while not self._by_id:
            self._watched_event = anyio.Event()
            try:
                await self._watched_event.wait()
            finally:
                self._watched_event = None

    async def run_poller(
        self,
        min_interval: float,
        max_interval: float,
        on_error: Callable[[Exception], Awaitable[None]] | None = None,
    ) -> None:
        """Poll every watched id, starting at ``min_interval`` and doubling up to
        ``max_interval`` while nothing changes; a change or a new waiter resets it.

        Runs until cancelled. A read error is logged (or given to ``on_error``)
        and polling goes on.
        """
        interval = min_interval
        seen = self._registrations
        while True:
            await self.wait_watched()
            try:
                changed = await self.refresh()
            except Exception as exc:
                if on_error is not None:
                    await on_error(exc)
                else:
                    logger.warning("polling %d results failed: %s", len(self._by_id), exc)
                changed = 0
            if changed or self._registrations != seen:
                interval = min_interval
            else:
                interval = min(interval * 2, max_interval)
            seen = self._registrations
            # A waiter arriving during a long pause cuts it short: its result
            # may be stored right after its first read.
            self._watched_event = arrived = anyio.Event()
            try:
                with anyio.move_on_after(interval):
                    await arrived.wait()
            finally:
                self._watched_event = None
            if arrived.is_set():
                await anyio.sleep(min_interval)
