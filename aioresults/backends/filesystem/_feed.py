"""The filesystem backend's feed: inotify on the result directory.

When a watched result's file changes, the feed reads it at once, in its own
task, and hands the record to the waiter hub: the file was just written, so
it is in the page cache, and one small read costs less than the hub's re-read
would (a task to start, a trip to a worker thread and back). Whatever it
cannot decide there goes to that re-read, which handles it as before: a read
error, a file larger than :data:`INLINE_MOST`, or a fresh record that does not
decode (Celery's own writer truncates a file and then writes it, so a reader
can catch it half done; the re-read waits for the rest). In a flood of
changes (another process storing thousands of watched results at once) the
feed reads at most :data:`INLINE_BURST` files per :data:`INLINE_WINDOW`
seconds itself, so it never holds the event loop for long; the rest are
re-read in one batch, in a worker thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..._exceptions import AioResultsError
from .. import _inotify
from ._files import TooLarge

if TYPE_CHECKING:
    from . import FilesystemBackend

__all__ = ["FRESH", "INLINE_BURST", "INLINE_MOST", "MASK", "ResultFeed"]

MASK = _inotify.IN_MOVED_TO | _inotify.IN_CLOSE_WRITE | _inotify.IN_DELETE | _inotify.IN_CREATE
#: The largest file read in the feed's task (larger ones go to a worker thread).
INLINE_MOST = 64 * 1024
#: A record younger than this that does not decode may be half written.
FRESH = 2.0
#: At most this many files read by the feed itself per window of this many seconds.
INLINE_BURST = 16
INLINE_WINDOW = 0.01


class ResultFeed(_inotify.InotifyFeed):
    """inotify on ``backend``'s directory; see the module docstring."""

    def __init__(self, backend: FilesystemBackend) -> None:
        super().__init__(backend.path, MASK, self._changed_file)
        self._backend = backend
        self._prefix = backend.global_keyprefix + backend.task_keyprefix
        self._window = 0.0  # when the current window began (monotonic)
        self._read = 0  # files read in it

    def _changed_file(self, name: str) -> list[str]:
        """The ids the hub should re-read after an event on ``name``."""
        if not name.startswith(self._prefix):
            return []
        task_id = name[len(self._prefix) :]
        if task_id not in self.watched:
            return []
        now = time.monotonic()
        if now - self._window > INLINE_WINDOW:
            self._window, self._read = now, 0
        if self._read >= INLINE_BURST:
            return [task_id]  # a flood: the rest in one batch, in a thread
        self._read += 1
        backend = self._backend
        try:
            payload, mtime = backend._dir.read(name, backend.expires, INLINE_MOST)
        except (OSError, TooLarge, AioResultsError):
            return [task_id]  # the hub's re-read reports or handles it
        if (
            payload is not None
            and time.time() - mtime < FRESH
            and not backend._decodes(task_id, payload)
        ):
            return [task_id]
        self.deliver(task_id, payload)
        return []
