"""BaseBackend: the one class a backend author subclasses; its docstrings are the contract.

The public half (:meth:`~BaseBackend.store_result`, :meth:`~BaseBackend.get_many`,
:meth:`~BaseBackend.waiter`, groups, chords, :meth:`~BaseBackend.aclose`) is
written once here: id checks, building records, the state rules, expiry
options, the waiter hub, chord outcomes. A store supplies the private half,
the primitives marked *store primitive* below, and nothing else:

========================  ==================================================
``_open``, ``_close``     connect and release (once, lazily)
``_read_raw``             read records in one batch, as the store holds them
``_decode``               turn one raw record into a :class:`ResultMeta`
``_write_meta``           write a record unless a SUCCESS is stored, atomically
``_forget``               delete a record
``_save_group`` & co.     keep a group's tuple
``_chord_start``          set a chord's size
``_chord_count``          count one part once, atomically (see :class:`PartCount`)
``_chord_parts``          every stored part of a chord
``_feed``                 how the store tells about changes (or None: polling)
``_cleanup``              delete expired records (optional)
========================  ==================================================

See the "Writing a backend" page of the documentation for a walk-through.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Self

from .. import states
from .._exceptions import (
    AioResultsError,
    ConfigurationError,
    DecodeError,
    InvalidTaskId,
)
from .._meta import ResultMeta, utcnow
from .._protocols import ChordProgress
from .._serialization import DEFAULT_MAX_VALUE_SIZE, Codec
from .._worker import WorkerMixin
from ._chords import PartCount, chord_outcome, encode_part
from ._feeds import wake_siblings
from ._hub import Waiter
from ._lifecycle import Lifecycle, WaitStats
from ._support import redact_url, seconds

__all__ = [
    "DEFAULT_EXPIRES",
    "BaseBackend",
    "ChordProgress",
    "PartCount",
    "WaitStats",
    "redact_url",
    "validate_id",
]

logger = logging.getLogger("aioresults.backends")

#: One day, as Celery's ``result_expires``.
DEFAULT_EXPIRES = 86400.0
MAX_ID_LENGTH = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT: Any = object()
_META_FIELDS = frozenset(
    ("group_id", "parent_id", "name", "args", "kwargs", "worker", "retries", "queue", "children")
)


def validate_id(task_id: object, what: str = "task id") -> str:
    """Return ``task_id`` as a string, or raise :class:`~aioresults.InvalidTaskId`.

    An id is a non-empty string (a :class:`uuid.UUID` is accepted) of at most
    255 characters that encodes to UTF-8 (no lone surrogates) and holds no NUL
    or other control character.
    """
    if type(task_id) is not str:
        if isinstance(task_id, uuid.UUID):
            return str(task_id)
        if not isinstance(task_id, str):
            raise InvalidTaskId(f"{what} must be a string, not {type(task_id).__name__}")
        task_id = str(task_id)
    if task_id.isascii():
        if task_id.isprintable() and 0 < len(task_id) <= MAX_ID_LENGTH:
            return task_id  # the common case, checked in two C calls
    else:
        try:
            task_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTaskId(f"{what} {task_id!r} does not encode to UTF-8") from None
    if not task_id:
        raise InvalidTaskId(f"{what} must not be empty")
    if len(task_id) > MAX_ID_LENGTH:
        raise InvalidTaskId(f"{what} is {len(task_id)} characters; the limit is {MAX_ID_LENGTH}")
    if _CONTROL.search(task_id):
        raise InvalidTaskId(f"{what} {task_id!r} contains NUL or control characters")
    return task_id


class BaseBackend(Lifecycle, WorkerMixin, ABC):
    """Shared behaviour of every backend; subclasses supply the store primitives.

    Every public method is a coroutine (but :meth:`waiter`) and may raise
    :class:`~aioresults.BackendUnavailable` when the store cannot be reached,
    :class:`~aioresults.InvalidTaskId` for an id no backend may store (before
    any store is touched), and :class:`~aioresults.BackendClosed` once the
    backend is closed.

    :param expires: seconds (or a timedelta) to keep results; None or 0 keeps
        them forever. One day by default.
    :param chord_expires: seconds to keep chord counters; defaults to ``expires``.
    :param serializer: ``"json"`` (default), ``"msgpack"`` or ``"pickle"``.
    :param accept: serializers allowed on read; pickle only when named here.
    :param compression: compress written payloads (``"zlib"``, ``"bzip2"``, ``"lzma"``).
    :param max_value_size: the largest encoded value, in bytes (512 MiB by default).
    :param known_exceptions: exception classes that decode as themselves.
    :param poll_interval: where waits are polled, the first pause between polls.
    :param max_poll_interval: polling backs off up to this many seconds while
        nothing changes.
    :param create: create what the store needs (a file, a directory, tables, a
        container) when it is missing. With False, opening a store that is not
        there raises :class:`~aioresults.StoreNotFound` instead, and nothing
        is created (what a tool that only looks at results wants).
    :param url: the URL shown (redacted) in ``repr()``; backends set it.
    """

    #: The URL schemes this backend serves; :func:`~aioresults.register_backend`
    #: registers them when given the class alone.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Wake the waiters of other backends on the same store in this process
    #: after each write (stores whose own notifications are slower or absent).
    local_wake: ClassVar[bool] = False

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
        poll_interval: float | None = None,
        max_poll_interval: float | None = None,
        create: bool = True,
    ) -> None:
        self.url = url
        self.expires = seconds(expires, "expires")
        self.chord_expires = (
            self.expires if chord_expires is _DEFAULT else seconds(chord_expires, "chord_expires")
        )
        self.codec = Codec(
            serializer,
            accept=accept,
            compression=compression,
            max_value_size=max_value_size,
            known_exceptions=known_exceptions,
        )
        #: Whether a missing store is created (see ``create``).
        self.create = bool(create)
        self._init_lifecycle(poll_interval, max_poll_interval)
        self._receipt_prefix = os.urandom(8).hex() + "-"
        self._receipts = itertools.count()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} url={redact_url(self.url)!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Create a backend from its URL; backends override this to parse it."""
        return cls(url=url, **options)

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
        """Store ``result`` in ``state`` for ``task_id``; waiters for it wake.

        A stored SUCCESS is never overwritten; the check is atomic in the store.
        ``fields`` are the optional meta fields (``group_id``, ``parent_id``,
        ``name``, ``args``, ``kwargs``, ``worker``, ``retries``, ``queue``,
        ``children``).

        :returns: True if this call's record is stored (also when a retry after
            a lost reply finds it there), False if a SUCCESS was already there.
        :raises SerializationError: the value cannot be encoded.
        :raises ResultTooLarge: the encoded value exceeds ``max_value_size``.
        """
        task_id = self._check_id(task_id)
        if not isinstance(state, str) or not state:
            raise ConfigurationError("state must be a non-empty string")
        if fields:
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
        if not self._opened:
            await self._ensure_open()
        written = await self._write_meta(meta)
        if written and self.local_wake and self._sibling_key is not None:
            wake_siblings(self._sibling_key, [task_id])
        return written

    # ------------------------------------------------------------ reading

    async def get_meta(self, task_id: str) -> ResultMeta:
        """Return the stored record; PENDING when there is none (or it expired).

        :raises DecodeError: the stored payload is corrupt.
        :raises ContentDisallowed: it uses a serializer not in ``accept``.
        """
        return (await self.get_many([task_id]))[0]

    async def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta]:
        """Return the records of ``task_ids`` in order, in one batch where the store allows.

        :raises DecodeError: a stored payload is corrupt (the first one met).
        """
        ids, raws = await self._read_checked(task_ids)
        return self._decode_many(ids, raws)

    async def _read_values(
        self, task_ids: Sequence[str]
    ) -> tuple[Sequence[Any], list[Any], list[ResultMeta | None]]:
        """A join's batched read: ``(raws, values, metas)``, in ``task_ids`` order.

        Where ``metas[i]`` is None, the record is a plain SUCCESS that was only
        parsed: ``values[i]`` is its value and ``raws[i]`` the record as the
        store gave it, which :meth:`_decode` turns into its meta if anyone asks
        (a finished set of thousands then keeps no object per member). Every
        other record is decoded into ``metas[i]``.

        :raises DecodeError: a stored payload is corrupt (the first one met).
        """
        if type(self).get_many is not BaseBackend.get_many:
            # A subclass's own reads (a cache, metrics) are what a join uses.
            read: list[ResultMeta | None] = list(await self.get_many(task_ids))
            return [None] * len(read), [None] * len(read), read
        ids, raws = await self._read_checked(task_ids)
        values, metas = self._split_values(ids, raws)
        return raws, values, metas

    async def _read_checked(self, task_ids: Sequence[str]) -> tuple[list[str], Sequence[Any]]:
        ids = [self._check_id(t) for t in task_ids]
        if not ids:
            return ids, []
        if not self._opened:
            await self._ensure_open()
        return ids, await self._read_raw(ids)

    def _split_values(
        self, task_ids: Sequence[str], raws: Sequence[Any]
    ) -> tuple[list[Any], list[ResultMeta | None]]:
        """``(values, metas)`` of raw records, as :meth:`_read_values` returns
        them. This one decodes every record; a store whose records parse into
        Celery's dict cheaply leaves the plain SUCCESS ones undecoded."""
        metas: list[ResultMeta | None] = list(self._decode_many(task_ids, raws))
        return [None] * len(metas), metas

    def _decode_many(self, task_ids: Sequence[str], raws: Sequence[Any]) -> list[ResultMeta]:
        """The metas of raw records read for ``task_ids`` (None: PENDING; an
        exception: raised). A store may override it with a faster loop."""
        decode = self._decode
        out = []
        for task_id, raw in zip(task_ids, raws, strict=True):
            if raw is None:
                out.append(ResultMeta.pending(task_id))
            elif isinstance(raw, Exception):
                raise raw
            else:
                out.append(decode(task_id, raw))
        return out

    def waiter(self, task_ids: Iterable[str], *, ready_only: bool = False) -> Waiter:
        """A watch on ``task_ids`` (see :class:`~aioresults._protocols.Watch`).

        Entering registers the watch before reading the store, so no result
        stored afterwards is missed. Records then arrive through ``next()``:
        first what the read found, then every change. With ``ready_only``,
        records of ids that have none yet (PENDING) are not delivered.
        """
        ids = [self._check_id(t) for t in task_ids]
        opener = None if self._opened else self._ensure_open
        return self._hub.waiter(ids, ready_only=ready_only, opener=opener)

    async def forget(self, task_id: str) -> None:
        """Delete the record of ``task_id``. Idempotent: a missing record is not an error."""
        task_id = self._check_id(task_id)
        await self._ensure_open()
        await self._forget(task_id)

    # ------------------------------------------------------------ groups

    async def save_group(self, group_id: str, group: list[Any]) -> None:
        """Store a group's tuple (``[[group_id, parent], [member tuples]]``) as Celery does."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        await self._save_group(group_id, group)

    async def restore_group(self, group_id: str) -> list[Any] | None:
        """Return a saved group's tuple, or None if it was never saved or expired."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        return await self._restore_group(group_id)

    async def delete_group(self, group_id: str) -> None:
        """Delete a saved group. Idempotent."""
        group_id = self._check_id(group_id, "group id")
        await self._ensure_open()
        await self._delete_group(group_id)

    # ------------------------------------------------------------ chords

    async def set_chord_size(self, group_id: str, size: int) -> None:
        """Start counting a chord of ``size`` header parts (resets a previous count)."""
        group_id = self._check_id(group_id, "group id")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigurationError("chord size must be a positive integer")
        await self._ensure_open()
        await self._chord_start(group_id, size)

    async def chord_part_return(
        self, group_id: str, task_id: str, state: str, value: Any, *, index: int | None = None
    ) -> ChordProgress:
        """Count one header part of a chord; idempotent by part.

        A part is (``group_id``, ``task_id``, and ``index`` when given). It is
        counted once however often it is delivered; a call retried after a
        lost reply is recognised as the same call. The call that counts the
        last part reports ``complete=True`` with the header results (in header
        order: by ``index`` when every part has one, else by the saved group's
        order, else by arrival); so does any redelivery of that part, so the
        chord never hangs. No other part ever does. A failed part counts too:
        the chord completes with a failure outcome.

        :raises ChordError: the chord has no size (never set, or expired).
        """
        group_id = self._check_id(group_id, "group id")
        task_id = self._check_id(task_id)
        await self._ensure_open()
        part_id = task_id if index is None else f"{task_id}:{index}"
        payload = encode_part(self.codec, task_id, index, state, value)
        # A receipt per call: unique to this backend (a random prefix) and call.
        receipt = f"{self._receipt_prefix}{next(self._receipts):x}"
        counted = await self._chord_count(group_id, part_id, payload, receipt)
        return await chord_outcome(self, group_id, task_id, counted)

    # ------------------------------------------------------------ housekeeping

    async def cleanup(self) -> int:
        """Delete expired records; return how many (0 where the store expires them itself)."""
        await self._ensure_open()
        return await self._cleanup()

    # ------------------------------------------------------------ store primitives

    @abstractmethod
    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        """*Store primitive.* Read records in one batch: per id, the record as
        the store holds it (anything comparable with ``==``: a payload, a row),
        None if there is none or it expired, or the exception reading that one
        id raised. Equal raw records must decode to equal metas."""

    @abstractmethod
    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        """*Store primitive.* Decode one raw record (never None).

        :raises DecodeError: it is corrupt (any other exception is wrapped as one).
        """

    @abstractmethod
    async def _write_meta(self, meta: ResultMeta) -> bool:
        """*Store primitive.* Write ``meta`` unless a SUCCESS is stored, in one
        atomic step; make its waiters' feed see it. Return whether this call's
        record is stored (True also when a retry finds its own earlier write)."""

    @abstractmethod
    async def _forget(self, task_id: str) -> None:
        """*Store primitive.* Delete a record; a missing one is not an error."""

    @abstractmethod
    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        """*Store primitive.* Store a group tuple (replacing one of that id)."""

    @abstractmethod
    async def _restore_group(self, group_id: str) -> list[Any] | None:
        """*Store primitive.* A saved group tuple, or None."""

    @abstractmethod
    async def _delete_group(self, group_id: str) -> None:
        """*Store primitive.* Delete a saved group; a missing one is not an error."""

    @abstractmethod
    async def _chord_start(self, group_id: str, size: int) -> None:
        """*Store primitive.* Record a chord's size and forget its counted parts
        (kept ``chord_expires`` seconds)."""

    @abstractmethod
    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        """*Store primitive.* Count one part, once, in one atomic step.

        If ``part_id`` is new, store ``payload`` and ``receipt`` with it and
        give it the next count; else leave everything as it is. Either way,
        return the part's count and whether ``receipt`` is the one stored with
        it (a retry of the call that counted it). A retry of this very call
        (same ``receipt``) must find its earlier write. The count never passes
        the size. None if the chord has no size.
        """

    @abstractmethod
    async def _chord_parts(self, group_id: str) -> list[bytes]:
        """*Store primitive.* Every stored part payload of a chord."""

    async def _cleanup(self) -> int:
        """*Store primitive.* Delete expired records; return how many (optional)."""
        return 0

    def _decode_payload(self, task_id: str, payload: Any) -> ResultMeta:
        """Decode a payload in Celery's format (a helper for ``_decode``)."""
        try:
            return ResultMeta.from_dict(
                self.codec.decode(payload), task_id, self.codec.exception_from_dict
            )
        except AioResultsError:
            raise
        except Exception as exc:  # a hostile payload must not take the reader down
            raise DecodeError(f"cannot decode the result of {task_id!r}: {exc}") from exc
