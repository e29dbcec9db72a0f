"""An optional wake hint for memcached: its ``watch mutations`` log stream.

Memcached has no notifications, so the hub's batched poller always serves
waits here. With ``watch="notify"``, a connection per server also runs
``watch mutations`` (memcached >= 1.4.26 logs a line per store to watchers:
``ts=... type=item_store key=celery-task-meta-<id> status=stored cmd=set ...``);
a stored key a waiter waits for is re-read at once, instead of at the next
poll.

It is a hint on top of the poller, never alone: the stream is a debugging aid
that drops lines when a watcher falls behind (it then says ``skipped=<n>``:
everything watched is re-read), and its lines come from memcached's logger
thread, which sleeps longer while the server is idle. Measured on memcached
1.6.18: a line follows its store within 1-2 ms under steady traffic, but 15 ms
after 0.1 s of quiet, about 90 ms after 1 s and 0.2-0.8 s after 4 s, when the
poller (every 0.5 s at most) is often first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from urllib.parse import quote, unquote_to_bytes

import anyio

from .._feeds import Feed, FeedGone
from ._client import Node

__all__ = ["MutationFeed"]


class MutationFeed(Feed):
    """``watch mutations`` on every server: stored task keys are re-read at once.

    :param nodes: the servers.
    :param prefix: the key prefix of task records (``<global_keyprefix>celery-task-meta-``).
    """

    kind = "signal"
    poll_too = True

    def __init__(self, nodes: Sequence[Node], prefix: str) -> None:
        self._nodes = list(nodes)
        # Memcached logs keys URI-encoded: only letters, digits and -._~ as they are.
        self._prefix = quote(prefix, safe="-._~").encode()

    def describe(self) -> str:
        return "signal"

    async def session(self) -> None:
        writers: list[asyncio.StreamWriter] = []
        try:
            readers = []
            for node in self._nodes:
                reader, writer = await self._watch(node)
                writers.append(writer)
                readers.append((node, reader))
            self.resynced()
            async with anyio.create_task_group() as group:
                for node, reader in readers:
                    group.start_soon(self._read, node, reader)
        finally:
            for writer in writers:
                writer.close()

    async def _watch(self, node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        with anyio.fail_after(node.connect_timeout):
            if isinstance(node.address, str):
                reader, writer = await asyncio.open_unix_connection(node.address)
            else:
                reader, writer = await asyncio.open_connection(*node.address)
            try:
                writer.write(b"watch mutations\r\n")
                answer = await reader.readline()
            except BaseException:
                writer.close()
                raise
        if answer != b"OK\r\n":
            writer.close()
            if not answer:
                raise ConnectionError(f"{node.name} closed the connection")
            # An old server, or one that does not allow watchers: poll only.
            raise FeedGone(f"{node.name} refused 'watch mutations': {answer.strip()!r}")
        return reader, writer

    async def _read(self, node: Node, reader: asyncio.StreamReader) -> None:
        hub = self  # the feed's own view of its hub
        needle = b" key=" + self._prefix
        skip = len(needle)
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError(f"{node.name} ended its mutation log")
            start = line.find(needle)
            if start < 0:
                if b"skipped=" in line:
                    hub.changed(None)  # lines were dropped: any watched key may have changed
                continue
            if b" status=stored" not in line:
                continue  # an add or cas that changed nothing
            end = line.find(b" ", start + skip)
            if end < 0:
                end = len(line.rstrip())
            with contextlib.suppress(UnicodeDecodeError):
                task_id = unquote_to_bytes(line[start + skip : end]).decode()
                if task_id in hub.watched:
                    hub.changed([task_id])
