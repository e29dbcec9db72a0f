"""Opening and closing aiormq connections, and the errors they raise.

Both of a backend's connections (the reply consumer's and the publisher's) are
opened here, bounded by ``connect_timeout``, and closed without waiting on a
peer that no longer answers. :func:`error_table` is the backend's one
translation of aiormq's errors into the aioresults tree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import aiormq
import anyio
from aiormq import exceptions as amqp_errors
from aiormq.abc import AbstractChannel

from ..._exceptions import BackendError, BackendUnavailable, ConfigurationError
from .._support import ErrorRule, ErrorTable

__all__ = [
    "CLOSE_TIMEOUT",
    "close_quietly",
    "declare_reply_queue",
    "error_table",
    "is_connection_error",
    "open_connection",
]

#: Seconds a goodbye (channel or connection close) may take before it is abandoned.
CLOSE_TIMEOUT = 5.0


def error_table(where: Callable[[], str]) -> ErrorTable:
    """aiormq's errors and what each becomes (the specific before the general)."""
    return ErrorTable(
        [
            ErrorRule(
                (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError),
                BackendError,
                "authentication failed on",
            ),
            ErrorRule(
                (amqp_errors.ChannelAccessRefused, amqp_errors.ConnectionNotAllowed),
                BackendError,
                "access refused on",
            ),
            ErrorRule(
                amqp_errors.ChannelNotFoundEntity, BackendError, "no such queue or exchange on"
            ),
            ErrorRule(
                amqp_errors.ChannelPreconditionFailed,
                ConfigurationError,
                "a queue or exchange is declared differently on",
            ),
            ErrorRule(
                (
                    amqp_errors.AMQPConnectionError,
                    amqp_errors.ChannelInvalidStateError,
                    ConnectionError,
                    TimeoutError,
                    OSError,
                ),
                BackendUnavailable,
                "cannot reach",
            ),
            ErrorRule(amqp_errors.AMQPError, BackendError, "failed on"),
        ],
        where,
    )


async def open_connection(
    url: str, name: str, timeout: float, errors: ErrorTable, doing: str
) -> aiormq.Connection:
    """A new connection to ``url`` (named ``name`` in the broker's listings).

    :raises BackendUnavailable: not connected within ``timeout`` seconds, or refused.
    :raises BackendError: the broker refused the credentials or the virtual host.
    """
    connection = aiormq.Connection(url, client_properties={"connection_name": name})
    try:
        with errors.translating(doing):
            try:
                with anyio.fail_after(timeout):
                    await connection.connect()
            except TimeoutError:
                raise TimeoutError(f"no answer within {timeout:g} s") from None
    except BaseException:
        await close_quietly(connection)
        raise
    return connection


async def close_quietly(connection: aiormq.Connection | None) -> None:
    """Close ``connection``, bounded and shielded; its errors do not matter any more."""
    if connection is None or connection.is_closed:
        return
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        with contextlib.suppress(Exception):
            await connection.close()


async def declare_reply_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> None:
    """Declare a reply queue as this backend does everywhere (arguments must match)."""
    # Durable like Celery's, but not auto-delete: an auto-delete queue is deleted
    # when its consumer's connection drops, and replies published meanwhile with it.
    # x-expires removes it once unused that long (a process that died without aclose()).
    await channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection or channel is gone (worth a retry on a
    new one), not that the broker refused a call (404, 403, 406: it would again)."""
    if isinstance(exc, amqp_errors.ChannelClosed):
        return type(exc) is amqp_errors.ChannelClosed
    # aiormq raises a bare RuntimeError for a channel asked of a closed connection.
    return isinstance(
        exc,
        (
            amqp_errors.AMQPConnectionError,
            amqp_errors.ChannelInvalidStateError,
            ConnectionError,
            OSError,
            RuntimeError,
        ),
    )
