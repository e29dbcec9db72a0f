"""Backends. Each lives in its own module, ``aioresults.backends.<name>``.

Modules with a driver (``redis``, ``sqlite``, ``azure_blob``) are imported
only when used, so ``import aioresults`` needs no extra.
"""

from __future__ import annotations

from .base import BaseBackend, ChordProgress, KeyValueBackend, ResultBackend

__all__ = ["BaseBackend", "ChordProgress", "KeyValueBackend", "ResultBackend"]
