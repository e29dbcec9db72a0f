"""A small Celery app for the RPC interop tests, run by a real worker on RabbitMQ.

The worker is started with ``celery -A tests.interop.rpc_tasks worker ...``
and finds :data:`app` here; it is built on first access from two environment
variables, so importing this module (as the tests do, for :func:`create_app`)
creates no app and touches no server:

* ``AIORESULTS_INTEROP_AMQP_URL``: the broker's ``amqp://`` URL;
* ``AIORESULTS_INTEROP_RPC_QUEUE``: the queue tasks are sent to (the worker's ``-Q``).

The result backend is Celery's own ``rpc://``: the worker publishes each state
to the ``reply_to`` queue of the task's message. Nothing here knows about
aioresults: it is an ordinary Celery app.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

URL_VARIABLE = "AIORESULTS_INTEROP_AMQP_URL"
QUEUE_VARIABLE = "AIORESULTS_INTEROP_RPC_QUEUE"

ADD = "rpc_interop.add"
FAIL = "rpc_interop.fail"
SLOW = "rpc_interop.slow"
ECHO = "rpc_interop.echo"


def create_app(amqp_url: str, queue: str, broker_heartbeat: float | None = None) -> Celery:
    """A Celery app with RabbitMQ as broker, ``rpc://`` results and this module's tasks.

    :param amqp_url: the broker's ``amqp://`` URL.
    :param queue: the default queue (the one the worker consumes).
    :param broker_heartbeat: AMQP heartbeat seconds (Celery's default otherwise).
    :returns: the app; the caller closes it.
    """
    app = Celery("rpc_interop", broker=amqp_url, backend="rpc://", set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_extended=True,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
    )
    if broker_heartbeat is not None:
        app.conf.broker_heartbeat = broker_heartbeat

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

    @app.task(name=ECHO, bind=True, shared=False)
    def echo(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Return what the worker received: arguments and the request's fields."""
        request = self.request
        return {
            "args": list(args),
            "kwargs": kwargs,
            "id": request.id,
            "reply_to": request.reply_to,
            "correlation_id": request.correlation_id,
            "eta": request.eta,
            "expires": request.expires,
            "retries": request.retries,
            "timelimit": list(request.timelimit or (None, None)),
            "root_id": request.root_id,
            "parent_id": request.parent_id,
            "group": request.group,
            "origin": request.origin,
            "priority": (request.delivery_info or {}).get("priority"),
            "custom": getattr(request, "custom", None),
        }

    return app


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    # `celery -A` reads `app` from this module: built on demand from the environment.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        # The worker's event loop sees a SIGTERM only when it wakes up, at least every
        # 10 s when idle; the heartbeat check wakes it every second, so it stops at once.
        _app = create_app(os.environ[URL_VARIABLE], os.environ[QUEUE_VARIABLE], 2.0)
    return _app
