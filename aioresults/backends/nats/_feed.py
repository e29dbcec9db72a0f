"""The NATS backend's push feed: one JetStream consumer over every task record.

A session subscribes an inbox, then creates an ephemeral push consumer on the
bucket's stream, filtered to the task records' subject (``$KV.<bucket>.
celery-task-meta-.*``: see :mod:`._keys`), delivering only what is written from
then on, without acks. Every update is handed to the hub as it arrives (a
delete marker or an expired record as "none"). Once the consumer exists the
session calls :meth:`~aioresults.backends._feeds.Feed.resynced`, so after a
reconnect the hub re-reads every watched id: nothing written while the feed was
away is lost.

A session ends (and the hub starts another, with back-off) when the connection
drops, when the server's idle heartbeats stop (the consumer is gone: a server
restarted, an operator deleted it), or when a gap in the consumer's sequence
shows that updates were dropped (a slow consumer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from nats.js import api

from .._feeds import Feed
from ._bucket import Bucket, deleted, expiry
from ._keys import decode_token

__all__ = ["WatchFeed"]


class WatchFeed(Feed):
    """Pushes every task record written to the bucket; see the module docstring.

    :param bucket: the backend's bucket (connected by ``ensure_open``).
    :param ensure_open: opens the backend.
    :param kind_token: the first key token of task records.
    :param heartbeat: the consumer's idle heartbeat, in seconds; three missed
        end the session.
    """

    kind = "push"

    def __init__(
        self,
        bucket: Bucket,
        ensure_open: Callable[[], Awaitable[None]],
        kind_token: str,
        heartbeat: float,
    ) -> None:
        self._bucket = bucket
        self._ensure_open = ensure_open
        self._kind_token = kind_token
        self._heartbeat = heartbeat

    async def session(self) -> None:
        await self._ensure_open()
        bucket = self._bucket
        nc, js = bucket.nc, bucket.js
        if nc is None or not nc.is_connected:
            raise ConnectionError("not connected to NATS")
        loop = asyncio.get_running_loop()
        hub = self  # the feed's own view of its hub
        prefix = f"{bucket.prefix}{self._kind_token}."
        ended = asyncio.Event()
        why: list[str] = []
        last_seen = loop.time()
        sequence = 0

        def end(reason: str) -> None:
            why.append(reason)
            ended.set()

        async def receive(msg: Any) -> None:
            nonlocal last_seen, sequence
            last_seen = loop.time()
            headers = msg.headers
            if headers and headers.get("Status"):  # an idle heartbeat
                last = headers.get("Nats-Last-Consumer")
                if last is not None and int(last) != sequence:
                    end("the consumer skipped updates")
                return
            consumer = msg.metadata.sequence.consumer
            if consumer != sequence + 1:
                end("the consumer skipped updates")
            sequence = consumer
            if not msg.subject.startswith(prefix):
                return
            try:
                task_id = decode_token(msg.subject[len(prefix) :])
            except ValueError:
                return  # not a key this backend writes
            if deleted(headers):
                raw = None
            else:
                expires_at = expiry(headers)
                expired = expires_at is not None and expires_at <= time.time()
                raw = None if expired else msg.data
            hub.deliver(task_id, raw)

        def lost() -> None:
            end("the connection was lost")

        bucket.on_lost.add(lost)
        subscription = await nc.subscribe(nc.new_inbox(), cb=receive)
        consumer_name = None
        try:
            info = await js.add_consumer(
                bucket.stream,
                api.ConsumerConfig(
                    deliver_subject=subscription.subject,
                    filter_subject=prefix + "*",
                    deliver_policy=api.DeliverPolicy.NEW,
                    ack_policy=api.AckPolicy.NONE,
                    idle_heartbeat=self._heartbeat,
                    mem_storage=True,
                    num_replicas=1,
                    inactive_threshold=max(30.0, 10 * self._heartbeat),
                ),
            )
            consumer_name = info.name
            self.resynced()
            while not ended.is_set():
                with anyio.move_on_after(self._heartbeat):
                    await ended.wait()
                if loop.time() - last_seen > 3 * self._heartbeat:
                    end(f"no heartbeat for {loop.time() - last_seen:.1f} s")
            raise ConnectionError(f"NATS watch on bucket {bucket.name!r} ended: {why[0]}")
        finally:
            bucket.on_lost.discard(lost)
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                try:
                    await subscription.unsubscribe()
                    if consumer_name is not None and nc.is_connected:
                        await js.delete_consumer(bucket.stream, consumer_name)
                except Exception:
                    pass  # the server drops an inactive consumer by itself
