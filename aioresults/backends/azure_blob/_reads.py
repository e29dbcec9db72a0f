"""The Azure backend's reads: conditional GETs, and listings where they are cheaper."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..._exceptions import AioResultsError
from ._client import NOT_MODIFIED, Blob, Blobs, live

__all__ = ["ConditionalReads"]

logger = logging.getLogger("aioresults.backends")


def _same(etag: str, listed_etag: str) -> bool:
    # A listing gives ETags without the quotes that response headers have.
    return etag.strip('"') == listed_etag.strip('"')


class ConditionalReads:
    """Reads that remember the last blob of each watched key, so an unchanged
    one costs a ``304 Not Modified``.

    :param watched: whether a key is watched (its last blob is kept).
    :param name: names the backend in logs.
    """

    def __init__(
        self,
        blobs: Blobs,
        list_threshold: int,
        watched: Callable[[str], bool],
        name: Callable[[], str],
    ) -> None:
        self._blobs = blobs
        self._list_threshold = list_threshold
        self._watched = watched
        self._name = name
        #: key -> the last blob seen, for each watched record.
        self.seen: dict[str, Blob] = {}
        # Blobs seen by the last listing (more than its limit if it stopped early).
        self._listed_size = 0
        self._list_again_at = 0.0

    async def resolve(self, keys: list[str]) -> list[bytes | None | Exception]:
        """Read ``keys``: watched ones with conditional GETs (an unchanged blob costs
        a 304), after a listing that answers for missing and unchanged blobs when
        the batch is large and the container small."""
        listed, complete = await self._scan(keys)
        results: dict[str, Blob | None | Exception] = {}
        for key in keys:
            blob = listed.get(key)
            old = self.seen.get(key)
            if (blob is None and complete) or (blob is not None and not live(blob.metadata)):
                results[key] = None
            elif blob is not None and old is not None and _same(old.etag, blob.etag):
                results[key] = old

        async def fetch(key: str) -> None:
            old = self.seen.get(key)
            try:
                with self._blobs.errors.translating(f"reading {key}"):
                    got = await self._blobs.fetch(key, old.etag if old is not None else None)
            except AioResultsError as exc:
                results[key] = exc
            else:
                results[key] = old if got is NOT_MODIFIED else got

        await self._blobs.gather(fetch, [key for key in keys if key not in results])
        out: list[bytes | None | Exception] = []
        for key in keys:
            result = results[key]
            if isinstance(result, Exception):
                out.append(result)
                continue
            if self._watched(key):
                if result is None:
                    self.seen.pop(key, None)
                else:
                    self.seen[key] = result
            out.append(result.payload if result is not None and result.live() else None)
        return out

    async def _scan(self, keys: list[str]) -> tuple[dict[str, Any], bool]:
        """List the blobs that may hold ``keys`` if that is cheaper than a GET each:
        ``({key: listed blob}, whether the listing was complete)``."""
        # A listed blob costs about a quarter of a GET, in the client and the service.
        limit = 2 * len(keys)
        if not self._list_threshold or len(keys) < self._list_threshold:
            return {}, False
        if self._listed_size > limit and time.monotonic() < self._list_again_at:
            return {}, False
        prefix = os.path.commonprefix([self._blobs.name(key) for key in keys])
        try:
            with self._blobs.errors.translating("listing results"):
                blobs, complete = await self._blobs.list_blobs(prefix, min(limit, 5000))
        except AioResultsError as exc:
            logger.debug("%s: listing failed; reading one by one: %s", self._name(), exc)
            return {}, False
        # Too many blobs to list: do not try again for a while.
        self._listed_size = len(blobs) if complete else limit + 1
        self._list_again_at = time.monotonic() + 300.0
        return {blob.name[len(self._blobs.base_path) :]: blob for blob in blobs}, complete
