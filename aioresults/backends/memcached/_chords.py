"""Chord counting on memcached: Celery's ``incr`` counter, made exactly-once per part.

Memcached changes one key atomically and nothing more, so counting a part once
takes several keys, each changed atomically, in an order that a redelivery can
always finish. For a chord, with ``B = <global_keyprefix>chord-unlock-<group id>``:

``B``
    Celery's counter: set to ``0`` when the chord starts (as Celery's
    ``_apply_chord_incr`` does), ``incr``-ed once per counted part.
``B.s``
    ``"<size> <epoch>"``; the epoch (new at each start) names the keys below,
    so a restarted chord forgets the parts of the last run.
``B.<epoch>.p<hash of the part id>``
    the part: ``"<count> <receipt> <claimed at>\\n"`` and its payload, created
    with ``add`` (so one delivery of a part *claims* it) with count 0, and
    given its count once counted (-1: it came after the chord was full).
``B.<epoch>.<count>``
    ``"<hash> <receipt>"``: which part got that count, created with ``add``.
    The completing call reads these to find every part.

A claiming call ``incr``-s ``B`` to get its count *k*, ``add``-s slot *k*, and
writes *k* into its claim. What a later call for the same part finds:

* a claim with a count: the part is counted; its count comes back, and
  ``own`` if the receipt is the caller's (the same call, retried);
* a claim without a count, recent: another delivery is counting it now; the
  call waits for that count (a duplicate delivered at the same moment);
* a claim without a count, older than ``claim_timeout``, or this call's own
  (its reply was lost): the claimer stopped somewhere between the claim and
  the count. The call takes the claim over (``cas``) and finishes the work:
  if a slot names the part, the count is that slot's (the claimer died after
  ``add``-ing it); if a slot below the counter stays empty for a second, the
  claimer died after its ``incr``: the slot is filled for this part; else the
  part was never counted, and is counted now.

So a part is counted once, the count never passes the size, and a redelivery
of the completing part finds the last count and completes the chord again.
What memcached cannot rule out: a claimer that stalls for longer than
``claim_timeout`` *between its claim and its ``incr``* and then resumes, while
its part is redelivered and taken over, counts that part twice (it logs a
warning when it notices). And memcached may evict keys under memory pressure:
a chord whose keys were evicted fails with :class:`~aioresults.ChordError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable

from ..._exceptions import BackendCorrupted, ChordError
from .._chords import PartCount
from .._support import Backoff
from ._client import Cluster, MemcacheConnectionError

__all__ = ["ChordCounter"]

logger = logging.getLogger("aioresults.backends")

#: How long a slot below the counter must stay empty to be deemed abandoned.
GAP_GRACE = 1.0
_ATTEMPTS = 3


def _record(count: int, receipt: str, claimed_at: int, payload: bytes) -> bytes:
    return b"%d %s %d\n" % (count, receipt.encode(), claimed_at) + payload


def _parse(value: bytes, key: str) -> tuple[int, str, int, bytes]:
    head, sep, payload = value.partition(b"\n")
    try:
        count, receipt, claimed_at = head.split()
        if not sep:
            raise ValueError("no payload")
        return int(count), receipt.decode(), int(claimed_at), payload
    except ValueError as exc:
        raise BackendCorrupted(f"chord part {key} is corrupt: {value[:60]!r}") from exc


class ChordCounter:
    """The chord keys of one backend; see the module docstring.

    :param exptime: the memcached expiry of chord keys (called at each write).
    :param claim_timeout: seconds after which an unfinished claim is taken over.
    """

    def __init__(self, cluster: Cluster, exptime: Callable[[], int], claim_timeout: float) -> None:
        self._cluster = cluster
        self._exptime = exptime
        self.claim_timeout = claim_timeout

    async def _add(self, key: str, value: bytes) -> bool:
        return await self._cluster.store(b"add", key, value, self._exptime()) == b"STORED"

    async def _set(self, key: str, value: bytes) -> None:
        await self._cluster.store(b"set", key, value, self._exptime())

    async def _size(self, base: str) -> tuple[int, str] | None:
        found = await self._cluster.get(base + ".s")
        if found is None:
            return None
        try:
            size, epoch = found.value.split()
            return int(size), epoch.decode()
        except ValueError as exc:
            raise BackendCorrupted(f"chord size {base}.s is corrupt") from exc

    # ------------------------------------------------------------ start

    async def start(self, base: str, size: int) -> None:
        """Set the counter to 0 (Celery's ``_apply_chord_incr``), then the size and
        a new epoch: the parts of an earlier run are forgotten."""
        await self._set(base, b"0")
        await self._set(base + ".s", b"%d %s" % (size, secrets.token_hex(4).encode()))

    # ------------------------------------------------------------ count

    async def count(
        self, base: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        """Count ``part_id`` once (see the module docstring); None if no chord.

        A lost connection is retried with the same receipt: the retry finds
        this call's claim and finishes what the lost attempt began.
        """
        backoff = Backoff(0.05, 0.5)
        for attempt in range(_ATTEMPTS):
            try:
                return await self._count(base, part_id, payload, receipt)
            except MemcacheConnectionError:
                if attempt == _ATTEMPTS - 1:
                    raise
                await backoff.sleep()
        raise AssertionError("unreachable")

    async def _count(
        self, base: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        sized = await self._size(base)
        if sized is None:
            return None
        size, epoch = sized
        part = _Part(base, epoch, size, part_id, receipt)
        claimed_at = int(time.time())
        if await self._add(part.key, _record(0, receipt, claimed_at, payload)):
            return await self._count_claimed(part, claimed_at, payload)
        delay = 0.002
        while True:
            item = await self._cluster.get(part.key, cas=True)
            if item is None:  # the claim expired or was evicted: claim again
                if await self._add(part.key, _record(0, receipt, claimed_at, payload)):
                    return await self._count_claimed(part, claimed_at, payload)
                continue
            count, owner, at, stored = _parse(item.value, part.key)
            if count > 0:
                return PartCount(count, size, owner == receipt)
            if count < 0:
                return PartCount(size + 1, size, owner == receipt)
            if owner == receipt:  # this call's own claim: an attempt lost its reply
                return await self._recover(part, at, stored)
            if time.time() - at >= self.claim_timeout:
                taken = _record(0, receipt, int(time.time()), stored)
                reply = await self._cluster.store(
                    b"cas", part.key, taken, self._exptime(), item.cas
                )
                if reply == b"STORED":
                    logger.warning(
                        "chord %s: part %r was claimed %d s ago and never counted; "
                        "counting it for the claimer",
                        base,
                        part_id,
                        time.time() - at,
                    )
                    return await self._recover(part, at, stored)
                continue
            # Another delivery is counting this part right now: wait for its count.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _count_claimed(
        self, part: _Part, claimed_at: int, payload: bytes
    ) -> PartCount | None:
        """Count a part this call has claimed: ``incr``, its slot, its count."""
        cluster = self._cluster
        while True:
            count = await cluster.incr(part.base)
            if count is None:
                return None  # the counter expired (or was evicted)
            if count > part.size:
                await self._set(part.key, _record(-1, part.receipt, claimed_at, payload))
                return PartCount(part.size + 1, part.size, True)
            if not await self._add(part.slot(count), part.slot_value):
                holder = await cluster.get(part.slot(count))
                if holder is None or holder.value.split()[:1] != [part.hash.encode()]:
                    # This call stalled and the slot was given to a redelivered part
                    # whose claimer had died: take the next count.
                    logger.warning(
                        "chord %s: count %d was taken over; counting again", part.base, count
                    )
                    continue
            await self._set(part.key, _record(count, part.receipt, claimed_at, payload))
            return PartCount(count, part.size, True)

    async def _recover(self, part: _Part, claimed_at: int, payload: bytes) -> PartCount | None:
        """Finish counting a part whose claimer (maybe this call) stopped midway."""
        cluster = self._cluster
        counter = await cluster.incr(part.base, 0)
        if counter is None:
            return None
        wanted = part.hash.encode()
        slots = [part.slot(k) for k in range(1, min(counter, part.size) + 1)]
        found = await cluster.get_many(slots)
        for index, key in enumerate(slots, 1):
            item = found.get(key)
            if isinstance(item, Exception):
                raise item
            if item is not None and item.value.split()[:1] == [wanted]:
                receipt = item.value.split()[1].decode()
                await self._set(part.key, _record(index, receipt, claimed_at, payload))
                return PartCount(index, part.size, receipt == part.receipt)
        gaps = [key for key in slots if key not in found]
        if gaps:
            # A count whose slot stays empty was taken by a claimer that died:
            # a claimer at work fills its slot within a round trip.
            await asyncio.sleep(GAP_GRACE)
            still = await cluster.get_many(gaps)
            for key in gaps:
                if key not in still and await self._add(key, part.slot_value):
                    index = slots.index(key) + 1
                    await self._set(part.key, _record(index, part.receipt, claimed_at, payload))
                    return PartCount(index, part.size, True)
        return await self._count_claimed(part, claimed_at, payload)

    # ------------------------------------------------------------ parts

    async def parts(self, base: str) -> list[bytes]:
        """Every counted part's payload, once each slot up to the size is filled.

        :raises ChordError: a slot stays empty for ``claim_timeout`` seconds (its
            part's worker died after its ``incr``; its redelivery fills it).
        """
        sized = await self._size(base)
        if sized is None:
            return []
        size, epoch = sized
        slots = [f"{base}.{epoch}.{k}" for k in range(1, size + 1)]
        deadline = time.monotonic() + self.claim_timeout + GAP_GRACE
        delay = 0.002
        while True:
            found = await self._cluster.get_many(slots)
            missing = [key for key in slots if key not in found]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ChordError(
                    f"chord {base}: count {slots.index(missing[0]) + 1} has no part: its "
                    "worker stopped after counting; the part's redelivery completes the chord"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        keys = []
        for key in slots:
            item = found[key]
            if isinstance(item, Exception):
                raise item
            keys.append(f"{base}.{epoch}.p{item.value.split()[0].decode()}")
        records = await self._cluster.get_many(keys)
        payloads = []
        for key in keys:
            record = records.get(key)
            if isinstance(record, Exception):
                raise record
            if record is None:
                raise ChordError(f"chord {base}: part {key} expired or was evicted")
            payloads.append(_parse(record.value, key)[3])
        return payloads


class _Part:
    """The keys of one part of one chord run."""

    __slots__ = ("base", "epoch", "hash", "key", "receipt", "size", "slot_value")

    def __init__(self, base: str, epoch: str, size: int, part_id: str, receipt: str) -> None:
        self.base = base
        self.epoch = epoch
        self.size = size
        self.receipt = receipt
        self.hash = hashlib.sha256(part_id.encode()).hexdigest()[:32]
        self.key = f"{base}.{epoch}.p{self.hash}"
        self.slot_value = f"{self.hash} {receipt}".encode()

    def slot(self, count: int) -> str:
        return f"{self.base}.{self.epoch}.{count}"
