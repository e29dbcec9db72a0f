"""ResultMeta: the record a backend stores for one task."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import types
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from . import states
from ._exceptions import DecodeError

__all__ = ["ResultMeta"]

# Celery's key order. group_id/parent_id and the extended fields are written
# only when set (or when the record they came from had them).
_OPTIONAL = ("group_id", "parent_id")
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")
_NO_EXTRA: Mapping[str, Any] = types.MappingProxyType({})
_BASIC = frozenset(("status", "result", "traceback", "children", "date_done", "task_id"))
_fromisoformat = dt.datetime.fromisoformat
_KNOWN = frozenset(
    ("status", "result", "traceback", "children", "date_done", "task_id", *_OPTIONAL, *_EXTENDED)
)

ExceptionDecoder = Callable[[Any, "str | None"], "BaseException | None"]


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime (what Celery stores)."""
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(slots=True, eq=False)
class ResultMeta:
    """The stored record of one task, with Celery's field names.

    Treat it as read-only: one instance is shared by every waiter on the task
    and cached by results. (It is not a frozen dataclass only because freezing
    makes building one several times slower, and joins build thousands.)

    For exception states (FAILURE, RETRY, REVOKED) ``result`` holds the rebuilt
    exception. ``date_done`` is set for ready states only. ``extra`` keeps any
    other stored keys (Celery's stamps, for example) so a record read and
    written back is unchanged.
    """

    task_id: str
    status: str = states.PENDING
    result: Any = None
    traceback: str | None = None
    children: list[Any] | None = None
    date_done: dt.datetime | None = None
    group_id: str | None = None
    parent_id: str | None = None
    name: str | None = None
    args: Any = None
    kwargs: Any = None
    worker: str | None = None
    retries: int | None = None
    queue: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=lambda: _NO_EXTRA)
    #: Keys the stored record had (kept so that a round trip writes the same keys).
    present: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    def __eq__(self, other: object) -> bool:
        # Field by field, but exceptions compare by type and arguments: the
        # same stored failure decodes to a new exception object each time, and
        # it must still read as "no change".
        if not isinstance(other, ResultMeta):
            return NotImplemented
        if _comparable(self) != _comparable(other):
            return False
        mine, theirs = self.result, other.result
        if isinstance(mine, BaseException) or isinstance(theirs, BaseException):
            return type(mine) is type(theirs) and mine.args == theirs.args
        return bool(mine == theirs)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def pending(cls, task_id: str) -> ResultMeta:
        """The meta of a task that has no stored record."""
        return cls(task_id=task_id)

    @property
    def state(self) -> str:
        """Alias of :attr:`status`."""
        return self.status

    @property
    def ready(self) -> bool:
        """Whether the state is final (SUCCESS, FAILURE or REVOKED)."""
        return self.status in states.READY_STATES

    @property
    def successful(self) -> bool:
        """Whether the state is SUCCESS."""
        return self.status == states.SUCCESS

    @property
    def failed(self) -> bool:
        """Whether the state is FAILURE."""
        return self.status == states.FAILURE

    def to_dict(
        self, exception_encoder: Callable[[BaseException], dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Return the dict Celery stores, keys in Celery's order, ``task_id`` last."""
        result = self.result
        if isinstance(result, BaseException):
            from ._serialization import exception_to_dict

            result = (exception_encoder or exception_to_dict)(result)
        date_done = self.date_done
        out: dict[str, Any] = {
            "status": self.status,
            "result": result,
            "traceback": self.traceback,
            "children": self.children,
            "date_done": date_done.isoformat() if date_done is not None else None,
        }
        present = self.present
        if (
            self.group_id is not None
            or self.parent_id is not None
            or self.name is not None
            or self.args is not None
            or self.kwargs is not None
            or self.worker is not None
            or self.retries is not None
            or self.queue is not None
            or (present and not present <= _BASIC)
        ):
            for key in _OPTIONAL:
                value = getattr(self, key)
                if value is not None or key in present:
                    out[key] = value
            if any(getattr(self, key) is not None or key in present for key in _EXTENDED):
                for key in _EXTENDED:
                    out[key] = getattr(self, key)
        if self.extra:
            out.update(self.extra)
        out["task_id"] = self.task_id
        return out

    def to_json(self, *, traceback: bool = False) -> dict[str, Any]:
        """A JSON-safe dict for web apps (what ``json.dumps`` and FastAPI accept).

        ``{"task_id", "state", "ready", "successful", "result", "date_done"}``,
        plus the meta fields that are set. A failure's ``result`` is
        ``{"type", "module", "message", "args"}``; dates become ISO 8601 text,
        UUIDs and decimals text, bytes text (or base64 when not UTF-8), sets
        and tuples lists, and anything else its ``repr()``.

        :param traceback: include the stored traceback text (off by default:
            it can reveal server internals to the client).
        """
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "state": self.status,
            "ready": self.ready,
            "successful": self.successful,
            "result": _jsonable(self.result),
            "date_done": self.date_done.isoformat() if self.date_done is not None else None,
        }
        if traceback:
            out["traceback"] = self.traceback
        for key in (*_OPTIONAL, *_EXTENDED):
            value = getattr(self, key)
            if value is not None:
                out[key] = _jsonable(value)
        return out

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        task_id: str | None = None,
        exception_decoder: ExceptionDecoder | None = None,
    ) -> ResultMeta:
        """Build a meta from the dict Celery stores.

        :param task_id: used when the record has no ``task_id`` key.
        :param exception_decoder: rebuilds the exception of exception states;
            defaults to :func:`aioresults._serialization.exception_from_dict`.
        :raises DecodeError: the record is not a mapping or has invalid fields.
        """
        if type(data) is not dict and not isinstance(data, Mapping):
            raise DecodeError(f"stored result must be a mapping, not {type(data).__name__}")
        get = data.get
        status = get("status", states.PENDING)
        if type(status) is not str:
            raise DecodeError("stored result has a non-string status")
        stored_id = get("task_id", task_id)
        if type(stored_id) is not str:
            raise DecodeError("stored result has no task_id")
        if task_id is not None and stored_id != task_id:
            raise DecodeError(f"the record stored for {task_id!r} names task {stored_id!r}")
        traceback = get("traceback")
        result = get("result")
        if status in states.EXCEPTION_STATES and isinstance(result, dict):
            from ._serialization import exception_from_dict

            decode = exception_decoder or exception_from_dict
            result = decode(result, traceback if isinstance(traceback, str) else None)
        date_done = get("date_done")
        if type(date_done) is str:
            try:
                date_done = dt.datetime.fromisoformat(date_done)
            except ValueError as exc:
                raise DecodeError(f"stored date_done is not ISO 8601: {date_done!r}") from exc
        elif date_done is not None and not isinstance(date_done, dt.datetime):
            raise DecodeError("stored date_done is not a date")
        # Positional, in field order: the hot path of every read.
        if data.keys() <= _BASIC:
            # Most records have only Celery's basic keys: skip the rest.
            return cls(
                stored_id, status, result, traceback, get("children"), date_done,
                None, None, None, None, None, None, None, None, _NO_EXTRA, _BASIC,
            )  # fmt: skip
        return cls(
            stored_id,
            status,
            result,
            traceback,
            get("children"),
            date_done,
            get("group_id"),
            get("parent_id"),
            get("name"),
            get("args"),
            get("kwargs"),
            get("worker"),
            get("retries"),
            get("queue"),
            _NO_EXTRA
            if data.keys() <= _KNOWN
            else {k: v for k, v in data.items() if k not in _KNOWN},
            frozenset(data),
        )


def _comparable(meta: ResultMeta) -> tuple[Any, ...]:
    return (
        meta.task_id,
        meta.status,
        meta.traceback,
        meta.children,
        meta.date_done,
        meta.group_id,
        meta.parent_id,
        meta.name,
        meta.args,
        meta.kwargs,
        meta.worker,
        meta.retries,
        meta.queue,
        meta.extra,
    )


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` with everything JSON cannot carry turned into something it can."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return (
            value if value == value and value not in (float("inf"), float("-inf")) else str(value)
        )
    if depth > 50:
        return repr(value)
    if isinstance(value, BaseException):
        remote = getattr(type(value), "remote_type", None)
        return {
            "type": remote or type(value).__qualname__,
            "module": getattr(type(value), "remote_module", None) or type(value).__module__,
            "message": str(value),
            "args": [_jsonable(a, depth + 1) for a in value.args],
        }
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    return repr(value)


_NOT_PLAIN: Any = object()


def _plain_date(data: Any, task_id: str) -> Any:
    """The parsed ``date_done`` (None if unset) of a plain SUCCESS record of
    ``task_id``: Celery's basic keys only, no other id, an ISO date or none;
    ``_NOT_PLAIN`` for any other record."""
    if type(data) is not dict or not data.keys() <= _BASIC:
        return _NOT_PLAIN
    get = data.get
    if get("status") != states.SUCCESS or get("task_id", task_id) != task_id:
        return _NOT_PLAIN
    date_done = get("date_done")
    if type(date_done) is str:
        try:
            return _fromisoformat(date_done)
        except ValueError:
            return _NOT_PLAIN  # from_dict says what is wrong
    return _NOT_PLAIN if date_done is not None else None


def plain_success(data: Any, task_id: str) -> bool:
    """Whether ``data`` is a plain SUCCESS record of ``task_id`` (Celery's basic
    keys only, no other id, an ISO date or none): one that
    :meth:`ResultMeta.from_dict` decodes without an error, its ``result`` as stored.
    """
    return _plain_date(data, task_id) is not _NOT_PLAIN


def success_from_dict(data: Any, task_id: str) -> ResultMeta | None:
    """The meta of a plain SUCCESS record of ``task_id`` (see
    :func:`plain_success`), built with nothing but the checks it needs; None
    for any other record (:meth:`ResultMeta.from_dict` reads it).

    Reads of thousands of records take this path.
    """
    date_done = _plain_date(data, task_id)
    if date_done is _NOT_PLAIN:
        return None
    get = data.get
    # Positional, in field order.
    return ResultMeta(
        task_id, states.SUCCESS, get("result"), get("traceback"), get("children"), date_done,
        None, None, None, None, None, None, None, None, _NO_EXTRA, _BASIC,
    )  # fmt: skip
