"""MemoryBackend: results kept in this process (``memory://``).

For tests and single-process apps. Waits are pushed: a store wakes its waiters
directly. ``memory://`` gives a private store; ``memory://name`` shares the
store called ``name`` with every other backend in the process that uses it.
Runs on any event loop anyio supports (asyncio, trio).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .base import KeyValueBackend

__all__ = ["MemoryBackend"]

_Value = tuple[Any, "float | None"]  # (bytes or dict of fields, monotonic expiry)


class _Store:
    def __init__(self) -> None:
        self.data: dict[str, _Value] = {}
        self.listeners: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()


_named_stores: dict[str, _Store] = {}


class MemoryBackend(KeyValueBackend):
    """Results in process memory; see the module docstring.

    :param name: share the store of this name; None (default) for a private one.
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, *, name: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        if name is None:
            self._store = _Store()
        else:
            self._store = _named_stores.setdefault(name, _Store())
        self._store.listeners.add(self)
        self.name = name

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryBackend:
        """``memory://`` (private store) or ``memory://name`` (shared by name)."""
        parts = urlsplit(url)
        name = (parts.netloc + parts.path).strip("/") or None
        return cls(url=url, name=name, **options)

    # ------------------------------------------------------------ primitives

    def _live(self, key: str) -> Any:
        entry = self._store.data.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and expires_at <= time.monotonic():
            del self._store.data[key]
            return None
        return value

    @staticmethod
    def _deadline(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    async def get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._store.data[key] = (value, self._deadline(ttl))
        self._notify(key, value)

    async def set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        # No await between the check and the write: atomic on the event loop.
        current = self._live(key)
        if isinstance(current, bytes) and self.is_success(current):
            return False
        await self.set(key, value, ttl)
        return True

    async def delete(self, key: str) -> None:
        self._store.data.pop(key, None)

    async def incr(self, key: str, ttl: float | None) -> int:
        current = self._live(key)
        count = int(current or 0) + 1
        self._store.data[key] = (str(count).encode(), self._deadline(ttl))
        return count

    async def add_field(self, key: str, field: str, value: bytes, ttl: float | None) -> bool:
        fields = self._live(key)
        if not isinstance(fields, dict):
            fields = {}
            self._store.data[key] = (fields, self._deadline(ttl))
        if field in fields:
            return False
        fields[field] = value
        return True

    async def get_fields(self, key: str) -> dict[str, bytes]:
        fields = self._live(key)
        return dict(fields) if isinstance(fields, dict) else {}

    async def _cleanup(self) -> int:
        now = time.monotonic()
        expired = [k for k, (_, at) in self._store.data.items() if at is not None and at <= now]
        for key in expired:
            del self._store.data[key]
        return len(expired)

    def _notify(self, key: str, value: bytes) -> None:
        for backend in list(self._store.listeners):
            prefix = backend.global_keyprefix + backend.task_keyprefix
            if key.startswith(prefix):
                task_id = key[len(prefix) :]
                if backend.hub.has_waiters(task_id):
                    backend.hub.deliver(task_id, backend.decode_meta(task_id, value))
