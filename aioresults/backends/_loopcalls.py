"""Calls from a backend's own threads into its event loop, woken by an eventfd.

A thread that answers a caller must run a callback in the caller's event loop.
:meth:`asyncio.loop.call_soon_threadsafe` does it through the loop's self-pipe,
a socket pair: a ``send()`` in the thread, and in the loop a ``recv()`` of the
byte and another that finds the socket empty. :class:`LoopCalls` queues the
callback itself and wakes the loop with an eventfd of its own, watched with
:meth:`~asyncio.loop.add_reader`: one ``write()`` in the thread, one ``read()``
in the loop for every wake-up, however many calls it brings. With asyncio's
own selector loop on this project's machines that is 15-20 µs less per
hand-off, for the writing thread and the loop together (``benchmarks/`` has
the figures of the stores that use it).

Where there is no eventfd (not Linux), none can be made (no descriptor left),
or the loop cannot watch a file descriptor, :func:`open_calls` returns None and
the caller uses ``call_soon_threadsafe``, as it does for a future of another
loop and for a call made after :meth:`LoopCalls.close`.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["LoopCalls", "call_in_loop", "open_calls"]


class LoopCalls:
    """A queue of callbacks for one event loop, filled from any thread.

    Callbacks run in the loop in the order they were queued, each as
    :class:`asyncio.Handle` runs one: an exception goes to the loop's exception
    handler, and only ``SystemExit`` and ``KeyboardInterrupt`` leave the loop.
    Use :func:`open_calls` to make one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self._fd = fd
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        # Held while the eventfd is written or closed: a thread never writes to
        # a descriptor closed (and perhaps reused) by close().
        self._lock = threading.Lock()

    def call(self, callback: Callable[..., Any], *args: Any) -> None:
        """From any thread: ``callback(*args)`` in the loop, soon.

        :raises RuntimeError: after :meth:`close`, if the loop is closed too.
        """
        with self._lock:
            fd = self._fd
            if fd >= 0:
                self._calls.append((callback, args))
                os.eventfd_write(fd, 1)
                return
        self.loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        """In the loop: stop watching and close the eventfd. Callbacks queued
        before still run (soon, in the loop); later calls go through
        ``call_soon_threadsafe``."""
        fd = self._fd
        if fd < 0:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(fd)
        with self._lock:
            self._fd = -1
            os.close(fd)
            # Before a thread's next call, which now goes through call_soon_threadsafe.
            if self._calls and not self.loop.is_closed():
                self.loop.call_soon(self._run, len(self._calls))

    def _ready(self) -> None:
        # The eventfd's counter is read (reset) before the queue is looked at:
        # a call queued after this counts again, and wakes the loop again.
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:  # a wake-up whose calls an earlier one ran
            pass
        self._run(len(self._calls))

    def _run(self, count: int) -> None:
        """Run the first ``count`` callbacks queued (those queued later have
        their own wake-up, so one busy thread cannot hold the loop here)."""
        calls = self._calls
        while count > 0 and calls:  # (a run scheduled twice finds fewer)
            count -= 1
            callback, args = calls.popleft()
            try:
                callback(*args)
            except (SystemExit, KeyboardInterrupt):
                if calls:  # the rest still run, at the loop's next turn
                    self.loop.call_soon(self._run, len(calls))
                raise
            except BaseException as exc:
                self.loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc}
                )


def open_calls(loop: asyncio.AbstractEventLoop) -> LoopCalls | None:
    """A :class:`LoopCalls` for ``loop`` (the running one), or None where
    eventfds or :meth:`~asyncio.loop.add_reader` are not there."""
    eventfd = getattr(os, "eventfd", None)
    if eventfd is None:
        return None
    try:
        fd = eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except OSError:  # no descriptor left: the loop's own way still works
        return None
    calls = LoopCalls(loop, fd)
    try:
        # In an empty context: not the context of whoever opened it, which
        # every callback would otherwise run in (and keep alive).
        contextvars.Context().run(loop.add_reader, fd, calls._ready)
    except NotImplementedError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return calls


def call_in_loop(
    calls: LoopCalls | None,
    loop: asyncio.AbstractEventLoop,
    callback: Callable[..., Any],
    *args: Any,
) -> None:
    """From a thread: ``callback(*args)`` in ``loop``, through ``calls`` when
    it serves that loop. Nothing happens if ``loop`` is closed: nobody is
    waiting there any more."""
    try:
        if calls is not None and calls.loop is loop:
            calls.call(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that loop is closed
        pass
