"""KeyValueBackend: the base of stores that keep each record under a key, as Celery does."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from .. import states
from .._exceptions import AioResultsError, DecodeError
from .._meta import ResultMeta, plain_success, success_from_dict
from .._serialization import COMPRESSED_MAGIC
from .base import BaseBackend

__all__ = ["KeyValueBackend"]


class KeyValueBackend(BaseBackend):
    """A backend over a key-value store, with Celery's key names.

    A subclass writes the key-value primitives ``_get``, ``_set``,
    ``_set_guarded`` and ``_delete`` (and ``_mget`` when the store can batch
    reads), plus the chord primitives of :class:`BaseBackend`; records,
    groups and reads are done here in their terms.

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
        """The key of a chord's bookkeeping (``.s`` size, ``.p`` parts, ...)."""
        return f"{self.group_key(group_id)}.{suffix}"

    # ------------------------------------------------------------ key-value primitives

    @abstractmethod
    async def _get(self, key: str) -> bytes | None:
        """*Store primitive.* The value at ``key``, or None (missing or expired)."""

    async def _mget(self, keys: Sequence[str]) -> Sequence[bytes | None | Exception]:
        """*Store primitive.* The values at ``keys`` in order (or the error reading
        one); override to batch."""
        return [await self._get(key) for key in keys]

    @abstractmethod
    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        """*Store primitive.* Store ``value`` at ``key``, expiring after ``ttl``
        seconds (None: never)."""

    @abstractmethod
    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        """*Store primitive.* Like ``_set``, unless the stored record is SUCCESS
        (see :meth:`is_success`), checked and written atomically. Returns whether
        ``value`` is stored (True if a retry finds exactly ``value`` there)."""

    @abstractmethod
    async def _delete(self, key: str) -> None:
        """*Store primitive.* Delete ``key``; a missing key is not an error."""

    def is_success(self, payload: bytes) -> bool:
        """Whether a stored payload is a SUCCESS record (False if unreadable)."""
        if b"SUCCESS" not in payload and not payload.startswith(COMPRESSED_MAGIC):
            return False  # the common case, without decoding
        try:
            data = self.codec.decode(payload)
        except AioResultsError:
            return False
        return isinstance(data, dict) and data.get("status") == states.SUCCESS

    # ------------------------------------------------------------ records

    def encode_meta(self, meta: ResultMeta) -> bytes:
        """Encode a meta as Celery stores it."""
        return self.codec.encode(meta.to_dict())

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        return await self._mget([self.task_key(t) for t in task_ids])

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        return self._decode_payload(task_id, raw)

    def _decode_many(self, task_ids: Sequence[str], raws: Sequence[Any]) -> list[ResultMeta]:
        if type(self)._decode is not KeyValueBackend._decode:
            return super()._decode_many(task_ids, raws)
        metas: list[Any] = self._parse_many(task_ids, raws, lazy=False)[1]
        return metas  # lazy=False: every record decoded

    def _split_values(
        self, task_ids: Sequence[str], raws: Sequence[Any]
    ) -> tuple[list[Any], list[ResultMeta | None]]:
        if type(self)._decode is not KeyValueBackend._decode:
            return super()._split_values(task_ids, raws)
        return self._parse_many(task_ids, raws, lazy=True)

    def _parse_many(
        self, task_ids: Sequence[str], raws: Sequence[Any], lazy: bool
    ) -> tuple[list[Any], list[ResultMeta | None]]:
        """``_decode_payload`` of each record, inlined (reads and joins of
        thousands take this loop); with ``lazy``, a plain SUCCESS record is only
        parsed, as :meth:`_split_values` returns it."""
        decode, from_dict = self.codec.decode, ResultMeta.from_dict
        exceptions = self.codec.exception_from_dict
        values: list[Any] = []
        metas: list[ResultMeta | None] = []
        for task_id, raw in zip(task_ids, raws, strict=True):
            if raw is None:
                values.append(None)
                metas.append(ResultMeta.pending(task_id))
                continue
            if isinstance(raw, Exception):
                raise raw
            try:
                data = decode(raw)
                if lazy and plain_success(data, task_id):
                    values.append(data["result"])
                    metas.append(None)
                else:
                    values.append(None)
                    plain = None if lazy else success_from_dict(data, task_id)
                    metas.append(plain or from_dict(data, task_id, exceptions))
            except AioResultsError:
                raise
            except Exception as exc:  # a hostile payload must not take the reader down
                raise DecodeError(f"cannot decode the result of {task_id!r}: {exc}") from exc
        return values, metas

    async def _write_meta(self, meta: ResultMeta) -> bool:
        return await self._set_guarded(
            self.task_key(meta.task_id), self.encode_meta(meta), self.expires
        )

    async def _forget(self, task_id: str) -> None:
        await self._delete(self.task_key(task_id))

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        await self._set(
            self.group_key(group_id), self.codec.encode({"result": group}), self.expires
        )

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        payload = await self._get(self.group_key(group_id))
        if payload is None:
            return None
        data = self.codec.decode(payload)
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise DecodeError(f"saved group {group_id!r} is not in Celery's format")
        result: list[Any] = data["result"]
        return result

    async def _delete_group(self, group_id: str) -> None:
        await self._delete(self.group_key(group_id))

    # ------------------------------------------------------------ deprecated spellings

    async def get(self, key: str) -> bytes | None:
        """Deprecated since 0.2 (it read as ``result.get()``): a raw key read."""
        _deprecated("get")
        await self._ensure_open()
        return await self._get(key)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Deprecated since 0.2: raw key reads."""
        _deprecated("mget")
        await self._ensure_open()
        values = await self._mget(keys)
        for value in values:
            if isinstance(value, Exception):
                raise value
        return list(values)  # type: ignore[arg-type]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Deprecated since 0.2: a raw key write."""
        _deprecated("set")
        await self._ensure_open()
        await self._set(key, value, ttl)

    async def delete(self, key: str) -> None:
        """Deprecated since 0.2: a raw key delete."""
        _deprecated("delete")
        await self._ensure_open()
        await self._delete(key)


def _deprecated(name: str) -> None:
    warnings.warn(
        f"KeyValueBackend.{name}() is private since 0.2 (_{name}); use the result API",
        DeprecationWarning,
        stacklevel=3,
    )
