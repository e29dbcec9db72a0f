"""Compare-and-swap on one blob: the Azure backend's every guarded write."""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from ..._exceptions import BackendError
from ._client import Blob, Blobs, container_missing

__all__ = ["Swapper"]

_MAX_CAS_ATTEMPTS = 100
_CACHE_SIZE = 4096


class Swapper:
    """``await swapper(key, ttl, update)``: compare-and-swap ``key``.

    ``update(live blob or None)`` gives the new payload (None: leave it as it
    is); it is uploaded on condition that the blob is still the one it was
    decided on, else the blob is read and decided again. Returns what was
    written (None if nothing).

    The first try needs no read: it assumes this backend's own last write (the
    condition fails if that is stale), or no blob at all (``If-None-Match: *``).
    A reply lost on the network makes the SDK send the request again, which
    then fails its condition (the first one did the work): the blob is read,
    and ``update`` sees its own earlier write, so it must recognise it (a
    payload equal to its own, a receipt).

    :param recreate: called when the container is missing; True to retry.
    :param ensure_open: opens the backend (the first write may come first).
    """

    def __init__(
        self,
        blobs: Blobs,
        recreate: Callable[[BaseException], Awaitable[bool]],
        ensure_open: Callable[[], Awaitable[None]],
    ) -> None:
        self._blobs = blobs
        self._recreate = recreate
        self._ensure_open = ensure_open
        # key -> the blob this backend last wrote: a compare-and-swap may skip its read.
        self._written: OrderedDict[str, Blob] = OrderedDict()
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def forget(self, key: str) -> None:
        self._written.pop(key, None)

    def forget_all(self) -> None:
        self._written.clear()

    def _remember(self, key: str, blob: Blob) -> None:
        self._written.pop(key, None)
        self._written[key] = blob
        if len(self._written) > _CACHE_SIZE:
            self._written.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        """Serialise this backend's own writes to ``key``: they would only make
        each other's conditions fail."""
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def __call__(
        self,
        key: str,
        ttl: float | None,
        update: Callable[[Blob | None], bytes | None],
        *,
        force: bool = False,
    ) -> bytes | None:
        """See the class docstring; ``force`` writes unconditionally."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        await self._ensure_open()
        blobs = self._blobs
        async with self._lock(key):
            current, fresh = self._written.get(key), False
            recreated = False
            for attempt in range(_MAX_CAS_ATTEMPTS):
                with blobs.errors.translating(f"writing {key}"):
                    value = update(current if current is not None and current.live() else None)
                    if value is None and not fresh and not force:
                        current, fresh = await self._read(key), True
                        continue
                    if value is None:
                        return None
                    try:
                        if force:
                            blob = await blobs.put(key, value, ttl)
                        else:
                            blob = await blobs.put(
                                key,
                                value,
                                ttl,
                                etag=None if current is None else current.etag,
                                create=current is None,
                            )
                    except (HttpResponseError, ResourceNotFoundError) as exc:
                        if not recreated and await self._recreate(exc):
                            recreated = True
                            current, fresh = None, True
                            continue
                        if container_missing(exc):
                            raise  # (not created again): says so, not "gave up"
                        # 404: the blob to replace is gone; 409/412: it changed.
                        if getattr(exc, "status_code", None) not in (404, 409, 412):
                            raise
                        if fresh or current is not None:
                            blobs.stats["conflicts"] += 1
                            # Jitter keeps writers that collided from colliding again.
                            await anyio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
                        current, fresh = await self._read(key), True
                        continue
                self._remember(key, blob)
                return value
        raise BackendError(f"writing {key}: gave up after {_MAX_CAS_ATTEMPTS} conflicts")

    async def _read(self, key: str) -> Blob | None:
        blob = await self._blobs.fetch(key)
        return blob if isinstance(blob, Blob) else None
