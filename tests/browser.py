"""Headless Chromium driven through the DevTools protocol, for the examples' page tests.

Only what the tests need: start Chromium on a page, evaluate JavaScript in it,
take a screenshot. The DevTools websocket is spoken with a few lines of
asyncio (text frames, masked as a client must), so no extra package is needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class _WebSocket:
    """A client websocket over asyncio streams (RFC 6455, text frames only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> _WebSocket:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        status = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {status[:200]!r}")
        return cls(reader, writer)

    async def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text
        if len(payload) < 126:
            header.append(0x80 | len(payload))
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        header += mask
        self.writer.write(bytes(header) + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await self.writer.drain()

    async def receive(self) -> str:
        message = b""
        while True:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", await self.reader.readexactly(8))
            data = await self.reader.readexactly(length)  # servers do not mask
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode in (0x1, 0x0):
                message += data
                if first & 0x80:
                    return message.decode()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class Page:
    """One browser tab, controlled through its DevTools websocket."""

    def __init__(self, socket: _WebSocket) -> None:
        self._socket = socket
        self._next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and return its result (events are skipped)."""
        self._next_id += 1
        call_id = self._next_id
        await self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self._socket.receive())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its value."""
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate ``expression`` until it is truthy; return that value."""
        async with asyncio.timeout(timeout):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await asyncio.sleep(0.05)

    async def screenshot(self, path: str) -> None:
        """Save a PNG of the page (for a person to look at)."""
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        await anyio.Path(path).write_bytes(base64.b64decode(data))


@asynccontextmanager
async def open_page(url: str) -> AsyncIterator[Page]:
    """Start headless Chromium on ``url`` and yield its tab; stop Chromium on exit."""
    with tempfile.TemporaryDirectory(prefix="aioresults-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *_FLAGS,
            f"--user-data-dir={profile}",
            url,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        socket: _WebSocket | None = None
        drain: asyncio.Task[None] | None = None
        try:
            assert process.stderr is not None
            port = None
            async with asyncio.timeout(30):
                while port is None:
                    line = (await process.stderr.readline()).decode()
                    if not line:
                        raise RuntimeError("chromium exited before its DevTools were ready")
                    found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
                    if found:
                        port = int(found.group(1))
            # Keep draining stderr so a chatty browser never blocks on a full pipe.
            drain = asyncio.create_task(_drain(process.stderr))
            async with httpx.AsyncClient() as http:
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page_target = next(t for t in targets if t["type"] == "page")
            socket = await _WebSocket.connect(page_target["webSocketDebuggerUrl"])
            yield Page(socket)
        finally:
            if socket is not None:
                await socket.close()
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(10):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
            if drain is not None:
                drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
