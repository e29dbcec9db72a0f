"""The filesystem backend's blocking file work, run in worker threads.

Every write goes to a hidden temporary file that is flushed to disk and
renamed over its target (or, for a new result, linked into place), so no
reader ever sees half a record. Checks that
must not race with another process run under an exclusive ``flock`` on
``<dir>/.aioresults.lock``, with one exception: a guarded write of a result
that has no file yet (the common case) is renamed into place with Linux's
``renameat2(RENAME_NOREPLACE)``, or hard-linked into place where that is
refused; both create the file only where there is none, atomically, so it
needs no lock. A write that finds a file there takes
the lock and checks it, and so does every delete, so a file a locked writer
has checked cannot go and come back before that writer is done. Expiry
deadlines live in an extended attribute where the file system has them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import stat
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ..._exceptions import BackendCorrupted, BackendError, ConfigurationError
from .._chords import PartCount

__all__ = ["ResultDirectory", "TooLarge"]

LOCK_NAME = ".aioresults.lock"
TEMP_PREFIX = ".aioresults-"
TEMP_SUFFIX = ".tmp"
#: A temporary file this old was left by a writer that died; cleanup() removes it.
_STALE_TEMP = 3600.0
#: The writer's expiry, on file systems with extended attributes: a Unix time or "never".
_XATTR = "user.aioresults.expires"
_NO_XATTRS = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM))
_LENGTH = struct.Struct(">I")
#: What :meth:`ResultDirectory.read` gives as the mtime of a file that is not there.
MISSING = float("-inf")
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: renameat2() errors that mean "not here" (the kernel, the C library or the
#: file system): such a directory links new results into place from then on.
#: (EPERM, which a sandbox may give for one call, makes that one write link.)
_NO_NOREPLACE = frozenset((errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP))
#: link() errors that mean "no hard links here" (the file system, or a security
#: policy: the temporary file was just created in the same directory, so a plain
#: permission problem would have failed that first); such a directory takes the
#: lock for every write from then on.
_NO_LINKS = frozenset(
    (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)
)
#: fsync() errors on a directory that mean "the file system does not do that"
#: (SQLite ignores those too): the names are then as safe as it makes them.
_NO_DIR_SYNC = frozenset((errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP))

if sys.platform != "win32":
    import fcntl
else:  # pragma: no cover - the backend refuses to open there
    fcntl = None


class TooLarge(Exception):
    """A file is larger than the caller wants to read here (see :meth:`ResultDirectory.read`)."""


def _load_renameat2() -> Any:
    """libc's ``renameat2``, or None (not Linux, or a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samestat(os.stat(a), os.stat(b, follow_symlinks=False))
    except OSError:
        return False


class ResultDirectory:
    """One result directory and what can be done to it (blocking calls)."""

    def __init__(
        self,
        path: str,
        max_value_size: int,
        is_success: Callable[[bytes], bool],
        full_sync: bool = False,
    ) -> None:
        self.path = path
        #: Also fsync a directory after a name in it is made or removed, so a
        #: write survives a power loss once it returns (``synchronous="FULL"``).
        self.full_sync = full_sync
        self._lock_path = os.path.join(path, LOCK_NAME)
        self._limit = max_value_size
        self._is_success = is_success
        self.xattrs = hasattr(os, "setxattr")
        #: How guarded writes of new results may skip the lock (see the module):
        #: renameat2(RENAME_NOREPLACE), else a hard link.
        self.noreplace = _renameat2 is not None
        self.links = hasattr(os, "link")

    # ------------------------------------------------------------ basics

    def prepare(self) -> None:
        """Create the directory if missing and check that it is usable."""
        missing = []  # the directories made here, deepest first
        path = self.path
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            missing.append(path)
            path = os.path.dirname(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except FileExistsError as exc:
            raise ConfigurationError(f"result path {self.path} is not a directory") from exc
        except OSError as exc:  # a parent is a file (ENOTDIR), not writable, ...
            raise ConfigurationError(
                f"cannot create result directory {self.path}: {exc.strerror or exc}"
            ) from exc
        if not os.path.isdir(self.path):
            raise ConfigurationError(f"result path {self.path} is not a directory")
        for made in reversed(missing):
            self.sync_names(os.path.dirname(made))
        try:
            os.unlink(self.write_temp(b"test", None))
            with self.locked():
                pass
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ConfigurationError(
                f"result directory {self.path} is not writable: {exc.strerror or exc}"
            ) from exc

    def sync_names(self, directory: str | None = None) -> None:
        """With :attr:`full_sync`, fsync ``directory`` (default: the result
        directory), so the names made or removed in it are on disk."""
        if not self.full_sync:
            return
        where = directory or self.path
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return  # removed since, with the names in it: nothing left to flush
        except OSError as exc:
            if exc.errno in _NO_DIR_SYNC:
                return
            # The change is made (a reader sees it), so this is not a failed
            # write: say what is not known.
            raise BackendError(
                f"the change in {where} is made, but the directory could not be "
                f"flushed to disk ({exc.strerror or exc}): it may not survive a power loss"
            ) from exc

    def file(self, key: str) -> str:
        return os.path.join(self.path, key)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's exclusive lock (across threads and processes)."""
        # A descriptor of its own per holder: flock excludes other open files,
        # including this process's other threads.
        fd = os.open(self._lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stamp(self, target: int | str, ttl: float | None) -> None:
        """Record the writer's expiry on a file, where extended attributes exist."""
        if not self.xattrs:
            return
        value = b"never" if ttl is None else f"{time.time() + ttl:.6f}".encode()
        try:
            os.setxattr(target, _XATTR, value)
        except OSError as exc:
            if exc.errno not in _NO_XATTRS:
                raise
            self.xattrs = False

    def expired(self, target: int | str, mtime: float, ttl: float | None) -> bool:
        """Whether a file has expired: by its writer's stamp, else (written by
        Celery, or no extended attributes) by its age and ``ttl``."""
        if self.xattrs:
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

    def write_temp(self, data: bytes, ttl: float | None) -> str:
        """Write ``data`` to a new hidden file in the directory, on disk; return its path."""
        path = os.path.join(self.path, f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self.stamp(fd, ttl)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        return path

    def replace(self, temp: str, key: str) -> None:
        """Rename ``temp`` over ``key`` (the caller removes ``temp`` if this fails)."""
        os.replace(temp, self.file(key))

    def create(self, temp: str, key: str) -> bool | None:
        """Give ``temp``'s file the name ``key`` only if ``key`` does not exist,
        atomically: renamed with ``renameat2(RENAME_NOREPLACE)``, or, where that
        is refused, hard-linked (``link`` never replaces a name either) and
        ``temp`` unlinked.

        :returns: True if created (``temp`` is gone), False if ``key`` exists,
            None if this directory can do neither (the caller then holds the
            lock and replaces).
        """
        target = self.file(key)
        if self.noreplace:
            if (
                _renameat2(
                    _AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
                )
                == 0
            ):
                return True
            code = ctypes.get_errno()
            if code == errno.EEXIST:
                return False
            if code in _NO_NOREPLACE:
                self.noreplace = False  # links from now on (or the lock)
            elif code != errno.EPERM:  # EPERM: a sandbox, or this file; a link may do
                raise OSError(code, os.strerror(code), target)  # ENOENT: FileNotFoundError
        if not self.links:
            return None
        try:
            os.link(temp, target)
        except FileExistsError:
            # On NFS a retransmitted link() that had succeeded answers EEXIST:
            # then the name is already this file.
            if not _same_file(temp, target):
                return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            self.links = False  # the lock alone guards writes here from now on
            return None
        # The record is stored under its new name: a temporary name that cannot
        # be removed now is left for cleanup(), not reported as a failed store.
        with contextlib.suppress(OSError):
            os.unlink(temp)
        return True

    def read(
        self, key: str, ttl: float | None, most: int | None = None
    ) -> tuple[bytes | None, float]:
        """A file's payload (None if missing, empty or expired) and its mtime
        (:data:`MISSING` if there is no file).

        :raises TooLarge: the file holds more than ``most`` bytes (when given).
        """
        try:
            fd = os.open(self.file(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, MISSING
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise BackendCorrupted(f"{key} in {self.path} is a directory")
            if most is not None and st.st_size > most:
                raise TooLarge
            if self.expired(fd, st.st_mtime, ttl):
                return None, st.st_mtime
            # A buffer of the file's size (one byte over the limit is enough for
            # the codec to refuse it), never one of the limit's.
            size = min(st.st_size, self._limit) + 1
            chunks = []
            while True:
                chunk = os.read(fd, size)
                if not chunk:
                    break
                chunks.append(chunk)
                size -= len(chunk)
                if size <= 0:
                    break
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            os.close(fd)
        # Celery treats an empty file as no record (its writer truncates first).
        return data or None, st.st_mtime

    def read_many(self, keys: list[str], ttl: float | None) -> list[tuple[bytes | None, float]]:
        return [self.read(key, ttl) for key in keys]

    def set(self, key: str, value: bytes, ttl: float | None, guarded: bool) -> bool:
        """Write a file; with ``guarded``, not over a SUCCESS (unless it is ``value``)."""
        stored = self._set(key, value, ttl, guarded)
        # Refused too: the SUCCESS found may be another writer's, not yet flushed.
        self.sync_names()
        return stored

    def _set(self, key: str, value: bytes, ttl: float | None, guarded: bool) -> bool:
        temp = self.write_temp(value, ttl)  # the slow part, outside the lock
        try:
            # Nothing stored yet, nothing to guard: created without the lock.
            if guarded and self.create(temp, key):
                return True
            with self.locked():
                if guarded:
                    current, mtime = self.read(key, ttl)
                    if mtime == MISSING:
                        # Gone since: created only where still missing, as above.
                        created = self.create(temp, key)
                        if created:
                            return True
                        if created is False:
                            # A name is there (a new record, or a dangling link
                            # that reads as missing): only locked writers can
                            # remove it now, so one more read decides.
                            current, _ = self.read(key, ttl)
                    if current is not None and current != value and self._is_success(current):
                        _unlink_quietly(temp)
                        return False
                self.replace(temp, key)
                return True
        except BaseException:
            _unlink_quietly(temp)  # not renamed
            raise

    def delete(self, key: str) -> None:
        # Under the lock: a guarded writer holding it has checked the file and
        # replaces it; were it deleted meanwhile, a write without the lock could
        # create a SUCCESS there that the replace would then overwrite.
        try:
            with self.locked():
                _unlink_quietly(self.file(key))
        except FileNotFoundError:
            return  # no directory (the lock could not be made): no file either
        self.sync_names()

    # ------------------------------------------------------------ chords

    def _parts_dir(self, group_key: str) -> str:
        # Hidden: Celery's cleanup() unlinks old entries with its prefixes and
        # would fail on a directory.
        return os.path.join(self.path, f".{group_key}.p")

    def chord_start(self, group_key: str, size: int, ttl: float | None) -> None:
        temp = self.write_temp(str(size).encode(), ttl)
        try:
            with self.locked():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self._parts_dir(group_key))
                _unlink_quietly(self.file(f"{group_key}.n"))
                self.replace(temp, f"{group_key}.s")
        finally:
            _unlink_quietly(temp)
        self.sync_names()

    def chord_count(
        self, group_key: str, part_id: str, payload: bytes, receipt: str, ttl: float | None
    ) -> PartCount | None:
        """Count a part once, under the lock.

        The counter file ``<group>.n`` holds ``"<count> <last part>"`` and is
        written *before* the part's own file, which holds its count and
        receipt. A counter whose last part never landed (the writer failed or
        died in between) is rolled back by the next count, so a part is either
        counted with its file in place, or not at all and counted on redelivery.
        """
        name = hashlib.sha256(part_id.encode()).hexdigest()
        directory = self._parts_dir(group_key)
        with self.locked():
            raw, _ = self.read(f"{group_key}.s", ttl)
            if raw is None:
                return None
            try:
                size = int(raw)
            except ValueError as exc:
                raise BackendCorrupted(f"chord {group_key} has a corrupt size") from exc
            found = self._read_part(os.path.join(directory, name))
            if found is not None:
                return PartCount(found[0], size, found[1] == receipt)
            count, last = self._read_counter(group_key, ttl)
            if last and not os.path.exists(os.path.join(directory, last)):
                count -= 1  # that part never landed: it is counted when it comes again
            if count >= size:
                return PartCount(size + 1, size, False)
            count += 1
            temp = self.write_temp(f"{count} {name}".encode(), ttl)
            try:
                self.replace(temp, f"{group_key}.n")
            finally:
                _unlink_quietly(temp)
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory)
            # With full_sync the counter is on disk before the part (the order
            # a crash relies on, see above), and so is a new parts directory.
            self.sync_names()
            # The directory is what cleanup() sees: it carries the chord's expiry
            # too, restarted by each part (else it would expire by its age alone).
            self.stamp(directory, ttl)
            header = f"{count} {receipt}\n".encode()
            temp = self.write_temp(header + _LENGTH.pack(len(payload)) + payload, ttl)
            try:
                os.replace(temp, os.path.join(directory, name))
            finally:
                _unlink_quietly(temp)
            self.sync_names(directory)
            return PartCount(count, size, True)

    def _read_counter(self, group_key: str, ttl: float | None) -> tuple[int, str]:
        raw, _ = self.read(f"{group_key}.n", ttl)
        if raw is None:
            return 0, ""
        count, _, last = raw.decode("ascii", "replace").partition(" ")
        try:
            return int(count), last
        except ValueError as exc:
            raise BackendCorrupted(f"chord counter {group_key}.n is corrupt") from exc

    @staticmethod
    def _read_part(path: str) -> tuple[int, str, bytes] | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        header, sep, rest = data.partition(b"\n")
        count, _, receipt = header.decode("ascii", "replace").partition(" ")
        if not sep or len(rest) < _LENGTH.size or not count.isdigit():
            raise BackendCorrupted(f"chord part {path} is corrupt")
        (length,) = _LENGTH.unpack_from(rest)
        return int(count), receipt, rest[_LENGTH.size : _LENGTH.size + length]

    def chord_parts(self, group_key: str) -> list[bytes]:
        directory = self._parts_dir(group_key)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        parts = []
        for name in names:
            if not name.startswith("."):
                found = self._read_part(os.path.join(directory, name))
                if found is not None:
                    parts.append(found[2])
        return parts

    # ------------------------------------------------------------ cleanup

    def cleanup(self, ttl_of: Callable[[str], float | None | Any]) -> int:
        """Delete expired files; ``ttl_of(name)`` is a file's TTL, or ``...`` for
        files that are not results. Returns how many were deleted."""

        def expired(name: str, st: os.stat_result) -> bool:
            ttl = ttl_of(name)
            return ttl is not ... and self.expired(os.path.join(self.path, name), st.st_mtime, ttl)

        candidates: list[str] = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                    if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
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
        with self.locked():
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
