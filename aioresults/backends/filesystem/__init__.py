"""FilesystemBackend: results kept as files in one directory (``file:///dir``).

Files are named and filled as Celery's ``FilesystemBackend`` names and fills
them: a task's record is ``<dir>/celery-task-meta-<id>`` holding exactly the
payload Celery writes, a saved group ``<dir>/celery-taskset-meta-<id>``. Celery
reads what aioresults writes, and the reverse.

Unlike Celery, every write is atomic: the payload goes to a hidden temporary
file in the same directory, is flushed to disk and then renamed over the
result, so no reader ever sees an empty or half-written record. Checks that
must not race with another process (never overwrite SUCCESS, count a chord
part once) run under an exclusive ``flock`` on ``<dir>/.aioresults.lock``;
a result that has no file yet needs no check, and is renamed into place
with Linux's ``renameat2(RENAME_NOREPLACE)`` (elsewhere, or where that is
refused, hard-linked into place), which creates it only where it is still
missing, without the lock. With ``synchronous="FULL"`` the directory is
fsynced as well before a write returns, so it also survives a power loss.
Chord bookkeeping lives next to the group: ``celery-taskset-meta-<id>.s``
(size), ``.n`` (counter) and the hidden directory ``.celery-taskset-meta-<id>.p``
(one file per counted part, holding its count and receipt).

Waits are pushed by inotify on Linux (``watch="auto"``, the default, or
``"notify"``): one watch on the directory wakes the waiters of the files that
changed, whoever wrote them; the feed reads a small record that just changed
at once, in its own task, and hands it to the waiters. Elsewhere, or with
``watch="poll"`` (for a directory shared over the network, whose remote
writes inotify does not see), one shared poller re-reads the watched results
with back-off. If the directory is removed, writes create it again and the
watch follows.

Expiry is decided by the writer, as Redis' TTLs are: each file carries its
deadline in an extended attribute (``user.aioresults.expires``). A file
without one (written by Celery, or on a file system without extended
attributes) expires when its modification time is older than ``expires``, as
Celery's ``cleanup()`` decides. An expired record reads as missing;
:meth:`~FilesystemBackend.cleanup` deletes expired files.

Blocking file operations run in worker threads (the backend's own on
asyncio, anyio's on trio). Runs on asyncio and, used as
``async with backend:``, on trio. Needs POSIX (``flock``): on Windows,
opening one raises :class:`~aioresults.ConfigurationError`.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from ..._exceptions import (
    AioResultsError,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DecodeError,
    InvalidTaskId,
    StoreNotFound,
)
from ..._meta import ResultMeta
from ..._runtime import on_asyncio
from .. import _inotify
from .._chords import PartCount
from .._feeds import Feed
from .._support import ErrorRule, ErrorTable
from ..keyvalue import KeyValueBackend
from ._feed import FRESH, ResultFeed
from ._files import ResultDirectory
from ._threads import Workers

__all__ = ["FilesystemBackend"]

T = TypeVar("T")

_NAME_MAX = 255
#: Pauses before re-reading a fresh record that does not decode: Celery's own
#: writer truncates the file and then writes it, so a reader can catch it half-done.
_REREAD_PAUSES = (0.01, 0.03, 0.1)
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.EIO, errno.ENOTCONN)


def _watch_option(watch: Any) -> str:
    """The ``watch`` option, with the 0.1 spellings (True/False/None) accepted."""
    if watch in ("auto", "notify", "poll"):
        return str(watch)
    if watch is None or isinstance(watch, bool):
        warnings.warn(
            'watch=True/False/None is deprecated since 0.2: use "notify", "poll" or "auto"',
            DeprecationWarning,
            stacklevel=4,
        )
        return {None: "auto", True: "notify", False: "poll"}[watch]
    raise ConfigurationError(f'watch must be "auto", "notify" or "poll", not {watch!r}')


class FilesystemBackend(KeyValueBackend):
    """Results as files in a directory; see the module docstring.

    :param location: the result directory (created if missing), or a
        ``file://`` URL.
    :param watch: ``"auto"`` (inotify where available, else polling),
        ``"notify"`` (inotify; an error where unavailable) or ``"poll"``.
    :param synchronous: ``"NORMAL"`` (the default: each record's file is
        fsynced before it is renamed into place; a store survives the process
        being killed, and a power loss leaves each record whole, old or new) or
        ``"FULL"`` (the directory is fsynced too before a store, a chord's
        start or part, or a ``forget()`` returns, so it also survives a power
        loss; one more fsync each). Any case; SQLite's names for the same
        trade.
    :param options: see :class:`~aioresults.KeyValueBackend` and
        :class:`~aioresults.BaseBackend` (``poll_interval``, ``expires``, ...).
    :raises ConfigurationError: an option is invalid.
    """

    schemes: ClassVar[tuple[str, ...]] = ("file",)
    runs_on: ClassVar[frozenset[str]] = frozenset({"asyncio", "trio"})
    local_wake: ClassVar[bool] = True

    def __init__(
        self,
        location: str | os.PathLike[str] | None = None,
        *,
        watch: str = "auto",
        synchronous: str = "NORMAL",
        path: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        if path is not None:  # the 0.1 spelling
            if location is not None:
                raise ConfigurationError("give the directory once (location or path)")
            location = path
        if location is None:
            raise ConfigurationError("FilesystemBackend needs its directory")
        if isinstance(location, str) and location[:7].lower() == "file://":
            location = _url_path(location)
            options.setdefault("url", str(location))
        directory = os.path.abspath(os.fspath(location))
        options.setdefault("url", f"file://{directory}")
        super().__init__(**options)
        if any(c in self.global_keyprefix for c in "/\\\0") or self.global_keyprefix.startswith(
            "."
        ):
            raise ConfigurationError(
                f"global_keyprefix {self.global_keyprefix!r} must be usable in a file name"
            )
        self.watch = _watch_option(watch)
        if self.watch == "notify" and not _inotify.available():
            raise ConfigurationError('watch="notify" needs Linux\'s inotify; use "auto" or "poll"')
        sync = synchronous.upper() if isinstance(synchronous, str) else None
        if sync not in ("NORMAL", "FULL"):
            raise ConfigurationError(f'synchronous must be "NORMAL" or "FULL", not {synchronous!r}')
        self.path = directory
        self._dir = ResultDirectory(
            directory, self.codec.max_value_size, self.is_success, full_sync=sync == "FULL"
        )
        self._workers = Workers("aioresults-files", most=40)  # as many as anyio allows
        self._errors = ErrorTable(
            [
                ErrorRule(OSError, BackendUnavailable, "cannot use", lambda e: _errno(e) in _GONE),
                ErrorRule(OSError, BackendError, "failed in"),
            ],
            lambda: f"result directory {self.path}",
        )

    @property
    def synchronous(self) -> str:
        """``"NORMAL"`` or ``"FULL"`` (see the class)."""
        return "FULL" if self._dir.full_sync else "NORMAL"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FilesystemBackend:
        """``file:///abs/dir`` or ``file://localhost/abs/dir``.

        As in Celery, the path is used as written (no percent-decoding), so a
        Celery app given the same URL uses the same directory.

        :raises ConfigurationError: any other form (a host, a relative path, a query).
        """
        return cls(_url_path(url), url=url, **options)

    @property
    def waiting_by(self) -> str | None:
        """Deprecated since 0.2: ``wait_stats().mode`` (``"inotify"`` or ``"poll"``)."""
        warnings.warn(
            "waiting_by is deprecated since 0.2: use wait_stats().mode",
            DeprecationWarning,
            stacklevel=2,
        )
        mode = self.wait_stats().mode
        return "polling" if mode == "poll" else mode

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - no flock there
            raise ConfigurationError("the file:// backend needs POSIX file locks (not Windows)")
        if not self.create:
            if not await anyio.to_thread.run_sync(os.path.isdir, self.path):
                raise StoreNotFound(f"no store at {self.path}: the directory does not exist")
            return
        await self._run(self._dir.prepare)

    def _feed(self) -> Feed | None:
        if self.watch == "poll" or not _inotify.available():
            return None
        return ResultFeed(self)

    def _store_key(self) -> object:
        return ("file", os.path.realpath(self.path), self.global_keyprefix)

    async def _close(self) -> None:
        self._workers.close()

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking file work in a thread; translate OS errors."""
        # ErrorTable.translating() inlined: this is every store's and read's path.
        try:
            if on_asyncio():
                return await self._workers.run(func, *args)
            return await anyio.to_thread.run_sync(func, *args)
        except self._errors.catches as exc:
            error = None
            if not isinstance(exc, AioResultsError):
                error = self._errors.translate(exc, func.__name__.replace("_", " ").strip())
            if error is None:
                raise
            raise error from exc

    async def _write(self, func: Callable[..., T], *args: Any) -> T:
        """Like :meth:`_run`, creating the directory again if it was removed."""
        try:
            return await self._run(func, *args)
        except BackendUnavailable as exc:
            if (
                not self.create
                or not isinstance(exc.__cause__, FileNotFoundError)
                or os.path.isdir(self.path)  # noqa: ASYNC240 - one stat, after a failure
            ):
                raise
        await self._run(self._dir.prepare)
        return await self._run(func, *args)

    # ------------------------------------------------------------ ids and names

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        """Validate an id: also a plain file name that stays inside the directory.

        :raises InvalidTaskId: the id contains a path separator, starts with a
            dot, or would make a file name longer than 255 bytes.
        """
        task_id = super()._check_id(task_id, what)
        if "/" in task_id or "\\" in task_id:
            raise InvalidTaskId(f"{what} {task_id!r} contains a path separator")
        if task_id.startswith("."):
            raise InvalidTaskId(f"{what} {task_id!r} starts with a dot")
        # A group's longest file is its hidden chord parts directory.
        name = f".{self.group_key(task_id)}.p" if what == "group id" else self.task_key(task_id)
        size = len(os.fsencode(name))
        if size > _NAME_MAX:
            raise InvalidTaskId(
                f"{what} {task_id[:40]!r}... makes a {size}-byte file name; the limit is "
                f"{_NAME_MAX}"
            )
        return task_id

    def _ttl_for(self, name: str) -> Any:
        """A file's TTL by its name; ``...`` for files that are not results."""
        if name.startswith(self.global_keyprefix + self.task_keyprefix):
            return self.expires
        group_prefix = self.global_keyprefix + self.group_keyprefix
        if name.startswith(group_prefix) and name[-2:] in (".s", ".n"):
            return self.chord_expires
        if name.startswith(group_prefix):
            return self.expires
        if name.startswith("." + group_prefix):
            return self.chord_expires
        return ...

    # ------------------------------------------------------------ key-value primitives

    async def _get(self, key: str) -> bytes | None:
        payload, _ = await self._run(self._dir.read, key, self._ttl_for(key))
        return payload

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._write(self._dir.set, key, value, ttl, False)

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        return await self._write(self._dir.set, key, value, ttl, True)

    async def _delete(self, key: str) -> None:
        await self._run(self._dir.delete, key)

    # ------------------------------------------------------------ records

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        keys = [self.task_key(t) for t in task_ids]
        read = await self._run(self._dir.read_many, keys, self.expires)
        raws: list[Any] = [payload for payload, _ in read]
        for pause in _REREAD_PAUSES:
            now = time.time()
            again = [
                i
                for i, (payload, mtime) in enumerate(read)
                if payload is not None
                and now - mtime < FRESH
                and not self._decodes(task_ids[i], payload)
            ]
            if not again:
                break
            await anyio.sleep(pause)
            reread = await self._run(self._dir.read_many, [keys[i] for i in again], self.expires)
            for i, entry in zip(again, reread, strict=True):
                read[i] = entry
                raws[i] = entry[0]
        return raws

    def _decodes(self, task_id: str, payload: bytes) -> bool:
        try:
            self._decode(task_id, payload)
        except AioResultsError as exc:
            return type(exc) is not DecodeError  # a plain DecodeError may be a torn write
        return True

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        return self._decode_payload(task_id, raw)

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        await self._write(self._dir.chord_start, self.group_key(group_id), size, self.chord_expires)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        return await self._write(
            self._dir.chord_count,
            self.group_key(group_id),
            part_id,
            payload,
            receipt,
            self.chord_expires,
        )

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        return await self._run(self._dir.chord_parts, self.group_key(group_id))

    async def _cleanup(self) -> int:
        """Delete expired result, group and chord files; return how many."""
        return await self._run(self._dir.cleanup, self._ttl_for)


def _errno(exc: BaseException) -> int | None:
    return getattr(exc, "errno", None)


def _url_path(url: str) -> str:
    parts = urlsplit(url)
    if (
        not url[:7].lower() == "file://"
        or parts.netloc.lower() not in ("", "localhost")
        or not parts.path.startswith("/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigurationError(
            f"a file result URL looks like file:///abs/dir or file://localhost/abs/dir, not {url!r}"
        )
    return parts.path
