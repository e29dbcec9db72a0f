"""The reply queue's consumer: one connection, one channel, one consumer.

:meth:`ReplyConsumer.connect` opens a session (connect, declare the reply queue,
consume it); the backend calls it once when it opens, so the queue exists
before any task names it as ``reply_to``. :meth:`ReplyConsumer.run` then keeps
it up: when the connection, the channel or the consumer is lost, it opens a new
session with jittered back-off, declaring the queue again. The queue outlives
the connection (it is not auto-delete), so replies published meanwhile wait in
it and arrive with the new session.

Replies are acknowledged once kept (one ``multiple`` ack covers every reply
that arrived meanwhile), so a reply in flight when the connection drops is
delivered again rather than lost; the buffer recognises the redelivery.

:class:`ReplyFeed` tells the waiter hub about sessions: records themselves go
to the hub as they arrive, through the backend's ``on_reply``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiormq
import anyio
from aiormq.abc import AbstractChannel, DeliveredMessage

from .._feeds import Feed
from .._support import Backoff, ErrorTable
from ._connection import CLOSE_TIMEOUT, close_quietly, declare_reply_queue
from ._messages import received_payload

__all__ = ["ReplyConsumer", "ReplyFeed"]

logger = logging.getLogger("aioresults.backends.amqp")

OnReply = Callable[[str | None, bytes, bool], None]


class _Session:
    """One connection and its consuming channel; ``lost`` is set when either ends."""

    def __init__(self, connection: aiormq.Connection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.lost = anyio.Event()
        self.acked = 0
        self.ack_upto = 0
        self.acking = False
        self.tag: str | None = None


class ReplyConsumer:
    """Consumes one reply queue; see the module docstring.

    :param connect: opens a new connection (translating its errors).
    :param queue: the reply queue's name.
    :param arguments: its declaration arguments (``x-expires``).
    :param prefetch: replies delivered but not yet acknowledged, at most.
    :param on_reply: called with (correlation id, body, redelivered) per reply.
    :param errors: translates aiormq's errors.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiormq.Connection]],
        queue: str,
        arguments: dict[str, Any],
        prefetch: int,
        on_reply: OnReply,
        errors: ErrorTable,
    ) -> None:
        self._connect = connect
        self._errors = errors
        self.queue = queue
        self.arguments = arguments
        self.prefetch = prefetch
        self._on_reply = on_reply
        self._session: _Session | None = None
        self._changed = anyio.Event()
        self._closed = False

    def __repr__(self) -> str:
        return f"the consumer of reply queue {self.queue!r}"

    # ------------------------------------------------------------ sessions

    async def connect(self) -> None:
        """Open a session: connect, declare the queue, consume it.

        :raises BackendUnavailable: the broker cannot be reached.
        :raises BackendError: it refused (credentials, permissions, another
            consumer holds the queue).
        """
        connection = await self._connect()
        try:
            with self._errors.translating(f"consuming reply queue {self.queue!r}"):
                channel = await connection.channel(publisher_confirms=False)
                await channel.basic_qos(prefetch_count=self.prefetch)
                await declare_reply_queue(channel, self.queue, self.arguments)
                session = _Session(connection, channel)
                channel.on_consumer_cancel_callbacks.add(lambda _: session.lost.set())
                # Exclusive: a second backend given the same reply_queue is refused
                # instead of silently taking every other reply.
                consuming = await channel.basic_consume(
                    self.queue,
                    functools.partial(self._received, session),
                    no_ack=False,
                    exclusive=True,
                )
        except BaseException:
            await close_quietly(connection)
            raise
        session.tag = consuming.consumer_tag
        connection.closing.add_done_callback(lambda _: session.lost.set())
        channel.closing.add_done_callback(lambda _: session.lost.set())
        if self._closed:  # closed while connecting: undo it
            await close_quietly(connection)
            return
        self._session = session
        self._announce()

    def _announce(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def run(self) -> None:
        """Keep a session up until cancelled (after a first :meth:`connect`)."""
        backoff = Backoff(0.05, 2.0)
        while True:
            session = self._session
            if session is not None:
                await session.lost.wait()
                logger.warning("%s lost its connection; reconnecting", self)
                self._session = None
                self._announce()
                await close_quietly(session.connection)
            await backoff.sleep()
            try:
                await self.connect()
            except Exception as exc:
                if backoff.attempts in (1, 10) or backoff.attempts % 100 == 0:
                    logger.warning("%s cannot reconnect yet (%s); retrying", self, exc)
                continue
            backoff.reset()
            logger.info("%s is consuming again", self)

    async def wait_up(self) -> anyio.Event:
        """Return once a session consumes; its ``lost`` event, set when it ends."""
        while True:
            session = self._session
            if session is not None and not session.lost.is_set():
                return session.lost
            await self._changed.wait()

    async def close(self, delete_queue: bool) -> None:
        """End the session; with ``delete_queue``, delete the queue first (replies
        still on their way to it are dropped, as Celery's auto-delete queue drops them)."""
        self._closed = True
        session, self._session = self._session, None
        if session is None:
            return
        if delete_queue and not session.lost.is_set():
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                try:
                    # Cancelled first, so the broker has no consumer of ours to cancel.
                    if session.tag is not None:
                        await session.channel.basic_cancel(session.tag)
                    await session.channel.queue_delete(self.queue)
                except Exception as exc:  # left to x-expires
                    logger.debug("deleting reply queue %r failed: %s", self.queue, exc)
        await close_quietly(session.connection)

    # ------------------------------------------------------------ replies

    async def _received(self, session: _Session, message: DeliveredMessage) -> None:
        # aiormq runs one task per message, in arrival order: nothing is awaited
        # before the reply is kept, so replies are kept in the order they came.
        properties = message.header.properties
        delivery: Any = message.delivery
        self._on_reply(
            properties.correlation_id,
            received_payload(message.body, properties.headers),
            bool(getattr(delivery, "redelivered", False)),
        )
        await self._acknowledge(session, int(delivery.delivery_tag))

    async def _acknowledge(self, session: _Session, tag: int) -> None:
        """Ack up to ``tag``; replies arriving during the ack join the next one."""
        session.ack_upto = max(session.ack_upto, tag)
        if session.acking:
            return
        session.acking = True
        try:
            while session.acked < session.ack_upto and not session.lost.is_set():
                upto = session.ack_upto
                await session.channel.basic_ack(upto, multiple=True, wait=False)
                session.acked = upto
        except Exception as exc:
            # The connection is going: the broker delivers these replies again.
            logger.debug("acknowledging replies failed: %s", exc)
        finally:
            session.acking = False


class ReplyFeed(Feed):
    """The hub's view of the consumer: a push feed that is up while it consumes.

    Every reply, for any task id, arrives through the one queue, so there is no
    per-id watch to set up: :meth:`watch` returns at once, and a waiter reads the
    buffer even while the broker is away (its reply waits in the queue).
    """

    kind = "push"

    def __init__(self, consumer: ReplyConsumer) -> None:
        self._consumer = consumer

    def __repr__(self) -> str:
        return repr(self._consumer)

    async def watch(self, task_ids: Sequence[str]) -> None:
        return None

    async def session(self) -> None:
        lost = await self._consumer.wait_up()
        self.resynced()
        await lost.wait()
        raise ConnectionError("the reply queue's connection was lost")
