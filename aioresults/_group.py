"""ResultSet and GroupResult: many results, joined in order or as they complete."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Iterable, Iterator
from contextlib import aclosing
from typing import Any, Generic, Literal, overload

from typing_extensions import TypeVar

from . import _runtime, states
from ._exceptions import DecodeError, ResultTimeout
from ._meta import ResultMeta
from ._protocols import ResultReader
from ._result import AsyncResult, iter_updates, value_of
from .backends.base import BaseBackend

__all__ = ["GroupResult", "ResultSet", "result_from_tuple"]

_UNREAD: Any = object()


async def _read_metas(
    backend: ResultReader, task_ids: list[str]
) -> tuple[list[Any], list[Any], list[ResultMeta | None]]:
    """What ``BaseBackend._read_values`` returns, for a reader without it:
    every record decoded."""
    metas: list[ResultMeta | None] = list(await backend.get_many(task_ids))
    return [None] * len(metas), [None] * len(metas), metas


T = TypeVar("T", default=Any)


class ResultSet(Generic[T]):
    """A set of results in one backend, waited for together.

    Waits read every member in one batch and then watch the unfinished ones,
    so joining a finished group of 10,000 costs one batched read.
    """

    def __init__(
        self, results: Iterable[AsyncResult[T]] = (), backend: ResultReader | None = None
    ) -> None:
        self._results: list[AsyncResult[T]] = []
        self._ids: set[str] = set()
        self._backend = backend
        self.update(results)

    @property
    def results(self) -> list[AsyncResult[T]]:
        """The members, in order (change them with :meth:`add`, :meth:`remove`, ...)."""
        return self._results

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(r.id for r in self.results)}]>"

    def __await__(self) -> Generator[Any, None, list[T]]:
        """``await rs`` is ``await rs.join()``."""
        return self.join().__await__()

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult[T]]:
        return iter(self.results)

    @overload
    def __getitem__(self, index: int) -> AsyncResult[T]: ...

    @overload
    def __getitem__(self, index: slice) -> list[AsyncResult[T]]: ...

    def __getitem__(self, index: int | slice) -> AsyncResult[T] | list[AsyncResult[T]]:
        return self.results[index]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, AsyncResult):
            item = item.id
        return item in self._ids

    @property
    def backend(self) -> ResultReader:
        """The backend every member uses."""
        if self._backend is None:
            raise ValueError(f"{type(self).__name__} is empty and has no backend")
        return self._backend

    # ------------------------------------------------------------ membership

    def add(self, result: AsyncResult[T]) -> None:
        """Add a result (no-op if it is already a member)."""
        if self._backend is None:
            self._backend = result.backend
        elif result.backend is not self._backend:
            raise ValueError("every member of a result set must use the same backend")
        if result.id not in self._ids:
            self._ids.add(result.id)
            self._results.append(result)

    def update(self, results: Iterable[AsyncResult[T]]) -> None:
        """Add several results."""
        for result in results:
            self.add(result)

    def remove(self, result: AsyncResult[T] | str) -> None:
        """Remove a member (by result or id); :class:`KeyError` if absent."""
        task_id = result.id if isinstance(result, AsyncResult) else result
        if task_id not in self._ids:
            raise KeyError(result)
        self._ids.discard(task_id)
        self._results = [r for r in self._results if r.id != task_id]

    def discard(self, result: AsyncResult[T] | str) -> None:
        """Remove a member if present."""
        try:
            self.remove(result)
        except KeyError:
            pass

    def clear(self) -> None:
        """Remove every member."""
        self._results.clear()
        self._ids.clear()

    # ------------------------------------------------------------ reading

    async def _metas(self) -> list[ResultMeta]:
        if not self.results:
            return []
        metas = await self.backend.get_many([r.id for r in self.results])
        return [r._remember(m) for r, m in zip(self.results, metas, strict=True)]

    async def completed_count(self) -> int:
        """How many members succeeded (Celery's meaning)."""
        return sum(m.status == states.SUCCESS for m in await self._metas())

    async def ready(self) -> bool:
        """Whether every member is ready."""
        return all(m.ready for m in await self._metas())

    async def waiting(self) -> bool:
        """Whether any member is not ready."""
        return not await self.ready()

    async def successful(self) -> bool:
        """Whether every member succeeded."""
        return all(m.status == states.SUCCESS for m in await self._metas())

    async def failed(self) -> bool:
        """Whether any member failed."""
        return any(m.status == states.FAILURE for m in await self._metas())

    async def forget(self) -> None:
        """Forget every member's result."""
        for result in self.results:
            await result.forget()

    # ------------------------------------------------------------ waiting

    async def _ready_metas(
        self, timeout: float | None, held: bool = True
    ) -> AsyncGenerator[ResultMeta, None]:
        """Yield each member's ready record once, in completion order.

        :param held: also yield the records members hold already (first); with
            False, only the others are waited for and yielded.
        """
        holders = {r.id: r for r in self.results if r._record is not None}
        cached = set(holders)
        if held:
            for holder in holders.values():
                meta = holder._meta
                if meta is not None:
                    yield meta
        wanted = list(dict.fromkeys(r.id for r in self.results if r.id not in cached))
        if not wanted:
            return
        seen: set[str] = set()
        updates = iter_updates(self.backend, wanted, timeout, ready_only=True)
        async with aclosing(updates) as it:
            async for meta in it:
                if meta.ready and meta.task_id not in seen:
                    seen.add(meta.task_id)
                    yield meta

    @overload
    async def join(
        self, timeout: float | None = None, propagate: Literal[True] = True
    ) -> list[T]: ...

    @overload
    async def join(
        self, timeout: float | None = None, *, propagate: Literal[False]
    ) -> list[T | BaseException]: ...

    async def join(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Wait for every member; return their values in member order.

        A finished set costs one batched read; the unfinished members are then
        watched and read again (so nothing stored in between is missed).

        :param timeout: seconds for the whole set; None waits for ever, 0 checks once.
        :param propagate: raise the first failure as soon as it is seen (in
            completion order); if False, failures are returned as exceptions.
        :raises ResultTimeout: not every member was ready in time.
        """
        deadline = _runtime.deadline_after(timeout)
        unread = [r for r in self.results if r._record is None]
        found: dict[str, Any] = {}  # values of plain SUCCESS records, by id
        waiting = False
        if unread:
            # One batched read first: a finished set needs nothing more.
            ids = [r.id for r in unread]
            backend = self.backend
            read = (
                backend._read_values(ids)
                if isinstance(backend, BaseBackend)
                else _read_metas(backend, ids)
            )
            try:
                raws, values, metas = (
                    await _runtime.within(read, deadline) if timeout else await read
                )
            except TimeoutError:
                assert timeout is not None
                raise ResultTimeout(ids, timeout) from None
            ready_states, failed = states.READY_STATES, states.PROPAGATE_STATES
            for result, raw, value, meta in zip(unread, raws, values, metas, strict=True):
                if meta is None:
                    # A plain SUCCESS: kept as read (AsyncResult._meta decodes it on demand).
                    result._record = raw
                    found[result.id] = value
                    continue
                status = meta.status
                if status in ready_states:  # result._remember(meta), inlined: joins of thousands
                    result._record = meta
                    if propagate and status in failed:
                        value_of(meta, propagate=True)
                else:
                    waiting = True
        if waiting:
            if timeout == 0:
                raise ResultTimeout([r.id for r in self.results if r._record is None], 0)
            remaining = None if deadline is None else deadline - _runtime.now()
            by_id = {r.id: r for r in self.results}
            try:
                if remaining is not None and remaining <= 0:
                    raise ResultTimeout([r.id for r in self.results if r._record is None], 0)
                async with aclosing(self._ready_metas(remaining, held=False)) as ready:
                    async for meta in ready:
                        by_id[meta.task_id]._remember(meta)
                        if propagate and meta.status in states.PROPAGATE_STATES:
                            value_of(meta, propagate=True)
            except ResultTimeout as exc:
                assert timeout is not None
                raise ResultTimeout(exc.task_ids, timeout) from None
            for result in self.results:  # duplicates of one id share its record
                if result._record is None:
                    result._remember(by_id[result.id]._meta)  # type: ignore[arg-type]
        out: list[Any] = []
        append, success, missing = out.append, states.SUCCESS, found.get
        for result in self.results:
            value = missing(result.id, _UNREAD) if found else _UNREAD
            if value is not _UNREAD:
                append(value)
                continue
            done = result._meta
            assert done is not None
            # value_of(done, propagate), inlined for the common case.
            append(done.result if done.status == success else value_of(done, propagate))
        return out

    async def as_completed(
        self, timeout: float | None = None
    ) -> AsyncGenerator[AsyncResult[T], None]:
        """Yield members as they become ready (each once), in completion order.

        The yielded results hold their ready record, so ``await r`` returns
        (or raises) at once.

        :raises ResultTimeout: not every member was ready in time.
        """
        members: dict[str, list[AsyncResult[T]]] = {}
        for result in self.results:
            members.setdefault(result.id, []).append(result)
        async with aclosing(self._ready_metas(timeout)) as ready:
            async for meta in ready:
                for result in members.get(meta.task_id, ()):
                    result._remember(meta)
                    yield result


class GroupResult(ResultSet[T]):
    """A :class:`ResultSet` with an id, which can be saved and restored.

    A saved group is stored as Celery stores it: ``celery-taskset-meta-<id>``
    holding ``{"result": [[id, None], [member tuples]]}``.
    """

    def __init__(
        self,
        id: str,
        results: Iterable[AsyncResult[T]] = (),
        backend: ResultReader | None = None,
        *,
        parent: AsyncResult[Any] | None = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("GroupResult needs a group id")
        super().__init__(results, backend)
        self.id = id
        self.parent = parent

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return (self.id, self.results) == (other.id, other.results)
        if isinstance(other, str):
            return self.id == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def as_tuple(self) -> list[Any]:
        """Celery's tuple form: ``[[id, parent or None], [member tuples]]``."""
        parent = self.parent.as_tuple() if self.parent is not None else None
        return [[self.id, parent], [r.as_tuple() for r in self.results]]

    async def save(self) -> None:
        """Store the group so :meth:`restore` can rebuild it elsewhere."""
        await self.backend.save_group(self.id, self.as_tuple())

    async def delete(self) -> None:
        """Delete the saved group (not its members' results). Idempotent."""
        await self.backend.delete_group(self.id)

    @classmethod
    async def restore(cls, id: str, backend: ResultReader) -> GroupResult[Any] | None:
        """Rebuild a saved group, or return None if it was never saved or expired.

        :raises DecodeError: the saved group is not in Celery's format.
        """
        stored = await backend.restore_group(id)
        if stored is None:
            return None
        group = result_from_tuple(stored, backend)
        if not isinstance(group, GroupResult):
            raise DecodeError(f"saved group {id!r} is not a group")
        return group


def result_from_tuple(data: Any, backend: ResultReader) -> AsyncResult[Any] | GroupResult[Any]:
    """Rebuild an :class:`AsyncResult` or :class:`GroupResult` from Celery's tuple form.

    :raises DecodeError: ``data`` is not a result tuple.
    """
    try:
        (node_id, parent_data), members = data
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not a result tuple: {data!r:.100}") from exc
    if members is not None and not isinstance(members, (list, tuple)):
        raise DecodeError(f"result tuple has no member list: {members!r:.100}")
    if not isinstance(node_id, str):
        raise DecodeError(f"result tuple has a non-string id: {node_id!r:.100}")
    try:
        parent = result_from_tuple(parent_data, backend) if parent_data is not None else None
    except RecursionError as exc:
        raise DecodeError("result tuple nests too deeply") from exc
    if parent is not None and not isinstance(parent, AsyncResult):
        parent = None
    if members is None:
        return AsyncResult(node_id, backend, parent=parent)
    children = [result_from_tuple(m, backend) for m in members]
    return GroupResult(
        node_id,
        [c for c in children if isinstance(c, AsyncResult)],
        backend,
        parent=parent,
    )
