"""Reading the SQLite backend's rows: the statements and the decoding."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ... import states
from ..._exceptions import AioResultsError, DecodeError
from ..._meta import ResultMeta
from ..._serialization import Codec
from ._writer import TASK_COLUMNS

__all__ = ["SELECT_GROUP", "SELECT_TASKS", "decode_group", "decode_row", "parse_date"]

SELECT_TASKS = (
    f"SELECT {', '.join('t.' + c for c in TASK_COLUMNS)}, "
    "m.task_id IS NOT NULL, m.expires_at, m.group_id, m.parent_id, m.extra "
    "FROM celery_taskmeta AS t LEFT JOIN aioresults_meta AS m ON m.task_id = t.task_id "
    "WHERE t.task_id IN ({})"
)
SELECT_GROUP = (
    "SELECT s.result, s.date_done, g.group_id IS NOT NULL, g.expires_at "
    "FROM celery_tasksetmeta AS s LEFT JOIN aioresults_group AS g "
    "ON g.group_id = s.taskset_id WHERE s.taskset_id = ?"
)
_ROW = (*TASK_COLUMNS, "has_meta", "expires_at", "group_id", "parent_id", "extra")
_EXTENDED = ("name", "args", "kwargs", "worker", "retries", "queue")

# cleanup(): statements whose deleted rows count, then the bookkeeping ones.
CLEANUP_COUNTED = (
    # Records written by aioresults expire when their writer said.
    "DELETE FROM celery_taskmeta WHERE task_id IN "
    "(SELECT task_id FROM aioresults_meta WHERE expires_at <= :now)",
    # Celery's records expire as Celery's own cleanup() says: date_done + expires.
    "DELETE FROM celery_taskmeta WHERE date_done < :cutoff "
    "AND task_id NOT IN (SELECT task_id FROM aioresults_meta)",
    "DELETE FROM celery_tasksetmeta WHERE taskset_id IN "
    "(SELECT group_id FROM aioresults_group WHERE expires_at <= :now)",
    "DELETE FROM celery_tasksetmeta WHERE date_done < :cutoff "
    "AND taskset_id NOT IN (SELECT group_id FROM aioresults_group)",
    "DELETE FROM aioresults_chord WHERE expires_at <= :now",
)
CLEANUP_BOOKKEEPING = (
    "DELETE FROM aioresults_meta WHERE expires_at <= :now "
    "OR task_id NOT IN (SELECT task_id FROM celery_taskmeta)",
    "DELETE FROM aioresults_group WHERE expires_at <= :now "
    "OR group_id NOT IN (SELECT taskset_id FROM celery_tasksetmeta)",
    "DELETE FROM aioresults_chord_part "
    "WHERE group_id NOT IN (SELECT group_id FROM aioresults_chord)",
)


def parse_date(value: Any) -> dt.datetime | None:
    """A stored ``date_done`` (naive UTC text) as an aware datetime."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"stored date_done is not a date: {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise DecodeError(f"stored date_done is not a date: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def decode_row(values: tuple[Any, ...], codec: Codec) -> ResultMeta:
    """The meta of one row of :data:`SELECT_TASKS`."""
    row = dict(zip(_ROW, values, strict=True))
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
