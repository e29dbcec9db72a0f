"""The Redis backend's pub/sub feed: one connection, one session at a time.

Only the session writes to the connection (waiters queue requests and never
block on it): SUBSCRIBE batches followed by ``PING <token>``, whose reply
confirms everything before it; queued UNSUBSCRIBEs, skipping ids watched
again since. A new session subscribes every watched id, and once that is
confirmed it reports :meth:`~aioresults.backends._feeds.Feed.resynced`, after
which the hub re-reads them all (a result stored while away is not lost). Its
reads never time out (idle waits of any length are fine); a PING every
``health_check_interval`` seconds detects a dead peer.

On a cluster the same class serves one master (``node``) with SSUBSCRIBE,
inside :class:`~._cluster.ClusterFeed`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from redis import exceptions as redis_errors
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from ..._exceptions import BackendError
from .._feeds import Feed

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
        #: The ids watched through this connection (subscribed, or about to be).
        self.watched: set[str] = set()
        self._drop: set[str] = set()
        self._resync = False
        self._resynced: list[str] = []
        self._tokens = 0
        self._answered = 0
        self._wake = anyio.Event()

    def __repr__(self) -> str:
        return f"pub/sub of {self._backend!r}" + (f" on {self.node}" if self.node else "")

    def resync_ids(self) -> Sequence[str]:
        return self._resynced

    # ------------------------------------------------------------ watching

    def submit(self, ids: Sequence[str]) -> _Request:
        """Queue ``ids`` for subscription; the request is done once confirmed."""
        if self._closed:
            raise BackendError(f"{self._backend!r} is closed")
        self.watched.update(ids)
        request = _Request(ids)
        self._queued.append(request)
        self._wake.set()
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
        self.watched.difference_update(task_ids)
        self._drop.update(task_ids)
        self._wake.set()

    def release(self, ids: set[str]) -> None:
        """Forget ``ids`` whose slot moved to another master (which dropped their
        channels itself), and answer their unconfirmed requests with :class:`Rerouted`."""
        if ids:
            self.watched -= ids
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
        connection: Any = self._backend._pubsub_connection(self.node)  # untyped
        try:
            # Bounded: with no read timeout, a hung handshake would block for ever.
            with anyio.fail_after(CONNECT_TIMEOUT):
                await connection.connect()
            self._resync = True
            self._wake.set()
            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write, connection)
                    tasks.start_soon(self._keep_alive)
                    await self._read(connection)
            except BaseExceptionGroup as group:
                raise _first(group) from None
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
            with anyio.CancelScope(shield=True):
                await connection.disconnect(nowait=True)

    async def _write(self, connection: AbstractConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            commands = self._pack(connection)
            if commands:
                await connection.send_packed_command(commands, check_health=False)

    def _pack(self, connection: AbstractConnection) -> list[bytes]:
        """The commands for everything queued; no await, so it sees one state."""
        commands: list[bytes] = []
        task_key = self._backend.task_key

        def batches(command: str, ids: list[str]) -> None:
            channels = [task_key(i) for i in ids]
            groups: list[list[str]] = [channels]
            if self.node is not None:  # a sharded command takes the channels of one slot
                by_slot: dict[int, list[str]] = {}
                for channel in channels:
                    by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
                groups = list(by_slot.values())
            for group in groups:
                for start in range(0, len(group), BATCH):
                    commands.extend(connection.pack_command(command, *group[start : start + BATCH]))

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
            commands.extend(connection.pack_command("PING", str(self._tokens)))
            if resync:
                self._resync_token = self._tokens
            for request in requests:
                request.token = self._tokens
                self._sent.append(request)
        return commands

    _resync_token = 0

    async def _read(self, connection: AbstractConnection) -> None:
        prefix = self._backend.global_keyprefix + self._backend.task_keyprefix
        hub = self.hub
        while True:
            try:
                response = await connection.read_response()
            except redis_errors.AskError as exc:
                # A cluster's reply (MOVED) to an SSUBSCRIBE for a slot this master
                # no longer serves: subscribe that slot's channels where it lives now.
                if self._cluster is None:
                    raise
                self._cluster.rehome_soon(slots=[exc.slot_id])
                continue
            except (redis_errors.TryAgainError, redis_errors.ClusterDownError):
                if self._cluster is None:
                    raise
                self._cluster.rehome_soon(ids=list(self.watched))
                continue
            if isinstance(response, list) and len(response) == 3:
                kind, channel = response[0], response[1]
                if kind in (b"message", b"smessage") or kind == b"sunsubscribe":
                    key = channel.decode("utf-8", "replace") if channel else ""
                    if not key.startswith(prefix):
                        continue
                    task_id = key[len(prefix) :]
                    if kind == b"sunsubscribe":
                        # Not ours (ours leave only unwanted ids): the master gave the
                        # slot away and dropped the channel. Find its new master.
                        if task_id in self.watched and self._cluster is not None:
                            self._cluster.rehome_soon(ids=[task_id])
                    else:
                        hub.deliver(task_id, response[2])
            elif isinstance(response, list) and len(response) == 2 and response[0] == b"pong":
                self._answered_up_to(response[1])
            elif isinstance(response, bytes):  # PING's reply when nothing is subscribed
                self._answered_up_to(response)

    def _answered_up_to(self, token: bytes) -> None:
        if not token.isdigit():
            return
        self._answered = max(self._answered, int(token))
        while self._sent and self._sent[0].token <= self._answered:
            self._sent.popleft().done.set()
        if self._resync_token and self._answered >= self._resync_token:
            self._resync_token = 0
            self.resynced()

    async def _keep_alive(self) -> None:
        # A silent peer (host gone, no RST) would leave the read blocked for ever.
        while True:
            await anyio.sleep(self._interval)
            request = _Request(())
            self._queued.append(request)
            self._wake.set()
            timeout = max(1.0, self._interval)
            with anyio.move_on_after(timeout):
                await request.done.wait()
            if not request.done.is_set():
                raise redis_errors.ConnectionError(f"no reply to PING within {timeout:g} s")


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a task group's (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first
