"""AsyncResult: an awaitable handle on one task's result."""

from __future__ import annotations

import warnings
from collections.abc import AsyncGenerator, Generator, Sequence
from contextlib import aclosing
from typing import Any, Generic, Literal, overload

from typing_extensions import TypeVar

from . import _runtime, states
from ._exceptions import RemoteTaskError, ResultTimeout
from ._meta import ResultMeta
from ._protocols import ResultReader, Watch

__all__ = ["AsyncResult", "iter_updates", "wait_ready"]

T = TypeVar("T", default=Any)


async def _enter(
    waiter: Watch, task_ids: Sequence[str], timeout: float | None, deadline: float | None
) -> None:
    """Enter a waiter (the backend may connect first) within the deadline."""
    if deadline is None:
        await waiter.__aenter__()
        return
    try:
        await _runtime.within(waiter.__aenter__(), deadline)
    except TimeoutError:
        assert timeout is not None
        raise ResultTimeout(task_ids, timeout) from None


async def iter_updates(
    backend: ResultReader,
    task_ids: Sequence[str],
    timeout: float | None = None,
    *,
    ready_only: bool = False,
) -> AsyncGenerator[ResultMeta, None]:
    """Yield the current record of every id, then each change, until all are ready.

    The ids are watched before they are read, so nothing stored in between is
    lost. With ``ready_only``, ids that have no record yet are not yielded
    until they get one.

    :raises ResultTimeout: ``timeout`` seconds passed before all were ready
        (``timeout=0`` reads once and never waits).
    :raises DecodeError: an id's stored payload is corrupt.
    """
    deadline = _runtime.deadline_after(timeout)
    pending = set(task_ids)
    if not pending:
        return
    if timeout == 0:
        for meta in await backend.get_many(list(dict.fromkeys(task_ids))):
            if not ready_only or meta.status != states.PENDING:
                yield meta
            if meta.ready:
                pending.discard(meta.task_id)
        if pending:
            raise ResultTimeout(sorted(pending), 0)
        return
    waiter = backend.waiter(sorted(pending), ready_only=ready_only)
    await _enter(waiter, sorted(pending), timeout, deadline)
    try:
        while pending:
            record = waiter.take()
            if record is None:
                await waiter.arrival(deadline)
                record = waiter.take()
                if record is None:
                    assert timeout is not None
                    raise ResultTimeout(sorted(pending), timeout)
            meta = record.meta()
            yield meta
            if meta.ready:
                pending.discard(meta.task_id)
    finally:
        waiter.close()


async def wait_ready(backend: ResultReader, task_id: str, timeout: float | None) -> ResultMeta:
    """Wait for one id's ready record: :func:`iter_updates` without the generator,
    since one process may hold tens of thousands of these waits at once."""
    if timeout == 0:
        return await _ready_now(backend, task_id)
    deadline = _runtime.deadline_after(timeout)
    waiter = backend.waiter((task_id,), ready_only=True)
    if not _enter_now(waiter):
        await _enter(waiter, (task_id,), timeout, deadline)
    try:
        while True:
            record = waiter.take()
            if record is None:
                await waiter.arrival(deadline)
                record = waiter.take()
                if record is None:
                    raise ResultTimeout([task_id], timeout)  # type: ignore[arg-type]
            meta = record.meta()
            if meta.ready:
                return meta
            # Not kept while waiting again: a process may hold thousands of waits.
            del meta, record
    finally:
        waiter.close()


async def _ready_now(backend: ResultReader, task_id: str) -> ResultMeta:
    """``timeout=0``: read once, never wait."""
    meta = (await backend.get_many([task_id]))[0]
    if meta.ready:
        return meta
    raise ResultTimeout([task_id], 0)


def _enter_now(waiter: Watch) -> bool:
    """Register a hub waiter at once when it needs no await (the backend is
    open): no task step and no timeout scope for that."""
    enter = getattr(waiter, "enter_now", None)
    return enter is not None and bool(enter())


class AsyncResult(Generic[T]):
    """A handle on the result of task ``id`` stored in ``backend``.

    ``await result`` waits for it and returns its value (or raises its
    exception), like ``await result.get()``. Reads cache the record once it is
    ready, since a ready record no longer changes.
    """

    # _record: the cached ready record, a ResultMeta, or the raw payload a join
    # left undecoded (see _meta): one slot, so a pending get() costs no more.
    __slots__ = ("_record", "backend", "id", "parent")

    def __init__(
        self, id: str, backend: ResultReader, *, parent: AsyncResult[Any] | None = None
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("AsyncResult needs a task id")
        self.id = id
        self.backend = backend
        self.parent = parent
        self._record: Any = None

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

    @property
    def _meta(self) -> ResultMeta | None:
        """The cached ready record, if any. A join leaves plain SUCCESS records
        as the store gave them (a finished set of thousands then keeps no
        object per member for the garbage collector to walk); such a record is
        decoded here, once, when someone asks for it."""
        record = self._record
        if record is None or isinstance(record, ResultMeta):
            return record
        meta: ResultMeta = self.backend._decode(self.id, record)  # type: ignore[attr-defined]
        self._record = meta
        return meta

    @_meta.setter
    def _meta(self, meta: ResultMeta | None) -> None:
        self._record = meta

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

    async def wait_ready(self, timeout: float | None = None) -> ResultMeta:
        """Wait until the task is ready and return its record; never raises its exception.

        :raises ResultTimeout: not ready within ``timeout`` seconds
            (``timeout=0`` checks once).
        """
        if self._meta is not None:
            return self._meta
        return self._remember(await wait_ready(self.backend, self.id, timeout))

    async def wait(self, timeout: float | None = None) -> ResultMeta:
        """Deprecated since 0.2: use :meth:`wait_ready` (same behaviour).

        In Celery ``wait`` means ``get``; this name will follow Celery in 0.3.
        """
        warnings.warn(
            "AsyncResult.wait() is renamed wait_ready(); in 0.3 wait() will mean get(), "
            "as in Celery",
            DeprecationWarning,
            stacklevel=2,
        )
        return await self.wait_ready(timeout)

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
        meta = self._meta
        if meta is not None:
            return value_of(meta, propagate)
        if timeout == 0:
            return await self._get_now(propagate)
        # wait_ready(), inlined: one coroutine frame per pending get(), not two,
        # since a process may hold tens of thousands of them.
        deadline = _runtime.deadline_after(timeout)
        waiter = self.backend.waiter((self.id,), ready_only=True)
        if not _enter_now(waiter):
            await _enter(waiter, (self.id,), timeout, deadline)
        try:
            while True:
                record = waiter.take()
                if record is None:
                    await waiter.arrival(deadline)
                    record = waiter.take()
                    if record is None:
                        raise ResultTimeout([self.id], timeout)  # type: ignore[arg-type]
                meta = record.meta()
                if meta.ready:
                    break
                del meta, record
        finally:
            waiter.close()
        self._meta = meta
        return value_of(meta, propagate)

    async def _get_now(self, propagate: bool) -> Any:
        """``get(timeout=0)``: read once (kept apart: it would make every pending
        ``get()``'s frame larger)."""
        return value_of(self._remember(await _ready_now(self.backend, self.id)), propagate)

    async def watch(self, timeout: float | None = None) -> AsyncGenerator[ResultMeta, None]:
        """Yield the record now and at every state change, ending with the ready one.

        Progress updates (e.g. ``PROGRESS`` with a new meta) are changes too.
        What each store delivers is listed in the backends' documentation:
        stores that push every record (Redis, memory, AMQP, NATS) deliver every
        change while connected; stores that signal or are polled deliver the
        latest record at each signal or poll, so changes written in quick
        succession may arrive as the last of them. The ready record always
        arrives.

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
