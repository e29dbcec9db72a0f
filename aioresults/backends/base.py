"""The backend contract and the base classes that carry the shared logic.

:class:`ResultBackend` is the protocol every backend implements; its
docstrings are the specification. :class:`BaseBackend` implements it in terms
of a few store primitives (read records, write a record unless it is SUCCESS,
delete, groups, a chord's size, counted parts and parts). :class:`KeyValueBackend`
implements those primitives in terms of key-value operations (``get``,
``mget``, ``set``, ``set_guarded``, ``delete``, ``incr``, ``add_field``,
``get_fields``), so a key-value store only writes those.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
import traceback as traceback_module
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol, runtime_checkable

import anyio
import sniffio

from .. import states
from .._exceptions import (
    AioResultsError,
    BackendError,
    ChordError,
    ConfigurationError,
    DecodeError,
    InvalidTaskId,
    TaskRevokedError,
)
from .._meta import ResultMeta, utcnow
from .._serialization import DEFAULT_MAX_VALUE_SIZE, Codec, exception_to_dict
from .._worker import TaskTracker
from ._waiters import Item, Waiter, WaiterHub

__all__ = [
    "DEFAULT_EXPIRES",
    "BaseBackend",
    "ChordProgress",
    "KeyValueBackend",
    "ResultBackend",
    "redact_url",
    "validate_id",
]

logger = logging.getLogger("aioresults.backends")

#: One day, as Celery's ``result_expires``.
DEFAULT_EXPIRES = 86400.0
MAX_ID_LENGTH = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT: Any = object()


def validate_id(task_id: object, what: str = "task id") -> str:
    """Return ``task_id`` as a string, or raise :class:`InvalidTaskId`.

    An id is a non-empty string (a :class:`uuid.UUID` is accepted) of at most
    255 characters without NUL or other control characters.
    """
    if isinstance(task_id, uuid.UUID):
        task_id = str(task_id)
    if not isinstance(task_id, str):
        raise InvalidTaskId(f"{what} must be a string, not {type(task_id).__name__}")
    if not task_id:
        raise InvalidTaskId(f"{what} must not be empty")
    if len(task_id) > MAX_ID_LENGTH:
        raise InvalidTaskId(f"{what} is {len(task_id)} characters; the limit is {MAX_ID_LENGTH}")
    if not task_id.isprintable() and _CONTROL.search(task_id):
        raise InvalidTaskId(f"{what} {task_id!r} contains NUL or control characters")
    return task_id


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with passwords, account keys and signatures replaced by ``***``.

    Handles every ``scheme://user:password@host`` in the string (Sentinel URLs
    hold several) and Azure connection-string secrets.
    """
    if url is None:
        return None
    url = re.sub(r"(://[^:/@;?#]*:)[^@/;?#]*@", r"\1***@", url)
    return re.sub(
        r"(?i)((?:AccountKey|SharedAccessSignature|sig|password|key)=)[^;&]+", r"\1***", url
    )


def _seconds(value: float | dt.timedelta | None, name: str) -> float | None:
    """Normalise an expiry: None or 0 means never."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative number of seconds or None")
    return float(value) or None


@dataclass(frozen=True, slots=True)
class ChordProgress:
    """What :meth:`ResultBackend.chord_part_return` reports.

    Exactly one call per chord reports ``complete=True``; that call also gets
    the header results in header order and, if any part failed, the failure.
    """

    group_id: str
    task_id: str
    #: False when this part had already been counted (a redelivery).
    counted: bool
    #: Parts counted so far, this one included (None for a redelivery).
    count: int | None
    size: int
    complete: bool
    #: Header values in header order (exceptions for failed parts); set when complete.
    results: list[Any] | None = None
    #: Ids of the parts that failed, in header order; set when complete.
    failed_task_ids: tuple[str, ...] = ()
    #: The first failure in header order; set when complete and a part failed.
    exception: BaseException | None = None

    @property
    def failed(self) -> bool:
        """Whether the chord completed with a failed part."""
        return bool(self.failed_task_ids)


@runtime_checkable
class ResultBackend(Protocol):
    """The contract every backend implements.

    Writers (workers) store states; readers (clients) read and wait. Every
    method is a coroutine and may raise :class:`~aioresults.BackendUnavailable`
    when the store cannot be reached, and :class:`~aioresults.InvalidTaskId`
    for an id no backend may store.
    """

    async def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        **fields: Any,
    ) -> bool:
        """Store ``result`` in ``state`` for ``task_id``.

        A stored SUCCESS is never overwritten; the check is atomic in the store.
        ``fields`` are the optional meta fields (``group_id``, ``parent_id``,
        ``name``, ``args``, ``kwargs``, ``worker``, ``retries``, ``queue``,
        ``children``). Waiters for ``task_id`` wake.

        :returns: True if stored, False if a SUCCESS was already there.
        :raises SerializationError: the value cannot be encoded.
        :raises ResultTooLarge: the encoded value exceeds ``max_value_size``.
        """
        ...

    async def get_meta(self, task_id: str) -> ResultMeta:
        """Return the stored record; PENDING when there is none (or it expired).

        :raises DecodeError: the stored payload is corrupt.
        :raises ContentDisallowed: it uses a serializer not in ``accept``.
        """
        ...

    async def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta]:
        """Return the records of ``task_ids`` in order, in one batch where the store allows."""
        ...

    def waiter(self, task_ids: Iterable[str]) -> Waiter:
        """An async context manager that watches ``task_ids``.

        Entering registers the watch before reading the store, so no result
        stored afterwards is missed. ``await waiter.next()`` returns
        ``(task_id, ResultMeta or exception)``: first the record read on entry,
        then every change. Leaving ends the watch (also on cancellation).
        """
        ...

    async def forget(self, task_id: str) -> None:
        """Delete the record of ``task_id``. Idempotent: a missing record is not an error."""
        ...

    async def save_group(self, group_id: str, group: list[Any]) -> None:
        """Store a group's tuple (``[[group_id, parent], [member tuples]]``)."""
        ...

    async def restore_group(self, group_id: str) -> list[Any] | None:
        """Return a saved group's tuple, or None if it was never saved or expired."""
        ...

    async def delete_group(self, group_id: str) -> None:
        """Delete a saved group. Idempotent."""
        ...

    async def set_chord_size(self, group_id: str, size: int) -> None:
        """Start counting a chord of ``size`` header parts (resets a previous count)."""
        ...

    async def chord_part_return(
        self, group_id: str, task_id: str, state: str, value: Any, *, index: int | None = None
    ) -> ChordProgress:
        """Count one header part of a chord.

        A part (``task_id``, and ``index`` when given) counts once however often
        it is delivered. Exactly one call reports ``complete=True``, with the
        header results in header order (by ``index`` when every part has one,
        else by the saved group's order, else by arrival). A failed part counts
        too: the chord completes with a failure outcome, it never hangs.

        :raises ChordError: the chord has no size (never set, or expired).
        """
        ...

    async def cleanup(self) -> int:
        """Delete expired records; return how many were deleted (0 where the store expires them)."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks. Idempotent."""
        ...


class BaseBackend(ABC):
    """Shared behaviour of every backend; subclasses supply store primitives.

    :param url: the URL the backend was created from (shown redacted in ``repr``).
    :param expires: seconds (or a timedelta) to keep results; None or 0 keeps
        them forever. One day by default.
    :param chord_expires: seconds to keep chord counters; defaults to ``expires``.
    :param serializer: ``"json"`` (default), ``"msgpack"`` or ``"pickle"``.
    :param accept: serializers allowed on read; pickle only when named here.
    :param compression: compress written payloads (``"zlib"``, ``"bzip2"``, ``"lzma"``).
    :param max_value_size: the largest encoded value, in bytes (512 MiB by default).
    :param known_exceptions: exception classes that decode as themselves.
    """

    #: Schemes this backend serves (used by the registry).
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        url: str | None = None,
        expires: float | dt.timedelta | None = DEFAULT_EXPIRES,
        chord_expires: float | dt.timedelta | None = _DEFAULT,
        serializer: str = "json",
        accept: Sequence[str] | None = None,
        compression: str | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        known_exceptions: Iterable[type[BaseException]] = (),
    ) -> None:
        self.url = url
        self.expires = _seconds(expires, "expires")
        self.chord_expires = (
            self.expires if chord_expires is _DEFAULT else _seconds(chord_expires, "chord_expires")
        )
        self.codec = Codec(
            serializer,
            accept=accept,
            compression=compression,
            max_value_size=max_value_size,
            known_exceptions=known_exceptions,
        )
        self.hub = WaiterHub(self)
        self._opening: anyio.Event | None = None
        self._opened = False
        self._closed = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} url={redact_url(self.url)!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BaseBackend:
        """Create a backend from its URL; backends override this to parse it."""
        return cls(url=url, **options)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BaseBackend:
        if self._task_group is None and sniffio.current_async_library() != "asyncio":
            # Without asyncio's free-standing tasks, background work needs a task group.
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
        await self._ensure_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _ensure_open(self) -> None:
        while not self._opened:
            if self._closed:
                raise BackendError(f"{self!r} is closed")
            if self._opening is not None:
                # Everyone who arrived while connecting resumes together, so
                # their first waits still share one batch.
                await self._opening.wait()
                continue
            self._opening = opening = anyio.Event()
            try:
                await self._open()
                self._opened = True
            finally:
                self._opening = None
                opening.set()

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Connect to the store (called once, lazily, before the first operation)."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Release the store's connections (background tasks are already stopped)."""

    async def aclose(self) -> None:
        """Stop background tasks and release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Waiters would otherwise wait for ever: nothing feeds them any more.
        self.hub.close(BackendError(f"{self!r} was closed while waiting"))
        if self._opening is not None:
            await self._opening.wait()  # let a lazy open finish, then undo it
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise  # our own caller is being cancelled
            except Exception:
                pass  # already logged by _task_done
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            self._task_group = None
        if self._opened:
            self._opened = False
            await self._close()

    def _spawn(self, func: Any, *args: Any, name: str) -> None:
        """Run ``func(*args)`` in the background until the backend closes."""
        if self._task_group is not None:
            self._task_group.start_soon(func, *args, name=name)
            return
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                f"{type(self).__name__} runs background tasks; outside asyncio, "
                "use it as `async with backend:`"
            )
        task = asyncio.get_running_loop().create_task(func(*args), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "background task %s of %r failed", task.get_name(), self, exc_info=task.exception()
            )

    # ------------------------------------------------------------ ids

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        """Validate an id; backends with stricter rules extend this."""
        return validate_id(task_id, what)

    # ------------------------------------------------------------ writing

    async def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        *,
        traceback: str | None = None,
        **fields: Any,
    ) -> bool:
        """See :meth:`ResultBackend.store_result`."""
        task_id = self._check_id(task_id)
        if not isinstance(state, str) or not state:
            raise ConfigurationError("state must be a non-empty string")
        unknown = set(fields) - _META_FIELDS
        if unknown:
            raise TypeError(f"unknown meta fields: {', '.join(sorted(unknown))}")
        for key in ("group_id", "parent_id"):
            if fields.get(key) is not None:
                fields[key] = self._check_id(fields[key], key.replace("_", " "))
        meta = ResultMeta(
            task_id=task_id,
            status=state,
            result=result,
            traceback=traceback,
            date_done=utcnow() if state in states.READY_STATES else None,
            **fields,
        )
        await self._ensure_open()
        return await self._write_meta(meta)

    async def mark_as_started(
        self, task_id: str, meta: dict[str, Any] | None = None, **fields: Any
    ) -> bool:
        """Store STARTED; ``meta`` (e.g. ``{"pid": ..., "hostname": ...}``) is the result."""
        return await self.store_result(task_id, meta, states.STARTED, **fields)

    async def update_state(self, task_id: str, state: str, meta: Any = None, **fields: Any) -> bool:
        """Store any state (e.g. ``"PROGRESS"``) with ``meta`` as its result."""
        return await self.store_result(task_id, meta, state, **fields)

    async def mark_as_done(self, task_id: str, result: Any, **fields: Any) -> bool:
        """Store SUCCESS with ``result``."""
        return await self.store_result(task_id, result, states.SUCCESS, **fields)

    async def mark_as_failure(
        self, task_id: str, exc: BaseException, traceback: str | None = None, **fields: Any
    ) -> bool:
        """Store FAILURE with ``exc``; the traceback defaults to the exception's own."""
        return await self.store_result(
            task_id, exc, states.FAILURE, traceback=traceback or _format_tb(exc), **fields
        )

    async def mark_as_retry(
        self, task_id: str, exc: BaseException, traceback: str | None = None, **fields: Any
    ) -> bool:
        """Store RETRY with ``exc`` (not ready: waiters keep waiting)."""
        return await self.store_result(
            task_id, exc, states.RETRY, traceback=traceback or _format_tb(exc), **fields
        )

    async def mark_as_revoked(self, task_id: str, reason: str = "", **fields: Any) -> bool:
        """Store REVOKED with a :class:`~aioresults.TaskRevokedError`."""
        return await self.store_result(task_id, TaskRevokedError(reason), states.REVOKED, **fields)

    def track(
        self,
        task_id: str,
        *,
        name: str | None = None,
        args: Any = None,
        kwargs: Any = None,
        group_id: str | None = None,
        chord: str | None = None,
        index: int | None = None,
        report_worker: bool = False,
        worker: str | None = None,
    ) -> TaskTracker:
        """Track one run of a task: ``async with backend.track(task_id) as task:``.

        Stores STARTED on entry, then SUCCESS, FAILURE or REVOKED on exit; see
        :class:`~aioresults.TaskTracker` for the parameters.
        """
        return TaskTracker(
            self,
            task_id,
            name=name,
            args=args,
            kwargs=kwargs,
            group_id=group_id,
            chord=chord,
            index=index,
            report_worker=report_worker,
            worker=worker,
        )

    # ------------------------------------------------------------ reading

    async def get_meta(self, task_id: str) -> ResultMeta:
        """See :meth:`ResultBackend.get_meta`."""
        return (await self.get_many([task_id]))[0]

    async def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta]:
        """See :meth:`ResultBackend.get_many`."""
        ids = [self._check_id(t) for t in task_ids]
        if not ids:
            return []
        await self._ensure_open()
        out = []
        for item in await self._read_metas(ids):
            if isinstance(item, Exception):
                raise item
            out.append(item)
        return out

    def waiter(self, task_ids: Iterable[str]) -> Waiter:
        """See :meth:`ResultBackend.waiter`."""
        return _OpeningWaiter(self, [self._check_id(t) for t in task_ids])

    async def forget(self, task_id: str) -> None:
        """See :meth:`ResultBackend.forget`."""
        task_id = self._check_id(task_id)
        await self._ensure_open()
        await self._forget(task_id)

    # ------------------------------------------------------------ groups

    async def save_group(self, group_id: str, group: list[Any]) -> None:
        """See :meth:`ResultBackend.save_group`."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        await self._save_group(group_id, group)

    async def restore_group(self, group_id: str) -> list[Any] | None:
        """See :meth:`ResultBackend.restore_group`."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        return await self._restore_group(group_id)

    async def delete_group(self, group_id: str) -> None:
        """See :meth:`ResultBackend.delete_group`."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        await self._delete_group(group_id)

    # ------------------------------------------------------------ chords

    async def set_chord_size(self, group_id: str, size: int) -> None:
        """See :meth:`ResultBackend.set_chord_size`."""
        group_id = self._check_id(group_id, "group id")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigurationError("chord size must be a positive integer")
        await self._ensure_open()
        await self._chord_init(group_id, size)

    async def chord_part_return(
        self, group_id: str, task_id: str, state: str, value: Any, *, index: int | None = None
    ) -> ChordProgress:
        """See :meth:`ResultBackend.chord_part_return`."""
        group_id = self._check_id(group_id, "group id")
        task_id = self._check_id(task_id)
        await self._ensure_open()
        part = {
            "task_id": task_id,
            "index": index,
            "state": state,
            "result": exception_to_dict(value) if isinstance(value, BaseException) else value,
            "seq": time.time_ns(),
        }
        field = task_id if index is None else f"{task_id}:{index}"
        counted = await self._chord_count_part(group_id, field, self.codec.encode(part))
        if counted is None:
            raise ChordError(
                f"chord {group_id!r} has no size: call set_chord_size() first "
                "(or its counter expired)"
            )
        count, size = counted
        if count == 0:
            return ChordProgress(
                group_id, task_id, counted=False, count=None, size=size, complete=False
            )
        if count != size:
            if count > size:
                logger.warning("chord %s counted %d parts of %d", group_id, count, size)
            return ChordProgress(
                group_id, task_id, counted=True, count=count, size=size, complete=False
            )
        return await self._chord_outcome(group_id, task_id, size)

    async def _chord_outcome(self, group_id: str, task_id: str, size: int) -> ChordProgress:
        parts = []
        for raw in await self._chord_parts(group_id):
            try:
                part = self.codec.decode(raw)
            except AioResultsError as exc:
                raise ChordError(f"chord {group_id!r} holds a corrupt part") from exc
            parts.append(part)
        parts.sort(key=lambda p: p.get("seq", 0))
        if parts and all(isinstance(p.get("index"), int) for p in parts):
            parts.sort(key=lambda p: p["index"])
        else:
            saved = await self._restore_group(group_id)
            order = _member_ids(saved) if saved else []
            if order:
                rank = {member: i for i, member in enumerate(order)}
                parts.sort(key=lambda p: rank.get(p.get("task_id"), len(rank)))
        results: list[Any] = []
        failed: list[str] = []
        first_exc: BaseException | None = None
        for part in parts:
            value = part.get("result")
            if part.get("state") in states.EXCEPTION_STATES:
                value = self.codec.exception_from_dict(value)
            if part.get("state") in states.PROPAGATE_STATES:
                failed.append(part.get("task_id", "?"))
                if first_exc is None and isinstance(value, BaseException):
                    first_exc = value
            results.append(value)
        return ChordProgress(
            group_id,
            task_id,
            counted=True,
            count=size,
            size=size,
            complete=True,
            results=results,
            failed_task_ids=tuple(failed),
            exception=first_exc,
        )

    # ------------------------------------------------------------ housekeeping

    async def cleanup(self) -> int:
        """See :meth:`ResultBackend.cleanup`."""
        await self._ensure_open()
        return await self._cleanup()

    async def _cleanup(self) -> int:
        return 0

    # ------------------------------------------------------------ store primitives

    @abstractmethod
    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]:
        """Read records in one batch: a meta per id (PENDING if missing or
        expired), or the error decoding that id's payload."""

    @abstractmethod
    async def _write_meta(self, meta: ResultMeta) -> bool:
        """Write ``meta`` unless a SUCCESS is stored, atomically; wake its waiters.
        Return whether it was written."""

    @abstractmethod
    async def _forget(self, task_id: str) -> None:
        """Delete a record; a missing one is not an error."""

    @abstractmethod
    async def _save_group(self, group_id: str, group: list[Any]) -> None: ...

    @abstractmethod
    async def _restore_group(self, group_id: str) -> list[Any] | None: ...

    @abstractmethod
    async def _delete_group(self, group_id: str) -> None: ...

    @abstractmethod
    async def _chord_init(self, group_id: str, size: int) -> None:
        """Record a chord's size and reset its parts and counter (TTL ``chord_expires``)."""

    @abstractmethod
    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes
    ) -> tuple[int, int] | None:
        """Add a part unless ``field`` is already there and count it, atomically if
        the store can.

        :returns: ``(count, size)`` with the counter after this part, ``count``
            being 0 for a duplicate; None if the chord has no size.
        """

    @abstractmethod
    async def _chord_parts(self, group_id: str) -> list[bytes]:
        """Return every stored part payload of a chord."""

    async def _watch(self, task_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Start watching ids (e.g. SUBSCRIBE); done before the hub reads them."""

    def _unwatch(self, task_ids: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Stop watching ids that no waiter waits for any more; must not block.

        A backend that acts on this later checks :meth:`WaiterHub.has_waiters` first.
        """


_META_FIELDS = frozenset(
    ("group_id", "parent_id", "name", "args", "kwargs", "worker", "retries", "queue", "children")
)


def _format_tb(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    return "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))


def _member_ids(group: list[Any]) -> list[str]:
    """The member ids of a group tuple ``[[gid, parent], [[[id, parent], None], ...]]``."""
    try:
        return [member[0][0] for member in group[1]]
    except (TypeError, IndexError, KeyError):
        return []


class _OpeningWaiter(Waiter):
    """A waiter that connects its backend lazily before registering."""

    __slots__ = ("_backend",)

    def __init__(self, backend: BaseBackend, ids: Iterable[str]) -> None:
        super().__init__(backend.hub, ids)
        self._backend = backend

    async def __aenter__(self) -> Waiter:
        await self._backend._ensure_open()
        return await super().__aenter__()


class KeyValueBackend(BaseBackend):
    """A backend over a key-value store, with Celery's key names.

    Subclasses implement ``get``, ``set``, ``set_guarded``, ``delete``,
    ``incr``, ``add_field`` and ``get_fields`` (and ``mget`` when the store
    can batch reads).

    :param global_keyprefix: prepended to every key, as Celery's
        ``global_keyprefix`` transport option (a ``_`` is added unless it ends
        in one of ``:_-.``).
    """

    task_keyprefix: ClassVar[str] = "celery-task-meta-"
    group_keyprefix: ClassVar[str] = "celery-taskset-meta-"

    def __init__(self, *, global_keyprefix: str = "", **options: Any) -> None:
        super().__init__(**options)
        if global_keyprefix and global_keyprefix[-1] not in ":_-.":
            global_keyprefix += "_"
        self.global_keyprefix = global_keyprefix

    # ------------------------------------------------------------ keys

    def task_key(self, task_id: str) -> str:
        """The key of a task's record."""
        return f"{self.global_keyprefix}{self.task_keyprefix}{task_id}"

    def group_key(self, group_id: str) -> str:
        """The key of a saved group."""
        return f"{self.global_keyprefix}{self.group_keyprefix}{group_id}"

    def chord_key(self, group_id: str, suffix: str) -> str:
        """The key of a chord's bookkeeping: ``.s`` size, ``.p`` parts, ``.n`` counter."""
        return f"{self.group_key(group_id)}.{suffix}"

    # ------------------------------------------------------------ primitives

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """Return the value at ``key``, or None (missing or expired)."""

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return the values at ``keys`` in order; override to batch."""
        return [await self.get(key) for key in keys]

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` at ``key``, expiring after ``ttl`` seconds (None: never)."""

    @abstractmethod
    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Like :meth:`set`, unless the stored record is SUCCESS (see
        :meth:`is_success`); checked and written atomically. Returns whether it wrote."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abstractmethod
    async def incr(self, key: str, ttl: float | None) -> int:
        """Atomically add one to the integer at ``key`` (0 if missing); return the result."""

    @abstractmethod
    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        """Atomically add ``field`` to the map at ``key`` unless present; return whether added."""

    @abstractmethod
    async def get_fields(self, key: str) -> dict[str, bytes]:
        """Return the map at ``key`` (empty if missing)."""

    def is_success(self, payload: bytes) -> bool:
        """Whether a stored payload is a SUCCESS record (False if unreadable)."""
        try:
            data = self.codec.decode(payload)
        except AioResultsError:
            return False
        return isinstance(data, dict) and data.get("status") == states.SUCCESS

    # ------------------------------------------------------------ store primitives

    def decode_meta(self, task_id: str, payload: bytes | None) -> Item:
        """Decode one stored payload into a meta, or the error it raises."""
        if payload is None:
            return ResultMeta.pending(task_id)
        try:
            return ResultMeta.from_dict(
                self.codec.decode(payload), task_id, self.codec.exception_from_dict
            )
        except AioResultsError as exc:
            return exc
        except Exception as exc:  # a hostile payload must not take the reader down
            return DecodeError(f"cannot decode the result of {task_id!r}: {exc}")

    def encode_meta(self, meta: ResultMeta) -> bytes:
        """Encode a meta as Celery stores it."""
        return self.codec.encode(meta.to_dict())

    async def _read_metas(self, task_ids: Sequence[str]) -> Sequence[Item]:
        payloads = await self.mget([self.task_key(t) for t in task_ids])
        return [self.decode_meta(t, p) for t, p in zip(task_ids, payloads, strict=True)]

    async def _write_meta(self, meta: ResultMeta) -> bool:
        return await self.set_guarded(
            self.task_key(meta.task_id), self.encode_meta(meta), self.expires
        )

    async def _forget(self, task_id: str) -> None:
        await self.delete(self.task_key(task_id))

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        await self.set(self.group_key(group_id), self.codec.encode({"result": group}), self.expires)

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        payload = await self.get(self.group_key(group_id))
        if payload is None:
            return None
        data = self.codec.decode(payload)
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise DecodeError(f"saved group {group_id!r} is not in Celery's format")
        result: list[Any] = data["result"]
        return result

    async def _delete_group(self, group_id: str) -> None:
        await self.delete(self.group_key(group_id))

    async def _chord_init(self, group_id: str, size: int) -> None:
        await self.delete(self.chord_key(group_id, "p"))
        await self.delete(self.chord_key(group_id, "n"))
        await self.set(self.chord_key(group_id, "s"), str(size).encode(), self.chord_expires)

    async def _chord_count_part(
        self, group_id: str, field: str, payload: bytes
    ) -> tuple[int, int] | None:
        raw = await self.get(self.chord_key(group_id, "s"))
        if raw is None:
            return None
        size = int(raw)
        if not await self.add_field(
            self.chord_key(group_id, "p"), field, payload, self.chord_expires
        ):
            return 0, size
        return await self.incr(self.chord_key(group_id, "n"), self.chord_expires), size

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        return list((await self.get_fields(self.chord_key(group_id, "p"))).values())
