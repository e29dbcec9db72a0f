"""The worker side: run a coroutine under a task id and store what happens to it.

:meth:`backend.track() <aioresults.BaseBackend.track>` returns a
:class:`TaskTracker`, an async context manager that stores STARTED on entry,
PROGRESS on :meth:`TaskTracker.progress`, and on exit SUCCESS (the value given
to :meth:`TaskTracker.set_result`), FAILURE (the exception and its traceback)
or REVOKED (on cancellation). :func:`task` is the decorator form.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import socket
import traceback as traceback_module
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

import anyio

from . import _runtime, states
from ._exceptions import ResultTooLarge, SerializationError, TaskRevokedError
from ._protocols import ChordProgress, ResultWriter

__all__ = ["TaskTracker", "TrackedTask", "WorkerMixin", "current_task", "task"]

P = ParamSpec("P")
T = TypeVar("T")

_current: contextvars.ContextVar[TaskTracker] = contextvars.ContextVar("aioresults_current_task")


def current_task() -> TaskTracker:
    """The :class:`TaskTracker` of the tracked task this code runs in.

    Lets a function decorated with :func:`task` report progress without being
    handed its tracker::

        await aioresults.current_task().progress(3, 10)

    :raises LookupError: no tracked task is running in this context.
    """
    try:
        return _current.get()
    except LookupError:
        raise LookupError("no tracked task is running here (see backend.track())") from None


class TaskTracker:
    """Stores the states of one task run; returned by ``backend.track()``.

    Use it as ``async with backend.track(task_id) as task:``. Entering stores
    STARTED. Leaving stores, whatever happens, exactly one final state:

    * SUCCESS with the value given to :meth:`set_result` (None if never set)
      when the block ends normally;
    * FAILURE with the exception and its traceback text when the block raises;
      the exception then propagates;
    * REVOKED with a :class:`~aioresults.TaskRevokedError` when the block is
      cancelled; the cancellation then propagates.

    The final store runs shielded from cancellation, so a cancelled task is
    still recorded as REVOKED rather than left STARTED.

    When the task is a part of a chord (``chord=<group id>``), leaving also
    counts it with :meth:`~aioresults.BaseBackend.chord_part_return` and keeps
    the outcome in :attr:`chord_progress`: ``chord_progress.complete`` is True
    for exactly one part of the chord, the one that should run the chord's body.

    :param backend: where states are stored.
    :param task_id: the task's id.
    :param name: the task's name, stored in the record's ``name`` field.
    :param args: positional arguments to store in the record (``args``).
    :param kwargs: keyword arguments to store in the record (``kwargs``).
    :param group_id: the group the task belongs to (stored as ``group_id``);
        defaults to ``chord``.
    :param chord: the group id of the chord this task is a header part of.
    :param index: the part's position in the chord's header, if known.
    :param report_worker: store ``{"pid": ..., "hostname": ...}`` as the
        STARTED meta and the host name in the ``worker`` field.
    :param worker: the ``worker`` field to store (overrides the host name).
    """

    def __init__(
        self,
        backend: ResultWriter,
        task_id: str,
        *,
        name: str | None = None,
        args: Any = None,
        kwargs: Any = None,
        group_id: str | None = None,
        chord: str | None = None,
        index: int | None = None,
        report_worker: bool = False,
        worker: str | None = None,
    ) -> None:
        self.backend = backend
        self.task_id = task_id
        self.chord = chord
        self.index = index
        self.report_worker = report_worker
        #: The chord's progress after this part was counted (None outside a chord).
        self.chord_progress: ChordProgress | None = None
        #: The state stored on leaving (None while the task runs).
        self.final_state: str | None = None
        hostname = socket.gethostname() if report_worker else None
        self._started_meta = {"pid": os.getpid(), "hostname": hostname} if report_worker else None
        fields: dict[str, Any] = {}
        for key, value in (
            ("name", name),
            ("args", args),
            ("kwargs", kwargs),
            ("group_id", group_id if group_id is not None else chord),
            ("worker", worker if worker is not None else hostname),
        ):
            if value is not None:
                fields[key] = value
        self._fields = fields
        self._result: Any = None
        self._token: contextvars.Token[TaskTracker] | None = None

    def __repr__(self) -> str:
        return f"<TaskTracker {self.task_id} state={self.final_state or 'running'}>"

    @property
    def result(self) -> Any:
        """The value that will be stored on success."""
        return self._result

    def set_result(self, value: Any) -> None:
        """Set the value stored as the result when the block ends normally."""
        self._result = value

    async def update_state(self, state: str, meta: Any = None) -> bool:
        """Store a state of your own (e.g. ``"RESIZING"``) with ``meta`` as its result.

        :returns: False if a SUCCESS was already stored for this id.
        """
        return await self.backend.store_result(self.task_id, meta, state, **self._fields)

    async def progress(self, current: float, total: float | None = None, **info: Any) -> bool:
        """Store PROGRESS with ``{"current": current, "total": total, **info}`` as the meta.

        Clients see it as a state change (``AsyncResult.watch()``).

        :returns: False if a SUCCESS was already stored for this id.
        """
        return await self.update_state(
            states.PROGRESS, {"current": current, "total": total, **info}
        )

    async def __aenter__(self) -> TaskTracker:
        try:
            await self.backend.store_result(
                self.task_id, self._started_meta, states.STARTED, **self._fields
            )
        except anyio.get_cancelled_exc_class():
            # Cancelled while STARTED was being stored (it may still land): the
            # task never runs, and must not stay STARTED for ever.
            await _runtime.shielded(
                self._finish(states.REVOKED, TaskRevokedError("cancelled"), None)
            )
            raise
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        traceback: str | None = None
        if exc is None:
            state, value = states.SUCCESS, self._result
        elif isinstance(exc, anyio.get_cancelled_exc_class()):
            state, value = states.REVOKED, TaskRevokedError("cancelled")
        else:
            state, value = states.FAILURE, exc
            traceback = "".join(traceback_module.format_exception(exc_type, exc, tb))
        # A cancelled task must still leave its final state behind, and a
        # cancellation arriving during the store must not cut it short.
        await _runtime.shielded(self._finish(state, value, traceback))

    async def _finish(self, state: str, value: Any, traceback: str | None) -> None:
        try:
            await self.backend.store_result(
                self.task_id, value, state, traceback=traceback, **self._fields
            )
        except (SerializationError, ResultTooLarge) as error:
            if state != states.SUCCESS:
                raise
            # The value cannot be stored: report that as the task's failure
            # (Celery does the same), rather than leave it STARTED for ever.
            state, value = states.FAILURE, error
            traceback = "".join(traceback_module.format_exception(error))
            await self.backend.store_result(
                self.task_id, value, state, traceback=traceback, **self._fields
            )
        self.final_state = state
        if self.chord is not None:
            self.chord_progress = await self.backend.chord_part_return(
                self.chord, self.task_id, state, value, index=self.index
            )


class TrackedTask(Generic[P, T]):
    """An async function whose every call runs under :meth:`~aioresults.BaseBackend.track`.

    Made by :func:`task`. ``await f(*args, task_id="...", **kwargs)`` runs the
    function, stores its states and result under ``task_id`` (a new uuid4
    string when omitted), and returns what it returned (or raises what it
    raised). The ``task_id`` keyword is taken by the wrapper; if the function
    itself declares a ``task_id`` parameter, it receives the id too.

    :attr:`fn` is the undecorated function; :meth:`run` is the same call with
    the id first and the function's own signature checked by type checkers.
    """

    # Copied from the function by functools.update_wrapper.
    __name__: str
    __qualname__: str

    def __init__(
        self,
        backend: ResultWriter,
        fn: Callable[P, Awaitable[T]],
        *,
        name: str | None = None,
        report_worker: bool = False,
        store_args: bool = False,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@task needs an async function, not {fn!r}")
        self.backend = backend
        self.fn = fn
        self.name = name or f"{fn.__module__}.{fn.__qualname__}"
        self.report_worker = report_worker
        self.store_args = store_args
        self._wants_id = "task_id" in inspect.signature(fn).parameters
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<TrackedTask {self.name}>"

    def __call__(
        self, *args: Any, task_id: str | None = None, **kwargs: Any
    ) -> Coroutine[Any, Any, T]:
        """Run the function tracked under ``task_id`` (a new uuid4 when omitted)."""
        return self.run(task_id or str(uuid.uuid4()), *args, **kwargs)

    async def run(self, task_id: str, /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the function tracked under ``task_id`` and return its value."""
        if self._wants_id:
            kwargs["task_id"] = task_id
        async with TaskTracker(
            self.backend,
            task_id,
            name=self.name,
            args=list(args) if self.store_args else None,
            kwargs=dict(kwargs) if self.store_args else None,
            report_worker=self.report_worker,
        ) as tracker:
            value = await self.fn(*args, **kwargs)
            tracker.set_result(value)
        return value


def task(
    backend: ResultWriter,
    *,
    name: str | None = None,
    report_worker: bool = False,
    store_args: bool = False,
) -> Callable[[Callable[P, Awaitable[T]]], TrackedTask[P, T]]:
    """Decorate an async function so that each call is tracked in ``backend``.

    ::

        @aioresults.task(backend)
        async def resize(path: str) -> str:
            await aioresults.current_task().progress(1, 2)
            ...
            return thumbnail_path

        thumbnail = await resize("cat.png", task_id=task_id)

    :param backend: where the states and results are stored.
    :param name: the stored task name; defaults to ``module.qualname``.
    :param report_worker: store the process id and host name (see :class:`TaskTracker`).
    :param store_args: store the call's arguments in the record's ``args`` and
        ``kwargs`` fields (they must then be serializable).
    :returns: a decorator producing a :class:`TrackedTask`.
    """

    def decorate(fn: Callable[P, Awaitable[T]]) -> TrackedTask[P, T]:
        return TrackedTask(
            backend, fn, name=name, report_worker=report_worker, store_args=store_args
        )

    return decorate


class WorkerMixin:
    """The worker side of every backend, in terms of ``store_result``."""

    async def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        **fields: Any,
    ) -> bool:
        raise NotImplementedError  # pragma: no cover - BaseBackend implements it

    async def mark_as_started(
        self, task_id: str, meta: dict[str, Any] | None = None, **fields: Any
    ) -> bool:
        """Store STARTED; ``meta`` (e.g. ``{"pid": ..., "hostname": ...}``) is the result."""
        return await self.store_result(task_id, meta, states.STARTED, **fields)

    async def update_state(self, task_id: str, state: str, meta: Any = None, **fields: Any) -> bool:
        """Store any state (e.g. ``"PROGRESS"``) with ``meta`` as its result."""
        return await self.store_result(task_id, meta, state, **fields)

    async def mark_as_done(self, task_id: str, result: Any, **fields: Any) -> bool:
        """Store SUCCESS with ``result``."""
        return await self.store_result(task_id, result, states.SUCCESS, **fields)

    async def mark_as_failure(
        self, task_id: str, exc: BaseException, traceback: str | None = None, **fields: Any
    ) -> bool:
        """Store FAILURE with ``exc``; the traceback defaults to the exception's own."""
        return await self.store_result(
            task_id, exc, states.FAILURE, traceback=traceback or _format_tb(exc), **fields
        )

    async def mark_as_retry(
        self, task_id: str, exc: BaseException, traceback: str | None = None, **fields: Any
    ) -> bool:
        """Store RETRY with ``exc`` (not ready: waiters keep waiting)."""
        return await self.store_result(
            task_id, exc, states.RETRY, traceback=traceback or _format_tb(exc), **fields
        )

    async def mark_as_revoked(self, task_id: str, reason: str = "", **fields: Any) -> bool:
        """Store REVOKED with a :class:`~aioresults.TaskRevokedError`."""
        return await self.store_result(task_id, TaskRevokedError(reason), states.REVOKED, **fields)

    def track(
        self,
        task_id: str,
        *,
        name: str | None = None,
        args: Any = None,
        kwargs: Any = None,
        group_id: str | None = None,
        chord: str | None = None,
        index: int | None = None,
        report_worker: bool = False,
        worker: str | None = None,
    ) -> TaskTracker:
        """Track one run of a task: ``async with backend.track(task_id) as task:``.

        Stores STARTED on entry, then SUCCESS, FAILURE or REVOKED on exit; see
        :class:`~aioresults.TaskTracker` for the parameters.
        """
        return TaskTracker(
            self,  # type: ignore[arg-type]  # a BaseBackend, which is a ResultWriter
            task_id,
            name=name,
            args=args,
            kwargs=kwargs,
            group_id=group_id,
            chord=chord,
            index=index,
            report_worker=report_worker,
            worker=worker,
        )


def _format_tb(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    return "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
