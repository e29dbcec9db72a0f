"""The limit rows of the Redis suite: the least a client can do, written by hand.

:class:`RawClient` is an :class:`asyncio.Protocol` with hiredis's reader:
commands are packed by hiredis, everything asked for in one event-loop
iteration leaves in one ``transport.write`` (auto-pipelining), and replies
resolve their futures right in ``data_received``. :class:`RawSubscriber` is
the same for pub/sub: a message resolves its waiter's future where it is
parsed. Neither retries, times out or checks anything: they are what a
library is measured against, not something to use.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis

__all__ = ["RawClient", "RawSubscriber", "open_raw"]


class RawClient(asyncio.Protocol):
    """Auto-pipelined commands; see the module docstring."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.out: list[bytes] = []
        self.scheduled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while (reply := self.reader.gets()) is not False:
            future = pending.popleft()
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.pending.append(future)
        self.out.append(hiredis.pack_command(args))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.scheduled = False
        assert self.transport is not None
        self.transport.write(b"".join(self.out))
        self.out = []

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RawSubscriber(asyncio.Protocol):
    """Pub/sub: ``await wait(channel)`` returns the next message's payload."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader()
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.pongs: deque[asyncio.Future[None]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if reply[0] == b"message":
                future = self.waiting.pop(reply[1], None)
                if future is not None and not future.done():
                    future.set_result(reply[2])
            elif reply[0] == b"pong":
                self.pongs.popleft().set_result(None)

    def subscribe(self, channels: list[bytes]) -> asyncio.Future[None]:
        """SUBSCRIBE, then a PING whose reply confirms it."""
        assert self.transport is not None
        for start in range(0, len(channels), 1000):
            self.transport.write(
                hiredis.pack_command(("SUBSCRIBE", *channels[start : start + 1000]))
            )
        self.transport.write(hiredis.pack_command(("PING", "x")))
        confirmed = self.loop.create_future()
        self.pongs.append(confirmed)
        return confirmed

    def unsubscribe(self, channels: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.write(hiredis.pack_command(("UNSUBSCRIBE", *channels)))

    def expect(self, channel: bytes) -> asyncio.Future[bytes]:
        future = self.waiting[channel] = self.loop.create_future()
        return future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_raw(port: int, kind: type[Any] = RawClient) -> Any:
    """A connected :class:`RawClient` (or ``kind``) to 127.0.0.1:``port``."""
    _, protocol = await asyncio.get_running_loop().create_connection(kind, "127.0.0.1", port)
    return protocol
