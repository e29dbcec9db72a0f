"""Task states, with Celery's names and sets.

A state is a plain string. Any other string (for example ``"PROGRESS"``) is a
custom state: it is stored as given and counts as not ready.
"""

from __future__ import annotations

__all__ = [
    "ALL_STATES",
    "EXCEPTION_STATES",
    "FAILURE",
    "PENDING",
    "PROGRESS",
    "PROPAGATE_STATES",
    "READY_STATES",
    "RECEIVED",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "UNREADY_STATES",
    "is_ready",
]

#: The task is waiting, unknown, expired or forgotten.
PENDING = "PENDING"
#: A worker received the task (Celery events only).
RECEIVED = "RECEIVED"
#: A worker started the task.
STARTED = "STARTED"
#: The task returned a value.
SUCCESS = "SUCCESS"
#: The task raised an exception.
FAILURE = "FAILURE"
#: The task is being retried.
RETRY = "RETRY"
#: The task was revoked.
REVOKED = "REVOKED"
#: The custom state used by progress reports; not ready.
PROGRESS = "PROGRESS"

#: States after which a result no longer changes.
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
#: Built-in states in which a task has not finished.
UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, RETRY, "REJECTED"})
#: States whose result is an exception.
EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
#: States whose exception ``get()`` re-raises.
PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
#: Every built-in state.
ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED})


def is_ready(state: str) -> bool:
    """Return whether ``state`` is final (custom states are not)."""
    return state in READY_STATES
