"""What the rpc:// backend refuses, as Celery's does: groups and chords.

A group's tuple or a chord's counter must live where every worker and client
can read it; RPC results reach one process only. Each call is refused at once
(before connecting), after the same id checks as everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._exceptions import ChordError, ConfigurationError
from ..._protocols import ChordProgress
from .._chords import PartCount

__all__ = ["E_NO_CHORDS", "E_NO_GROUPS", "NoGroupsOrChords"]

E_NO_GROUPS = (
    "the rpc:// backend keeps no groups (as Celery's): results are messages to the sender, "
    "not records others can look up; save groups with a store backend (redis://, sqlite://...)"
)
E_NO_CHORDS = (
    "the rpc:// backend does not support chords (as Celery's): a chord needs a store every "
    "worker counts its parts in; use a store backend (redis://, sqlite://...)"
)


class NoGroupsOrChords:
    """Refuses the group and chord operations of :class:`~aioresults.BaseBackend`."""

    if TYPE_CHECKING:

        def _check_id(self, task_id: object, what: str = "task id") -> str: ...

    async def save_group(self, group_id: str, group: list[Any]) -> None:
        """Refused: the rpc:// backend keeps no groups (:class:`~aioresults.ConfigurationError`)."""
        self._check_id(group_id, "group id")
        raise ConfigurationError(E_NO_GROUPS)

    async def restore_group(self, group_id: str) -> list[Any] | None:
        """Refused: the rpc:// backend keeps no groups (:class:`~aioresults.ConfigurationError`)."""
        self._check_id(group_id, "group id")
        raise ConfigurationError(E_NO_GROUPS)

    async def delete_group(self, group_id: str) -> None:
        """Refused: the rpc:// backend keeps no groups (:class:`~aioresults.ConfigurationError`)."""
        self._check_id(group_id, "group id")
        raise ConfigurationError(E_NO_GROUPS)

    async def set_chord_size(self, group_id: str, size: int) -> None:
        """Refused: the rpc:// backend has no chords (:class:`~aioresults.ChordError`)."""
        self._check_id(group_id, "group id")
        raise ChordError(E_NO_CHORDS)

    async def chord_part_return(
        self, group_id: str, task_id: str, state: str, value: Any, *, index: int | None = None
    ) -> ChordProgress:
        """Refused: the rpc:// backend has no chords (:class:`~aioresults.ChordError`)."""
        self._check_id(group_id, "group id")
        self._check_id(task_id)
        raise ChordError(E_NO_CHORDS)

    async def _save_group(self, group_id: str, group: list[Any]) -> None:
        raise ConfigurationError(E_NO_GROUPS)

    async def _restore_group(self, group_id: str) -> list[Any] | None:
        raise ConfigurationError(E_NO_GROUPS)

    async def _delete_group(self, group_id: str) -> None:
        raise ConfigurationError(E_NO_GROUPS)

    async def _chord_start(self, group_id: str, size: int) -> None:
        raise ChordError(E_NO_CHORDS)

    async def _chord_count(
        self, group_id: str, part_id: str, payload: bytes, receipt: str
    ) -> PartCount | None:
        raise ChordError(E_NO_CHORDS)

    async def _chord_parts(self, group_id: str) -> list[bytes]:
        raise ChordError(E_NO_CHORDS)
