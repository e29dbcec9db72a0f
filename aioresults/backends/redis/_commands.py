"""The Redis commands the backend sends, over one of two paths behind one interface.

* :class:`PipelinedCommands`: the backend's own multiplexed connection
  (:mod:`._channel`): everything asked for in one event-loop iteration leaves
  in one write. Used for a single server, a Unix socket, TLS and Sentinel.
* :class:`ClientCommands`: a redis-py client: Redis Cluster (its command
  routing), a caller's injected client, or connection options only redis-py
  knows. Reads of one iteration share one MGET (a batcher).

Both send the same commands and scripts, so the server-side semantics are the
same: the guarded write script, the compare-and-set fallback, SET with PUBLISH
in one MULTI, the chord scripts.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.cluster import RedisCluster

from ._channel import Channel, Script
from ._resp import pack, reply_error
from ._scripts import COUNT_PART, WRITE, WRITE_IF, WRITE_IF_SHARDED, WRITE_SHARDED

__all__ = ["BATCH", "ClientCommands", "Commands", "PipelinedCommands"]

#: Keys per MGET; larger reads send several at once.
BATCH = 1000


def _bytes(value: Any) -> Any:
    # A caller's client may decode responses; payloads are bytes to the codec.
    return value.encode() if isinstance(value, str) else value


class Commands(ABC):
    """What the backend asks of Redis. Every command here is idempotent."""

    @abstractmethod
    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values at ``keys``, in order (None: missing)."""

    @abstractmethod
    async def write(self, key: str, value: bytes, ttl_ms: int) -> int:
        """The guarded write script: 1 stored, 0 refused (SUCCESS), -1 undecidable."""

    @abstractmethod
    async def write_if(self, key: str, value: bytes, ttl_ms: int, seen: str) -> int:
        """Store ``value`` if the record's SHA1 is still ``seen`` ('' none): 1, else 2."""

    @abstractmethod
    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        """SET (with its TTL) and PUBLISH, in one MULTI."""

    @abstractmethod
    async def delete(self, *keys: str) -> None:
        """DEL."""

    @abstractmethod
    async def chord_start(self, keys: Sequence[str], size: int, ttl_ms: int) -> None:
        """Delete the chord's ``keys`` (parts, counter, receipts) and set its size key
        (the last of ``keys``), in one MULTI."""

    @abstractmethod
    async def chord_count(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The chord part script."""

    @abstractmethod
    async def hvals(self, key: str) -> list[bytes]:
        """HVALS."""

    def close(self, error: Exception) -> None:  # noqa: B027 - optional
        """Fail what is in flight with ``error``; refuse more."""


class PipelinedCommands(Commands):
    """Commands on the backend's own multiplexed connection."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._write = Script(WRITE)
        self._write_if = Script(WRITE_IF)
        self._count = Script(COUNT_PART)
        channel.scripts = [self._write, self._count]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if len(keys) <= BATCH:
            values: list[bytes | None] = await self.channel.send(pack(("MGET", *keys)))
            return values
        chunks = [pack(("MGET", *keys[i : i + BATCH])) for i in range(0, len(keys), BATCH)]
        return [v for chunk in await self.channel.send_all(chunks) for v in chunk]

    async def write(self, key: str, value: bytes, ttl_ms: int) -> int:
        written: int = await self.channel.script(self._write, (key,), (value, ttl_ms))
        return written

    async def write_if(self, key: str, value: bytes, ttl_ms: int, seen: str) -> int:
        written: int = await self.channel.script(self._write_if, (key,), (value, ttl_ms, seen))
        return written

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        command = ("SET", key, value, "PX", ttl_ms) if ttl_ms else ("SET", key, value)
        replies = await self.channel.send(
            pack(("MULTI",)) + pack(command) + pack(("PUBLISH", key, value)) + pack(("EXEC",)), 4
        )
        _raise_failed(replies)

    async def delete(self, *keys: str) -> None:
        await self.channel.send(pack(("DEL", *keys)))

    async def chord_start(self, keys: Sequence[str], size: int, ttl_ms: int) -> None:
        *parts, size_key = keys
        command = ("SET", size_key, size, "PX", ttl_ms) if ttl_ms else ("SET", size_key, size)
        replies = await self.channel.send(
            pack(("MULTI",)) + pack(("DEL", *parts)) + pack(command) + pack(("EXEC",)), 4
        )
        _raise_failed(replies)

    async def chord_count(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.channel.script(self._count, keys, args)

    async def hvals(self, key: str) -> list[bytes]:
        values: list[bytes] = await self.channel.send(pack(("HVALS", key)))
        return values

    def close(self, error: Exception) -> None:
        self.channel.close(error)


def _raise_failed(replies: Any) -> None:
    """EXEC answers None when aborted, else a list that may hold an error reply."""
    for reply in replies or ():
        if type(reply) is hiredis.ReplyError:
            raise reply_error(reply)


class ClientCommands(Commands):
    """Commands through a redis-py client (a cluster's, an injected one...).

    :param limit: commands in flight at once (a cluster's nodes refuse
        connections past a limit instead of queueing callers).
    :param batch: wraps the MGET of a batch of reads (the backend's batcher).
    """

    def __init__(
        self,
        client: Any,
        *,
        limit: contextlib.AbstractAsyncContextManager[Any],
        batch: Callable[[Callable[[list[list[str]]], Any]], Callable[[list[str]], Any]],
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._limit = limit
        self._write = client.register_script(WRITE_SHARDED if self.cluster else WRITE)
        self._write_if = client.register_script(WRITE_IF_SHARDED if self.cluster else WRITE_IF)
        self._count = client.register_script(COUNT_PART)
        self._reads = batch(self._read_batch)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        values: list[bytes | None] = await self._reads(list(keys))
        return values

    async def _read_batch(self, batches: list[list[str]]) -> list[list[bytes | None]]:
        keys = [key for batch in batches for key in batch]
        async with self._limit:
            client = self.client
            if self.cluster:
                values = await client.mget_nonatomic(keys)
            elif len(keys) <= BATCH:
                values = await client.mget(keys)
            else:
                async with client.pipeline(transaction=False) as pipe:
                    for start in range(0, len(keys), BATCH):
                        pipe.mget(keys[start : start + BATCH])
                    values = [v for chunk in await pipe.execute() for v in chunk]
        out = []
        offset = 0
        for batch in batches:
            out.append([_bytes(v) for v in values[offset : offset + len(batch)]])
            offset += len(batch)
        return out

    async def write(self, key: str, value: bytes, ttl_ms: int) -> int:
        async with self._limit:
            return int(await self._write(keys=[key], args=[value, ttl_ms]))

    async def write_if(self, key: str, value: bytes, ttl_ms: int, seen: str) -> int:
        async with self._limit:
            return int(await self._write_if(keys=[key], args=[value, ttl_ms, seen]))

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        # As Celery: the value with its TTL and a PUBLISH, in one MULTI.
        async with self._limit, self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, value, px=ttl_ms or None)
            # PUBLISH reaches every node of a cluster; SPUBLISH only the key's shard.
            if self.cluster:
                pipe.spublish(key, value)
            else:
                pipe.publish(key, value)
            await pipe.execute()

    async def delete(self, *keys: str) -> None:
        async with self._limit:
            await self.client.delete(*keys)

    async def chord_start(self, keys: Sequence[str], size: int, ttl_ms: int) -> None:
        *parts, size_key = keys
        async with self._limit, self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*parts)
            pipe.set(size_key, size, px=ttl_ms or None)
            await pipe.execute()

    async def chord_count(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with self._limit:
            return await self._count(keys=list(keys), args=list(args))

    async def hvals(self, key: str) -> list[bytes]:
        async with self._limit:
            values = await self.client.hvals(key)
        return [v for v in map(_bytes, values) if v is not None]
