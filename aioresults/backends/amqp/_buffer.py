"""The replies a backend has received: the latest record per task id, bounded.

RPC has no store to read a record back from: a reply is a message, consumed
once. So the backend keeps what its reply queue delivered, and that is what
``get_meta()`` and the waiter hub read.

* One entry per task id: its latest record (the raw reply body), replaced by
  each newer reply, except that a SUCCESS is never replaced (the rule every
  store keeps, enforced here by the receiver, since a writer cannot see it).
* At most ``limit`` entries: past it, the entry updated longest ago is evicted
  (and counted in :attr:`ReplyBuffer.evicted`); it then reads as PENDING, as a
  result never received. Waiters that were waiting when it arrived already
  have it.
* An entry older than ``ttl`` seconds (the backend's ``expires``) reads as
  missing and is dropped.
* A message the broker delivers again after a reconnect (its ack was lost with
  the connection) is ignored if this entry already applied it, so an older
  state redelivered never replaces a newer one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["ReplyBuffer"]

#: Digests of the bodies applied per entry, to recognise redeliveries.
HISTORY = 8


class _Entry:
    __slots__ = ("deadline", "history", "raw", "success")

    def __init__(self, raw: bytes, deadline: float | None) -> None:
        self.raw = raw
        self.deadline = deadline
        self.history: tuple[int, ...] = (hash(raw),)
        # Whether raw is a SUCCESS, worked out only when a reply would replace it.
        self.success: bool | None = None


class ReplyBuffer:
    """See the module docstring.

    :param limit: the most entries kept.
    :param ttl: seconds an entry is kept (None: until evicted or forgotten).
    :param is_success: whether a raw record is a SUCCESS (a decode failure is not).
    """

    def __init__(
        self, limit: int, ttl: float | None, is_success: Callable[[str, bytes], bool]
    ) -> None:
        self.limit = limit
        self.ttl = ttl
        self._is_success = is_success
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        #: Entries evicted because the buffer was full.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, task_id: str) -> bytes | None:
        """The latest record of ``task_id``, or None (never received, evicted, expired)."""
        entry = self._entries.get(task_id)
        if entry is None:
            return None
        if entry.deadline is not None and entry.deadline <= time.monotonic():
            del self._entries[task_id]
            return None
        return entry.raw

    def put(self, task_id: str, raw: bytes, *, redelivered: bool = False) -> bool:
        """Keep ``raw`` as the latest record of ``task_id``; whether it changed
        anything (False: the same record, a stored SUCCESS, or a redelivery
        already applied)."""
        deadline = None if self.ttl is None else time.monotonic() + self.ttl
        entry = self._entries.get(task_id)
        if entry is None or (entry.deadline is not None and entry.deadline <= time.monotonic()):
            self._entries[task_id] = _Entry(raw, deadline)
            self._entries.move_to_end(task_id)
            if len(self._entries) > self.limit:
                self._entries.popitem(last=False)
                self.evicted += 1
            return True
        if entry.raw == raw:
            return False
        digest = hash(raw)
        if redelivered and digest in entry.history:
            return False
        if entry.success is None:
            entry.success = self._is_success(task_id, entry.raw)
        if entry.success:
            return False
        entry.raw, entry.deadline, entry.success = raw, deadline, None
        entry.history = (*entry.history[-(HISTORY - 1) :], digest)
        self._entries.move_to_end(task_id)
        return True

    def forget(self, task_id: str) -> None:
        """Drop the entry of ``task_id`` (a missing one is fine)."""
        self._entries.pop(task_id, None)

    def cleanup(self) -> int:
        """Drop the expired entries; return how many."""
        if self.ttl is None:
            return 0
        now = time.monotonic()
        expired = [
            t for t, e in self._entries.items() if e.deadline is not None and e.deadline <= now
        ]
        for task_id in expired:
            del self._entries[task_id]
        return len(expired)
