"""Chord counting on NATS KV: one key per chord, changed only by conditional writes.

A chord is the key ``chord-unlock-.<group id>`` holding
``{"size": n, "parts": {<hash of the part id>: [count, receipt], ...}}`` and,
for each part, ``chord-part-.<group id>.<hash>`` holding its value. Counting a
part stores its value first (``create``: the first delivery's value stays),
then reads the chord key and writes it back with the part added, on condition
that its revision is still the one read (``update(..., last=revision)``); a
write that loses the race reads and tries again. So a part is counted once, in
one atomic step, and the count never passes the size.

A later call for a counted part finds its count and receipt: ``own`` when the
receipt is the call's own, i.e. a retry after a lost reply. That retry happens
here too: a conditional write whose answer does not come in time is followed
by a read, which finds the part counted if the write landed. Starting a chord
again purges the values of its earlier parts.

The chord key grows by about 60 bytes per part, so a chord holds at most about
15,000 parts under NATS's default 1 MiB message limit, and every count
rewrites it: very large chords with many concurrent workers are slow here.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import nats.errors

from ..._exceptions import BackendCorrupted, ChordError
from .._chords import PartCount
from ._bucket import Bucket, WrongRevision

__all__ = ["ChordStore"]

_MAX_ATTEMPTS = 100
_LOST_REPLIES = 3


class ChordStore:
    """The chords of one bucket; see the module docstring.

    :param ttl: the expiry of chord keys (called at each write).
    """

    def __init__(self, bucket: Bucket, ttl: Callable[[], float | None]) -> None:
        self._bucket = bucket
        self._ttl = ttl

    async def start(self, key: str, parts: str, size: int) -> None:
        """Forget the values under ``parts`` (a subject filter), then set the size."""
        await self._bucket.purge(parts)
        state = json.dumps({"size": size, "parts": {}}).encode()
        await self._bucket.write(key, state, self._ttl())

    async def count(
        self, key: str, part_key: str, part: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        """Count ``part`` (its hash) once; None if the chord has no size."""
        bucket = self._bucket
        # The value first: a counted part always has its value stored.
        try:
            await bucket.write(part_key, payload, self._ttl(), 0)
        except WrongRevision:
            pass  # a delivery of this part stored it already
        lost = 0
        for attempt in range(_MAX_ATTEMPTS):
            entry = await bucket.read(key)
            current = entry.live() if entry is not None else None
            if entry is None or current is None:
                return None
            try:
                state = json.loads(current)
                size, parts = int(state["size"]), state["parts"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BackendCorrupted(f"chord {key} has a corrupt count") from exc
            found = parts.get(part)
            if found is not None:
                return PartCount(int(found[0]), size, found[1] == receipt)
            if len(parts) >= size:
                return PartCount(size + 1, size, False)
            parts[part] = [len(parts) + 1, receipt]
            try:
                await bucket.write(key, json.dumps(state).encode(), self._ttl(), entry.revision)
            except WrongRevision:
                if attempt >= 2:  # spread out writers that keep colliding
                    await asyncio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.05)))
                continue
            except nats.errors.TimeoutError:
                # Its answer was lost: the next read tells whether it landed.
                lost += 1
                if lost > _LOST_REPLIES:
                    raise
                continue
            return PartCount(len(parts), size, True)
        raise ChordError(f"chord {key}: gave up after {_MAX_ATTEMPTS} conflicts")

    async def parts(self, key: str, part_key: Callable[[str], str]) -> list[bytes]:
        """Every counted part's value."""
        bucket = self._bucket
        entry = await bucket.read(key)
        current = entry.live() if entry is not None else None
        if current is None:
            return []
        parts = list(json.loads(current)["parts"])
        found = await bucket.read_many([part_key(p) for p in parts])
        payloads = []
        for part, item in zip(parts, found, strict=True):
            if isinstance(item, Exception):
                raise item
            value = item.live() if item is not None else None
            if value is None:
                raise ChordError(f"chord {key}: the value of part {part} is gone")
            payloads.append(value)
        return payloads
