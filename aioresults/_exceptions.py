"""The aioresults error tree.

Every error aioresults raises derives from :class:`AioResultsError`. Driver
errors (redis, aiosqlite, azure) never reach the caller as themselves: each
backend translates them at its boundary and chains the original with ``from``.

::

    AioResultsError
    ├── ConfigurationError (ValueError)     bad URL, option or argument
    │   └── UnknownBackend                  no backend for that URL scheme
    ├── MissingDependency (ImportError)     the backend's driver is not installed
    ├── InvalidTaskId (ValueError)          an id no backend may store (path traversal, NUL, length)
    ├── ResultTimeout (TimeoutError)        a wait ran out of time
    ├── BackendError                        the store failed
    │   ├── BackendUnavailable (ConnectionError)   cannot reach the store
    │   │   └── StoreNotFound               the store is not there (and create=False)
    │   ├── BackendClosed                   the backend was closed under the operation
    │   ├── BackendCorrupted                the store itself is damaged or foreign
    │   └── ResultTooLarge                  an encoded value exceeds the size limit
    ├── SerializationError (ValueError)     a value cannot be encoded or decoded
    │   ├── DecodeError                     a stored payload is corrupt
    │   ├── ContentDisallowed               a payload uses a serializer not in ``accept``
    │   └── SecurityError                   a payload names something that is not an exception
    ├── ChordError                          a chord cannot be counted or completed
    ├── TaskRevokedError                    the task was revoked (stored as Celery's)
    └── RemoteTaskError                     base of exception types rebuilt from a payload
                                            whose class is not a Python builtin
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AioResultsError",
    "BackendClosed",
    "BackendCorrupted",
    "BackendError",
    "BackendUnavailable",
    "ChordError",
    "ConfigurationError",
    "ContentDisallowed",
    "DecodeError",
    "InvalidTaskId",
    "MissingDependency",
    "RemoteTaskError",
    "ResultTimeout",
    "ResultTooLarge",
    "SecurityError",
    "SerializationError",
    "StoreNotFound",
    "TaskRevokedError",
    "UnknownBackend",
]


class AioResultsError(Exception):
    """Root of every error raised by aioresults."""


class ConfigurationError(AioResultsError, ValueError):
    """A URL, option or argument is not valid."""


class UnknownBackend(ConfigurationError):
    """No backend is registered for a URL scheme.

    :ivar scheme: the scheme that was asked for.
    :ivar known: the schemes that are registered.
    """

    def __init__(self, scheme: str, known: Sequence[str]) -> None:
        self.scheme = scheme
        self.known = tuple(known)
        super().__init__(
            f"no result backend for URL scheme {scheme!r}; known schemes: {', '.join(known)}"
        )


class MissingDependency(AioResultsError, ImportError):
    """A backend's driver package is not installed.

    The message names the command that installs it, for example
    ``pip install 'aioresults[redis]'``.
    """


class InvalidTaskId(AioResultsError, ValueError):
    """A task or group id that cannot be stored safely.

    Raised for ids that are empty, too long, contain NUL or control characters,
    or (on the filesystem backend) would name a path outside the result directory.
    """


class ResultTimeout(AioResultsError, TimeoutError):
    """A wait for a result ran out of time.

    It is also a :class:`TimeoutError`, so ``except TimeoutError`` catches it.

    :ivar task_ids: the ids that were not ready when time ran out.
    :ivar timeout: the timeout in seconds.
    """

    def __init__(self, task_ids: Sequence[str], timeout: float) -> None:
        self.task_ids = tuple(task_ids)
        self.timeout = timeout
        shown = ", ".join(self.task_ids[:3]) + (" ..." if len(self.task_ids) > 3 else "")
        noun = "result" if len(self.task_ids) == 1 else f"{len(self.task_ids)} results"
        super().__init__(f"{noun} not ready after {timeout:g} s: {shown}")


class BackendError(AioResultsError):
    """The result store failed to perform an operation."""


class BackendUnavailable(BackendError, ConnectionError):
    """The result store cannot be reached."""


class StoreNotFound(BackendUnavailable):
    """The store (a file, a directory, tables, a container) is not there, and the
    backend was told not to create it (``create=False``)."""


class BackendClosed(BackendError):
    """The backend was closed while the operation waited (or before it started).

    Every operation still outstanding when :meth:`~aioresults.BaseBackend.aclose`
    runs (a wait, a batched read or write not yet sent) fails with this error at
    once; none is left waiting.
    """


class BackendCorrupted(BackendError):
    """The store is damaged, or was written by something aioresults cannot read."""


class ResultTooLarge(BackendError):
    """An encoded value is larger than the backend's ``max_value_size``."""


class SerializationError(AioResultsError, ValueError):
    """A value cannot be encoded, or a stored payload cannot be decoded."""


class DecodeError(SerializationError):
    """A stored payload is corrupt or not in the expected format."""


class ContentDisallowed(SerializationError):
    """A payload uses a serializer that the backend does not ``accept``.

    Pickle is refused unless the backend was created with ``accept`` naming it,
    because unpickling runs code chosen by whoever wrote the payload.
    """


class SecurityError(SerializationError):
    """A payload names a class or callable that is not an exception."""


class ChordError(AioResultsError):
    """A chord cannot be counted or completed (for example, its size is unknown)."""


class TaskRevokedError(AioResultsError):
    """The task was revoked before it finished.

    Stored as Celery's ``celery.exceptions.TaskRevokedError`` so Celery clients
    rebuild it too.
    """


class RemoteTaskError(AioResultsError):
    """Base class of exceptions rebuilt from a stored failure.

    When a stored failure names a class that is not a Python builtin exception,
    aioresults never imports the module it names. It creates a subclass of this
    class with the remote name instead, so ``exc.remote_type`` and
    ``exc.remote_module`` tell what was raised, ``exc.args`` holds the remote
    arguments and ``exc.remote_traceback`` the traceback text, if any.
    """

    remote_type: str = "RemoteTaskError"
    remote_module: str = "aioresults"
    remote_traceback: str | None = None
