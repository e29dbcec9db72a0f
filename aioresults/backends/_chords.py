"""Chord counting shared by every backend: the part record and the outcome.

A store implements one atomic primitive, ``_chord_count`` (count this part
once, by its id, and say which count it got and whether this call got it);
everything else about chords is here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import states
from .._exceptions import AioResultsError, ChordError
from .._protocols import ChordProgress
from .._serialization import Codec, exception_to_dict

if TYPE_CHECKING:
    from .base import BaseBackend

__all__ = ["PartCount", "chord_outcome", "encode_part", "member_ids"]

logger = logging.getLogger("aioresults.backends")


@dataclass(frozen=True, slots=True)
class PartCount:
    """What a store's ``_chord_count`` answers for one part.

    ``count`` is the part's place in the count (1..``size``), whether it was
    counted by this call or earlier; ``size + 1`` for a new part that arrived
    after the chord was full (it is not stored). ``own`` is True when the
    receipt stored with the part is this call's (a fresh count, or a retry of
    the call that counted it).
    """

    count: int
    size: int
    own: bool


def encode_part(codec: Codec, task_id: str, index: int | None, state: str, value: Any) -> bytes:
    """A part's stored payload: its id, place, state, value and arrival time."""
    return codec.encode(
        {
            "task_id": task_id,
            "index": index,
            "state": state,
            "result": exception_to_dict(value) if isinstance(value, BaseException) else value,
            "seq": time.time_ns(),
        }
    )


def member_ids(group: list[Any]) -> list[str]:
    """The member ids of a group tuple ``[[gid, parent], [[[id, parent], None], ...]]``."""
    try:
        return [member[0][0] for member in group[1]]
    except (TypeError, IndexError, KeyError):
        return []


async def chord_outcome(
    backend: BaseBackend, group_id: str, task_id: str, counted: PartCount | None
) -> ChordProgress:
    """Turn a store's count into what ``chord_part_return`` reports."""
    if counted is None:
        raise ChordError(
            f"chord {group_id!r} has no size: call set_chord_size() first (or its counter expired)"
        )
    count, size = counted.count, counted.size
    if count > size:
        logger.warning("chord %s: a part beyond its size %d arrived (%s)", group_id, size, task_id)
        return ChordProgress(
            group_id, task_id, counted=False, count=None, size=size, complete=False
        )
    if count < size:
        return ChordProgress(group_id, task_id, counted.own, count, size, complete=False)
    parts = []
    for raw in await backend._chord_parts(group_id):
        try:
            part = backend.codec.decode(raw)
        except AioResultsError as exc:
            raise ChordError(f"chord {group_id!r} holds a corrupt part") from exc
        parts.append(part)
    parts.sort(key=lambda p: p.get("seq", 0))
    if parts and all(isinstance(p.get("index"), int) for p in parts):
        parts.sort(key=lambda p: p["index"])
    else:
        saved = await backend._restore_group(group_id)
        order = member_ids(saved) if saved else []
        if order:
            rank = {member: i for i, member in enumerate(order)}
            parts.sort(key=lambda p: rank.get(p.get("task_id"), len(rank)))
    results: list[Any] = []
    failed: list[str] = []
    first_exc: BaseException | None = None
    for part in parts:
        value = part.get("result")
        if part.get("state") in states.EXCEPTION_STATES:
            value = backend.codec.exception_from_dict(value)
        if part.get("state") in states.PROPAGATE_STATES:
            failed.append(part.get("task_id", "?"))
            if first_exc is None and isinstance(value, BaseException):
                first_exc = value
        results.append(value)
    return ChordProgress(
        group_id,
        task_id,
        counted=counted.own,
        count=size,
        size=size,
        complete=True,
        results=results,
        failed_task_ids=tuple(failed),
        exception=first_exc,
    )
