"""Exceptions to and from Celery's stored form (``exc_type``, ``exc_message``, ``exc_module``).

Decoding an exception never imports a module and never calls anything that is
not an exception class. Builtin exceptions come back as themselves; classes the
caller lists in ``known_exceptions`` come back as themselves; anything else is
rebuilt as a subclass of :class:`~aioresults.RemoteTaskError` that keeps the
remote name, module, arguments and traceback text.
"""

from __future__ import annotations

import builtins
import inspect
import sys
from collections.abc import Iterable
from typing import Any

from ._exceptions import DecodeError, RemoteTaskError, SecurityError, TaskRevokedError
from ._json import _json_dumps

__all__ = ["exception_from_dict", "exception_to_dict"]


_REVOKED_MODULE = "celery.exceptions"
_synthesized: dict[tuple[str, str], type[RemoteTaskError]] = {}
_MAX_SYNTHESIZED = 1024


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """Return Celery's stored form of ``exc``: ``{exc_type, exc_message, exc_module}``.

    Arguments that JSON cannot carry are stored as their ``repr()``, as Celery does.
    """
    if isinstance(exc, RemoteTaskError):
        exc_type, exc_module = exc.remote_type, exc.remote_module
    elif isinstance(exc, TaskRevokedError):
        exc_type, exc_module = "TaskRevokedError", _REVOKED_MODULE
    else:
        exc_type, exc_module = type(exc).__qualname__, type(exc).__module__
    return {
        "exc_type": exc_type,
        "exc_message": [_storable(arg) for arg in exc.args],
        "exc_module": exc_module,
    }


def _storable(value: Any) -> Any:
    try:
        _json_dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _synthesize(exc_type: str, exc_module: str) -> type[RemoteTaskError]:
    key = (exc_module, exc_type)
    cls = _synthesized.get(key)
    if cls is None:
        name = exc_type.rpartition(".")[2] or "RemoteTaskError"
        cls = type(
            name,
            (RemoteTaskError,),
            {
                "remote_type": exc_type,
                "remote_module": exc_module,
                "__module__": exc_module,
                "__qualname__": exc_type,
                "__doc__": f"Rebuilt from a stored {exc_module}.{exc_type}.",
            },
        )
        if len(_synthesized) < _MAX_SYNTHESIZED:
            _synthesized[key] = cls
    return cls


def _refuse_non_exception(exc_type: str, exc_module: str) -> None:
    """Raise SecurityError when an already-imported module names a non-exception."""
    target: Any = builtins if exc_module == "builtins" else sys.modules.get(exc_module)
    if target is None:
        return
    for part in exc_type.split("."):
        try:
            # Static lookup: a module's __getattr__ may import other modules.
            target = inspect.getattr_static(target, part)
        except AttributeError:
            return
    if not (isinstance(target, type) and issubclass(target, BaseException)):
        raise SecurityError(
            f"stored failure names {exc_module}.{exc_type}, which is not an exception class"
        )


def exception_from_dict(
    data: Any,
    traceback: str | None = None,
    known_exceptions: Iterable[type[BaseException]] = (),
) -> BaseException | None:
    """Rebuild an exception from its stored form without importing anything.

    :param data: the stored ``{exc_type, exc_message, exc_module}`` mapping (an
        exception instance, as stored by the pickle serializer, is returned as is).
    :param traceback: the stored traceback text, attached as ``remote_traceback``
        and as a note on the exception.
    :param known_exceptions: classes that may come back as themselves.
    :raises DecodeError: the mapping is malformed.
    :raises SecurityError: it names something that is not an exception class.
    """
    if data is None:
        return None
    if isinstance(data, BaseException):
        return data
    if not isinstance(data, dict):
        raise DecodeError(f"stored exception must be a mapping, not {type(data).__name__}")
    exc_type = data.get("exc_type")
    exc_module = data.get("exc_module") or "builtins"
    if not isinstance(exc_type, str) or not exc_type or not isinstance(exc_module, str):
        raise DecodeError("stored exception has no valid exc_type/exc_module")
    message = data.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)

    exc = _instantiate(exc_type, exc_module, args, known_exceptions)
    if traceback:
        try:
            exc.remote_traceback = traceback  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - slotted exception classes
            pass
        exc.add_note(f"Remote traceback:\n{traceback.rstrip()}")
    return exc


def _instantiate(
    exc_type: str,
    exc_module: str,
    args: tuple[Any, ...],
    known_exceptions: Iterable[type[BaseException]],
) -> BaseException:
    for cls in known_exceptions:
        if cls.__qualname__ == exc_type and cls.__module__ == exc_module:
            return _construct(cls, exc_type, exc_module, args)
    if exc_type == "TaskRevokedError" and exc_module == _REVOKED_MODULE:
        return TaskRevokedError(*args)
    if exc_module == "builtins" and "." not in exc_type:
        found = getattr(builtins, exc_type, None)
        # StopIteration and friends would be turned into RuntimeError by await.
        if (
            isinstance(found, type)
            and issubclass(found, Exception)
            and not issubclass(found, (StopIteration, StopAsyncIteration))
        ):
            return _construct(found, exc_type, exc_module, args)
    _refuse_non_exception(exc_type, exc_module)
    return _synthesize(exc_type, exc_module)(*args)


def _construct(
    cls: type[BaseException], exc_type: str, exc_module: str, args: tuple[Any, ...]
) -> BaseException:
    try:
        return cls(*args)
    except Exception:
        # Some constructors want other arguments (UnicodeDecodeError wants 5).
        return _synthesize(exc_type, exc_module)(*args)
