"""How a store tells the waiter hub about changes, and the loops the hub runs for it.

A backend declares one of three ways (see :meth:`BaseBackend._feed
<aioresults.BaseBackend._feed>`):

* **push**: the store delivers the new record itself (Redis pub/sub, AMQP,
  NATS KV watch, memory). The feed hands records to :meth:`WaiterHub.deliver
  <aioresults.backends._hub.WaiterHub.deliver>` as they arrive.
* **signal**: the store says "these ids, or anything, may have changed"
  (inotify on files and SQLite, PostgreSQL NOTIFY). The feed calls
  :meth:`WaiterHub.changed`; the hub re-reads those ids in one batch.
* **poll**: the store says nothing (no feed). The hub's one poller re-reads
  every watched id in one batch, with back-off while nothing changes.

The hub owns the loop around a feed: it runs one session after another with
back-off between them, and after a session that follows a lost one it re-reads
every watched id *once the feed has re-established its watches* (the feed calls
:meth:`WaiterHub.resynced` for that), so nothing stored while the feed was away
is lost. It backs off between
attempts, falls back to polling when the feed is gone for good
(:class:`FeedGone`), and runs the poller beside a feed that misses some
writers (``poll_too``). Backends on one store in one process also wake each
other's waiters after a write (:func:`wake_siblings`).
"""

from __future__ import annotations

import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import anyio

from ._support import Backoff

if TYPE_CHECKING:
    from .._meta import ResultMeta
    from ._hub import WaiterHub

__all__ = [
    "Feed",
    "FeedGone",
    "HubSource",
    "run_feed",
    "run_poller",
    "run_refreshes",
    "wake_siblings",
]

logger = logging.getLogger("aioresults.backends")


class HubSource(Protocol):
    """What the hub needs from its backend."""

    poll_interval: float
    max_poll_interval: float

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]: ...

    def _decode(self, task_id: str, raw: Any) -> ResultMeta: ...

    def _unwatched(self, task_ids: Sequence[str]) -> None: ...

    def _start_task(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None: ...


class FeedGone(Exception):
    """Raised by a feed that can never work again here (an inotify watch removed,
    notifications not permitted): the hub polls instead from then on."""


class Feed(ABC):
    """What a backend supplies when its store can tell about changes.

    A feed keeps the store's own watches (channels subscribed, files watched)
    through :meth:`watch` and :meth:`unwatch`, and runs one session at a time
    in :meth:`session`; the hub runs the loop around it. During a session it
    tells what happens, synchronously (from a protocol's ``data_received``
    even): :meth:`resynced` once its watches are in place, then
    :meth:`WaiterHub.changed` (signal) or :meth:`WaiterHub.deliver` (push).
    """

    #: ``"push"`` (records arrive through :meth:`WaiterHub.deliver`) or
    #: ``"signal"`` (ids to re-read arrive through :meth:`WaiterHub.changed`).
    kind: ClassVar[Literal["push", "signal"]]
    #: Run the hub's poller beside this feed: some writers are not seen by it
    #: (e.g. NOTIFY without the trigger, for writers that do not notify).
    poll_too: bool = False

    hub: WaiterHub
    _up: anyio.Event | None = None
    _is_up = False

    def bind(self, hub: WaiterHub) -> None:
        """Called once by the hub that runs this feed."""
        self.hub = hub

    async def watch(self, task_ids: Sequence[str]) -> None:
        """Start watching ``task_ids``; return once the store will report their
        changes (the hub reads them only then). A watch that cannot be set up raises.

        By default: wait until a session is up (it watches everything at once).
        """
        while not self._is_up:
            if self._up is None:
                self._up = anyio.Event()
            await self._up.wait()

    def unwatch(self, task_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Stop watching ids no waiter waits for any more; must not block."""

    #: Sessions whose watches were set up, so far.
    sessions = 0

    def set_up(self, up: bool) -> None:
        """Whether a session has its watches in place (see :meth:`watch`)."""
        self._is_up = up
        if up and self._up is not None:
            self._up.set()
            self._up = None

    def resynced(self) -> None:
        """Called by :meth:`session` once its watches are in place: after a
        session that followed a lost one, the hub re-reads :meth:`resync_ids`."""
        self.sessions += 1
        self.set_up(True)
        self.hub.resynced(self)

    # What a feed tells the hub, and asks it: the whole of its interface.

    def deliver(self, task_id: str, raw: Any) -> None:
        """A push feed's new record of ``task_id`` (see :meth:`WaiterHub.deliver`)."""
        self.hub.deliver(task_id, raw)

    def changed(self, task_ids: Collection[str] | None = None) -> None:
        """A signal feed's news: ``task_ids`` (None: any) may have changed."""
        self.hub.changed(task_ids)

    @property
    def watched(self) -> Collection[str]:
        """The ids some waiter waits for."""
        return self.hub.watched

    async def wait_watched(self) -> None:
        """Return once some id is watched."""
        await wait_watched(self.hub)

    def refresh_soon(self, task_ids: Collection[str] | None = None) -> None:
        """Re-read ``task_ids`` (None: every watched id), retrying until it works."""
        self.hub.refresh_soon(task_ids)

    def fall_back_to_polling(self) -> None:
        """Have the hub's poller run beside (or instead of) this feed from now on."""
        self.hub.fall_back_to_polling()

    def adopt(self, feed: Feed) -> None:
        """Make ``feed`` a part of this one (a cluster's feed of one node)."""
        feed.bind(self.hub)

    async def run_part(self, feed: Feed) -> None:
        """Run an adopted feed's sessions, with the hub's back-off between them."""
        await run_feed(self.hub, feed)

    def close(self) -> None:  # noqa: B027 - optional hook
        """The backend closed: answer whatever still waits on this feed."""

    def sessions_by_node(self) -> dict[str, int]:
        """Sessions per node, for a feed that has several (a cluster's masters)."""
        return {}

    def resync_ids(self) -> Sequence[str] | None:
        """The ids to re-read after a reconnect (None: every watched id)."""
        return None

    @abstractmethod
    async def session(self) -> None:
        """One session: connect, set up every current watch, call
        :meth:`resynced`, then report changes until the connection is lost,
        which it raises (:class:`FeedGone` if it can never work here)."""

    def describe(self) -> str:
        """How waits are served, for :meth:`~aioresults.BaseBackend.wait_stats`."""
        return self.kind


async def run_feed(hub: WaiterHub, feed: Feed) -> None:
    """The loop around ``feed``: sessions, with back-off between them."""
    backoff = Backoff(0.05, 1.0)
    while not hub.closed:
        sessions = feed.sessions
        try:
            await feed.session()
            raise ConnectionError("the feed's session ended")
        except FeedGone as exc:
            logger.warning("%s: %s; polling from now on", hub, exc)
            hub.fall_back_to_polling()
            feed.set_up(True)  # the poller serves every watch from now on
            return
        except Exception as exc:
            feed.set_up(False)
            hub.feed_failures += 1
            if feed.sessions != sessions:
                backoff.reset()
            if feed.sessions != sessions or backoff.attempts == 0:
                logger.warning("%s: the feed failed (%s); reconnecting", hub, exc)
        await backoff.sleep()


async def run_poller(hub: WaiterHub, min_interval: float, max_interval: float) -> None:
    """Poll every watched id, starting at ``min_interval`` and doubling up to
    ``max_interval`` while nothing changes; a change or a new waiter resets it.

    A read error is logged and polling goes on. With no waiter, nothing is read.
    """
    interval = min_interval
    seen = hub.registrations
    # Stops once the hub is closed, even under a driver that swallowed the
    # cancellation meant to end it.
    while not hub.closed:
        await wait_watched(hub)
        try:
            changed = await hub.refresh()
        except Exception as exc:
            logger.warning("%s: polling %d results failed: %s", hub, len(hub.watched), exc)
            changed = 0
        hub.polls += 1
        if changed or hub.registrations != seen:
            interval = min_interval
        else:
            interval = min(interval * 2, max_interval)
        seen = hub.registrations
        # A waiter arriving during a long pause cuts it short: its result may be
        # stored right after its first read.
        if await wait_registration(hub, interval):
            await anyio.sleep(min_interval)


async def run_refreshes(hub: WaiterHub) -> None:
    """Re-read what :meth:`WaiterHub.refresh_soon` asked for, in batches, one
    at a time, retrying with back-off until it works: nothing else may tell
    about those changes."""
    backoff = Backoff(0.05, 1.0)
    try:
        while not hub.closed and (hub._refresh_all or hub._refresh_ids):
            every, hub._refresh_all = hub._refresh_all, False
            ids, hub._refresh_ids = hub._refresh_ids, set()
            try:
                await hub.refresh(None if every else ids)
                backoff.reset()
            except Exception as exc:
                logger.warning("%s: re-reading changed results failed: %s", hub, exc)
                hub._refresh_all |= every
                hub._refresh_ids |= ids
                await backoff.sleep()
    finally:
        hub._refreshing = False


async def wait_watched(hub: WaiterHub) -> None:
    """Return once at least one id is watched."""
    while not hub.watched:
        hub._watched_event = event = anyio.Event()
        try:
            await event.wait()
        finally:
            hub._watched_event = None


async def wait_registration(hub: WaiterHub, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a new waiter; whether one came."""
    hub._registered_event = arrived = anyio.Event()
    try:
        with anyio.move_on_after(timeout):
            await arrived.wait()
    finally:
        hub._registered_event = None
    return arrived.is_set()


# ---------------------------------------------------------------- siblings

#: The hubs on each store, by id (weakly: a backend dropped unclosed leaves).
#: Plain dicts of references: every write of a local-wake store walks them,
#: and a WeakSet's iteration costs more than the rest of the walk.
_siblings: dict[object, dict[int, weakref.ref[WaiterHub]]] = {}


def join_siblings(key: object, hub: WaiterHub) -> None:
    """Register ``hub`` as one of the hubs on the store named by ``key``."""
    number = id(hub)

    def gone(ref: weakref.ref[WaiterHub]) -> None:
        # Runs whenever the collector does (any thread): it removes its own
        # entry only, never the store's dict, which a join may be filling.
        now = _siblings.get(key)
        if now is not None and now.get(number) is ref:
            now.pop(number, None)

    ref = weakref.ref(hub, gone)
    _siblings.setdefault(key, {})[number] = ref


def leave_siblings(key: object, hub: WaiterHub) -> None:
    hubs = _siblings.get(key)
    if hubs is not None:
        ref = hubs.get(id(hub))
        if ref is not None and ref() is hub:
            hubs.pop(id(hub), None)
        if not hubs:
            _siblings.pop(key, None)


def wake_siblings(key: object, task_ids: Sequence[str], raws: Sequence[Any] | None = None) -> None:
    """After a write to the store named by ``key``, wake the waiters of every hub
    on it in this process: with the written records (``raws``), or by a re-read."""
    hubs = _siblings.get(key)
    if not hubs:
        return
    for ref in list(hubs.values()):
        hub = ref()
        if hub is None:
            continue
        if raws is not None:
            for task_id, raw in zip(task_ids, raws, strict=True):
                hub.deliver(task_id, raw)
        else:
            watched = hub.watched
            if watched:
                wanted = [t for t in task_ids if t in watched]
                if wanted:
                    hub.refresh_soon(wanted)
