"""Backends. Each lives in its own module or package, ``aioresults.backends.<name>``.

Those with a driver (``redis``, ``sqlite``, ``azure_blob``, ...) are imported
only when used, so ``import aioresults`` needs no extra.
"""

from __future__ import annotations

from typing import Any

from .._protocols import ChordProgress
from .base import BaseBackend, PartCount, WaitStats
from .keyvalue import KeyValueBackend

__all__ = ["BaseBackend", "ChordProgress", "KeyValueBackend", "PartCount", "WaitStats"]


def __getattr__(name: str) -> Any:
    if name == "ResultBackend":
        from .._deprecated import result_backend

        return result_backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
