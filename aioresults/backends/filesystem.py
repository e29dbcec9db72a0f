"""FilesystemBackend: results kept as files in one directory (``file:///dir``).

Files are named and filled as Celery's ``FilesystemBackend`` names and fills
them: a task's record is ``<dir>/celery-task-meta-<id>`` holding exactly the
payload Celery writes, a saved group ``<dir>/celery-taskset-meta-<id>``. Celery
reads what aioresults writes, and the reverse.

Unlike Celery, every write is atomic: the payload goes to a hidden temporary
file in the same directory, is flushed to disk and then renamed over the
result, so no reader ever sees an empty or half-written record. Checks that
must not race with another process (never overwrite SUCCESS, count a chord
part once) run under an exclusive ``flock`` on ``<dir>/.aioresults.lock``.
Chord bookkeeping lives next to the group: ``celery-taskset-meta-<id>.s``
(size), ``.n`` (counter) and the directory ``.celery-taskset-meta-<id>.p``
(one file per counted part), hidden because Celery's ``cleanup()`` unlinks
every old entry with its prefixes and would fail on a directory.

Waits are pushed by inotify on Linux: one watch on the directory wakes the
waiters of the files that changed, whoever wrote them. Elsewhere, or with
``watch=False``, one shared poller re-reads the watched results with back-off.

Expiry is decided by the writer, as Redis' TTLs are: each file carries its
deadline in an extended attribute (``user.aioresults.expires``). A file
without one (written by Celery, or on a file system without extended
attributes) expires when its modification time is older than ``expires``, as
Celery's ``cleanup()`` decides. An expired record reads as missing;
:meth:`~FilesystemBackend.cleanup` deletes expired files.

Blocking file operations run in worker threads. Runs on asyncio and, used as
``async with backend:``, on trio.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from .._exceptions import (
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DecodeError,
    InvalidTaskId,
)
from .._meta import ResultMeta
from . import _inotify
from ._waiters import Item
from .base import KeyValueBackend

__all__ = ["FilesystemBackend"]

logger = logging.getLogger("aioresults.backends")

T = TypeVar("T")

_LOCK_NAME = ".aioresults.lock"
_TEMP_PREFIX = ".aioresults-"
_TEMP_SUFFIX = ".tmp"
#: A temporary file this old was left by a writer that died; cleanup() removes it.
_STALE_TEMP = 3600.0
_NAME_MAX = 255
_WATCH_MASK = (
    _inotify.IN_MOVED_TO | _inotify.IN_CLOSE_WRITE | _inotify.IN_DELETE | _inotify.IN_CREATE
)
_IN_IGNORED = 0x00008000  # the watch is gone (directory deleted or unmounted)
_FIELD_LENGTH = struct.Struct(">I")
#: The writer's expiry, on file systems with extended attributes: a Unix time or "never".
_XATTR = "user.aioresults.expires"
_NO_XATTRS = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM))
#: Pauses before re-reading a fresh record that does not decode: Celery's own
#: writer truncates the file and then writes it, so a reader can catch it half-done.
_REREAD_PAUSES = (0.01, 0.03, 0.1)
_FRESH = 2.0


class FilesystemBackend(KeyValueBackend):
    """Results as files in a directory; see the module docstring.

    :param path: the result directory (created if missing).
    :param watch: True to wait with inotify (an error where it is unavailable),
        False to poll, None (default) for inotify where available, else polling.
    :param poll_interval: the first polling interval, in seconds.
    :param max_poll_interval: polling backs off up to this many seconds while
        nothing changes.
    :param options: see :class:`~aioresults.KeyValueBackend` and
        :class:`~aioresults.BaseBackend`.
    :raises ConfigurationError: an option is invalid.
    """

    schemes: ClassVar[tuple[str, ...]] = ("file",)

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        watch: bool | None = None,
        poll_interval: float = 0.05,
        max_poll_interval: float = 1.0,
        **options: Any,
    ) -> None:
        directory = os.path.abspath(os.fspath(path))
        options.setdefault("url", f"file://{directory}")
        super().__init__(**options)
        if any(c in self.global_keyprefix for c in "/\\\0") or self.global_keyprefix.startswith(
            "."
        ):
            raise ConfigurationError(
                f"global_keyprefix {self.global_keyprefix!r} must be usable in a file name"
            )
        if not 0 < poll_interval <= max_poll_interval:
            raise ConfigurationError("need 0 < poll_interval <= max_poll_interval")
        if watch is not None and not isinstance(watch, bool):
            raise ConfigurationError("watch must be True, False or None")
        self.path = directory
        self.watch = watch
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self._lock_path = os.path.join(directory, _LOCK_NAME)
        self._xattrs = hasattr(os, "setxattr")
        self._inotify: _inotify.Inotify | None = None
        self._waiting_by: str | None = None
        # task id -> (digest of the payload, its decoded item), for watched ids only, so
        # re-reading an unchanged file yields the same item and wakes no one twice.
        self._decoded: dict[str, tuple[bytes, Item]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FilesystemBackend:
        """``file:///abs/dir`` or ``file://localhost/abs/dir``.

        As in Celery, the path is used as written (no percent-decoding), so a
        Celery app given the same URL uses the same directory.

        :raises ConfigurationError: any other form (a host, a relative path, a query).
        """
        parts = urlsplit(url)
        if (
            not url[:7].lower() == "file://"
            or parts.netloc.lower() not in ("", "localhost")
            or not parts.path.startswith("/")
            or parts.query
            or parts.fragment
        ):
            raise ConfigurationError(
                f"a file result URL looks like file:///abs/dir or file://localhost/abs/dir, "
                f"not {url!r}"
            )
        return cls(url=url, path=parts.path, **options)

    @property
    def waiting_by(self) -> str | None:
        """How waits are served: ``"inotify"``, ``"polling"``, or None before opening."""
        return self._waiting_by

    # ------------------------------------------------------------ lifecycle

    async def _open(self) -> None:
        await self._run(self._prepare_directory, opening=True)
        if self.watch is not False and _inotify.available():
            ino = None
            try:
                ino = _inotify.Inotify()
                ino.add_watch(self.path, _WATCH_MASK)
            except OSError as exc:
                if ino is not None:
                    ino.close()
                if self.watch:
                    raise BackendUnavailable(
                        f"cannot watch {self.path} with inotify: {exc.strerror or exc}"
                    ) from exc
                logger.warning("cannot watch %s with inotify (%s); polling", self.path, exc)
            else:
                try:
                    self._spawn(self._follow_events, ino, name=f"{self!r} inotify")
                except BaseException:
                    ino.close()
                    raise
                self._inotify = ino
                self._waiting_by = "inotify"
                return
        elif self.watch:
            raise ConfigurationError("inotify is not available here; use watch=None or False")
        self._waiting_by = "polling"
        self._spawn(self._poll, name=f"{self!r} poller")

    async def _close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._decoded.clear()

    def _prepare_directory(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except FileExistsError as exc:
            raise ConfigurationError(f"result path {self.path} is not a directory") from exc
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create result directory {self.path}: {exc.strerror or exc}"
            ) from exc
        if not os.path.isdir(self.path):
            raise ConfigurationError(f"result path {self.path} is not a directory")
        try:
            os.unlink(self._write_temp(b"test", None))
            with self._locked():
                pass
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ConfigurationError(
                f"result directory {self.path} is not writable: {exc.strerror or exc}"
            ) from exc

    async def _run(self, func: Callable[..., T], *args: Any, opening: bool = False) -> T:
        """Run blocking file work in a thread; translate OS errors."""
        if not opening:
            # The key-value primitives are public: open on their first use too.
            await self._ensure_open()
        try:
            return await anyio.to_thread.run_sync(func, *args)
        except OSError as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: OSError) -> BackendError:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE, errno.EIO, errno.ENOTCONN):
            return BackendUnavailable(f"result directory {self.path} is unavailable: {reason}")
        return BackendError(f"result directory {self.path}: {reason}")

    # ------------------------------------------------------------ waiting

    async def _follow_events(self, ino: _inotify.Inotify) -> None:
        prefix = self.global_keyprefix + self.task_keyprefix
        while True:
            try:
                events = await ino.read()
            except OSError as exc:
                logger.warning("inotify on %s failed (%s); polling", self.path, exc)
                break
            changed: set[str] = set()
            overflow = lost = False
            for _wd, mask, name in events:
                if mask & _inotify.IN_Q_OVERFLOW:
                    overflow = True
                elif mask & _IN_IGNORED:
                    lost = True
                elif name.startswith(prefix):
                    task_id = name[len(prefix) :]
                    if self.hub.has_waiters(task_id):
                        changed.add(task_id)
            try:
                if overflow or lost:
                    # Events were dropped: any watched file may have changed.
                    await self.hub.refresh()
                elif changed:
                    await self.hub.refresh(changed)
            except Exception as exc:
                logger.warning("reading changed results in %s failed: %s", self.path, exc)
            if lost:
                logger.warning("the inotify watch on %s is gone; polling", self.path)
                break
        self._waiting_by = "polling"
        await self._poll()

    async def _poll(self) -> None:
        await self.hub.run_poller(self.poll_interval, self.max_poll_interval)

    def _unwatch(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            self._decoded.pop(task_id, None)

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
        name = "." + self.chord_key(task_id, "p") if what == "group id" else self.task_key(task_id)
        try:
            size = len(os.fsencode(name))
        except UnicodeEncodeError as exc:
            raise InvalidTaskId(f"{what} {task_id!r} cannot be a file name") from exc
        if size > _NAME_MAX:
            raise InvalidTaskId(
                f"{what} {task_id[:40]!r}... makes a {size}-byte file name; the limit is "
                f"{_NAME_MAX}"
            )
        return task_id

    def _file(self, key: str) -> str:
        if "/" in key or "\0" in key or key.startswith("."):
            raise InvalidTaskId(f"{key!r} is not a plain file name")  # ids are checked before
        return os.path.join(self.path, key)

    def _map_dir(self, key: str) -> str:
        return os.path.join(self.path, "." + key)

    def _ttl_for(self, key: str) -> float | None:
        group_prefix = self.global_keyprefix + self.group_keyprefix
        if key.startswith(group_prefix) and key[-2:] in (".s", ".n", ".p"):
            return self.chord_expires
        return self.expires

    # ------------------------------------------------------------ blocking helpers

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the directory's exclusive lock (across threads and processes)."""
        # A descriptor of its own per holder: flock excludes other open files,
        # including this process's other threads.
        fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stamp(self, target: int | str, ttl: float | None) -> None:
        """Record the writer's expiry on a file (or map directory), where the
        file system keeps extended attributes."""
        if not self._xattrs:
            return
        value = b"never" if ttl is None else f"{time.time() + ttl:.6f}".encode()
        try:
            os.setxattr(target, _XATTR, value)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS:
                raise
            self._xattrs = False

    def _expired(self, target: int | str, mtime: float, ttl: float | None) -> bool:
        """Whether a file has expired: by its writer's stamp, else (written by
        Celery, or no extended attributes) by its age and ``ttl``."""
        if self._xattrs:
            try:
                if isinstance(target, int):
                    value = os.getxattr(target, _XATTR)
                else:
                    value = os.getxattr(target, _XATTR, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_XATTRS and exc.errno != errno.ENODATA:
                    raise
            else:
                if value == b"never":
                    return False
                with contextlib.suppress(ValueError):
                    return float(value) <= time.time()
        return ttl is not None and mtime + ttl <= time.time()

    def _write_temp(self, data: bytes, ttl: float | None) -> str:
        """Write ``data`` to a new hidden file in the directory, on disk; return its path."""
        path = os.path.join(self.path, f"{_TEMP_PREFIX}{uuid.uuid4().hex}{_TEMP_SUFFIX}")
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                self._stamp(f.fileno(), ttl)
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(path)
            raise
        return path

    def _read(self, key: str, ttl: float | None) -> tuple[bytes | None, float]:
        """Return a file's payload (None if missing, empty or expired) and its mtime."""
        try:
            with open(self._file(key), "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                if self._expired(f.fileno(), mtime, ttl):
                    return None, mtime
                # One byte over the limit is enough for the codec to refuse it.
                data = f.read(self.codec.max_value_size + 1)
        except FileNotFoundError:
            return None, 0.0
        except IsADirectoryError as exc:
            raise BackendCorrupted(f"{key} in {self.path} is a directory") from exc
        # Celery treats an empty file as no record (its writer truncates first).
        return data or None, mtime

    def _read_many(
        self, keys: Sequence[str], ttl: float | None
    ) -> list[tuple[bytes | None, float]]:
        return [self._read(key, ttl) for key in keys]

    def _replace(self, key: str, data: bytes, ttl: float | None) -> None:
        """Atomically replace a file; the caller holds the lock."""
        temp = self._write_temp(data, ttl)
        try:
            os.replace(temp, self._file(key))
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _set(self, key: str, value: bytes, ttl: float | None, guarded: bool) -> bool:
        temp = self._write_temp(value, ttl)  # the slow part, outside the lock
        try:
            with self._locked():
                if guarded:
                    current, _ = self._read(key, self._ttl_for(key))
                    if current is not None and self.is_success(current):
                        return False
                os.replace(temp, self._file(key))
                return True
        finally:
            _unlink_quietly(temp)  # left only when not renamed

    def _delete(self, key: str) -> None:
        _unlink_quietly(self._file(key))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            shutil.rmtree(self._map_dir(key))

    def _incr(self, key: str, ttl: float | None) -> int:
        """Add one to a counter file; the caller holds the lock."""
        raw, _ = self._read(key, ttl)
        try:
            count = int(raw or 0) + 1
        except ValueError as exc:
            raise BackendCorrupted(f"counter {key} in {self.path} is not a number") from exc
        self._replace(key, str(count).encode(), ttl)
        return count

    def _add_field(self, key: str, field: str, temp: str, ttl: float | None) -> bool:
        """Move ``temp`` into the map of ``key`` unless ``field`` is there; the caller
        holds the lock."""
        directory = self._map_dir(key)
        try:
            mtime = os.stat(directory).st_mtime
        except FileNotFoundError:
            os.mkdir(directory)
        else:
            if self._expired(directory, mtime, ttl):
                shutil.rmtree(directory)
                os.mkdir(directory)
        target = os.path.join(directory, hashlib.sha256(os.fsencode(field)).hexdigest())
        if os.path.lexists(target):
            return False
        os.replace(temp, target)
        self._stamp(directory, ttl)  # each new field restarts the map's expiry
        return True

    def _get_fields(self, key: str, ttl: float | None) -> dict[str, bytes]:
        directory = self._map_dir(key)
        fields: dict[str, bytes] = {}
        try:
            if self._expired(directory, os.stat(directory).st_mtime, ttl):
                return fields
            names = os.listdir(directory)
        except FileNotFoundError:
            return fields
        for name in names:
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            field, value = _unpack_field(data, key)
            fields[field] = value
        return fields

    def _count_part(self, group_id: str, field: str, payload: bytes) -> tuple[int, int] | None:
        ttl = self.chord_expires
        temp = self._write_temp(_pack_field(field, payload), None)
        try:
            with self._locked():
                raw, _ = self._read(self.chord_key(group_id, "s"), ttl)
                if raw is None:
                    return None
                try:
                    size = int(raw)
                except ValueError as exc:
                    raise BackendCorrupted(f"chord {group_id!r} has a corrupt size") from exc
                if not self._add_field(self.chord_key(group_id, "p"), field, temp, ttl):
                    return 0, size
                return self._incr(self.chord_key(group_id, "n"), ttl), size
        finally:
            _unlink_quietly(temp)

    def _chord_reset(self, group_id: str, size: int) -> None:
        temp = self._write_temp(str(size).encode(), self.chord_expires)
        try:
            with self._locked():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self._map_dir(self.chord_key(group_id, "p")))
                _unlink_quietly(self._file(self.chord_key(group_id, "n")))
                os.replace(temp, self._file(self.chord_key(group_id, "s")))
        finally:
            _unlink_quietly(temp)

    def _cleanup_files(self) -> int:
        task_prefix = self.global_keyprefix + self.task_keyprefix
        group_prefix = self.global_keyprefix + self.group_keyprefix

        def expired(name: str, st: os.stat_result) -> bool:
            path = os.path.join(self.path, name)
            if name.startswith(task_prefix):
                return self._expired(path, st.st_mtime, self.expires)
            if name.startswith(group_prefix):
                return self._expired(path, st.st_mtime, self._ttl_for(name))
            if name.startswith("." + group_prefix):
                return self._expired(path, st.st_mtime, self._ttl_for(name[1:]))
            return False

        candidates: list[str] = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                    if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
                        # Left by a writer that died; not a result, so not counted.
                        if st.st_mtime + _STALE_TEMP <= time.time():
                            _unlink_quietly(entry.path)
                    elif expired(name, st):
                        candidates.append(name)
                except FileNotFoundError:
                    continue
        if not candidates:
            return 0
        deleted = 0
        # Under the lock, so a result rewritten since the scan is not deleted.
        with self._locked():
            for name in candidates:
                path = os.path.join(self.path, name)
                try:
                    st = os.lstat(path)
                    if not expired(name, st):
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    continue
                deleted += 1
        return deleted

    # ------------------------------------------------------------ primitives

    async def get(self, key: str) -> bytes | None:
        """See :meth:`KeyValueBackend.get`."""
        payload, _ = await self._run(self._read, key, self._ttl_for(key))
        return payload

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """See :meth:`KeyValueBackend.mget`; one thread call for the batch."""
        ttls = {self._ttl_for(k) for k in keys}
        if len(ttls) == 1:
            read = await self._run(self._read_many, keys, ttls.pop())
            return [payload for payload, _ in read]
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """See :meth:`KeyValueBackend.set`; ``ttl`` is stamped on the file."""
        await self._run(self._set, key, value, ttl, False)

    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """See :meth:`KeyValueBackend.set_guarded`; checked and renamed under the lock."""
        return await self._run(self._set, key, value, ttl, True)

    async def delete(self, key: str) -> None:
        """See :meth:`KeyValueBackend.delete`."""
        await self._run(self._delete, key)

    async def incr(self, key: str, ttl: float | None) -> int:
        """See :meth:`KeyValueBackend.incr`."""

        def incr() -> int:
            with self._locked():
                return self._incr(key, ttl)

        return await self._run(incr)

    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        """See :meth:`KeyValueBackend.add_field`; a map is a hidden directory."""

        def add() -> bool:
            temp = self._write_temp(_pack_field(field, value), None)
            try:
                with self._locked():
                    return self._add_field(key, field, temp, ttl)
            finally:
                _unlink_quietly(temp)

        return await self._run(add)

    async def get_fields(self, key: str) -> dict[str, bytes]:
        """See :meth:`KeyValueBackend.get_fields`."""
        return await self._run(self._get_fields, key, self._ttl_for(key))

    # ------------------------------------------------------------ store primitives

    def _decode(self, task_id: str, payload: bytes | None) -> Item:
        if payload is None or not self.hub.has_waiters(task_id):
            return self.decode_meta(task_id, payload)
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        cached = self._decoded.get(task_id)
        if cached is not None and cached[0] == digest:
            return cached[1]
        item = self.decode_meta(task_id, payload)
        self._decoded[task_id] = (digest, item)
        return item

    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]:
        keys = [self.task_key(t) for t in task_ids]
        read = await self._run(self._read_many, keys, self.expires)
        items = [self._decode(t, payload) for t, (payload, _) in zip(task_ids, read, strict=True)]
        for pause in _REREAD_PAUSES:
            now = time.time()
            again = [
                i
                for i, item in enumerate(items)
                if type(item) is DecodeError and now - read[i][1] < _FRESH
            ]
            if not again:
                break
            await anyio.sleep(pause)
            reread = await self._run(self._read_many, [keys[i] for i in again], self.expires)
            for i, entry in zip(again, reread, strict=True):
                read[i] = entry
                items[i] = self._decode(task_ids[i], entry[0])
        return items

    async def _write_meta(self, meta: ResultMeta) -> bool:
        payload = self.encode_meta(meta)
        written = await self.set_guarded(self.task_key(meta.task_id), payload, self.expires)
        # inotify reports this write like any other; a poller would see it late.
        if written and self._waiting_by == "polling" and self.hub.has_waiters(meta.task_id):
            self.hub.deliver(meta.task_id, self._decode(meta.task_id, payload))
        return written

    async def _chord_init(self, group_id: str, size: int) -> None:
        await self._run(self._chord_reset, group_id, size)

    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes
    ) -> tuple[int, int] | None:
        # Dedupe and count in one critical section, so it holds across processes.
        return await self._run(self._count_part, group_id, field, payload)

    async def _cleanup(self) -> int:
        """Delete expired result, group and chord files; return how many."""
        return await self._run(self._cleanup_files)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _pack_field(field: str, value: bytes) -> bytes:
    name = os.fsencode(field)
    return _FIELD_LENGTH.pack(len(name)) + name + value


def _unpack_field(data: bytes, key: str) -> tuple[str, bytes]:
    if len(data) < _FIELD_LENGTH.size:
        raise BackendCorrupted(f"a part of {key} is truncated")
    (length,) = _FIELD_LENGTH.unpack_from(data)
    end = _FIELD_LENGTH.size + length
    if len(data) < end:
        raise BackendCorrupted(f"a part of {key} is truncated")
    return os.fsdecode(data[_FIELD_LENGTH.size : end]), data[end:]
