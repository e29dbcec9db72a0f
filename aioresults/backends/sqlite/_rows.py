"""The SQLite backend's rows: the statements, and records to and from rows.

A record is one ``celery_taskmeta`` row: Celery's columns, and aioresults'
own (:data:`~._schema.OWN_COLUMNS`: the expiry its writer set, and what Celery
has no column for). Writes run in the writer's thread, as one statement or in
a transaction begun with ``BEGIN IMMEDIATE`` (the write lock is held from the
start, so what a write checks stays true until it commits).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ... import states
from ..._meta import ResultMeta
from ..._serialization import Codec, exception_to_dict
from .._chords import PartCount
from .._sql._rows import TASK_COLUMNS, decode_group, decode_row, parse_date
from ._schema import OWN_COLUMNS

__all__ = [
    "DATE_FORMAT",
    "SELECT_GROUP",
    "SELECT_TASKS",
    "TASK_COLUMNS",
    "Expired",
    "SuccessFound",
    "Write",
    "chunks",
    "count_part",
    "decode_group",
    "decode_row",
    "format_date",
    "marks",
    "most_rows",
    "parse_date",
    "store_each",
    "store_many",
    "store_one",
]

#: Ids per read: SQLite's default limit of bound parameters is 999 on old builds.
CHUNK = 900
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's DATETIME text on SQLite: naive UTC
#: ``aioresults_expires_at`` of a record that never expires.
_NEVER = float("inf")

# ---------------------------------------------------------------- reading

SELECT_TASKS = (
    f"SELECT {', '.join(TASK_COLUMNS)}, aioresults_expires_at IS NOT NULL, "
    "aioresults_expires_at, aioresults_group_id, aioresults_parent_id, aioresults_extra "
    "FROM celery_taskmeta WHERE task_id IN ({})"
)
SELECT_GROUP = (
    "SELECT s.result, s.date_done, g.group_id IS NOT NULL, g.expires_at "
    "FROM celery_tasksetmeta AS s LEFT JOIN aioresults_group AS g "
    "ON g.group_id = s.taskset_id WHERE s.taskset_id = ?"
)

# cleanup(): statements whose deleted rows count, then the bookkeeping ones.
CLEANUP_COUNTED = (
    # Records written by aioresults expire when their writer said.
    "DELETE FROM celery_taskmeta WHERE aioresults_expires_at <= :now",
    # Celery's records expire as Celery's own cleanup() says: date_done + expires.
    "DELETE FROM celery_taskmeta WHERE date_done < :cutoff AND aioresults_expires_at IS NULL",
    "DELETE FROM celery_tasksetmeta WHERE taskset_id IN "
    "(SELECT group_id FROM aioresults_group WHERE expires_at <= :now)",
    "DELETE FROM celery_tasksetmeta WHERE date_done < :cutoff "
    "AND taskset_id NOT IN (SELECT group_id FROM aioresults_group)",
    "DELETE FROM aioresults_chord WHERE expires_at <= :now",
)
CLEANUP_BOOKKEEPING = (
    "DELETE FROM aioresults_group WHERE expires_at <= :now "
    "OR group_id NOT IN (SELECT taskset_id FROM celery_tasksetmeta)",
    "DELETE FROM aioresults_chord_part "
    "WHERE group_id NOT IN (SELECT group_id FROM aioresults_chord)",
)


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def marks(n: int) -> str:
    return ", ".join("?" * n)


def format_date(value: dt.datetime) -> str:
    """``value`` as :data:`DATE_FORMAT` text, in UTC."""
    if value.tzinfo is not None:
        if value.tzinfo is not dt.UTC:
            value = value.astimezone(dt.UTC)
        value = value.replace(tzinfo=None)
    if value.year < 1000:  # strftime does not pad such a year to four digits
        return value.strftime(DATE_FORMAT)
    # The same text as strftime(DATE_FORMAT), at less than half its cost.
    text = value.isoformat(" ")
    return text if value.microsecond else text + ".000000"


# ---------------------------------------------------------------- writing

#: The columns of a written row, in the order of :attr:`Write.row`.
COLUMNS = (*TASK_COLUMNS, *OWN_COLUMNS)
_UPSERT = (
    f"INSERT INTO celery_taskmeta ({', '.join(COLUMNS)}) "
    f"VALUES ({marks(len(COLUMNS))}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:] if c != "stamps")
    # Celery keeps stamps it has when a write brings none.
    + ", stamps = coalesce(excluded.stamps, celery_taskmeta.stamps)"
)
#: Stores unless a SUCCESS is there; the row count says which happened.
UPSERT_GUARDED = _UPSERT + " WHERE celery_taskmeta.status IS NOT 'SUCCESS'"
#: What decides whether a stored SUCCESS has expired (then it is replaced).
_SELECT_GUARD = (
    "SELECT date_done, aioresults_expires_at IS NOT NULL, aioresults_expires_at "
    "FROM celery_taskmeta WHERE task_id = ?"
)
_VALUES = f"({marks(len(COLUMNS))})"
_upserts: dict[int, str] = {}

#: Whether a stored record has expired: (aioresults wrote it, its deadline,
#: the stored ``date_done``, now).
Expired = Callable[[Any, Any, Any, float], bool]


def most_rows(conn: sqlite3.Connection) -> int:
    """The most rows one multi-row upsert may carry on ``conn``: a power of two,
    within the connection's limit of bound parameters (999 on old builds)."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return 1 << max(0, min(6, (limit // len(COLUMNS)).bit_length() - 1))


class Write:
    """One record to write, as its row, and the future its caller awaits.

    Encoded here, in the caller's call: an error is the caller's alone, and
    the record is the value as it was when the caller stored it.
    """

    __slots__ = ("future", "row", "status", "task_id")

    def __init__(self, meta: ResultMeta, codec: Codec, expires: float | None) -> None:
        encode = codec.encode
        result = meta.result
        if isinstance(result, BaseException):
            result = exception_to_dict(result)
        extra = meta.extra
        stamps = None
        if extra:
            extra = dict(extra)
            headers = extra.pop("stamped_headers", None)
            if headers:
                stamped = {h: extra.pop(h) for h in list(headers) if h in extra}
                stamps = encode({"stamped_headers": headers, "stamps": stamped})
        self.task_id = meta.task_id
        self.status = meta.status
        self.row = (  # in COLUMNS order
            meta.task_id,
            meta.status,
            encode(result),
            None if meta.date_done is None else format_date(meta.date_done),
            meta.traceback,
            encode(meta.children) if meta.children else None,
            meta.name,
            None if meta.args is None else encode(meta.args),
            None if meta.kwargs is None else encode(meta.kwargs),
            meta.worker,
            meta.retries,
            meta.queue,
            stamps,
            _NEVER if expires is None else time.time() + expires,
            meta.group_id,
            meta.parent_id,
            encode(extra) if extra else None,
        )
        self.future: asyncio.Future[bool] | None = None


class SuccessFound(Exception):
    """:func:`store_many` met a stored SUCCESS: roll back and use :func:`store_each`."""


def store_one(write: Write, conn: sqlite3.Connection) -> bool:
    """Write one record with one statement, its own transaction; False if a
    SUCCESS is there (then nothing was written, and :func:`store_each`, in a
    transaction, decides whether it expired)."""
    return conn.execute(UPSERT_GUARDED, write.row).rowcount == 1


def store_many(writes: list[Write], most: int, conn: sqlite3.Connection) -> list[bool]:
    """Write a batch of distinct ids with a few multi-row statements of up to
    ``most`` rows (one sqlite3 step each, so the thread lets go of the GIL a
    few times, not once per row). Raises :class:`SuccessFound` if a SUCCESS is
    stored for one of them: nothing is decided for that batch here."""
    cursor = conn.cursor()
    for chunk in _sized(writes, most):
        cursor.execute(_upsert_rows(len(chunk)), [v for w in chunk for v in w.row])
        if cursor.rowcount != len(chunk):
            raise SuccessFound
    return [True] * len(writes)


def store_each(writes: list[Write], expired: Expired, conn: sqlite3.Connection) -> list[bool]:
    """Write a batch row by row; which were written.

    A SUCCESS already stored, and not expired, is never overwritten; neither is
    one written earlier in the same batch.
    """
    cursor = conn.cursor()
    execute = cursor.execute
    written: list[bool] = []
    protected: set[str] = set()
    now = 0.0
    for write in writes:
        task_id = write.task_id
        if task_id in protected:
            written.append(False)
            continue
        execute(UPSERT_GUARDED, write.row)
        if cursor.rowcount != 1:  # a SUCCESS is there: replaced only if it expired
            if not now:
                now = time.time()  # after BEGIN IMMEDIATE, which may have waited
            found = execute(_SELECT_GUARD, (task_id,)).fetchone()
            if found is None or not expired(found[1], found[2], found[0], now):
                written.append(False)
                protected.add(task_id)
                continue
            execute(_UPSERT, write.row)
        written.append(True)
        if write.status == states.SUCCESS:
            protected.add(task_id)
    return written


def _sized(items: list[Write], most: int) -> Iterator[list[Write]]:
    """``items`` in chunks of power-of-two sizes up to ``most``."""
    start = 0
    while start < len(items):
        size = min(most, 1 << ((len(items) - start).bit_length() - 1))
        yield items[start : start + size]
        start += size


def _upsert_rows(n: int) -> str:
    sql = _upserts.get(n)
    if sql is None:
        sql = _upserts[n] = UPSERT_GUARDED.replace(_VALUES, ", ".join([_VALUES] * n), 1)
    return sql


def count_part(
    group_id: str, field: str, payload: bytes, receipt: str, conn: sqlite3.Connection
) -> PartCount | None:
    """Count a chord part once (in the current transaction, under the write lock)."""
    row = conn.execute(
        "SELECT size, count, expires_at FROM aioresults_chord WHERE group_id = ?", (group_id,)
    ).fetchone()
    if row is None or (row[2] is not None and row[2] <= time.time()):
        return None
    size = int(row[0])
    found = conn.execute(
        "SELECT count, receipt FROM aioresults_chord_part WHERE group_id = ? AND field = ?",
        (group_id, field),
    ).fetchone()
    if found is not None:
        # A part counted by schema 1 has no count: it never completes again.
        return PartCount(int(found[0] or 0), size, found[1] == receipt)
    if int(row[1]) >= size:
        return PartCount(size + 1, size, False)
    (count,) = conn.execute(
        "UPDATE aioresults_chord SET count = count + 1 WHERE group_id = ? RETURNING count",
        (group_id,),
    ).fetchone()
    conn.execute(
        "INSERT INTO aioresults_chord_part VALUES (?, ?, ?, ?, ?)",
        (group_id, field, payload, count, receipt),
    )
    return PartCount(int(count), size, True)


# ---------------------------------------------------------------- groups, chords, cleanup
# (each runs in the writer's thread, inside a transaction)


def save_group(
    group_id: str, payload: bytes, now: str, deadline: float | None, conn: sqlite3.Connection
) -> None:
    conn.execute(
        "INSERT INTO celery_tasksetmeta (taskset_id, result, date_done) VALUES (?, ?, ?) "
        "ON CONFLICT (taskset_id) DO UPDATE SET result = excluded.result, "
        "date_done = excluded.date_done",
        (group_id, payload, now),
    )
    conn.execute("INSERT OR REPLACE INTO aioresults_group VALUES (?, ?)", (group_id, deadline))


def delete_group(group_id: str, conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM celery_tasksetmeta WHERE taskset_id = ?", (group_id,))
    conn.execute("DELETE FROM aioresults_group WHERE group_id = ?", (group_id,))


def start_chord(group_id: str, size: int, deadline: float | None, conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM aioresults_chord_part WHERE group_id = ?", (group_id,))
    conn.execute(
        "INSERT OR REPLACE INTO aioresults_chord VALUES (?, ?, 0, ?)", (group_id, size, deadline)
    )


def clean(params: dict[str, Any], conn: sqlite3.Connection) -> int:
    """Delete what expired; how many records and groups went."""
    deleted = sum(max(conn.execute(sql, params).rowcount, 0) for sql in CLEANUP_COUNTED)
    for sql in CLEANUP_BOOKKEEPING:
        conn.execute(sql, params)
    return deleted
