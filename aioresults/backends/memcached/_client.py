"""The memcached backend's wire: a small asyncio client for memcached's text protocol.

One :class:`Node` per server holds one connection, opened on first use and
again after it is lost, on which requests are *pipelined*: each request is
written at once and its reply is matched to it in order, so a poll of a
thousand keys and a concurrent write share the connection without waiting for
each other. A caller that is cancelled (or times out) leaves the connection
in step: its reply is still read, and dropped.

Why not aiomcache (the driver the ``memcached`` extra names): it lends one
connection per request from a pool, so requests cannot be pipelined; a
request cancelled while waiting for its reply returns the connection to the
pool with that reply unread, and the next request on it reads the wrong
answer; it has no timeouts (a frozen server hangs the caller); and it refuses
any value stored with non-zero client flags, which other clients write.

:class:`Cluster` places keys on nodes exactly as pymemcache's ``HashClient``
(Celery's client for several servers) does (see :mod:`._routing`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from ._routing import rendezvous_node

__all__ = [
    "Cluster",
    "Item",
    "MemcacheClientError",
    "MemcacheConnectionError",
    "MemcacheError",
    "MemcacheServerError",
    "Node",
]

#: Keys per ``get`` command (more go in further commands of the same write).
GET_CHUNK = 1000
_LINE, _VALUES = 0, 1
_ROUTES_CACHED = 65536


class MemcacheError(Exception):
    """Base of this client's errors."""


class MemcacheConnectionError(MemcacheError, ConnectionError):
    """A server could not be reached, the connection was lost, or no answer came in time."""


class MemcacheServerError(MemcacheError):
    """The server answered ``SERVER_ERROR`` (e.g. ``object too large for cache``)."""


class MemcacheClientError(MemcacheError):
    """The server answered ``ERROR`` or ``CLIENT_ERROR``: it refused the request."""


class Item(NamedTuple):
    """A stored value: its bytes, client flags and (from ``gets``) CAS unique."""

    value: bytes
    flags: int
    cas: int | None


def _error(line: bytes) -> MemcacheError | None:
    """The error an error reply line stands for, else None."""
    if line.startswith(b"SERVER_ERROR"):
        return MemcacheServerError(line.decode(errors="replace"))
    if line.startswith(b"CLIENT_ERROR") or line == b"ERROR":
        return MemcacheClientError(line.decode(errors="replace"))
    return None


class _Request:
    __slots__ = ("current", "future", "items", "kind")

    def __init__(self, kind: int, future: asyncio.Future[Any]) -> None:
        self.kind = kind
        self.future = future
        self.items: dict[bytes, Item] = {}
        self.current: tuple[bytes, int, int, int | None] | None = None


class _Protocol(asyncio.Protocol):
    """One connection: requests go out in order and replies are matched in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Request] = deque()
        self.lost: Exception | None = None
        self._buffer = bytearray()
        self._pos = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(MemcacheConnectionError(f"connection to {self.name} lost: {exc or 'closed'}"))

    def fail(self, error: Exception) -> None:
        """Fail every request in flight and close."""
        if self.lost is None:
            self.lost = error
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def send(self, data: bytes, kinds: Sequence[int]) -> list[asyncio.Future[Any]]:
        if self.lost is not None or self.transport is None:
            raise MemcacheConnectionError(f"connection to {self.name} lost: {self.lost}")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for kind in kinds:
            future = loop.create_future()
            self.pending.append(_Request(kind, future))
            futures.append(future)
        self.transport.write(data)
        return futures

    def data_received(self, data: bytes) -> None:
        if not self.pending:  # memcached only ever answers: the stream is out of step
            self.fail(MemcacheClientError(f"unexpected data from {self.name}: {data[:80]!r}"))
            return
        self._buffer += data
        try:
            self._parse()
        except Exception as exc:  # a reply we cannot read: the stream is out of step
            self.fail(MemcacheClientError(f"unreadable reply from {self.name}: {exc}"))

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n", self._pos)
        if end < 0:
            return None
        line = bytes(self._buffer[self._pos : end])
        self._pos = end + 2
        return line

    def _parse(self) -> None:
        buffer = self._buffer
        while self.pending:
            request = self.pending[0]
            if request.kind == _LINE:
                line = self._line()
                if line is None:
                    break
                self._finish(request, line)
                continue
            # _VALUES: VALUE <key> <flags> <bytes> [<cas>] / data / ... / END
            if request.current is not None:
                key, flags, size, cas = request.current
                if len(buffer) - self._pos < size + 2:
                    break
                value = bytes(buffer[self._pos : self._pos + size])
                self._pos += size + 2
                request.items[key] = Item(value, flags, cas)
                request.current = None
                continue
            line = self._line()
            if line is None:
                break
            if line.startswith(b"VALUE "):
                words = line.split()
                cas = int(words[4]) if len(words) > 4 else None
                request.current = (words[1], int(words[2]), int(words[3]), cas)
            elif line == b"END":
                self._finish(request, request.items)
            else:
                self._finish(request, line)
        # Keep the buffer short without copying it on every reply.
        if self._pos and (self._pos >= len(buffer) or self._pos > 65536):
            del buffer[: self._pos]
            self._pos = 0

    def _finish(self, request: _Request, answer: Any) -> None:
        self.pending.popleft()
        if request.future.done():
            return  # its caller gave up; the reply is read and dropped
        error = _error(answer) if isinstance(answer, bytes) else None
        if request.kind == _VALUES and isinstance(answer, bytes) and error is None:
            error = MemcacheClientError(f"unexpected reply to a get: {answer[:80]!r}")
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(answer)


class Node:
    """One memcached server; see the module docstring.

    :param name: the node's name in key placement (pymemcache's ``"host:port"``).
    :param address: ``(host, port)``, or a Unix socket path.
    :param connect_timeout: seconds to wait for a connection.
    :param timeout: seconds to wait for the replies of one call.
    :param stats: counters shared by the backend (``requests``: writes of one or
        more pipelined commands, ``commands``: commands in them).
    """

    def __init__(
        self,
        name: str,
        address: tuple[str, int] | str,
        *,
        connect_timeout: float,
        timeout: float,
        stats: dict[str, int],
    ) -> None:
        self.name = name
        self.address = address
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.stats = stats
        self._protocol: _Protocol | None = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<memcached node {self.name}>"

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None:
                return protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if isinstance(self.address, str):
                        _, protocol = await loop.create_unix_connection(
                            lambda: _Protocol(self.name), self.address
                        )
                    else:
                        _, protocol = await loop.create_connection(
                            lambda: _Protocol(self.name), *self.address
                        )
            except TimeoutError:
                raise MemcacheConnectionError(
                    f"cannot connect to {self.name} within {self.connect_timeout} s"
                ) from None
            except OSError as exc:
                raise MemcacheConnectionError(f"cannot connect to {self.name}: {exc}") from exc
            self._protocol = protocol
            return protocol

    async def call(self, data: bytes, kinds: Sequence[int]) -> list[Any]:
        """Send ``data`` (one or more commands) and return one answer per command.

        An error reply raises (the first one); the other answers are still read.
        """
        protocol = await self._connection()
        futures = protocol.send(data, kinds)
        self.stats["requests"] += 1
        self.stats["commands"] += len(kinds)
        try:
            async with asyncio.timeout(self.timeout):
                return [await future for future in futures]
        except TimeoutError:
            # Its replies may still come, after others': the connection is out of step.
            protocol.fail(MemcacheConnectionError(f"no answer from {self.name}"))
            raise MemcacheConnectionError(
                f"no answer from {self.name} within {self.timeout} s"
            ) from None
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" warning

    async def line(self, command: bytes) -> bytes:
        """One command answered by one line (``STORED``, ``DELETED``, a number...)."""
        answer: bytes = (await self.call(command, (_LINE,)))[0]
        return answer

    async def get_many(self, keys: Sequence[bytes], *, cas: bool = False) -> dict[bytes, Item]:
        """The items of ``keys`` found (``get``, or ``gets`` with ``cas``), pipelined in chunks."""
        verb = b"gets " if cas else b"get "
        commands = [
            verb + b" ".join(keys[i : i + GET_CHUNK]) + b"\r\n"
            for i in range(0, len(keys), GET_CHUNK)
        ]
        found: dict[bytes, Item] = {}
        for answer in await self.call(b"".join(commands), (_VALUES,) * len(commands)):
            found.update(answer)
        return found

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            protocol.lost = protocol.lost or MemcacheConnectionError("closed")


def storage_command(
    verb: bytes, key: bytes, value: bytes, exptime: int, cas: int | None = None
) -> bytes:
    """``<verb> <key> 0 <exptime> <bytes> [<cas>]`` and the data block (flags 0, as Celery)."""
    head = b"%s %s 0 %d %d" % (verb, key, exptime, len(value))
    if cas is not None:
        head += b" %d" % cas
    return head + b"\r\n" + value + b"\r\n"


class Cluster:
    """The servers of one backend, and where each key lives (see the module docstring)."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = list(nodes)
        self._names = [node.name for node in self.nodes]
        self._routes: OrderedDict[str, Node] = OrderedDict()

    def node(self, key: str) -> Node:
        """The node that holds ``key``."""
        if len(self.nodes) == 1:
            return self.nodes[0]
        node = self._routes.get(key)
        if node is None:
            node = self.nodes[rendezvous_node(self._names, key)]
            self._routes[key] = node
            if len(self._routes) > _ROUTES_CACHED:
                self._routes.popitem(last=False)
        return node

    def by_node(self, keys: Sequence[str]) -> dict[Node, list[str]]:
        """``keys`` grouped by the node that holds them."""
        groups: dict[Node, list[str]] = {}
        for key in keys:
            groups.setdefault(self.node(key), []).append(key)
        return groups

    async def get_many(
        self, keys: Sequence[str], *, cas: bool = False
    ) -> dict[str, Item | Exception]:
        """The items of ``keys`` (one pipelined request per node, concurrently); a
        key whose node failed maps to that error, a missing key is absent."""
        groups = self.by_node(list(dict.fromkeys(keys)))
        found: dict[str, Item | Exception] = {}

        async def one(node: Node, names: list[str]) -> None:
            encoded = [name.encode() for name in names]
            try:
                items = await node.get_many(encoded, cas=cas)
            except MemcacheError as exc:
                found.update(dict.fromkeys(names, exc))
                return
            for name, key in zip(names, encoded, strict=True):
                item = items.get(key)
                if item is not None:
                    found[name] = item

        if len(groups) == 1:
            [(node, names)] = groups.items()
            await one(node, names)
        else:
            await asyncio.gather(*(one(node, names) for node, names in groups.items()))
        return found

    async def get(self, key: str, *, cas: bool = False) -> Item | None:
        item = (await self.get_many([key], cas=cas)).get(key)
        if isinstance(item, Exception):
            raise item
        return item

    async def store(
        self, verb: bytes, key: str, value: bytes, exptime: int, cas: int | None = None
    ) -> bytes:
        """``set``, ``add``, ``cas``: the reply line (``STORED``, ``NOT_STORED``, ``EXISTS``)."""
        encoded = key.encode()
        return await self.node(key).line(storage_command(verb, encoded, value, exptime, cas))

    async def incr(self, key: str, delta: int = 1) -> int | None:
        """``incr``: the new value, or None if there is no such key."""
        answer = await self.node(key).line(b"incr %s %d\r\n" % (key.encode(), delta))
        return None if answer == b"NOT_FOUND" else int(answer)

    async def delete(self, key: str) -> bool:
        """``delete``: whether the key was there."""
        return await self.node(key).line(b"delete %s\r\n" % key.encode()) == b"DELETED"

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
