"""A minimal asynchronous inotify reader (Linux), through ctypes and the stdlib.

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
from typing import Any

import anyio

__all__ = [
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_MODIFY",
    "IN_MOVED_TO",
    "IN_Q_OVERFLOW",
    "Inotify",
    "available",
]

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
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
