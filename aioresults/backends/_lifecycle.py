"""What every backend does around its store: open once, run background work, close.

:class:`Lifecycle` is the half of :class:`~aioresults.BaseBackend` that is not
about records: lazy opening (every caller that arrives while it connects
resumes together), the background tasks and batchers it owns (closing fails
whatever they still hold with :class:`~aioresults.BackendClosed`), the waiter
hub, and the optional hooks a store may override (``_open``, ``_close``,
``_feed``, ``_store_key``, ``_unwatched``).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio

from .. import _runtime
from .._exceptions import BackendClosed, ConfigurationError
from ._feeds import Feed, join_siblings, leave_siblings
from ._hub import WaiterHub
from ._support import Batcher

__all__ = ["Lifecycle", "WaitStats"]

logger = logging.getLogger("aioresults.backends")


@dataclass(frozen=True, slots=True)
class WaitStats:
    """How a backend serves waits right now (:meth:`BaseBackend.wait_stats`)."""

    #: Waiters registered (one per waiting ``get()``, ``watch()`` or join).
    waiters: int
    #: The ids at least one waiter waits for.
    watched_ids: tuple[str, ...]
    #: ``"push"``, ``"signal"``, ``"poll"``, or a feed with the poller beside it
    #: (``"signal+poll"``); a feed that fell back shows ``"poll"``.
    mode: str
    #: Feed sessions established so far (the first one included): reconnects + 1.
    sessions: int
    #: Feed sessions that failed (connection lost or refused).
    feed_failures: int
    #: Rounds of the batched poller so far.
    polls: int
    #: Waiters whose first read is still under way.
    unsettled: int = 0
    #: Re-reads of watched ids so far (after a signal, a poll or a reconnect).
    refreshes: int = 0
    #: Feed sessions established per node, where the feed has several (a cluster).
    sessions_by_node: Mapping[str, int] = dataclasses.field(default_factory=dict)


class Lifecycle:
    """Opening, background work, the hub and closing; see the module docstring."""

    #: The event loops it runs on: its driver may be asyncio-only.
    runs_on: ClassVar[frozenset[str]] = frozenset({"asyncio"})
    #: Default polling pauses of this store (see ``poll_interval``).
    default_poll_interval: ClassVar[float] = 0.05
    default_max_poll_interval: ClassVar[float] = 1.0

    poll_interval: float
    max_poll_interval: float

    def _init_lifecycle(self, poll_interval: float | None, max_poll_interval: float | None) -> None:
        self.poll_interval = float(
            self.default_poll_interval if poll_interval is None else poll_interval
        )
        self.max_poll_interval = float(
            self.default_max_poll_interval if max_poll_interval is None else max_poll_interval
        )
        if not 0 < self.poll_interval <= self.max_poll_interval:
            raise ConfigurationError("need 0 < poll_interval <= max_poll_interval")
        self._tasks = _runtime.TaskOwner(type(self).__name__, self._task_failed)
        self._batchers: list[Batcher[Any, Any]] = []
        self._hub_: WaiterHub | None = None
        self._sibling_key: object = None
        self._opening: anyio.Event | None = None
        self._open_scope: anyio.CancelScope | None = None
        self._opened = False
        self._closed = False

    async def __aenter__(self) -> Self:
        await self._tasks.enter()
        try:
            await self._ensure_open()
        except BaseException:
            # Leave nothing half-entered (a trio nursery, say) behind the real error.
            await self._tasks.exit_group()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _ensure_open(self) -> None:
        """Open the backend unless it is open (every public operation calls this)."""
        while not self._opened:
            if self._closed:
                raise BackendClosed(f"{self!r} is closed")
            if self._opening is not None:
                # Everyone who arrived while connecting resumes together, so
                # their first waits still share one batch.
                await self._opening.wait()
                continue
            if not _runtime.on_asyncio() and "trio" not in self.runs_on:
                raise ConfigurationError(
                    f"{type(self).__name__} runs on asyncio only (its driver is asyncio-only)"
                )
            self._opening = opening = anyio.Event()
            try:
                # aclose() cancels an open under way: it may wait on a dead host.
                with anyio.CancelScope() as self._open_scope:
                    await self._open()
                    self._opened = True
                    self._sibling_key = self._store_key()
                    if self._sibling_key is not None:
                        join_siblings(self._sibling_key, self._hub)
            finally:
                self._open_scope = None
                self._opening = None
                opening.set()
            if not self._opened:
                raise BackendClosed(f"{self!r} was closed while it was opening")

    async def aclose(self) -> None:
        """Stop background work and release connections. Idempotent.

        Every operation still waiting (waits, batched reads and writes not yet
        sent) fails at once with :class:`~aioresults.BackendClosed`.
        """
        if self._closed:
            return
        self._closed = True
        error = BackendClosed(f"{self!r} was closed")
        self._hub.close(error)
        for batcher in self._batchers:
            batcher.close(error)
        if self._opening is not None:
            if self._open_scope is not None:
                self._open_scope.cancel()
            await self._opening.wait()  # let the open end, then undo what it did
        await self._tasks.aclose()
        if self._hub.feed is not None:
            self._hub.feed.close()
        if self._sibling_key is not None:
            leave_siblings(self._sibling_key, self._hub)
        if self._opened:
            self._opened = False
            await self._close()

    def _start_task(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run ``func(*args)`` in the background until the backend closes."""
        self._tasks.start(func, *args, name=name)

    def _task_failed(self, name: str, error: BaseException) -> None:
        logger.error("background task %s of %r failed", name, self, exc_info=error)

    def _batcher(
        self,
        run: Callable[[list[Any]], Awaitable[Sequence[Any]]],
        name: str,
        *,
        max_size: int | None = None,
        linger: Callable[[int], float] | None = None,
    ) -> Batcher[Any, Any]:
        """A :class:`~aioresults.backends._support.Batcher` owned by this backend
        (its calls fail with :class:`~aioresults.BackendClosed` when it closes)."""
        batcher: Batcher[Any, Any] = Batcher(
            run,
            start=self._start_task,
            name=f"{name} of {self!r}",
            max_size=max_size,
            linger=linger,
        )
        self._batchers.append(batcher)
        return batcher

    @property
    def _hub(self) -> WaiterHub:
        hub = self._hub_
        if hub is None:
            # A Lifecycle is always a BaseBackend, which supplies the reads.
            hub = self._hub_ = WaiterHub(self, self._feed(), repr(self))  # type: ignore[arg-type]
        return hub

    @property
    def hub(self) -> WaiterHub:
        """Deprecated: the hub is private; use :meth:`wait_stats` to inspect waits."""
        warnings.warn(
            "backend.hub is private since 0.2; use backend.wait_stats()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._hub

    def wait_stats(self) -> WaitStats:
        """How waits are served now: waiters, watched ids, feed mode and counters."""
        hub = self._hub
        return WaitStats(
            waiters=len(hub),
            watched_ids=tuple(hub.watched),
            mode=hub.mode,
            sessions=hub.sessions,
            feed_failures=hub.feed_failures,
            polls=hub.polls,
            unsettled=hub.unsettled,
            refreshes=hub.refreshes,
            sessions_by_node=hub.feed.sessions_by_node() if hub.feed is not None else {},
        )

    def _is_watched(self, task_id: str) -> bool:
        """Whether some waiter waits for ``task_id`` (for stores that keep
        something per watched id)."""
        return task_id in self._hub.watched

    # ------------------------------------------------------------ optional hooks

    async def _open(self) -> None:
        """Connect (called once, lazily, before the first operation)."""

    async def _close(self) -> None:
        """Release connections (background tasks are stopped already)."""

    def _feed(self) -> Feed | None:
        """How the store tells about changes: a
        :class:`~aioresults.backends._feeds.Feed`, or None to be polled."""
        return None

    def _unwatched(self, task_ids: Sequence[str]) -> None:
        """Called when no waiter waits for ``task_ids`` any more (drop what was
        kept for them); must not block."""

    def _store_key(self) -> object:
        """What names this store in this process, so backends on it wake each
        other's waiters (see ``local_wake``); None (default) for none."""
        return None
