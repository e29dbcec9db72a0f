"""Publishing: task messages and result replies, on a connection of their own.

A publishing connection is kept apart from the consuming one: a broker that
throttles publishers (a memory alarm) blocks the whole connection, and must not
stop replies from arriving. It is opened on first use, and again after it is
lost. Every message is published with ``mandatory`` and confirmed by the
broker before :meth:`Publisher.publish` returns.

Queues are declared once per connection before the first message to them:
the backend's own reply queue (so a reply has somewhere to go even if the
broker lost it), and a task's queue the way Celery declares it (a direct
exchange named as the queue, a durable queue, a binding), unless it exists
already, whatever its arguments (a quorum queue, a priority queue).

A publish that fails because the connection was lost is retried on a new one
(``retries`` times, with back-off). One the broker had received but not yet
confirmed is then published twice: delivery is at least once, as with Celery.
A publish the broker has not confirmed within ``timeout`` seconds raises
:class:`~aioresults.BackendUnavailable` and is not sent again (the broker may
have it), nor is its connection closed (other messages may wait on it): a
broker that stopped answering is found out by the connection's heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiormq
import anyio
from aiormq import exceptions as amqp_errors
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from ..._exceptions import BackendClosed, BackendError
from .._support import Backoff, ErrorTable
from ._connection import CLOSE_TIMEOUT, close_quietly, is_connection_error
from ._messages import Outgoing

__all__ = ["Publisher", "Unroutable"]

logger = logging.getLogger("aioresults.backends.amqp")


class Unroutable(BackendError):
    """The broker returned a message: no queue is bound for its routing key."""


class _Unconfirmed(TimeoutError):
    """No answer from the broker within the publish timeout."""


class Publisher:
    """Publishes confirmed messages; see the module docstring.

    :param connect: opens a new connection (translating its errors).
    :param declare_own: declares the backend's reply queue on a channel.
    :param errors: translates aiormq's errors.
    :param retries: new connections tried after a lost one, per message.
    :param timeout: seconds a publish (connecting, declaring, publishing and
        the broker's confirmation) may take.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiormq.Connection]],
        declare_own: Callable[[AbstractChannel], Awaitable[None]],
        errors: ErrorTable,
        retries: int,
        timeout: float = 10.0,
    ) -> None:
        self._connect = connect
        self._declare_own = declare_own
        self._errors = errors
        self._retries = retries
        self._timeout = timeout
        self._connection: aiormq.Connection | None = None
        self._channel: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._lock = anyio.Lock()
        self._closed = False

    async def publish(
        self, message: Outgoing, *, exchange: str, routing_key: str, declare: str | None = None
    ) -> None:
        """Publish ``message`` and wait for the broker's confirmation.

        :param declare: a task queue to declare (as Celery does) before the first
            message to it on this connection.
        :raises Unroutable: no queue took it.
        :raises BackendUnavailable: the broker stayed unreachable.
        :raises BackendError: the broker refused (permissions, a missing exchange).
        """
        properties = Basic.Properties(**message.properties)
        backoff = Backoff(0.05, 1.0)
        for attempt in range(self._retries + 1):
            channel = None
            try:
                try:
                    with self._errors.translating("publishing"):
                        try:
                            async with asyncio.timeout(self._timeout):
                                channel = await self._ready()
                                if declare is not None and declare not in self._declared:
                                    async with self._lock:  # once, not by every sender now
                                        if declare not in self._declared:
                                            await self._declare_task_queue(declare)
                                await channel.basic_publish(
                                    message.body,
                                    exchange=exchange,
                                    routing_key=routing_key,
                                    properties=properties,
                                    mandatory=True,
                                )
                        except TimeoutError:
                            raise _Unconfirmed(
                                f"the broker did not answer within {self._timeout:g} s "
                                "(the message may still arrive)"
                            ) from None
                    return
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # the caller's own cancellation
                    # aiormq cancels what waits on a connection it found stuck
                    # (no heartbeat): the connection is lost, not this caller.
                    lost = ConnectionError("the connection to the broker stopped answering")
                    raise (self._errors.translate(lost, "publishing") or lost) from lost
            except Exception as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                if isinstance(cause, amqp_errors.PublishError):
                    if declare in self._declared and attempt < self._retries:
                        # Deleted since it was declared on this connection: again.
                        self._declared.discard(declare)
                        continue
                    raise Unroutable(str(cause)) from cause
                if self._closed and not isinstance(exc, BackendClosed):
                    raise BackendClosed("the backend was closed while publishing") from exc
                if isinstance(cause, _Unconfirmed):
                    raise  # see the module docstring
                if channel is not None and (channel.is_closed or is_connection_error(cause)):
                    self._forget(channel)
                if self._closed or not is_connection_error(cause) or attempt == self._retries:
                    raise
                logger.info("publishing failed (%s); retrying on a new connection", exc)
                await backoff.sleep()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ready(self) -> AbstractChannel:
        """The confirming channel, (re)connecting as needed; one caller connects at a time."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._closed:
                raise BackendClosed("the backend was closed")
            channel = self._channel
            if channel is not None and not channel.is_closed:
                return channel
            await close_quietly(self._connection)
            self._connection = self._channel = None
            connection = await self._connect()
            try:
                with self._errors.translating("opening a channel"):
                    channel = await connection.channel(publisher_confirms=True)
                    await self._declare_own(channel)
            except BaseException:
                await close_quietly(connection)
                raise
            self._connection, self._channel = connection, channel
            self._declared = set()
            return channel

    def _forget(self, channel: AbstractChannel) -> None:
        # A channel the broker closed (a refused call) is replaced; its connection too,
        # for simplicity: that is rare, and a new connection is cheap.
        if self._channel is channel:
            self._channel = None

    async def _declare_task_queue(self, name: str) -> None:
        connection = self._connection
        if connection is None:
            raise amqp_errors.ChannelInvalidStateError("the connection is gone")
        with self._errors.translating(f"declaring queue {name!r}"):
            # A failed passive declare closes its channel: use throwaway ones.
            probe = await connection.channel(publisher_confirms=False)
            try:
                await probe.queue_declare(name, passive=True)
            except amqp_errors.ChannelNotFoundEntity:
                declarer = await connection.channel(publisher_confirms=False)
                try:
                    await declarer.exchange_declare(name, exchange_type="direct", durable=True)
                    await declarer.queue_declare(name, durable=True)
                    await declarer.queue_bind(name, name, routing_key=name)
                finally:
                    await _close_channel(declarer)
            finally:
                await _close_channel(probe)
        self._declared.add(name)

    async def close(self) -> None:
        """Close the connection; publishing after this raises BackendClosed."""
        self._closed = True
        connection, self._connection, self._channel = self._connection, None, None
        await close_quietly(connection)


async def _close_channel(channel: AbstractChannel) -> None:
    if not channel.is_closed:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            try:
                await channel.close()
            except Exception as exc:
                logger.debug("closing a channel failed: %s", exc)
