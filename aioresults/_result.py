"""AsyncResult: an awaitable handle on one task's result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Generator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

import anyio
import sniffio

from . import states
from ._exceptions import RemoteTaskError, ResultTimeout
from ._meta import ResultMeta

if TYPE_CHECKING:
    from .backends._waiters import Waiter
    from .backends.base import ResultBackend

__all__ = ["AsyncResult", "iter_updates"]

T = TypeVar("T")
_T = TypeVar("_T")


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("timeout must be None or >= 0")
    return anyio.current_time() + timeout


async def _within(
    awaitable: Awaitable[_T], task_ids: Sequence[str], timeout: float | None, deadline: float | None
) -> _T:
    """Await ``awaitable`` before ``deadline``, else raise :class:`ResultTimeout`."""
    if deadline is None:
        return await awaitable
    assert timeout is not None
    if sniffio.current_async_library() == "asyncio":
        # asyncio's own timeout keeps no per-task state, unlike a cancel scope.
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                return await awaitable
        except TimeoutError:
            if scope.expired():
                raise ResultTimeout(task_ids, timeout) from None
            raise
    with anyio.move_on_after(deadline - anyio.current_time()):
        return await awaitable
    raise ResultTimeout(task_ids, timeout)


async def _read(
    backend: ResultBackend, task_ids: Sequence[str], timeout: float | None, deadline: float | None
) -> list[ResultMeta]:
    """The first read of a wait, bounded by its deadline (``timeout=0`` reads once)."""
    if timeout == 0:
        return await backend.get_many(task_ids)
    return await _within(backend.get_many(task_ids), task_ids, timeout, deadline)


async def _enter(
    waiter: Waiter, task_ids: Sequence[str], timeout: float | None, deadline: float | None
) -> None:
    """Enter a waiter (watch, then read) within the deadline; leaving it is the caller's."""
    await _within(waiter.__aenter__(), task_ids, timeout, deadline)


async def iter_updates(
    backend: ResultBackend,
    task_ids: Sequence[str],
    timeout: float | None = None,
    *,
    read_first: bool = True,
) -> AsyncGenerator[ResultMeta, None]:
    """Yield the current record of every id, then each change, until all are ready.

    The store is read once first (unless ``read_first`` is False because the
    caller just did); only ids that are not ready are then watched (registered
    before being read again, so nothing stored in between is lost).

    :raises ResultTimeout: ``timeout`` seconds passed before all were ready
        (``timeout=0`` reads once and never waits).
    :raises DecodeError: an id's stored payload is corrupt.
    """
    deadline = _deadline(timeout)
    pending = set()
    if read_first:
        for meta in await _read(backend, task_ids, timeout, deadline):
            yield meta
            if not meta.ready:
                pending.add(meta.task_id)
    else:
        pending.update(task_ids)  # the caller has just read them: watch straight away
    if not pending:
        return
    if deadline is not None and anyio.current_time() >= deadline:
        assert timeout is not None
        raise ResultTimeout(sorted(pending), timeout)
    waiter = backend.waiter(sorted(pending))
    await _enter(waiter, sorted(pending), timeout, deadline)
    try:
        while pending:
            got = await waiter.next(deadline)
            if got is None:
                assert timeout is not None
                raise ResultTimeout(sorted(pending), timeout)
            task_id, item = got
            if isinstance(item, Exception):
                raise item
            yield item
            if item.ready:
                pending.discard(task_id)
    finally:
        waiter.close()


async def wait_ready(backend: ResultBackend, task_id: str, timeout: float | None) -> ResultMeta:
    """Wait for one id's ready record; :func:`iter_updates` without the generator,
    since one task may hold tens of thousands of these waits at once."""
    deadline = _deadline(timeout)
    meta = (await _read(backend, [task_id], timeout, deadline))[0]
    if meta.ready:
        return meta
    del meta  # the hub keeps the record it reads next; don't hold two per waiter
    if deadline is not None and anyio.current_time() >= deadline:
        assert timeout is not None
        raise ResultTimeout([task_id], timeout)
    waiter = backend.waiter([task_id])
    await _enter(waiter, [task_id], timeout, deadline)
    try:
        while True:
            got = waiter.take()
            if got is None:
                await waiter.arrival(deadline)
                got = waiter.take()
            if got is None:
                assert timeout is not None
                raise ResultTimeout([task_id], timeout)
            # Read through `got` only: it is reassigned before the next wait,
            # so an unfinished record is not kept alive while waiting.
            if isinstance(got[1], Exception):
                raise got[1]
            if got[1].ready:
                return got[1]
    finally:
        waiter.close()


class AsyncResult(Generic[T]):
    """A handle on the result of task ``id`` stored in ``backend``.

    ``await result`` waits for it and returns its value (or raises its
    exception), like ``await result.get()``. Reads cache the record once it is
    ready, since a ready record no longer changes.
    """

    __slots__ = ("_meta", "backend", "id", "parent")

    def __init__(
        self, id: str, backend: ResultBackend, *, parent: AsyncResult[Any] | None = None
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("AsyncResult needs a task id")
        self.id = id
        self.backend = backend
        self.parent = parent
        self._meta: ResultMeta | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return self.id == other.id
        if isinstance(other, str):
            return self.id == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __await__(self) -> Generator[Any, None, T]:
        return self.get().__await__()

    @property
    def task_id(self) -> str:
        """Alias of :attr:`id`."""
        return self.id

    def as_tuple(self) -> list[Any]:
        """Celery's tuple form: ``[[id, parent tuple or None], None]``."""
        return [[self.id, self.parent.as_tuple() if self.parent is not None else None], None]

    # ------------------------------------------------------------ reading

    def _remember(self, meta: ResultMeta) -> ResultMeta:
        if meta.ready:
            self._meta = meta
        return meta

    async def meta(self) -> ResultMeta:
        """The stored record (PENDING if there is none); cached once ready."""
        if self._meta is not None:
            return self._meta
        return self._remember(await self.backend.get_meta(self.id))

    async def state(self) -> str:
        """The current state."""
        return (await self.meta()).status

    async def ready(self) -> bool:
        """Whether the task finished (SUCCESS, FAILURE or REVOKED)."""
        return (await self.meta()).ready

    async def successful(self) -> bool:
        """Whether the task succeeded."""
        return (await self.meta()).status == states.SUCCESS

    async def failed(self) -> bool:
        """Whether the task failed (REVOKED is not a failure)."""
        return (await self.meta()).status == states.FAILURE

    # ------------------------------------------------------------ waiting

    async def wait(self, timeout: float | None = None) -> ResultMeta:
        """Wait until the task is ready and return its record; never raises its exception.

        :raises ResultTimeout: not ready within ``timeout`` seconds
            (``timeout=0`` checks once).
        """
        if self._meta is not None:
            return self._meta
        return self._remember(await wait_ready(self.backend, self.id, timeout))

    @overload
    async def get(self, timeout: float | None = None, propagate: Literal[True] = True) -> T: ...

    @overload
    async def get(
        self, timeout: float | None = None, *, propagate: Literal[False]
    ) -> T | BaseException: ...

    async def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the result and return it.

        :param timeout: seconds to wait; None waits for ever, 0 checks once.
        :param propagate: re-raise the task's exception on FAILURE or REVOKED;
            if False, return the exception instead.
        :raises ResultTimeout: not ready in time (also a :class:`TimeoutError`).
        """
        # Not through wait(): one coroutine less per waiting task.
        meta = self._meta or self._remember(await wait_ready(self.backend, self.id, timeout))
        return value_of(meta, propagate)

    async def watch(self, timeout: float | None = None) -> AsyncGenerator[ResultMeta, None]:
        """Yield the record now and at every state change, ending with the ready one.

        Progress updates (e.g. ``PROGRESS`` with a new meta) are changes too.
        Stores that push the record itself (Redis, memory) deliver every
        change; stores that only signal "something changed" (filesystem,
        SQLite, Azure) deliver the latest record at each signal, so changes
        written in quick succession may arrive as the last of them. The ready
        record always arrives.

        :raises ResultTimeout: not ready within ``timeout`` seconds.
        """
        last: ResultMeta | None = None
        async with aclosing(iter_updates(self.backend, [self.id], timeout)) as updates:
            async for meta in updates:
                if meta == last:
                    continue
                last = meta
                yield self._remember(meta)

    async def forget(self) -> None:
        """Delete the stored result and drop the cached one. Idempotent."""
        self._meta = None
        await self.backend.forget(self.id)


def value_of(meta: ResultMeta, propagate: bool = True) -> Any:
    """The value of a ready record; raises its exception if ``propagate``."""
    if meta.status in states.PROPAGATE_STATES and propagate:
        exc = meta.result
        if not isinstance(exc, BaseException):
            exc = RemoteTaskError(exc)
        raise exc.with_traceback(None)
    return meta.result
