"""MemoryBackend: results kept in this process (``memory://``).

For tests and single-process apps. Waits are pushed: a store hands the new
record to the waiters of every backend on that store at once. ``memory://``
gives a private store; ``memory://name`` shares the store called ``name`` with
every other backend in the process that uses it. Runs on any event loop anyio
supports (asyncio, trio).

This module is also the smallest complete backend, walked through in the
documentation's "Writing a backend" page.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import anyio

from ._chords import PartCount
from ._feeds import Feed, wake_siblings
from .keyvalue import KeyValueBackend

__all__ = ["MemoryBackend"]


class _Store:
    """One named store: values by key, each with its monotonic expiry (None: never)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[Any, float | None]] = {}


_named_stores: dict[str, _Store] = {}


class _Pushed(Feed):
    """Writes deliver their records to the hubs themselves: nothing to listen to."""

    kind = "push"

    async def session(self) -> None:
        self.resynced()
        await anyio.sleep_forever()


class MemoryBackend(KeyValueBackend):
    """Results in process memory; see the module docstring.

    :param name: share the store of this name; None (default) for a private one.
    :param options: see :class:`~aioresults.KeyValueBackend`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    runs_on: ClassVar[frozenset[str]] = frozenset({"asyncio", "trio"})

    def __init__(self, name: str | None = None, **options: Any) -> None:
        options.setdefault("url", f"memory://{name or ''}")
        super().__init__(**options)
        self.name = name
        self._store = _Store() if name is None else _named_stores.setdefault(name, _Store())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryBackend:
        """``memory://`` (private store) or ``memory://name`` (shared by name)."""
        parts = urlsplit(url)
        name = (parts.netloc + parts.path).strip("/") or None
        return cls(name, url=url, **options)

    def _feed(self) -> Feed:
        return _Pushed()

    def _store_key(self) -> object:
        return self._store

    # ------------------------------------------------------------ key-value primitives

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

    async def _get(self, key: str) -> bytes | None:
        value = self._live(key)
        return value if isinstance(value, bytes) else None

    async def _mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [v if isinstance(v := self._live(key), bytes) else None for key in keys]

    async def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._store.data[key] = (value, self._deadline(ttl))
        # Every backend on this store wakes its waiters with the record itself.
        prefix = self.global_keyprefix + self.task_keyprefix
        if key.startswith(prefix):
            wake_siblings(self._store, [key[len(prefix) :]], [value])

    async def _set_guarded(self, key: str, value: bytes, ttl: float | None) -> bool:
        # No await between the check and the write: atomic on the event loop.
        current = self._live(key)
        if isinstance(current, bytes) and current != value and self.is_success(current):
            return False
        await self._set(key, value, ttl)
        return True

    async def _delete(self, key: str) -> None:
        self._store.data.pop(key, None)

    # ------------------------------------------------------------ chords

    async def _chord_start(self, group_id: str, size: int) -> None:
        deadline = self._deadline(self.chord_expires)
        self._store.data[self.chord_key(group_id, "p")] = ({}, deadline)
        self._store.data[self.chord_key(group_id, "s")] = (size, deadline)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        # One step on the event loop: atomic.
        size = self._live(self.chord_key(group_id, "s"))
        parts = self._live(self.chord_key(group_id, "p"))
        if not isinstance(size, int) or not isinstance(parts, dict):
            return None
        found = parts.get(part_id)
        if found is not None:
            return PartCount(found[0], size, found[1] == receipt)
        if len(parts) >= size:
            return PartCount(size + 1, size, False)
        parts[part_id] = (len(parts) + 1, receipt, payload)
        return PartCount(len(parts), size, True)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        parts = self._live(self.chord_key(group_id, "p"))
        return [payload for _, _, payload in parts.values()] if isinstance(parts, dict) else []

    async def _cleanup(self) -> int:
        now = time.monotonic()
        expired = [k for k, (_, at) in self._store.data.items() if at is not None and at <= now]
        for key in expired:
            del self._store.data[key]
        return len(expired)
