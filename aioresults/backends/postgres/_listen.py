"""The LISTEN feed: one connection per backend that hears every write to the task table.

Every write of aioresults NOTIFYs the task id on the store's channel in the
same transaction, and so does the trigger for any other writer; PostgreSQL
delivers a notification at commit, to every session LISTENing then. The feed
hands each id to the hub, which re-reads the ids of one moment in one SELECT
(a signal feed: a notification carries 8000 bytes at most, so never the record).

A session is: connect, ``LISTEN``, learn whether the trigger is there, then
:meth:`~aioresults.backends._feeds.Feed.resynced` (after a reconnect the hub
re-reads every watched id: nothing else tells what was stored meanwhile), then
wait until the connection is lost. Without the trigger, writes of others
(Celery's) send nothing, so the hub's batched poller runs beside the feed.

The connection must reach PostgreSQL itself: PgBouncer in transaction mode
hands a session's statements to any server connection, so its LISTEN is lost
(the backend's ``listen_url`` may point past it).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio

from .._feeds import Feed

if TYPE_CHECKING:
    import asyncpg

    from . import PostgresBackend

__all__ = ["ListenFeed", "keep_alive"]

logger = logging.getLogger("aioresults.backends")

#: How the LISTEN connection is named in ``pg_stat_activity``.
APPLICATION_NAME = "aioresults-listen"


def keep_alive(
    conn: asyncpg.Connection, idle: int = 30, interval: int = 10, count: int = 3
) -> None:
    """Turn TCP keep-alives on: a connection whose server vanished without a
    word (a host down, a network cut) is noticed in about a minute, with no
    query sent while all is well."""
    transport: Any = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class ListenFeed(Feed):
    """The LISTEN connection of one :class:`~aioresults.backends.postgres.PostgresBackend`."""

    kind: ClassVar[Literal["push", "signal"]] = "signal"

    def __init__(self, backend: PostgresBackend) -> None:
        self._backend = backend

    def __repr__(self) -> str:
        return f"the LISTEN feed of {self._backend!r}"

    def _notified(self, conn: object, pid: int, channel: str, task_id: str) -> None:
        self.changed((task_id,))

    async def session(self) -> None:
        backend = self._backend
        conn = await backend._listen_connection()
        try:
            lost = anyio.Event()
            conn.add_termination_listener(lambda _: lost.set())
            with backend._errors.translating("listening for results"):
                await conn.add_listener(backend._channel, self._notified)
                trigger = await backend._has_trigger(conn)
            if not trigger and not self.poll_too:
                # Nothing tells about writes of others: the poller finds them.
                logger.info("%r: no NOTIFY trigger on the task table; polling too", backend)
                self.poll_too = True
                self.fall_back_to_polling()
            self.resynced()
            await lost.wait()
            raise ConnectionError("the LISTEN connection was closed")
        finally:
            conn.terminate()  # no goodbye needed: nothing is pending on it
