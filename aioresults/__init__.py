"""aioresults: store and await the results of distributed tasks from asyncio.

The one front door: everything public is importable from here, and backends
from ``aioresults.backends.<name>``.
"""

from __future__ import annotations

from . import states
from ._exceptions import (
    AioResultsError,
    BackendClosed,
    BackendCorrupted,
    BackendError,
    BackendUnavailable,
    ChordError,
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    InvalidTaskId,
    MissingDependency,
    RemoteTaskError,
    ResultTimeout,
    ResultTooLarge,
    SecurityError,
    SerializationError,
    StoreNotFound,
    TaskRevokedError,
    UnknownBackend,
)
from ._group import GroupResult, ResultSet, result_from_tuple
from ._meta import ResultMeta
from ._protocols import ChordProgress, Record, ResultReader, ResultWriter, Watch
from ._registry import DEFAULT_URL, connect, known_schemes, register_backend
from ._result import AsyncResult
from ._serialization import Codec, exception_from_dict, exception_to_dict, register_type
from ._worker import TaskTracker, TrackedTask, current_task, task
from .backends.base import BaseBackend, WaitStats
from .backends.keyvalue import KeyValueBackend

__version__ = "0.2.0.dev0"

__all__ = [
    "DEFAULT_URL",
    "AioResultsError",
    "AsyncResult",
    "BackendClosed",
    "BackendCorrupted",
    "BackendError",
    "BackendUnavailable",
    "BaseBackend",
    "ChordError",
    "ChordProgress",
    "Codec",
    "ConfigurationError",
    "ContentDisallowed",
    "DecodeError",
    "GroupResult",
    "InvalidTaskId",
    "KeyValueBackend",
    "MissingDependency",
    "Record",
    "RemoteTaskError",
    "ResultMeta",
    "ResultReader",
    "ResultSet",
    "ResultTimeout",
    "ResultTooLarge",
    "ResultWriter",
    "SecurityError",
    "SerializationError",
    "StoreNotFound",
    "TaskRevokedError",
    "TaskTracker",
    "TrackedTask",
    "UnknownBackend",
    "WaitStats",
    "Watch",
    "connect",
    "current_task",
    "exception_from_dict",
    "exception_to_dict",
    "known_schemes",
    "register_backend",
    "register_type",
    "result_from_tuple",
    "states",
    "task",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aioresults.") and _name not in {
        "states",
        "BaseBackend",
        "KeyValueBackend",
        "ChordProgress",
        "WaitStats",
    }:
        try:
            _obj.__module__ = "aioresults"
        except (AttributeError, TypeError):
            pass
del _name, _obj


def __getattr__(name: str) -> object:
    if name == "ResultBackend":
        from ._deprecated import result_backend

        return result_backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
