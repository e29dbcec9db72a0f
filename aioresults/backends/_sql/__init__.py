"""What the SQL backends share: Celery's database tables as rows, and the flow around them.

Celery's database backend (``db+postgresql://``, ``db+mysql://``) keeps a task's
record in ``celery_taskmeta``, one column per field (payloads as blobs, a naive
UTC ``date_done``), and a group's tuple in ``celery_tasksetmeta``. The SQL
backends read and write those tables as Celery does, so either side reads what
the other wrote. What Celery has no column for lives in tables of aioresults'
own beside them, which Celery never looks at:

=========================  =====================================================
``aioresults_meta``        per task written by aioresults: when it expires,
                           group and parent ids, any other field
``aioresults_group``       per group saved by aioresults: when it expires
``aioresults_chord``       per chord: its size and count
``aioresults_chord_part``  per counted part: its count, the receipt of the call
                           that counted it, its payload
``aioresults_schema``      the version of this layout
=========================  =====================================================

A record written by aioresults expires when its writer said; one written by
Celery when Celery's own ``cleanup()`` would delete it: ``date_done`` plus the
reader's ``expires``.

:class:`SQLBackend` is the dialect-free half of the PostgreSQL and MySQL
backends: records as rows, expiry, group commit (concurrent writes travel
together, one row per id), retries after a lost connection, Celery's table
names. A dialect supplies the statements.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from ..._exceptions import BackendError, ConfigurationError, InvalidTaskId, ResultTooLarge
from ..._meta import ResultMeta
from .._support import Backoff, ErrorTable, expires_at
from ..base import BaseBackend
from ._names import URL_OPTIONS, Names, boolean, parse_url, take_options
from ._rows import (
    META_COLUMNS,
    ROW,
    TASK_COLUMNS,
    Write,
    candidates,
    decode_group,
    decode_row,
    naive_utc,
    parse_date,
    settle,
)

__all__ = [
    "META_COLUMNS",
    "ROW",
    "TASK_COLUMNS",
    "URL_OPTIONS",
    "Names",
    "SQLBackend",
    "Write",
    "boolean",
    "parse_url",
    "take_options",
]

logger = logging.getLogger("aioresults.backends")

T = TypeVar("T")

#: Celery's ``task_id`` and ``taskset_id`` are ``VARCHAR(155)``.
MAX_ID_LENGTH = 155


class SQLBackend(BaseBackend):
    """The dialect-free half of the SQL backends; see the module docstring.

    :param pool_size: the most connections the backend holds for reads and
        other operations (a dialect may keep one more for writes or waits).
    :param table_names: Celery's ``database_table_names``: ``{"task": ...,
        "group": ...}``.
    :param table_schemas: Celery's ``database_table_schemas``, with the same keys.
    :param retries: attempts after a lost connection or a deadlock (0.05 s
        back-off doubling to 1 s) before an operation raises
        :class:`~aioresults.BackendUnavailable`.
    :param command_timeout: seconds a statement, or making a connection, may
        take before it counts as a lost connection (None: for ever).
    :param max_batch: the most writes committed in one transaction.
    :param options: the options of :class:`~aioresults.BaseBackend`.
    """

    #: The character that quotes identifiers, and their longest length.
    quote_char: ClassVar[str]
    identifier_limit: ClassVar[int]

    _errors: ErrorTable

    def __init__(
        self,
        *,
        pool_size: int = 10,
        table_names: Mapping[str, str] | None = None,
        table_schemas: Mapping[str, str] | None = None,
        retries: int = 5,
        command_timeout: float | None = 10.0,
        max_batch: int = 500,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError("pool_size must be a positive integer")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError("retries must be a non-negative integer")
        if command_timeout is not None and not command_timeout > 0:
            raise ConfigurationError("command_timeout must be a positive number of seconds")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigurationError("max_batch must be a positive integer")
        self.pool_size = pool_size
        self.retries = retries
        self.command_timeout = command_timeout
        self.names = Names.build(table_names, table_schemas, self.quote_char, self.identifier_limit)
        #: Bytes each of Celery's columns holds, where the store caps them (MySQL's BLOB).
        self._limits: dict[str, tuple[int, str]] = {}
        self._writes = self._batcher(self._commit, "sql writes", max_size=max_batch)

    # ------------------------------------------------------------ dialect hooks

    @abstractmethod
    def _transient(self, exc: BaseException) -> bool:
        """Whether a driver error is worth another attempt (a lost connection,
        a deadlock, a server starting up)."""

    @abstractmethod
    async def _select_rows(self, task_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """The rows of ``task_ids`` that exist, in the :data:`ROW` shape."""

    @abstractmethod
    async def _store_rows(self, writes: Sequence[Write]) -> Collection[str]:
        """Write records of distinct ids in one transaction, each unless a
        SUCCESS is stored; return the ids whose record the store now holds
        (written, or found there already). Make their waiters' feed see them."""

    @abstractmethod
    async def _select_group(self, group_id: str) -> tuple[Any, ...] | None:
        """``(result, date_done, has_own, expires_at)`` of a saved group, or None."""

    @abstractmethod
    async def _store_group(
        self, group_id: str, payload: bytes, date_done: dt.datetime, deadline: float | None
    ) -> None:
        """Insert or replace a group's row, and its expiry."""

    @abstractmethod
    async def _delete_expired(self, now: float, cutoff: dt.datetime | None) -> int:
        """Delete what expired (rows of aioresults by their deadline, Celery's
        with a ``date_done`` before ``cutoff``); return how many records."""

    # ------------------------------------------------------------ shared

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        checked = super()._check_id(task_id, what)
        if len(checked) > MAX_ID_LENGTH:
            raise InvalidTaskId(
                f"{what} is {len(checked)} characters; Celery's tables hold {MAX_ID_LENGTH}"
            )
        return checked

    async def _attempt(self, doing: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``, its driver errors translated; again after a transient one."""
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                with self._errors.translating(doing):
                    return await operation()
            except BackendError as exc:
                cause = exc.__cause__
                if cause is None or backoff.attempts >= self.retries:
                    raise
                if not self._transient(cause):
                    raise
                logger.info("%r: %s; trying again", self, exc)
                await backoff.sleep()

    def _expired(self, has_meta: Any, deadline: Any, date_done: Any, now: float) -> bool:
        if has_meta:  # written by aioresults: its writer chose the expiry
            return deadline is not None and deadline <= now
        if self.expires is None or not isinstance(date_done, dt.datetime):
            return False  # Celery's: expires as its cleanup() would delete it
        done = parse_date(date_done)
        return done is not None and done.timestamp() + self.expires <= now

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        unique = list(dict.fromkeys(task_ids))
        rows = await self._attempt("reading results", lambda: self._select_rows(unique))
        now = time.time()
        has_meta = len(TASK_COLUMNS)
        found: dict[str, tuple[Any, ...]] = {}
        for row in rows:
            if not self._expired(row[has_meta], row[has_meta + 1], row[3], now):
                # Keyed by the stored id: a case-insensitive collation (MySQL)
                # may answer for an id that differs.
                found[row[0]] = row
        return [found.get(t) for t in task_ids]

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        return decode_row(raw, self.codec)

    def _fit(self, column: str, value: Any, what: str) -> Any:
        """``value`` if its column holds it; a traceback is cut to fit (its end
        kept); anything else raises :class:`~aioresults.ResultTooLarge`."""
        limit, kind = self._limits[column]
        data = value.encode("utf-8") if isinstance(value, str) else value
        if len(data) <= limit:
            return value
        if column == "traceback":
            marker = "[... cut to fit the traceback column ...]\n"
            keep = data[len(data) - limit + len(marker.encode()) :]
            return marker + keep.decode("utf-8", "ignore")
        table, name = (
            (self.names.group_name, "result")
            if column == "group"
            else (self.names.task_name, column)
        )
        raise ResultTooLarge(
            f"the encoded {what} is {len(data):,} bytes, but its column {table}.{name} "
            f"({kind.upper()}) holds {limit:,}: nothing was written. Store less, or widen "
            f"the column (Celery reads it the same): ALTER TABLE {table} MODIFY {name} "
            f"LONG{kind.upper()}"
        )

    def _adapt(self, write: Write) -> None:
        """Make ``write`` fit the store's columns (see :meth:`_fit`)."""
        for index, column in enumerate(TASK_COLUMNS):
            if column in self._limits and write.values[index] is not None:
                what = f"{column} of {write.task_id!r}"
                write.values[index] = self._fit(column, write.values[index], what)

    async def _write_meta(self, meta: ResultMeta) -> bool:
        write = Write(meta, self.codec, self.expires)  # encoding errors are the caller's alone
        self._adapt(write)
        written: bool = await self._writes(write)
        return written

    async def _commit(self, batch: list[Write]) -> list[bool | BaseException]:
        """One transaction for the batch (one row per id); on an error that may
        be one record's, each alone, so only its caller fails."""
        chosen = candidates(batch)
        rows = sorted(chosen.values(), key=lambda w: w.task_id)  # one lock order for all
        try:
            stored = await self._attempt("storing results", lambda: self._store_rows(rows))
        except BackendError as exc:
            if len(rows) == 1 or self._transient(exc.__cause__ or exc):
                raise
            answers: list[bool | BaseException] = []
            for write in batch:
                try:
                    answers.extend(await self._commit([write]))
                except BackendError as own:
                    answers.append(own)
            return answers
        return list(settle(batch, chosen, set(stored)))

    # ------------------------------------------------------------ groups

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        # Celery's database backend stores the bare tuple (no {"result": ...} wrapper).
        payload = self.codec.encode(group)
        if "group" in self._limits:
            self._fit("group", payload, f"tuple of group {group_id!r}")
        now = naive_utc(dt.datetime.now(dt.UTC))
        deadline = expires_at(self.expires)
        await self._attempt(
            "saving a group", lambda: self._store_group(group_id, payload, now, deadline)
        )

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        row = await self._attempt("restoring a group", lambda: self._select_group(group_id))
        if row is None:
            return None
        payload, date_done, has_own, deadline = row
        if payload is None or self._expired(has_own, deadline, date_done, time.time()):
            return None
        return decode_group(group_id, bytes(payload), self.codec)

    # ------------------------------------------------------------ housekeeping

    def _cutoff(self, now: float) -> dt.datetime | None:
        """Celery's records done before this (naive UTC) are expired (None: none is)."""
        if self.expires is None:
            return None
        return naive_utc(dt.datetime.fromtimestamp(now - self.expires, dt.UTC))

    async def _cleanup(self) -> int:
        now = time.time()
        return await self._attempt(
            "deleting expired results", lambda: self._delete_expired(now, self._cutoff(now))
        )
