"""What results, groups and the worker side need from a backend: narrow protocols.

This module is a leaf: it imports nothing from the backends, so
:class:`~aioresults.AsyncResult`, :class:`~aioresults.ResultSet` and
:class:`~aioresults.TaskTracker` depend on these protocols, not on
:class:`~aioresults.BaseBackend`. Every :class:`~aioresults.BaseBackend`
satisfies both; a third party can also satisfy them without it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ._meta import ResultMeta

__all__ = ["ChordProgress", "Record", "ResultReader", "ResultWriter", "Watch"]


class Record:
    """One stored record as a waiter receives it: decoded on first use, once.

    Every waiter on a task shares one :class:`Record` per change, so a record
    that nobody looks at is never decoded, and one that many look at is
    decoded once.
    """

    __slots__ = ("_decode", "_error", "_meta", "raw", "task_id")

    def __init__(
        self,
        task_id: str,
        raw: Any,
        decode: Callable[[str, Any], ResultMeta] | None = None,
        *,
        meta: ResultMeta | None = None,
        error: Exception | None = None,
    ) -> None:
        self.task_id = task_id
        #: The record as the store gave it (a payload, a row); None if there is none.
        self.raw = raw
        self._decode = decode
        self._meta = meta
        self._error = error

    @classmethod
    def failed(cls, task_id: str, error: Exception) -> Record:
        """A record that could not be read: :meth:`meta` raises ``error``."""
        return cls(task_id, None, error=error)

    @property
    def missing(self) -> bool:
        """Whether the store has no record (PENDING), or reading it failed."""
        return self.raw is None

    def meta(self) -> ResultMeta:
        """The decoded record (PENDING when the store has none).

        :raises DecodeError: the stored payload is corrupt (or another read error).
        """
        if self._meta is not None:
            return self._meta
        if self._error is None:
            if self.raw is None:
                self._meta = ResultMeta.pending(self.task_id)
                return self._meta
            assert self._decode is not None
            try:
                self._meta = self._decode(self.task_id, self.raw)
                return self._meta
            except Exception as exc:
                self._error = exc
        # Each caller raises its own copy: one exception object raised in many
        # tasks at once would collect all their tracebacks.
        error = self._error
        try:
            copy = type(error)(*error.args)
        except Exception:
            raise error from error.__cause__ or None
        raise copy from error.__cause__ or error


@runtime_checkable
class Watch(Protocol):
    """A watch on some ids (what :meth:`ResultReader.waiter` returns), an async
    context manager.

    Entering registers the watch and starts the first read of every id; the
    records then arrive through :meth:`next` (or :meth:`take` after
    :meth:`arrival`): first what that read found, then every change. Leaving,
    or :meth:`close`, ends the watch.
    """

    ids: tuple[str, ...]

    async def __aenter__(self) -> Watch: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def take(self) -> Record | None:
        """The next record if one has arrived, else None."""
        ...

    def arrival(self, deadline: float | None = None) -> Awaitable[None]:
        """Ends when a record arrives or at ``deadline`` (loop time)."""
        ...

    async def next(self, deadline: float | None = None) -> Record | None:
        """The next record, or None once ``deadline`` (loop time) has passed."""
        ...

    def close(self) -> None:
        """End the watch; idempotent, never blocks."""
        ...


@runtime_checkable
class ResultReader(Protocol):
    """What :class:`~aioresults.AsyncResult` and :class:`~aioresults.ResultSet`
    need: read records, watch them, and keep groups."""

    async def get_meta(self, task_id: str) -> ResultMeta: ...

    async def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta]: ...

    def waiter(self, task_ids: Iterable[str], *, ready_only: bool = False) -> Watch: ...

    async def forget(self, task_id: str) -> None: ...

    async def save_group(self, group_id: str, group: list[Any]) -> None: ...

    async def restore_group(self, group_id: str) -> list[Any] | None: ...

    async def delete_group(self, group_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ChordProgress:
    """What :meth:`~aioresults.BaseBackend.chord_part_return` reports.

    ``complete`` is True for the call that counted a chord's last part, and
    again for any later delivery of that same part (a worker's redelivery after
    a crash): the chord's body runs at least once and, when nothing fails,
    exactly once. No other part ever reports it. ``results`` and the failure
    fields are set whenever ``complete`` is.
    """

    group_id: str
    task_id: str
    #: False when this part had already been counted by an earlier call (a redelivery).
    counted: bool
    #: The part's place in the count (1..size), this call's or the earlier one's.
    count: int | None
    size: int
    complete: bool
    #: Header values in header order (exceptions for failed parts); set when complete.
    results: list[Any] | None = None
    #: Ids of the parts that failed, in header order; set when complete.
    failed_task_ids: tuple[str, ...] = ()
    #: The first failure in header order; set when complete and a part failed.
    exception: BaseException | None = None

    @property
    def failed(self) -> bool:
        """Whether the chord completed with a failed part."""
        return bool(self.failed_task_ids)


@runtime_checkable
class ResultWriter(Protocol):
    """What the worker side (:class:`~aioresults.TaskTracker`) needs: store
    states and count chord parts."""

    async def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        **fields: Any,
    ) -> bool: ...

    async def chord_part_return(
        self, group_id: str, task_id: str, state: str, value: Any, *, index: int | None = None
    ) -> ChordProgress: ...
