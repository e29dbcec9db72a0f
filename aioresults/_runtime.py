"""The one runtime seam: where asyncio's fast paths and anyio's portable ones meet.

The drivers are asyncio-only, so asyncio is the supported loop and gets the
light primitives (bare futures, loop timers, free-standing tasks). The
backends that need no driver (memory, filesystem) also run under trio through
anyio. Every other module asks this one which loop it is on, and nothing else
in the package imports ``sniffio``.
"""

from __future__ import annotations

import asyncio
import math
from asyncio import events as _events
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc

from ._exceptions import ConfigurationError

__all__ = [
    "Promise",
    "TaskOwner",
    "check_timeout",
    "deadline_after",
    "now",
    "on_asyncio",
    "shielded",
    "within",
]

T = TypeVar("T")

_get_running_loop = _events._get_running_loop


def on_asyncio() -> bool:
    """Whether the calling code runs in an asyncio event loop (a C call: cheap)."""
    return _get_running_loop() is not None


def now() -> float:
    """The event loop's clock (:func:`anyio.current_time`)."""
    loop = _get_running_loop()
    return loop.time() if loop is not None else anyio.current_time()


def check_timeout(timeout: float | None) -> float | None:
    """Return ``timeout`` if it is None or a finite number >= 0.

    :raises ConfigurationError: anything else (NaN and infinity included: use None).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigurationError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0:
        raise ConfigurationError(
            f"timeout must be a finite number >= 0, or None to wait for ever; not {timeout!r}"
        )
    return float(timeout)


def deadline_after(timeout: float | None) -> float | None:
    """The loop time ``timeout`` seconds from now (None: no deadline); validates ``timeout``."""
    timeout = check_timeout(timeout)
    return None if timeout is None else now() + timeout


class Promise(Generic[T]):
    """A one-shot result that several parties may settle, awaited once.

    On asyncio it is a bare :class:`asyncio.Future` underneath; elsewhere an
    :class:`anyio.Event` and a slot. The first :meth:`set_result` or
    :meth:`set_exception` wins; later ones are ignored.
    """

    __slots__ = ("_error", "_event", "_future", "_value")

    def __init__(self) -> None:
        loop = _get_running_loop()
        self._future: asyncio.Future[T] | None = None
        self._event: anyio.Event | None = None
        if loop is not None:
            self._future = loop.create_future()
        else:
            self._event = anyio.Event()
            self._value: T | None = None
            self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether it has been settled."""
        if self._future is not None:
            return self._future.done()
        assert self._event is not None
        return self._event.is_set()

    def set_result(self, value: T) -> None:
        if self._future is not None:
            if not self._future.done():
                self._future.set_result(value)
        elif self._event is not None and not self._event.is_set():
            self._value = value
            self._event.set()

    def set_exception(self, error: BaseException) -> None:
        if self._future is not None:
            if not self._future.done():
                self._future.set_exception(error)
                # Retrieved or not, a failure handed to a caller that left is not "unhandled".
                self._future.exception()
        elif self._event is not None and not self._event.is_set():
            self._error = error
            self._event.set()

    def __await__(self) -> Generator[Any, None, T]:
        if self._future is not None:
            return self._future.__await__()
        return self._wait().__await__()

    async def _wait(self) -> T:
        assert self._event is not None
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


async def within(awaitable: Awaitable[T], deadline: float | None) -> T:
    """Await ``awaitable`` before ``deadline`` (loop time), else raise :class:`TimeoutError`.

    ``awaitable`` is cancelled when the deadline passes.
    """
    if deadline is None:
        return await awaitable
    if on_asyncio():
        # asyncio's own timeout keeps no per-task state, unlike a cancel scope.
        async with asyncio.timeout_at(deadline):
            result = await awaitable
        return result
    with anyio.move_on_after(max(0.0, deadline - now())):
        return await awaitable
    raise TimeoutError


async def shielded(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end even if the caller is cancelled meanwhile;
    the cancellation is raised once it is done."""
    if on_asyncio():
        # anyio's shield does not stop a plain asyncio task.cancel().
        task: asyncio.Future[T] = asyncio.ensure_future(coroutine)
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        result = task.result()
        if cancelled:
            raise asyncio.CancelledError
        return result
    with anyio.CancelScope(shield=True):
        result = await coroutine
    return result


class TaskOwner:
    """The background tasks of one backend: started here, all stopped by :meth:`aclose`.

    On asyncio they are free-standing tasks (a backend is usable without
    ``async with``). On other loops they run in a task group that must be
    entered first (:meth:`enter`, done by the backend's ``__aenter__``).
    """

    def __init__(self, name: str, on_error: Callable[[str, BaseException], None]) -> None:
        self._name = name
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def entered(self) -> bool:
        """Whether a task group is in use (a non-asyncio loop)."""
        return self._group is not None

    async def enter(self) -> None:
        """Open a task group if this loop needs one for background tasks."""
        if self._group is None and not on_asyncio():
            group = anyio.create_task_group()
            await group.__aenter__()
            self._group = group

    async def exit_group(self) -> None:
        """Close the task group (cancelling what still runs in it)."""
        group, self._group = self._group, None
        if group is not None:
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)

    def start(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run ``func(*args)`` in the background until :meth:`aclose`."""
        if self._group is not None:
            self._group.start_soon(self._guard, func, args, name, name=name)
            return
        loop = _get_running_loop()
        if loop is None:
            raise RuntimeError(
                f"{self._name} runs background tasks; outside asyncio, use it as `async with ...:`"
            )
        task: asyncio.Task[Any] = loop.create_task(func(*args), name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _guard(self, func: Callable[..., Awaitable[Any]], args: Any, name: str) -> None:
        try:
            await func(*args)
        except Exception as exc:  # one failing task must not cancel its siblings
            self._on_error(name, exc)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._on_error(task.get_name(), task.exception())  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Cancel every task and wait for it; a caller's own cancellation propagates."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise  # our own caller is being cancelled
            except Exception:
                pass  # reported by _done
        await self.exit_group()
