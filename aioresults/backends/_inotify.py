"""A minimal asynchronous inotify reader (Linux), through ctypes and the stdlib,
and the signal feed built on it.

Used by the filesystem and SQLite backends to wake waiters when a file in a
directory changes, without polling. :func:`available` says whether the
platform has inotify; backends fall back to polling where it does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

import anyio

from ._feeds import Feed, FeedGone

__all__ = [
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_MODIFY",
    "IN_MOVED_TO",
    "IN_Q_OVERFLOW",
    "Inotify",
    "InotifyFeed",
    "available",
]

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000  # the watch is gone (directory deleted or unmounted)
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc: Any = None


def _load() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc = libc
    return _libc


def available() -> bool:
    """Whether inotify can be used here (Linux with a libc that has it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(_load(), "inotify_init1")
    except OSError:  # pragma: no cover - no libc
        return False


class Inotify:
    """One inotify instance; :meth:`read` waits for events without blocking the loop."""

    def __init__(self) -> None:
        fd = _load().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path`` for the events in ``mask``; return the watch descriptor."""
        wd = _load().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch({path!r}): {os.strerror(err)}")
        return int(wd)

    async def read(self) -> list[tuple[int, int, str]]:
        """Wait for events; return ``(watch descriptor, mask, name)`` triples."""
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)
                continue
            except OSError as exc:  # pragma: no cover - EINTR is retried by Python
                if exc.errno == errno.EINTR:
                    continue
                raise
            events = []
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset : offset + length].rstrip(b"\0")
                offset += length
                events.append((wd, mask, os.fsdecode(name)))
            return events

    def close(self) -> None:
        """Close the descriptor (stop every task reading it first)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class InotifyFeed(Feed):
    """A signal feed: one inotify watch on a directory.

    :param directory: the directory to watch.
    :param mask: the events to watch for.
    :param changed: maps a file name to the ids it may have changed: a list
        (empty for none), or None for "any watched id".
    :param settle: after a burst of events, signal once more when it has been
        quiet this long (a write may be seen before it is visible to readers).

    While no id is watched it takes no events (they wait in the kernel, which
    merges repeats), so an idle process does no work at all.
    """

    kind = "signal"

    def __init__(
        self,
        directory: str,
        mask: int,
        changed: Callable[[str], list[str] | None],
        *,
        settle: float | None = None,
    ) -> None:
        self.directory = directory
        self.mask = mask
        self._changed = changed
        self._settle = settle

    def describe(self) -> str:
        return "inotify"

    async def session(self) -> None:
        try:
            ino = Inotify()
        except OSError as exc:  # out of inotify instances, or none here
            raise FeedGone(f"cannot use inotify ({exc})") from exc
        try:
            try:
                ino.add_watch(self.directory, self.mask)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise  # the directory is gone for now: try again later
                raise FeedGone(f"cannot watch {self.directory} ({exc.strerror or exc})") from exc
            self.resynced()
            pending = False
            while True:
                if not self.watched:
                    pending = False
                    await self.wait_watched()
                events: list[tuple[int, int, str]] | None = None
                if pending and self._settle:
                    with anyio.move_on_after(self._settle):
                        events = await ino.read()
                    if events is None:
                        pending = False
                        self.changed(None)
                        continue
                else:
                    events = await ino.read()
                every = False
                ids: list[str] = []
                for _wd, mask, name in events:
                    if mask & IN_Q_OVERFLOW:
                        every = True  # events were dropped: anything may have changed
                    elif mask & IN_IGNORED:
                        raise ConnectionError(f"the inotify watch on {self.directory} is gone")
                    else:
                        found = self._changed(name)
                        if found is None:
                            every = True
                        else:
                            ids.extend(i for i in found if i in self.watched)
                if every:
                    self.changed(None)
                elif ids:
                    self.changed(ids)
                else:
                    continue
                pending = True
        finally:
            ino.close()
