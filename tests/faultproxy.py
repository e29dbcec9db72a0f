"""A fault-injecting TCP proxy between a client under test and a real server.

:class:`FaultProxy` listens on a free loopback port and forwards every
connection to ``target``, one upstream connection per client connection. Tests
point the client at :attr:`FaultProxy.port` and arm faults on the way::

    async with FaultProxy(("127.0.0.1", azurite.port)) as proxy:
        backend = make_backend(port=proxy.port)
        lost = proxy.drop_reply(http_request("PUT", "/devstoreaccount1/c/celery-task-meta-"))
        assert await backend.mark_as_done(task_id, 1)
        assert lost.hits == 1  # the fault did happen

**Requests.** With ``framing="http"`` (the default) the proxy reads the
client's byte stream as HTTP/1.1 requests (a head, then a body by
``Content-Length`` or chunked), so it knows where each request starts even on
a keep-alive connection; a fault's predicate sees the request head (request
line and headers). With ``framing="raw"`` every chunk the client writes counts
as a request and the predicate sees that chunk (enough for protocols whose
client writes one command at a time, such as Redis's RESP). Replies are never
parsed: after a request is forwarded, the next bytes from the server are taken
as its reply (true of HTTP/1.1 clients that do not pipeline, as aiohttp and
the Azure SDK; with a client that pipelines or a server that pushes, "the
reply" is just the next bytes).

**Faults.** Each ``*_reply``/``delay``/``answer`` call arms a :class:`Fault`
and returns it. A fault applies to requests its predicate accepts (``match``:
a callable on the request's first bytes, ``bytes`` for a prefix, or None for
every request); it lets the first ``after`` of them through untouched, then
applies ``times`` times (None: for ever). Faults are tried in the order they
were armed; the first one that applies wins. ``fault.hits`` counts the
requests it was applied to, ``await fault.wait()`` returns once it was.

* :meth:`FaultProxy.drop_reply`: the request reaches the server; its reply is
  swallowed and the client's connection is reset (RST) as soon as the reply's
  first bytes arrive, so the server did the work and the client cannot know
  it. A ``hit`` is counted when the reply is swallowed.
* :meth:`FaultProxy.delay`: hold the request (or, with ``reply=True``, its
  reply) for ``seconds`` before passing it on.
* :meth:`FaultProxy.answer`: answer the request with fixed bytes (a canned
  ``503``, say) without forwarding it; the client connection is closed after
  the answer unless ``close=False``.
* :meth:`FaultProxy.reset_all`: reset every open connection now (RST to the
  client, upstream closed); returns how many.
* :meth:`FaultProxy.refuse`: stop listening, so new connections are refused
  (``ECONNREFUSED``) while open ones go on; ``refuse(False)`` listens again on
  the same port.
* :meth:`FaultProxy.clear`: disarm every fault.

:attr:`FaultProxy.requests` lists the first line (``raw``: the first 80 bytes)
of every request seen, :attr:`FaultProxy.accepted` counts connections accepted
and :attr:`FaultProxy.open_connections` those open now.

Helpers for predicates: :func:`http_request` (method and path prefix) and
:func:`starts_with` (any byte prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Literal

__all__ = ["Fault", "FaultProxy", "Match", "http_request", "starts_with"]

#: A request predicate: called with the request's first bytes (see the module docstring).
Match = Callable[[bytes], bool] | bytes | None

_HEAD_LIMIT = 1 << 20


def http_request(method: str, path_prefix: str = "/") -> Callable[[bytes], bool]:
    """A predicate for HTTP requests whose request line is ``<method> <path_prefix>...``."""
    prefix = f"{method.upper()} {path_prefix}".encode()
    return lambda head: head.startswith(prefix)


def starts_with(prefix: bytes) -> Callable[[bytes], bool]:
    """A predicate for requests whose first bytes are ``prefix``."""
    return lambda head: head.startswith(prefix)


class Fault:
    """One armed fault; see the module docstring."""

    def __init__(
        self,
        kind: Literal["drop", "delay", "answer"],
        match: Match,
        *,
        after: int = 0,
        times: int | None = 1,
        seconds: float = 0.0,
        reply: bool = False,
        answer: bytes = b"",
        close: bool = True,
    ) -> None:
        if isinstance(match, bytes):
            match = starts_with(match)
        self.kind = kind
        self.match = match
        self.after = after
        self.times = times
        self.seconds = seconds
        self.reply = reply
        self.answer = answer
        self.close = close
        #: Requests the predicate accepted (those let through by ``after`` too).
        self.matched = 0
        #: Requests the fault was applied to.
        self.hits = 0
        self._hit = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Fault {self.kind} after={self.after} times={self.times} hits={self.hits}>"

    @property
    def spent(self) -> bool:
        """Whether it will apply to no more requests."""
        return self.times is not None and self.matched - self.after >= self.times

    def _take(self, head: bytes) -> bool:
        """Whether this fault applies to the request starting with ``head``."""
        if self.spent or (self.match is not None and not self.match(head)):
            return False
        self.matched += 1
        return self.matched > self.after

    def _applied(self) -> None:
        self.hits += 1
        self._hit.set()

    async def wait(self, timeout: float = 10.0) -> None:
        """Return once the fault was applied at least once (TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self._hit.wait(), timeout)


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        # What to do with the next reply (set before its request is forwarded).
        self.reply_fault: Fault | None = None

    def reset(self) -> None:
        """RST the client's connection and close the upstream one."""
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger 0: closing sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A TCP proxy that injects faults; see the module docstring.

    :param target: ``(host, port)`` of the real server.
    :param host: the address to listen on.
    :param framing: ``"http"`` or ``"raw"``: how requests are told apart.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        framing: Literal["http", "raw"] = "http",
    ) -> None:
        self.target = target
        self.host = host
        self.framing = framing
        #: The port it listens on (set by :meth:`start`, kept by :meth:`refuse`).
        self.port = 0
        self.faults: list[Fault] = []
        #: The first line of every request seen, in order.
        self.requests: list[bytes] = []
        #: Connections accepted so far.
        self.accepted = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> FaultProxy:
        """Start listening (on a free port the first time, the same port after)."""
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and reset every connection."""
        self.faults.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = [task for link in self._links for task in link.tasks]
        self.reset_all()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ faults

    def drop_reply(self, match: Match = None, *, after: int = 0, times: int | None = 1) -> Fault:
        """Forward matching requests, swallow their replies and reset the client."""
        return self._arm(Fault("drop", match, after=after, times=times))

    def delay(
        self,
        seconds: float,
        match: Match = None,
        *,
        reply: bool = False,
        after: int = 0,
        times: int | None = None,
    ) -> Fault:
        """Hold matching requests (their replies, with ``reply``) for ``seconds``."""
        return self._arm(
            Fault("delay", match, after=after, times=times, seconds=seconds, reply=reply)
        )

    def answer(
        self,
        answer: bytes,
        match: Match = None,
        *,
        after: int = 0,
        times: int | None = 1,
        close: bool = True,
    ) -> Fault:
        """Answer matching requests with ``answer`` instead of forwarding them."""
        return self._arm(
            Fault("answer", match, after=after, times=times, answer=answer, close=close)
        )

    def _arm(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault."""
        self.faults.clear()

    def reset_all(self) -> int:
        """Reset every open connection now; return how many."""
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.clear()
        return len(links)

    async def refuse(self, refusing: bool = True) -> None:
        """Refuse new connections (stop listening), or accept them again on the same port."""
        if refusing:
            if self._server is not None:
                self._server.close()  # open connections go on
                self._server = None
        else:
            await self.start()

    # ------------------------------------------------------------ forwarding

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                link.reset()  # the server is down: so is the proxy, for this client
                return
            link.tasks = [
                asyncio.current_task(),  # type: ignore[list-item]
                asyncio.create_task(self._replies(link, up_reader)),
            ]
            await self._requests(link, reader)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            link.reset()
        finally:
            self._links.discard(link)
            if link.upstream is not None:
                link.upstream.close()
            writer.close()

    async def _requests(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Client to server, one request at a time."""
        assert link.upstream is not None
        while True:
            request = await self._read_request(reader)
            if not request:
                link.upstream.write_eof()
                return
            self.requests.append(
                request.split(b"\r\n", 1)[0] if self.framing == "http" else request[:80]
            )
            fault = next((f for f in self.faults if f._take(request[:_HEAD_LIMIT])), None)
            if fault is not None and fault.kind == "answer":
                fault._applied()
                link.client.write(fault.answer)
                await link.client.drain()
                if fault.close:
                    link.client.close()
                    return
                continue
            if fault is not None and fault.kind == "delay" and not fault.reply:
                fault._applied()
                await asyncio.sleep(fault.seconds)
            elif fault is not None:
                link.reply_fault = fault  # before the request goes: its reply may be quick
            link.upstream.write(request)
            await link.upstream.drain()

    async def _replies(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Server to client."""
        try:
            while data := await reader.read(65536):
                fault, link.reply_fault = link.reply_fault, None
                if fault is not None and fault.kind == "drop":
                    fault._applied()
                    self._links.discard(link)
                    link.reset()
                    return
                if fault is not None:
                    fault._applied()
                    await asyncio.sleep(fault.seconds)
                link.client.write(data)
                await link.client.drain()
            link.client.close()
        except (ConnectionError, OSError):
            link.reset()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        """The next request's bytes (b"" at the end of the stream)."""
        if self.framing == "raw":
            return await reader.read(65536)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            return b""
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return head + await reader.readexactly(length)
        parts = [head]
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    parts.append(trailer)
                parts.append(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
