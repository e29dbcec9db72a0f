"""The Redis backend's feed on a Redis Cluster: one sharded subscriber per master.

Writes SPUBLISH (sharded pub/sub: the channel is the key, served by the key's
master), so waiters SSUBSCRIBE on the master that owns each channel's slot.
:class:`ClusterFeed` routes every watch to the :class:`~._subscriber.Subscriber`
of that master and runs one loop per master (each reconnecting on its own, and
re-reading only its own ids after). A MOVED reply, a channel the server drops
(its slot moved) or a lost connection re-reads the slot map; channels whose
slot moved are subscribed on their new master first, then their keys are
re-read. The backend sees the same watch/unwatch interface as on one server.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from ..._exceptions import BackendError, BackendUnavailable
from .._feeds import Feed
from .._support import Backoff
from ._subscriber import CONNECT_TIMEOUT, Rerouted, Subscriber

if TYPE_CHECKING:
    from . import RedisBackend

__all__ = ["ClusterFeed"]

logger = logging.getLogger("aioresults.backends.redis")


class ClusterFeed(Feed):
    """Sharded pub/sub over every master; see the module docstring."""

    kind = "push"

    def __init__(self, backend: RedisBackend, health_check_interval: float) -> None:
        self._backend = backend
        self._interval = health_check_interval
        #: One sharded subscriber per master, by node name (``host:port``).
        self.shards: dict[str, Subscriber] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._lost_ids: set[str] = set()
        self._lost_slots: set[int] = set()
        self._rehoming = False
        self._rehome_again = False

    def __repr__(self) -> str:
        return f"sharded pub/sub of {self._backend!r}"

    def sessions_by_node(self) -> dict[str, int]:
        """Sessions established per master so far."""
        return {name: shard.sessions for name, shard in self.shards.items()}

    @property
    def _nodes(self) -> RedisCluster:
        client = self._backend.client
        assert isinstance(client, RedisCluster)
        return client

    # ------------------------------------------------------------ the session

    async def session(self) -> None:
        self.resynced()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                for name, shard in self.shards.items():
                    self._run_shard(name, shard)
                await anyio.sleep_forever()
        finally:
            self._group = None

    def _run_shard(self, name: str, shard: Subscriber) -> None:
        if self._group is None or name in self._scopes:
            return
        scope = self._scopes[name] = anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    await self.run_part(shard)
            finally:
                if self._scopes.get(name) is scope:
                    del self._scopes[name]

        self._group.start_soon(run, name=f"{shard!r}")

    # ------------------------------------------------------------ watching

    def _shard_for(self, task_id: str) -> Subscriber:
        """The subscriber of the master that serves ``task_id``'s slot now."""
        key = self._backend.task_key(task_id)
        node = self._nodes.get_node_from_key(key)
        if node is None:  # only for replica=True in redis-py: never here
            raise BackendUnavailable(f"no master of {self._backend!r} serves {key!r}")
        shard = self.shards.get(node.name)
        if shard is None:
            shard = Subscriber(self._backend, self._interval, node.name, self)
            self.adopt(shard)
            self.shards[node.name] = shard
            self._run_shard(node.name, shard)
        return shard

    def _route(self, task_ids: Sequence[str]) -> dict[Subscriber, list[str]]:
        """Group ids by the subscriber of their slot's master."""
        groups: dict[Subscriber, list[str]] = {}
        with self._backend._errors.translating("finding a channel's master"):
            for task_id in task_ids:
                groups.setdefault(self._shard_for(task_id), []).append(task_id)
        return groups

    async def watch(self, task_ids: Sequence[str]) -> None:
        await super().watch(task_ids)  # the cluster's session is up
        pending = list(task_ids)
        while pending:
            requests = [(s, s.submit(ids)) for s, ids in self._route(pending).items()]
            try:
                # All are in flight already: this waits for the slowest master only.
                for _, request in requests:
                    await request.done.wait()
            except BaseException:
                # The hub takes these ids as never watched: end what was started.
                for shard, request in requests:
                    shard.unwatch(request.ids)
                raise
            pending = []
            for _, request in requests:
                if isinstance(request.error, Rerouted):
                    pending.extend(request.ids)  # its slot moved meanwhile: subscribe anew
                elif request.error is not None:
                    for shard, other in requests:
                        shard.unwatch(other.ids)
                    raise request.error

    def unwatch(self, task_ids: Sequence[str]) -> None:
        for shard in self.shards.values():
            if shard.watched:
                shard.unwatch([i for i in task_ids if i in shard.watched])

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()

    # ------------------------------------------------------------ moved slots

    def rehome_soon(self, ids: Sequence[str] = (), slots: Sequence[int] = ()) -> None:
        """Re-read the slot map soon, and move channels whose master changed.

        :param ids: channels a master dropped (they are subscribed again).
        :param slots: slots a master refused with MOVED (likewise).
        """
        self._lost_ids.update(ids)
        self._lost_slots.update(slots)
        self._rehome_again = True
        if not self._rehoming and self._group is not None:
            self._rehoming = True
            self._group.start_soon(self._rehome, name=f"{self!r} slot map")

    async def _rehome(self) -> None:
        backoff = Backoff(0.05, 1.0)
        try:
            while self._rehome_again:
                self._rehome_again = False
                try:
                    with anyio.fail_after(CONNECT_TIMEOUT):
                        await self._nodes.nodes_manager.initialize()
                    self._move_channels()
                except Exception as exc:
                    logger.warning("re-reading the slot map of %r failed: %s", self, exc)
                    self._rehome_again = True
                # Re-read at most this often, however many replies ask for it.
                await backoff.sleep()
        finally:
            self._rehoming = False

    def _move_channels(self) -> None:
        lost_ids, self._lost_ids = self._lost_ids, set()
        lost_slots, self._lost_slots = self._lost_slots, set()
        channels: list[str] = []
        for old in list(self.shards.values()):
            leaving = set()
            for task_id in old.watched:
                try:
                    new = self._shard_for(task_id)
                except (BackendError, redis_errors.RedisClusterException):
                    self.rehome_soon(ids=[task_id])  # its slot has no master right now
                    continue
                lost = task_id in lost_ids or (
                    bool(lost_slots)
                    and key_slot(self._backend.task_key(task_id).encode()) in lost_slots
                )
                if new is not old or lost:
                    leaving.add(task_id)
            old.release(leaving)
            channels.extend(leaving)
        if channels and self._group is not None:
            logger.info("%r: %d channels moved to another master", self, len(channels))
            self._group.start_soon(self._resubscribe, channels, name=f"{self!r} moved channels")
        # A master that left the cluster keeps no connection once nothing is on it.
        masters = {node.name for node in self._nodes.get_primaries()}
        for name, shard in list(self.shards.items()):
            if name not in masters and not shard.watched:
                shard.close(Rerouted())
                del self.shards[name]
                scope = self._scopes.pop(name, None)
                if scope is not None:
                    scope.cancel()

    async def _resubscribe(self, ids: list[str]) -> None:
        """Subscribe moved channels where their slot lives now, then re-read their keys."""
        backoff = Backoff(0.05, 1.0)
        while True:
            # Ids whose waiters left meanwhile were unwatched nowhere: leave them out.
            ids = [i for i in ids if i in self.watched]
            try:
                await self.watch(ids)
                break
            except Exception as exc:
                logger.warning("subscribing moved channels of %r failed: %s", self, exc)
                await backoff.sleep()
        self.refresh_soon(ids)
