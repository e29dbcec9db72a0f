"""Old spellings kept for one release, each warning when used."""

from __future__ import annotations

import warnings
from typing import Any


def result_backend() -> Any:
    """``ResultBackend``: the backend contract is :class:`~aioresults.BaseBackend`;
    what results read through is :class:`~aioresults.ResultReader`."""
    warnings.warn(
        "ResultBackend is deprecated since 0.2: subclass BaseBackend to write a backend, "
        "and annotate with ResultReader / ResultWriter what only reads or writes",
        DeprecationWarning,
        stacklevel=3,
    )
    from .backends.base import BaseBackend

    return BaseBackend
