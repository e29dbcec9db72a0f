"""The Celery side: an ordinary Celery app whose results live in Redis.

Nothing here knows about aioresults. Start a worker from this directory::

    celery -A tasks worker --pool=solo --loglevel=info

``REDIS_URL`` names the Redis database used as both the broker and the result
backend (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    result_serializer="json",  # what an aioresults backend reads by default
    result_extended=True,  # store the task's name, args and worker with its result
    task_track_started=True,  # store STARTED when a worker picks the task up
    broker_connection_retry_on_startup=True,
)


@app.task(name="tasks.add")
def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@app.task(bind=True, name="tasks.count_to")
def count_to(self: Any, n: int, delay: float = 0.1) -> int:
    """Count to ``n``, storing PROGRESS ``{"current": i, "total": n}`` at each step."""
    for i in range(1, n + 1):
        time.sleep(delay)
        self.update_state(state="PROGRESS", meta={"current": i, "total": n})
    return n


class InventoryError(Exception):
    """A task's own exception type: the web app rebuilds it without importing this module."""


@app.task(name="tasks.reserve")
def reserve(item: str) -> None:
    """Always fails, to show how a Celery failure reaches an async client."""
    raise InventoryError(f"{item} is out of stock")
