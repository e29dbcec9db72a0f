"""Celery's ``celery_taskmeta`` rows: a record as the values of its columns, and back.

Payloads are encoded with the backend's codec, as Celery's database backend
encodes them; ``date_done`` is naive UTC; Celery's stamps go to its ``stamps``
column. What Celery has no column for (expiry, group and parent ids, other
fields) goes to aioresults' own ``aioresults_meta`` row beside it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ... import states
from ..._exceptions import AioResultsError, DecodeError
from ..._meta import ResultMeta
from ..._serialization import Codec, exception_to_dict
from .._support import expires_at

__all__ = [
    "META_COLUMNS",
    "ROW",
    "TASK_COLUMNS",
    "Write",
    "candidates",
    "decode_group",
    "decode_row",
    "naive_utc",
    "parse_date",
    "settle",
]

#: Celery 5.7's ``celery_taskmeta`` columns (but ``id``), in the order rows are written.
TASK_COLUMNS = (
    "task_id status result date_done traceback children name args kwargs worker retries queue "
    "stamps".split()
)
#: ``aioresults_meta``'s columns (but ``task_id``).
META_COLUMNS = ("expires_at", "group_id", "parent_id", "extra")
#: The shape of a record as read: Celery's columns, then whether aioresults
#: wrote it, then its own columns.
ROW = (*TASK_COLUMNS, "has_meta", *META_COLUMNS)
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")


def naive_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as Celery's columns hold it: naive, in UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def parse_date(value: Any) -> dt.datetime | None:
    """A stored ``date_done`` (naive UTC, as a datetime or text) as an aware datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError(f"stored date_done is not a date: {value!r}") from exc
    if not isinstance(value, dt.datetime):
        raise DecodeError(f"stored date_done is not a date: {value!r}")
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class Write:
    """One record to write: the values of Celery's columns and of aioresults' own."""

    __slots__ = ("date_done", "result", "side", "status", "task_id", "values")

    def __init__(self, meta: ResultMeta, codec: Codec, expires: float | None) -> None:
        encode = codec.encode
        result = meta.result
        if isinstance(result, BaseException):
            result = exception_to_dict(result)
        extra = dict(meta.extra)
        stamps = None
        headers = extra.pop("stamped_headers", None)
        if headers:  # Celery's stamps column: {"stamped_headers": [...], "stamps": {...}}
            stamped = {h: extra.pop(h) for h in list(headers) if h in extra}
            stamps = encode({"stamped_headers": headers, "stamps": stamped})
        self.task_id = meta.task_id
        self.status = meta.status
        self.result = encode(result)
        self.date_done = None if meta.date_done is None else naive_utc(meta.date_done)
        #: In :data:`TASK_COLUMNS` order.
        self.values: list[Any] = [
            meta.task_id,
            meta.status,
            self.result,
            self.date_done,
            meta.traceback,
            encode(meta.children) if meta.children else None,
            meta.name,
            None if meta.args is None else encode(meta.args),
            None if meta.kwargs is None else encode(meta.kwargs),
            meta.worker,
            meta.retries,
            meta.queue,
            stamps,
        ]
        #: In :data:`META_COLUMNS` order.
        self.side: tuple[Any, ...] = (
            expires_at(expires),
            meta.group_id,
            meta.parent_id,
            encode(extra) if extra else None,
        )

    def same_record(self, other: Write) -> bool:
        """Whether ``other`` stores the same state, value and time (a retry of this one)."""
        return (self.status, self.result, self.date_done) == (
            other.status,
            other.result,
            other.date_done,
        )


def candidates(batch: Sequence[Write]) -> dict[str, Write]:
    """The one write per id a batch sends: the first SUCCESS, else the last write.

    Applied one after the other, the writes of one id before its first SUCCESS
    are each overwritten by the next, and those after it refused: the store
    holds what the candidate holds. A batch is one transaction, so no reader
    could have seen the others anyway.
    """
    chosen: dict[str, Write] = {}
    for write in batch:
        first = chosen.get(write.task_id)
        if first is None or first.status != states.SUCCESS:
            chosen[write.task_id] = write
    return chosen


def settle(
    batch: Sequence[Write], chosen: Mapping[str, Write], stored: Collection[str]
) -> list[bool]:
    """Each write's answer, given the ids whose candidate the store now holds
    (written, or found already there): the writes up to the candidate are
    stored (each in turn), the later ones only if they are the same record."""
    passed: set[str] = set()
    answers = []
    for write in batch:
        candidate = chosen[write.task_id]
        if write.task_id not in stored:
            answers.append(False)
        elif write.task_id in passed:
            answers.append(write.same_record(candidate))
        else:
            answers.append(True)
        if write is candidate:
            passed.add(write.task_id)
    return answers


def decode_row(values: Sequence[Any], codec: Codec) -> ResultMeta:
    """The meta of one record read in the :data:`ROW` shape."""
    row = dict(zip(ROW, values, strict=True))
    task_id = row["task_id"]

    def decoded(column: str) -> Any:
        raw = row[column]
        return None if raw is None else codec.decode(raw)

    try:
        data: dict[str, Any] = {
            "status": row["status"] or states.PENDING,
            "result": decoded("result"),
            "traceback": row["traceback"],
            "children": decoded("children"),
            "date_done": parse_date(row["date_done"]),
        }
        data.update({k: row[k] for k in ("group_id", "parent_id") if row[k] is not None})
        if any(row[k] is not None for k in _EXTENDED):
            data.update({k: decoded(k) if k in ("args", "kwargs") else row[k] for k in _EXTENDED})
        stamps = decoded("stamps")
        if isinstance(stamps, dict):  # Celery's {"stamped_headers": [...], "stamps": {...}}
            if "stamped_headers" in stamps:
                data["stamped_headers"] = stamps["stamped_headers"]
            if isinstance(stamps.get("stamps"), dict):
                data.update(stamps["stamps"])
        extra = decoded("extra")
        if isinstance(extra, dict):
            data.update(extra)
        data["task_id"] = task_id
        return ResultMeta.from_dict(data, task_id, codec.exception_from_dict)
    except AioResultsError:
        raise
    except Exception as exc:  # a hostile payload must not take the reader down
        raise DecodeError(f"cannot decode the result of {task_id!r}: {exc}") from exc


def decode_group(group_id: str, payload: bytes, codec: Codec) -> list[Any]:
    """A saved group's tuple (Celery's database backend stores it bare)."""
    data = codec.decode(payload)
    if isinstance(data, dict) and isinstance(data.get("result"), list):
        data = data["result"]  # the key-value backends' wrapper, if copied here
    if not isinstance(data, list):
        raise DecodeError(f"saved group {group_id!r} is not in Celery's format")
    return data
