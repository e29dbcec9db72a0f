"""The filesystem backend's worker threads, on asyncio.

Blocking file work goes to a few threads of the backend's own: a call is put
on their queue and answered with one call into the event loop (through
:class:`~.._loopcalls.LoopCalls`), which costs less than half of a trip
through :func:`anyio.to_thread.run_sync` (no checkpoint first, no capacity
limiter, no cancel scope). As there, a caller cancelled
while its call runs waits for the call to end before the cancellation goes
on, so no file operation outlives the call that asked for it. Under trio the
backend uses :func:`anyio.to_thread.run_sync` instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from .._loopcalls import LoopCalls, call_in_loop, open_calls

__all__ = ["Workers"]

T = TypeVar("T")

_STOP = None


class _Call:
    __slots__ = ("args", "finished", "fn", "future", "loop", "over")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.args = args
        self.future = future
        self.loop = loop
        self.over = False  # the thread is done with it (set in the event loop)
        self.finished: asyncio.Future[None] | None = None  # awaited by a cancelled caller

    def answer(self, result: Any, error: BaseException | None) -> None:
        """In the event loop: the thread's outcome."""
        self.over = True
        future = self.future
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


class Workers:
    """Up to ``most`` daemon threads, started as calls overlap, stopped by :meth:`close`.

    :param name: names the threads.
    :param most: the most calls that run at once (more wait in the queue).
    """

    def __init__(self, name: str, most: int = 16) -> None:
        self._name = name
        self._most = most
        self._queue: SimpleQueue[_Call | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0  # calls queued or running (counted in the event loop)
        #: The way back into the event loop the calls come from (None: that
        #: loop's call_soon_threadsafe), and the loop it was opened for.
        self._calls: LoopCalls | None = None
        self._calls_loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Threads started."""
        return len(self._threads)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread."""
        loop = asyncio.get_running_loop()
        if self._calls_loop is not loop:
            self._open_calls(loop)
        future: asyncio.Future[T] = loop.create_future()
        call = _Call(fn, args, future, loop)
        self._busy += 1
        if self._busy > len(self._threads) < self._most:
            thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._queue.put(call)
        try:
            return await future
        except asyncio.CancelledError:
            # As anyio.to_thread.run_sync does: the call runs to its end, and the
            # caller waits for it; then the cancellation goes on.
            if not call.over:
                call.finished = finished = loop.create_future()
                while not finished.done():
                    try:
                        await asyncio.shield(finished)
                    except asyncio.CancelledError:
                        continue
            raise
        finally:
            self._busy -= 1

    def _open_calls(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer in ``loop`` from now on, unless the current way back serves a
        loop still open (the backend used from a second loop at the same time:
        that loop's answers take its own way)."""
        calls = self._calls
        if self._calls_loop is not None and not self._calls_loop.is_closed():
            return
        if calls is not None:
            calls.close()
        self._calls = open_calls(loop)
        self._calls_loop = loop

    def close(self) -> None:
        """Stop the threads once the calls queued before are done."""
        for _ in self._threads:
            self._queue.put(_STOP)
        self._threads = []
        calls, self._calls, self._calls_loop = self._calls, None, None
        if calls is not None:
            calls.close()  # answers still to come take the loop's own way

    def _serve(self) -> None:
        queue = self._queue
        while True:
            call = queue.get()
            if call is None:
                return
            result: Any = None
            error: BaseException | None = None
            try:
                result = call.fn(*call.args)
            except BaseException as exc:
                error = exc
            call_in_loop(self._calls, call.loop, call.answer, result, error)
