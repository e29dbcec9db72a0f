"""The waiter hub: one per backend, routing stored records to waiting tasks.

A waiter registers *before* the store is read, so a record stored between the
read and the wake-up is never missed. Waiters that register in the same
event-loop iteration are settled in one batch by one background task: one
watch call (one SUBSCRIBE on Redis) and one read (one MGET) for all of them.
Many waiters on one id share one watch; the last one to leave, by any route
(result, timeout, cancellation), ends it, and nothing of it stays behind.

The hub also owns the loops that feed it (see :mod:`._feeds`): the feed's
sessions with their re-reads after a reconnect, or the batched poller. It
remembers the last record seen per watched id, so the same payload read twice
is not a change, and hands each change to the waiters as one shared
:class:`~aioresults._protocols.Record`, decoded by whoever looks at it first.

On asyncio a waiter is a bare future, and deadlines live in one heap with one
loop timer for the earliest, instead of a timeout scope per waiter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any

import anyio

from .._exceptions import BackendUnavailable
from .._protocols import Record
from ._feeds import Feed, HubSource, run_feed, run_poller, run_refreshes
from ._waiter import Deadlines, Waiter

__all__ = ["HubSource", "Waiter", "WaiterHub"]

logger = logging.getLogger("aioresults.backends")


class WaiterHub:
    """Routes records to waiters and runs the loops that feed it; see the module docstring."""

    def __init__(self, source: HubSource, feed: Feed | None, name: str) -> None:
        self._source = source
        self.feed = feed
        self._name = name
        if feed is not None:
            feed.bind(self)
        #: Waiters by watched id: usually one (kept bare), a list when there are more.
        self.watched: dict[str, Waiter | list[Waiter]] = {}
        # The last record seen per id (ids with no record have none), and, while
        # reads are in flight, a count per id of the news handed out since they
        # began. A read during which news of its id went out is not trusted
        # either way (reads on a pool or in threads see the store in any order
        # of their starts): it is dropped, and the id read again.
        self._last: dict[str, Record] = {}
        self._versions: dict[str, int] = {}
        self._reads = 0
        self._registered = 0
        self._to_watch: set[str] = set()
        self._in_flight: set[str] = set()
        self._to_read: set[Waiter] = set()
        self._reading: set[Waiter] = set()
        # Waiters awaiting their first read that news of an id reached already:
        # that read finding the same record does not hand it to them twice.
        self._told: dict[Waiter, set[str]] = {}
        self._settling = False
        self._refresh_ids: set[str] = set()
        self._refresh_all = False
        self._refreshing = False
        self._watched_event: anyio.Event | None = None
        self._registered_event: anyio.Event | None = None
        self._closed: Exception | None = None
        self._started = False
        self._polling = False
        #: The deadlines of asyncio waiters: one heap, one timer.
        self.deadlines = Deadlines()
        #: Counters shown by ``wait_stats()``.
        self.registrations = 0
        self.sessions = 0
        self.feed_failures = 0
        self.polls = 0
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"the waiter hub of {self._name}"

    # ------------------------------------------------------------ inspection

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed is not None

    def __len__(self) -> int:
        """The number of registered waiters."""
        return self._registered

    def watched_ids(self) -> list[str]:
        """The ids at least one waiter is waiting for."""
        return list(self.watched)

    def has_waiters(self, task_id: str) -> bool:
        """Whether any waiter waits for ``task_id``."""
        return task_id in self.watched

    @property
    def mode(self) -> str:
        """How waits are served now: the feed's kind, ``"poll"``, or ``"<kind>+poll"``."""
        if self.feed is None:
            return "poll"
        kind = self.feed.describe()
        if self._polling and self.feed.poll_too:
            return f"{kind}+poll"
        return "poll" if self._polling else kind

    def waiter(
        self,
        task_ids: Iterable[str],
        *,
        ready_only: bool = False,
        opener: Callable[[], Awaitable[None]] | None = None,
    ) -> Waiter:
        """A waiter for ``task_ids``, to be entered with ``async with``."""
        return Waiter(self, task_ids, ready_only=ready_only, opener=opener)

    def _waiters(self, task_id: str) -> Sequence[Waiter]:
        found = self.watched.get(task_id)
        if found is None:
            return ()
        return (found,) if type(found) is Waiter else found  # type: ignore[return-value]

    # ------------------------------------------------------------ registration

    def _add(self, waiter: Waiter) -> None:
        if self._closed is not None:
            raise self._closed
        watched = self.watched
        for task_id in waiter.ids:
            found = watched.get(task_id)
            if found is None:
                watched[task_id] = waiter
                self._to_watch.add(task_id)
            elif type(found) is Waiter:
                watched[task_id] = [found, waiter]
            else:
                found.append(waiter)  # type: ignore[union-attr]
        self._to_read.add(waiter)
        self.registrations += 1
        if waiter.ids:
            self._registered += 1
        if not self._settling:
            self._settling = True
            self._source._start_task(self._settle, name=f"{self._name} waits")
        if not self._started:
            self._start_feeding()
        if self._watched_event is not None:
            self._watched_event.set()
        if self._registered_event is not None:
            self._registered_event.set()

    def _remove(self, waiter: Waiter) -> None:
        self._to_read.discard(waiter)
        if self._told:
            self._told.pop(waiter, None)
        gone = []
        watched = self.watched
        removed = False
        for task_id in waiter.ids:
            found = watched.get(task_id)
            if found is waiter:
                removed = True
                del watched[task_id]
                self._last.pop(task_id, None)
                if task_id in self._to_watch:
                    self._to_watch.discard(task_id)  # never watched: nothing to end
                elif task_id not in self._in_flight:
                    gone.append(task_id)
            elif type(found) is list:
                if waiter in found:
                    removed = True
                    found.remove(waiter)
                if len(found) == 1:
                    watched[task_id] = found[0]
        if removed:
            self._registered -= 1
        if gone:
            self._unwatch(gone)

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        try:
            if self.feed is not None:
                self.feed.unwatch(task_ids)
            self._source._unwatched(task_ids)
        except Exception:  # pragma: no cover - a backend bug must not break waiters
            logger.exception("ending the watch of %d ids failed", len(task_ids))

    def _fail(self, waiters: Iterable[Waiter], error: Exception) -> None:
        for waiter in waiters:
            for task_id in waiter.ids:
                waiter._put(Record.failed(task_id, error))

    async def _settle(self) -> None:
        """Watch and read for every waiter that registered, in batches."""
        try:
            # This task's first step runs after every task that was ready when a
            # waiter registered: the waiters of that iteration are all in.
            while self._to_read and self._closed is None:
                await self._settle_batch()
        finally:
            self._settling = False
            if self._to_read and self._closed is None:  # registered while being cancelled
                self._settling = True
                self._source._start_task(self._settle, name=f"{self._name} waits")

    @property
    def unsettled(self) -> int:
        """Waiters whose first read has not been delivered yet."""
        return len(self._to_read) + len(self._reading)

    async def _settle_batch(self) -> None:
        try:
            await self._settle_readers()
        finally:
            self._reading = set()
            if self._told:
                to_read = self._to_read
                self._told = {w: ids for w, ids in self._told.items() if w in to_read}

    async def _settle_readers(self) -> None:
        batch, self._to_watch = self._to_watch, set()
        readers, self._to_read = self._to_read, set()
        self._reading = readers
        if batch and self.feed is not None:
            self._in_flight = batch
            try:
                await self.feed.watch(sorted(batch))
            except Exception as exc:
                # The watch may be half set up: end it; its waiters learn why.
                self._in_flight = set()
                self._unwatch(sorted(batch))
                self._fail(readers, exc)
                for task_id in batch:  # a later waiter on these ids watches again
                    if task_id in self.watched:
                        self._to_watch.add(task_id)
                return
            finally:
                self._in_flight = set()
            # Ids whose waiters all left while their watch was being set up.
            abandoned = [i for i in batch if i not in self.watched]
            if abandoned:
                self._unwatch(abandoned)
        ids = list(dict.fromkeys(i for w in readers for i in w.ids if i in self.watched))
        if not ids:
            return
        self._reads += 1
        before = self._counts(ids)
        try:
            try:
                raws = await self._source._read_raw(ids)
            except Exception as exc:
                self._fail(readers, exc)
                return
            self._apply(ids, before, raws, readers)
        finally:
            self._done_reading()

    def _counts(self, ids: list[str]) -> list[int] | None:
        """What a read starting now must compare with when it ends (None: no news yet)."""
        versions = self._versions
        return [versions.get(i, 0) for i in ids] if versions else None

    def _apply(
        self,
        ids: list[str],
        before: list[int] | None,
        raws: Sequence[Any],
        readers: set[Waiter] | None = None,
    ) -> int:
        """Hand out what a read found; ``before``: the news counts when it began
        (see :meth:`_counts`); ``readers``: the waiters whose first read it is.
        Returns the number of ids that changed."""
        versions = self._versions
        last_seen = self._last
        # Counts matter to other reads in flight only.
        others = self._reads > 1
        changed = 0
        again: list[str] = []
        for n, (task_id, raw) in enumerate(zip(ids, raws, strict=True)):
            if versions and versions.get(task_id, 0) != (before[n] if before else 0):
                # News of this id went out while it was read: this read may be
                # older or newer than that news. Read it again (its waiters
                # have had that news, readers included), unless it found what
                # they hold now: nothing is left to settle. (While an id's news
                # keeps changing, one batched re-read at a time is in flight.)
                held = last_seen.get(task_id)
                if (held.raw if held is not None else None) != raw:
                    again.append(task_id)
                continue
            record: Record | None
            if readers is not None and isinstance(raw, Exception):
                record = Record.failed(task_id, raw)  # a first read's failure: its readers' alone
            else:
                record = last_seen.get(task_id) if last_seen else None
                if (record.raw if record is not None else None) != raw:
                    # News for every waiter on the id, not only this read's: an
                    # earlier one holds an older record (or none), and the push or
                    # signal of this change may be spent already (it found this
                    # record known, so no change, had this read come first).
                    if self._hand_out(task_id, raw):
                        changed += 1
                        if others:
                            versions[task_id] = versions.get(task_id, 0) + 1
                    continue
            if not readers:
                continue
            found = self.watched.get(task_id)
            if found is None:
                continue
            # The record the waiters hold (not this read's own failure): a
            # reader that had it as news while it waited for this read has it.
            known = bool(self._told) and record is not None and record is last_seen.get(task_id)
            for waiter in (found,) if type(found) is Waiter else found:  # type: ignore[union-attr]
                if waiter in readers and (raw is not None or not waiter.ready_only):
                    if known and task_id in self._told.get(waiter, ()):
                        continue
                    if record is None:  # for a waiter that wants PENDING when there is none
                        record = Record(task_id, None, self._source._decode)
                    waiter._put(record)
        if again:
            self.refresh_soon(again)
        return changed

    def _done_reading(self) -> None:
        # Counts matter only to reads in flight: none, none kept.
        self._reads -= 1
        if not self._reads:
            self._versions.clear()

    # ------------------------------------------------------------ feeding

    def deliver(self, task_id: str, raw: Any) -> None:
        """Hand a new record of ``task_id`` (as the store gave it; None: none,
        an exception: it could not be read) to its waiters, unless it is the
        one they have."""
        if self._hand_out(task_id, raw) and self._reads:
            # Reads in flight may predate this news: they must not undo it.
            self._versions[task_id] = self._versions.get(task_id, 0) + 1

    def _hand_out(self, task_id: str, raw: Any) -> bool:
        """Give the waiters of ``task_id`` this record if it is news; whether it was."""
        found = self.watched.get(task_id)
        if found is None:
            return False
        failed = isinstance(raw, Exception)
        if failed:
            record = Record.failed(task_id, raw)
        else:
            last = self._last.get(task_id)
            if last is None:
                if raw is None:
                    return False
            elif last.raw == raw:
                return False
            record = Record(task_id, raw, self._source._decode)
            if raw is None:
                del self._last[task_id]
            else:
                self._last[task_id] = record
        # Waiters whose first read is to come, if this is a record it may find.
        unread = (self._to_read or self._reading) and raw is not None and not failed
        if type(found) is Waiter:
            if raw is not None or not found.ready_only:
                found._put(record)
                if unread and (found in self._to_read or found in self._reading):
                    self._told.setdefault(found, set()).add(task_id)
            return True
        for waiter in found:  # type: ignore[union-attr]
            if raw is not None or not waiter.ready_only:
                waiter._put(record)
                if unread and (waiter in self._to_read or waiter in self._reading):
                    self._told.setdefault(waiter, set()).add(task_id)
        return True

    def resynced(self, feed: Feed) -> None:
        """Called (through :meth:`Feed.resynced`) once a session's watches are in
        place. After a session that followed a lost one, the feed's ids are
        re-read (retried until it works): nothing else tells about what was
        stored meanwhile."""
        self.sessions += 1
        if feed.sessions > 1 and self.watched:
            ids = feed.resync_ids()
            logger.info("%s is back; re-reading results", feed)
            self.refresh_soon(ids)

    def changed(self, task_ids: Collection[str] | None = None) -> None:
        """Called by a signal feed: ``task_ids`` (None: any) may have changed."""
        self.refresh_soon(task_ids)

    async def refresh(self, task_ids: Iterable[str] | None = None) -> int:
        """Re-read watched ids (all of them by default) and deliver what changed.

        :returns: the number of ids whose record changed.
        """
        wanted = self.watched if task_ids is None else task_ids
        ids = [i for i in dict.fromkeys(wanted) if i in self.watched]
        if not ids:
            return 0
        self.refreshes += 1
        self._reads += 1
        before = self._counts(ids)
        try:
            raws = await self._source._read_raw(ids)
            for raw in raws:
                if isinstance(raw, BackendUnavailable):
                    # The store could not be reached for that id: not news for its
                    # waiters (they keep waiting); the caller tries again.
                    raise raw
            return self._apply(ids, before, raws)
        finally:
            self._done_reading()

    def refresh_soon(self, task_ids: Collection[str] | None = None) -> None:
        """Re-read ``task_ids`` (None: every watched id) in the background, batched
        with other such requests of this moment, retrying until it works."""
        if self._closed is not None or not self.watched:
            return
        if task_ids is None:
            self._refresh_all = True
        else:
            self._refresh_ids.update(task_ids)
        if not self._refreshing:
            self._refreshing = True
            self._source._start_task(run_refreshes, self, name=f"{self._name} re-reads")

    def _start_feeding(self) -> None:
        self._started = True
        if self.feed is not None:
            self._source._start_task(run_feed, self, self.feed, name=f"{self._name} feed")
            if self.feed.poll_too:
                self.fall_back_to_polling()
        else:
            self.fall_back_to_polling()

    def fall_back_to_polling(self) -> None:
        """Start the batched poller (once)."""
        if self._polling or self._closed is not None:
            return
        self._polling = True
        self._source._start_task(
            run_poller,
            self,
            self._source.poll_interval,
            self._source.max_poll_interval,
            name=f"{self._name} poller",
        )

    def close(self, error: Exception) -> None:
        """Give ``error`` to every waiter and refuse new ones (the backend closed)."""
        self._closed = error
        for task_id in list(self.watched):
            for waiter in self._waiters(task_id):
                waiter._put(Record.failed(task_id, error))
        self.deadlines.close()
