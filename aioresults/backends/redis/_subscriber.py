"""The Redis backend's pub/sub feed: one connection, one session at a time.

Only the session writes to the connection (waiters queue requests and never
block on it): what is queued in one event-loop iteration leaves in one write,
SUBSCRIBE batches followed by ``PING <token>``, whose reply confirms
everything before it; queued UNSUBSCRIBEs, skipping ids watched again since.
Replies are parsed by hiredis in the protocol's ``data_received``, and a
message is handed to the hub right there: its waiters' futures are resolved
with no task in between. A new session subscribes every watched id, and once that is
confirmed it reports :meth:`~aioresults.backends._feeds.Feed.resynced`, after
which the hub re-reads them all (a result stored while away is not lost). Its
reads never time out (idle waits of any length are fine); a PING every
``health_check_interval`` seconds detects a dead peer.

On a cluster the same class serves one master (``node``) with SSUBSCRIBE,
inside :class:`~._cluster.ClusterFeed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import hiredis
from redis import exceptions as redis_errors
from redis.crc import key_slot

from ..._exceptions import BackendError
from .._feeds import Feed
from ._resp import Connection, pack, reply_error

if TYPE_CHECKING:
    from . import RedisBackend
    from ._cluster import ClusterFeed

__all__ = ["BATCH", "Rerouted", "Subscriber"]

logger = logging.getLogger("aioresults.backends.redis")

#: Channels per (UN)SUBSCRIBE; larger batches are sent as several commands.
BATCH = 1000
CONNECT_TIMEOUT = 10.0


class Rerouted(Exception):
    """A request's slot moved to another master before it was confirmed."""


class _Request:
    """Ids to subscribe; ``done`` is set once Redis has confirmed (a PING reply
    after the SUBSCRIBE), or ``error`` says why it cannot be."""

    __slots__ = ("done", "error", "ids", "token")

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = ids
        self.token = 0
        self.done = anyio.Event()
        self.error: Exception | None = None


class Subscriber(Feed):
    """One pub/sub connection: the backend's only one on a single server; on a
    cluster, one per master (``node``), SSUBSCRIBEd to the channels placed on it."""

    kind = "push"

    def __init__(
        self,
        backend: RedisBackend,
        health_check_interval: float,
        node: str | None = None,
        cluster: ClusterFeed | None = None,
    ) -> None:
        self._backend = backend
        self._interval = health_check_interval
        #: The cluster master (``host:port``) this subscriber serves; None on a single server.
        self.node = node
        self._cluster = cluster
        self._subscribe, self._unsubscribe = (
            ("SUBSCRIBE", "UNSUBSCRIBE") if node is None else ("SSUBSCRIBE", "SUNSUBSCRIBE")
        )
        self._closed = False
        self._queued: list[_Request] = []
        self._sent: deque[_Request] = deque()
        # On a cluster, the ids watched through this master's connection; on a
        # single server that is every id the hub watches (no copy of its own).
        self._own: set[str] | None = set() if node is not None else None
        self._drop: set[str] = set()
        self._resync = False
        self._resynced: list[str] = []
        self._tokens = 0
        self._answered = 0
        self._later: list[Callable[[], None]] = []
        # Channels are task keys: this prefix, then the id.
        self._prefix = (backend.global_keyprefix + backend.task_keyprefix).encode()

    def __repr__(self) -> str:
        return f"pub/sub of {self._backend!r}" + (f" on {self.node}" if self.node else "")

    @property
    def watched(self) -> Collection[str]:
        """The ids watched through this connection (subscribed, or about to be)."""
        return super().watched if self._own is None else self._own

    def resync_ids(self) -> Sequence[str]:
        return self._resynced

    # ------------------------------------------------------------ watching

    def submit(self, ids: Sequence[str]) -> _Request:
        """Queue ``ids`` for subscription; the request is done once confirmed."""
        if self._closed:
            raise BackendError(f"{self._backend!r} is closed")
        if self._own is not None:
            self._own.update(ids)
        request = _Request(ids)
        self._queued.append(request)
        self._kick()
        return request

    async def watch(self, task_ids: Sequence[str]) -> None:
        request = self.submit(task_ids)
        try:
            await request.done.wait()
        except BaseException:
            # The hub takes these ids as never watched; drop what was subscribed.
            self.unwatch(task_ids)
            raise
        if request.error is not None:
            self.unwatch(task_ids)
            raise request.error

    def unwatch(self, task_ids: Sequence[str]) -> None:
        """End the watch of ``ids`` (their channels are unsubscribed unless watched again)."""
        if self._own is not None:
            self._own.difference_update(task_ids)
        self._drop.update(task_ids)
        self._kick()

    def release(self, ids: set[str]) -> None:
        """Forget ``ids`` whose slot moved to another master (which dropped their
        channels itself), and answer their unconfirmed requests with :class:`Rerouted`."""
        if ids:
            if self._own is not None:
                self._own -= ids
            self._answer_early(lambda r: not ids.isdisjoint(r.ids), Rerouted())

    def close(self, error: Exception | None = None) -> None:
        """Stop for good; unconfirmed requests get ``error`` (closed, by default)."""
        self._closed = True
        self._answer_early(lambda r: True, error or BackendError(f"{self._backend!r} was closed"))

    def _answer_early(self, which: Callable[[_Request], bool], error: Exception) -> None:
        for request in [*self._sent, *self._queued]:
            if which(request):
                request.error = error
                request.done.set()
        self._sent = deque(r for r in self._sent if not r.done.is_set())
        self._queued = [r for r in self._queued if not r.done.is_set()]

    # ------------------------------------------------------------ a session

    async def session(self) -> None:
        connection: Connection | None = None
        try:
            # Bounded: a hung handshake would block for ever.
            with anyio.fail_after(CONNECT_TIMEOUT):
                connection = await self._backend._pubsub_connect(self.node)
            connection.receiver = self._received
            self._connection = connection
            self._resync = True
            self._kick()
            self._schedule_ping(connection)
            while True:
                # Until the connection is lost (that raises why), run what a reply
                # asked for that needs a task (a cluster's slot map re-read).
                self._poke = poke = asyncio.get_running_loop().create_future()
                await asyncio.wait((connection.lost, poke), return_when=asyncio.FIRST_COMPLETED)
                if connection.lost.done():
                    connection.lost.result()
                later, self._later = self._later, []
                for call in later:
                    call()
        except Exception as exc:
            if isinstance(exc, (redis_errors.AuthenticationError, redis_errors.ResponseError)):
                self._answer_early(
                    lambda r: True, BackendError(f"cannot subscribe on {self!r}: {exc}")
                )
            if self._cluster is not None:
                # The master may have failed over: ask the cluster who serves what.
                self._cluster.rehome_soon()
            raise
        finally:
            self._connection = None
            self._later = []
            if self._ping_timer is not None:
                self._ping_timer.cancel()
                self._ping_timer = None
            if connection is not None:
                connection.close()

    _connection: Connection | None = None
    _poke: asyncio.Future[None] | None = None
    _flushing = False
    _ping_timer: asyncio.TimerHandle | None = None

    def _kick(self) -> None:
        """Send what is queued, once this event-loop iteration is over."""
        if self._connection is not None and not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        connection = self._connection
        if connection is not None and not connection.closed:
            commands = self._pack()
            if commands:
                connection.write(b"".join(commands))

    def _pack(self) -> list[bytes]:
        """The commands for everything queued; one state, no await."""
        commands: list[bytes] = []
        prefix = self._backend.global_keyprefix + self._backend.task_keyprefix

        def batches(command: str, ids: list[str]) -> None:
            if self.node is None:
                # Channel names made a batch at a time: a large resync allocates little.
                for start in range(0, len(ids), BATCH):
                    chunk = ids[start : start + BATCH]
                    commands.append(pack((command, *[prefix + i for i in chunk])))
                return
            # A sharded command takes the channels of one slot.
            by_slot: dict[int, list[str]] = {}
            for task_id in ids:
                channel = prefix + task_id
                by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
            for group in by_slot.values():
                for start in range(0, len(group), BATCH):
                    commands.append(pack((command, *group[start : start + BATCH])))

        resync, self._resync = self._resync, False
        if resync:
            # A new connection: subscribe every id served here; that answers every request.
            requests = [*self._sent, *self._queued]
            self._sent.clear()
            ids = self._resynced = list(self.watched)
        else:
            # Skipping ids watched again since: their waiters keep the subscription.
            batches(self._unsubscribe, [i for i in self._drop if i not in self.watched])
            requests = self._queued
            ids = list(dict.fromkeys(i for r in requests for i in r.ids if i in self.watched))
        self._drop.clear()
        self._queued = []
        batches(self._subscribe, ids)
        if resync or requests:
            self._tokens += 1
            commands.append(pack(("PING", str(self._tokens))))
            if resync:
                self._resync_token = self._tokens
            for request in requests:
                request.token = self._tokens
                self._sent.append(request)
        return commands

    _resync_token = 0

    def _received(self, reply: Any) -> None:
        """One reply, as hiredis parsed it in ``data_received``."""
        if type(reply) is list:
            if len(reply) == 3:
                kind, channel = reply[0], reply[1]
                if kind == b"message" or kind == b"smessage":
                    if channel.startswith(self._prefix):
                        task_id = channel[len(self._prefix) :].decode("utf-8", "replace")
                        self.deliver(task_id, reply[2])
                elif kind == b"sunsubscribe" and channel.startswith(self._prefix):
                    # Not ours (ours leave only unwanted ids): the master gave the
                    # slot away and dropped the channel. Find its new master.
                    task_id = channel[len(self._prefix) :].decode("utf-8", "replace")
                    if task_id in self.watched and self._cluster is not None:
                        self._soon(self._cluster.rehome_soon, [task_id])
            elif len(reply) == 2 and reply[0] == b"pong":
                self._answered_up_to(reply[1])
        elif type(reply) is bytes:  # PING's reply when nothing is subscribed
            self._answered_up_to(reply)
        elif type(reply) is hiredis.ReplyError:
            error = reply_error(reply)
            if self._cluster is None:
                raise error
            if isinstance(error, redis_errors.AskError):
                # A cluster's reply (MOVED) to an SSUBSCRIBE for a slot this master
                # no longer serves: subscribe that slot's channels where it lives now.
                self._soon(self._cluster.rehome_soon, (), [error.slot_id])
            elif isinstance(error, (redis_errors.TryAgainError, redis_errors.ClusterDownError)):
                self._soon(self._cluster.rehome_soon, list(self.watched))
            else:
                raise error

    def _soon(self, call: Callable[..., None], *args: Any) -> None:
        """Have the session's task run ``call(*args)`` (anyio wants a task)."""
        self._later.append(lambda: call(*args))
        if self._poke is not None and not self._poke.done():
            self._poke.set_result(None)

    def _answered_up_to(self, token: bytes) -> None:
        if not token.isdigit():
            return
        self._answered = max(self._answered, int(token))
        while self._sent and self._sent[0].token <= self._answered:
            self._sent.popleft().done.set()
        if self._resync_token and self._answered >= self._resync_token:
            self._resync_token = 0
            self.resynced()
            self._resynced = []  # the hub took them

    # ------------------------------------------------------------ keep-alive

    def _schedule_ping(self, connection: Connection) -> None:
        # A silent peer (host gone, no RST) would leave the session waiting for ever.
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self._interval, self._ping, connection)

    def _ping(self, connection: Connection) -> None:
        request = _Request(())
        self._queued.append(request)
        self._kick()
        timeout = max(1.0, self._interval)
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(timeout, self._pinged, connection, request, timeout)

    def _pinged(self, connection: Connection, request: _Request, timeout: float) -> None:
        if request.done.is_set():
            self._schedule_ping(connection)
        else:
            self._ping_timer = None
            connection.abort(redis_errors.ConnectionError(f"no reply to PING within {timeout:g} s"))
