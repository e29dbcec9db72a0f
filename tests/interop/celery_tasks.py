"""A small Celery app for the interop tests, run by a real worker on Redis.

The worker is started with ``celery -A tests.interop.celery_tasks worker ...``
and finds :data:`app` here; it is built on first access from two environment
variables, so importing this module (as the tests do, for :func:`create_app`)
creates no app and touches no server:

* ``AIORESULTS_INTEROP_REDIS_URL``: the Redis URL of both broker and result backend;
* ``AIORESULTS_INTEROP_QUEUE``: the queue tasks are sent to (the worker's ``-Q``).

Nothing here knows about aioresults: it is an ordinary Celery app.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

URL_VARIABLE = "AIORESULTS_INTEROP_REDIS_URL"
QUEUE_VARIABLE = "AIORESULTS_INTEROP_QUEUE"

ADD = "interop.add"
FAIL = "interop.fail"
SLOW = "interop.slow"
PROGRESS = "interop.progress"
TOTAL = "interop.total"


def create_app(redis_url: str, queue: str) -> Celery:
    """A Celery app with Redis as broker and result backend and this module's tasks.

    :param redis_url: the ``redis://`` URL of both the broker and the backend.
    :param queue: the default queue, so a chord's body sent by the worker
        lands on the queue that worker consumes.
    :returns: the app; the caller closes it.
    """
    app = Celery("interop", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        # One backend (one Redis client) for every thread, so a test that calls
        # Celery from worker threads has one client to close at the end.
        result_backend_thread_safe=True,
    )

    # shared=False: the tasks belong to this app only, not to every app created later.
    @app.task(name=ADD, shared=False)
    def add(x: int, y: int) -> int:
        """Add two numbers."""
        return x + y

    @app.task(name=FAIL, shared=False)
    def fail() -> None:
        """Raise a builtin exception with two arguments."""
        raise ValueError("bad", 42)

    @app.task(name=SLOW, shared=False)
    def slow(value: Any, delay: float) -> Any:
        """Return ``value`` after ``delay`` seconds (long enough to see STARTED)."""
        time.sleep(delay)
        return value

    @app.task(name=PROGRESS, bind=True, shared=False)
    def progress(self: Any, steps: int, delay: float) -> int:
        """Store PROGRESS ``{"current": i, "total": steps}`` for each step, then return steps."""
        for i in range(1, steps + 1):
            time.sleep(delay)
            self.update_state(state="PROGRESS", meta={"current": i, "total": steps})
        return steps

    @app.task(name=TOTAL, shared=False)
    def total(values: list[int]) -> int:
        """Sum a chord header's results."""
        return sum(values)

    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A` reads `app` from this module: built on demand from the environment.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app(os.environ[URL_VARIABLE], os.environ[QUEUE_VARIABLE])
    return _app
