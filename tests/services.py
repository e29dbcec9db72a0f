"""Private servers for the next stores' tests, each on free loopback ports.

Every class here runs one server (or a few) in the **foreground** under
:class:`subprocess.Popen`, in a new session, bound to 127.0.0.1 only, with a
private temporary directory, so it never touches the machine's own PostgreSQL,
MariaDB, RabbitMQ, memcached or NATS. Each is a context manager (see
:class:`tests.servers._Service`) and, for fault tests, can be

- stopped (:meth:`_Server.stop`: the server's stop signal, then SIGKILL after a
  grace period), killed (:meth:`_Server.kill`: SIGKILL), started again on the
  same port (:meth:`_Server.start`, :meth:`_Server.restart`), and
- frozen and thawed (:meth:`_Server.freeze`, :meth:`_Server.thaw`: SIGSTOP and
  SIGCONT): the kernel still queues new connections, but nothing is answered.

Kills and freezes reach every process of the server: its descendants (found
through ``/proc``: PostgreSQL's children leave the process group with
``setsid()``) and its process group (the server is a session leader), so
PostgreSQL's backends and the Erlang VM behind RabbitMQ's start script go with it.
A process is identified by its PID and start time, so a reused PID is never
signalled.

As root (CI), the database servers do not run as root: PostgreSQL runs as
``postgres``, MariaDB as ``mysql`` and RabbitMQ as ``rabbitmq`` (Popen's ``user=``/
``group=``/``extra_groups=``, so the PID is the server's own, with no ``runuser``
parent in between), each in a directory that account owns; memcached starts as
root and drops to ``nobody`` itself (``-u nobody``); nats-server, like the Redis
servers of :mod:`tests.servers`, runs as the invoking user. As another user,
everything runs as that user.

``start_seconds`` holds how long the last start took (launch to first answer) and
``prepare_seconds`` how long the one-off preparation took (``initdb``,
``mariadb-install-db``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import quote

from tests.servers import _Service, free_port

__all__ = [
    "MariaDBServer",
    "MemcachedCluster",
    "MemcachedServer",
    "NatsServer",
    "PostgresServer",
    "RabbitMQServer",
    "Proc",
    "alive",
    "amqp_handshake",
    "free_ports",
    "mariadb_ready",
    "memcached_command",
    "nats_info",
    "postgres_bindir",
    "postgres_ready",
    "process_tree",
    "rabbitmq_sbin",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (each found by binding port 0)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


#: A process as (pid, start time in clock ticks since boot), so that a PID reused
#: by another process is never signalled.
Proc = tuple[int, int]


def _scan() -> dict[int, tuple[int, int, bool, int]]:
    """Every process: pid -> (ppid, pgrp, live, start time).

    A zombie is not live, unless other threads of it still run: when a
    multithreaded process (the Erlang VM) is killed, its main thread can be a
    zombie while the others still hold its sockets.
    """
    table = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ... num_threads(20th) itrealvalue starttime(22nd)";
        # comm may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        live = fields[0] not in ("Z", "X") or int(fields[17]) > 1
        table[int(text.split(" ", 1)[0])] = (int(fields[1]), int(fields[2]), live, int(fields[19]))
    return table


def process_tree(pid: int) -> list[Proc]:
    """``pid``, its live descendants and the live members of its process group.

    PostgreSQL's children call ``setsid()``, so the process group alone would miss
    them; an orphan (reparented away) is only found through the group.
    """
    table = _scan()
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found: list[int] = []
    todo = [pid] if pid in table else []
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    found += [p for p, (_, pgrp, _, _) in table.items() if pgrp == pid and p not in found]
    return [(p, table[p][3]) for p in found if table[p][2]]


def alive(procs: Sequence[Proc]) -> list[Proc]:
    """Those of ``procs`` that still run (the same process, not a zombie)."""
    table = _scan()
    return [
        (pid, began)
        for pid, began in procs
        if pid in table and table[pid][3] == began and table[pid][2]
    ]


def _signal_procs(procs: Sequence[Proc], sig: signal.Signals) -> None:
    for pid, _ in alive(procs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _identifier(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def _pg_literal(value: str) -> str:
    """A PostgreSQL string literal (``standard_conforming_strings`` is on)."""
    return "'" + value.replace("'", "''") + "'"


def _mysql_literal(value: str) -> str:
    """A MariaDB string literal (backslash is an escape there)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without the variables that would point a server or client
    at another instance (``PG*``, ``MYSQL_*``, ``RABBITMQ_*``...)."""
    prefixes = ("PG", "MYSQL", "MARIADB", "RABBITMQ_", "ERL_", "NATS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


class _Account:
    """The account a server runs as: ``name`` when we are root, else ourselves."""

    def __init__(self, name: str | None) -> None:
        self.switch = name is not None and os.geteuid() == 0
        entry = pwd.getpwnam(name) if self.switch and name else pwd.getpwuid(os.geteuid())
        self.name = entry.pw_name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.home = entry.pw_dir

    def popen_kwargs(self) -> dict[str, Any]:
        """Popen arguments that make the child this account (nothing if no switch)."""
        if not self.switch:
            return {}
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": os.getgrouplist(self.name, self.gid),
        }

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name} if self.switch else {}

    def own(self, path: Path) -> None:
        """Give ``path`` (and what is under it) to this account."""
        if not self.switch:
            return
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    def run(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ``argv`` to completion as this account and capture its output."""
        return subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
            env=env, cwd=cwd, check=False, **self.popen_kwargs(),
        )  # fmt: skip


class _Server(_Service):
    """One foreground server process in its own session; see the module docstring.

    Subclasses give :meth:`_argv` and :meth:`_ready`, and may override
    :meth:`_prepare` (once before the first start, and again after a wipe),
    :meth:`_data_paths` (what a wipe removes) and :meth:`log_files`.
    """

    #: Name used in the temporary directory and in error messages.
    kind: ClassVar[str] = "server"
    #: Account to run as when we are root (``None``: stay root).
    account_name: ClassVar[str | None] = None
    #: The signal :meth:`stop` sends first.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: Seconds :meth:`stop` waits before SIGKILL.
    grace: ClassVar[float] = 10.0
    #: Seconds :meth:`start` waits for the first answer.
    start_timeout: ClassVar[float] = 20.0

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.account = _Account(self.account_name)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"aioresults-{self.kind}-")
        self.directory = Path(self._tmp.name)
        self.account.own(self.directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.prepare_seconds: float | None = None
        self._frozen: list[Proc] = []
        self._prepared = False
        self._closed = False

    # -- what subclasses provide ----------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return _clean_env(**self.account.env())

    def _ready(self) -> bool:
        """One readiness probe (``OSError`` counts as not ready)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-off work before the first start (and after a wipe)."""

    def _data_paths(self) -> list[Path]:
        """What :meth:`restart` with ``wipe=True`` deletes."""
        return []

    @property
    def console_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.directory / "console.log"

    def log_files(self) -> list[Path]:
        """The files :meth:`log` reads, most useful last."""
        return [self.console_path]

    # -- lifecycle -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The PID of the running server (also its process group), else ``None``."""
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def processes(self) -> list[Proc]:
        """The server's live processes (its PID first, then children and group)."""
        return process_tree(self.process.pid) if self.process is not None else []

    def start(self) -> Self:
        """Start the server (on :attr:`port`, again after a stop or kill) and wait
        until it answers; raise :class:`RuntimeError` with the log tail otherwise."""
        if self._closed:
            raise RuntimeError(f"{self.kind} server was closed")
        if self.running:
            return self
        if not self._prepared:
            began = time.monotonic()
            self._prepare()
            self.prepare_seconds = time.monotonic() - began
            self._prepared = True
        began = time.monotonic()
        with open(self.console_path, "ab") as console:
            self.process = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                cwd=self.directory, env=self._env(), start_new_session=True,
                **self.account.popen_kwargs(),
            )  # fmt: skip
        deadline = began + self.start_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.kill()
                raise RuntimeError(
                    f"{self.kind} server on port {self.port} exited with code {code}; "
                    f"log {self.log_files()[-1]}:\n{self.log()}"
                )
            try:
                if self._ready():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.kind} server on port {self.port} did not answer within "
                    f"{self.start_timeout:.0f} s; log {self.log_files()[-1]}:\n{self.log()}"
                )
            time.sleep(0.01)
        self.start_seconds = time.monotonic() - began
        return self

    def _finish(self, procs: Sequence[Proc]) -> None:
        """SIGKILL whatever of ``procs`` (and of the group) is left, and wait for it."""
        assert self.process is not None
        procs = [*procs, *self.processes()]
        _signal_procs(procs, signal.SIGKILL)
        self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while left := alive(procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} processes {[p for p, _ in left]} linger")
            time.sleep(0.005)
        self.process = None
        self._frozen = []

    def kill(self) -> None:
        """SIGKILL the server and every process it started (no goodbye to clients),
        and wait until they are gone; nothing if it is not running."""
        if self.process is None:
            return
        # Stopped first, the server cannot fork while its children are collected.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGSTOP)
        self._finish(self.processes())

    def stop(self) -> None:
        """Stop the server with :attr:`stop_signal`, SIGKILL after :attr:`grace`
        seconds, and wait until every process of it is gone; idempotent."""
        if self.process is None:
            return
        procs = self.processes()
        if self.process.poll() is None:
            self._send_stop()
            _signal_procs(self._frozen, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=self.grace)
        self._finish(procs)

    def _send_stop(self) -> None:
        """Send :attr:`stop_signal` to the server."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.stop_signal)

    def restart(self, wipe: bool = False) -> None:
        """Kill the server and start it again on the same port; with ``wipe``, its
        data is deleted (and prepared again) in between."""
        self.kill()
        if wipe:
            for path in self._data_paths():
                shutil.rmtree(path, ignore_errors=True)
            self._prepared = False
        self.start()

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def freeze(self) -> None:
        """SIGSTOP the server and its children (PostgreSQL backends, the Erlang VM):
        connections stay open and nothing is answered until :meth:`thaw`."""
        if self.process is None:
            raise RuntimeError(f"{self.kind} server is not running")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGSTOP)
        procs = self.processes()
        _signal_procs(procs, signal.SIGSTOP)
        self._frozen = procs

    def thaw(self) -> None:
        """SIGCONT what :meth:`freeze` stopped."""
        _signal_procs(self._frozen, signal.SIGCONT)
        self._frozen = []

    def log(self, chars: int = 3000) -> str:
        """The tail of the server's log files (for error messages)."""
        parts = []
        for path in self.log_files():
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop the server and remove its directory; idempotent."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            self._tmp.cleanup()


# -- PostgreSQL --------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The directory of ``postgres``, ``initdb`` and ``psql`` (the newest Debian
    ``/usr/lib/postgresql/<major>/bin``, else ``pg_config --bindir``, else PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    postgres = shutil.which("postgres")
    if postgres:
        return Path(postgres).parent
    raise RuntimeError("PostgreSQL binaries not found")


def postgres_ready(port: int, timeout: float = 1.0) -> bool:
    """Log in as ``postgres`` (trust) and wait for ReadyForQuery."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        while True:
            kind, size = struct.unpack("!cI", _recv_exact(sock, 5))
            _recv_exact(sock, size - 4)
            if kind == b"Z":
                sock.sendall(b"X\0\0\0\4")
                return True
            if kind == b"E":  # "the database system is starting up"
                return False


class PostgresServer(_Server):
    """A private PostgreSQL cluster (``initdb`` once, trust authentication, no fsync).

    The server's Unix socket is in :attr:`directory`. It stops with SIGINT (a
    "fast" shutdown that disconnects clients; SIGTERM would wait for them).
    Restarts keep the data, unless ``restart(wipe=True)`` (which runs initdb again).
    """

    kind = "postgres"
    account_name = "postgres"
    stop_signal = signal.SIGINT

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.bindir = postgres_bindir()
        self.data = self.directory / "data"

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres`` (the superuser)."""
        return self.url_for()

    def url_for(
        self, database: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        """A URL for ``user`` (with ``password``, if given) on ``database``."""
        auth = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    @property
    def socket_dir(self) -> Path:
        """The directory of the ``.s.PGSQL.<port>`` socket."""
        return self.directory

    def _prepare(self) -> None:
        result = self.account.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
            ],
            env=_clean_env(**self.account.env()), cwd=self.directory,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def _data_paths(self) -> list[Path]:
        return [self.data]

    def _argv(self) -> list[str]:
        return [
            str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-k", str(self.directory), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        ]  # fmt: skip

    def _ready(self) -> bool:
        return postgres_ready(self.port)

    def execute(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (as the superuser by default) and return its
        unaligned, tuples-only output; raise :class:`RuntimeError` on any error."""
        argv = [
            str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", database, "-c", sql,
        ]  # fmt: skip
        result = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
            env=_clean_env(), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}) on {sql!r}: {result.stderr}")
        return result.stdout

    def create_database(self, name: str, owner: str = "postgres") -> str:
        """Create database ``name`` (owned by ``owner``) and return its superuser URL."""
        self.execute(f'CREATE DATABASE "{_identifier(name)}" OWNER "{_identifier(owner)}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its clients; no error if it is absent."""
        self.execute(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    def create_role(self, name: str, password: str = "secret", database: str | None = None) -> str:
        """Create a login role without superuser, CREATEDB or CREATEROLE, and return
        its URL for ``database`` (default ``postgres``).

        With ``database``, the role may connect to it and read and write (but not
        own, alter or put triggers on) the tables and sequences of its ``public``
        schema, present and future ones created by ``postgres``: the position of a
        backend that cannot create its NOTIFY trigger.
        """
        role = _identifier(name)
        self.execute(
            f'CREATE ROLE "{role}" LOGIN PASSWORD {_pg_literal(password)} '
            "NOSUPERUSER NOCREATEDB NOCREATEROLE"
        )
        if database is not None:
            db = _identifier(database)
            self.execute(
                f'GRANT CONNECT ON DATABASE "{db}" TO "{role}";'
                f'GRANT USAGE ON SCHEMA public TO "{role}";'
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
                f' TO "{role}";'
                f'GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO "{role}";'
                "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public"
                f' GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{role}";'
                "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public"
                f' GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO "{role}";',
                database=db,
            )
        return self.url_for(database or "postgres", role, password)


# -- MariaDB -----------------------------------------------------------------------------


def mariadb_ready(port: int, timeout: float = 1.0) -> bool:
    """The server sends its handshake (protocol 10), not an error packet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        header = _recv_exact(sock, 4)
        payload = _recv_exact(sock, int.from_bytes(header[:3], "little"))
        return payload[:1] == b"\x0a"


class MariaDBServer(_Server):
    """A private MariaDB server (``mariadb-install-db`` once; root has no password).

    utf8mb4 with ``utf8mb4_unicode_ci`` by default, no binlog, no name resolution
    (clients are ``root@127.0.0.1``). Commits reach the OS at once and the disk
    once a second (``innodb_flush_log_at_trx_commit=2``), so a killed server keeps
    every committed row, as with PostgreSQL's ``fsync=off``. Restarts keep the
    data, unless ``restart(wipe=True)``.
    """

    kind = "mariadb"
    account_name = "mysql"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.data = self.directory / "data"
        self.socket_path = self.directory / "mariadb.sock"
        self.error_log = self.directory / "error.log"

    @property
    def url(self) -> str:
        """``mysql://root@127.0.0.1:<port>/mysql``; see :meth:`create_database`."""
        return self.url_for()

    def url_for(
        self, database: str = "mysql", user: str = "root", password: str | None = None
    ) -> str:
        """A URL for ``user`` (with ``password``, if given) on ``database``."""
        auth = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
        return f"mysql://{auth}@127.0.0.1:{self.port}/{database}"

    def log_files(self) -> list[Path]:
        return [self.console_path, self.directory / "install.log", self.error_log]

    def _prepare(self) -> None:
        result = self.account.run(
            [
                shutil.which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
                f"--user={self.account.name}", f"--datadir={self.data}",
                "--auth-root-authentication-method=normal", "--skip-test-db",
            ],
            env=_clean_env(**self.account.env()), cwd=self.directory,
        )  # fmt: skip
        (self.directory / "install.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def _data_paths(self) -> list[Path]:
        return [self.data]

    def _argv(self) -> list[str]:
        return [
            "/usr/sbin/mariadbd" if os.path.exists("/usr/sbin/mariadbd") else "mariadbd",
            # Temporary tables in the server's own directory, not the shared /tmp
            # (whose cleaners once deleted one mid-test).
            "--no-defaults", f"--datadir={self.data}", f"--tmpdir={self.data}",
            f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket_path}",
            f"--pid-file={self.directory / 'mariadb.pid'}", "--skip-log-bin",
            "--skip-name-resolve", "--innodb-flush-log-at-trx-commit=2",
            "--innodb-buffer-pool-size=32M", "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci", f"--log-error={self.error_log}",
        ]  # fmt: skip

    def _ready(self) -> bool:
        return mariadb_ready(self.port)

    def execute(self, sql: str, database: str | None = None, user: str = "root") -> str:
        """Run ``sql`` with the ``mariadb`` client over TCP (as root by default) and
        return its batch output (tab-separated, no column names)."""
        argv = [
            shutil.which("mariadb") or "mariadb", "--no-defaults", "--protocol=TCP",
            "-h", "127.0.0.1", "-P", str(self.port), "-u", user, "-N", "-B", "-e", sql,
        ]  # fmt: skip
        if database is not None:
            argv.append(database)
        result = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
            env=_clean_env(), check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"mariadb failed ({result.returncode}) on {sql!r}: {result.stderr}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create database ``name`` (utf8mb4) and return its root URL."""
        self.execute(
            f"CREATE DATABASE `{_identifier(name)}` "
            "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        )
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``; no error if it is absent."""
        self.execute(f"DROP DATABASE IF EXISTS `{_identifier(name)}`")

    def create_user(self, name: str, password: str = "secret", database: str | None = None) -> str:
        """Create a user (any host) that may read and write the tables of
        ``database`` but not create or alter anything; return its URL."""
        user = _identifier(name)
        self.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY {_mysql_literal(password)}")
        if database is not None:
            self.execute(
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{_identifier(database)}`.* "
                f"TO '{user}'@'%'"
            )
        return self.url_for(database or "mysql", user, password)


# -- RabbitMQ ----------------------------------------------------------------------------


def rabbitmq_sbin() -> Path:
    """The directory of the package's inner ``rabbitmq-server`` and ``rabbitmqctl``
    (not the ``/usr/sbin`` wrappers, which switch users through ``su`` and send the
    output to ``/var/log/rabbitmq``)."""
    for candidate in ("/usr/lib/rabbitmq/bin", *glob.glob("/usr/lib/rabbitmq/lib/*/sbin")):
        if os.path.exists(os.path.join(candidate, "rabbitmq-server")):
            return Path(candidate)
    found = shutil.which("rabbitmq-server")
    if found:
        return Path(found).parent
    raise RuntimeError("rabbitmq-server not found")


def amqp_handshake(port: int, timeout: float = 1.0) -> bool:
    """Send the AMQP 0-9-1 protocol header and check that Connection.Start comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        frame = _recv_exact(sock, 11)
        # type 1 (method), channel 0, size, class 10 (connection), method 10 (start)
        return frame[:3] == b"\x01\x00\x00" and frame[7:11] == b"\x00\x0a\x00\x0a"


class RabbitMQServer(_Server):
    """A private RabbitMQ node ``aior<random>@localhost`` with no plugins.

    ``guest`` may log in from 127.0.0.1 (``loopback_users = none``). The node
    shares the user's Erlang cookie (``HOME`` is the ``rabbitmq`` account's) and
    the machine's epmd; the distribution port is :attr:`dist_port`, bound to
    127.0.0.1 like the AMQP port. Starting takes several seconds, so start one per
    test session. Restarts keep the node's Mnesia data (durable queues), unless
    ``restart(wipe=True)``.

    :attr:`pid` is the start script's; the Erlang VM is its child (and in its
    process group), which every stop, kill and freeze reaches too.
    """

    kind = "rabbitmq"
    account_name = "rabbitmq"
    grace = 30.0
    start_timeout = 60.0

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.nodename = f"aior{secrets.token_hex(4)}@localhost"
        self.sbin = rabbitmq_sbin()
        self.env_file = self.directory / "rabbitmq-env.conf"
        d = self.directory
        self.env_file.write_text(
            f"NODENAME={self.nodename}\n"
            "NODE_IP_ADDRESS=127.0.0.1\n"
            f"NODE_PORT={self.port}\n"
            f"DIST_PORT={self.dist_port}\n"
            f"MNESIA_BASE={d / 'mnesia'}\n"
            f"LOG_BASE={d / 'log'}\n"
            f"CONFIG_FILE={d / 'rabbitmq.conf'}\n"
            f"ENABLED_PLUGINS_FILE={d / 'enabled_plugins'}\n"
            f"PID_FILE={d / 'rabbitmq.pid'}\n"
            # The distribution listener on loopback only, as the system node does.
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        (d / "rabbitmq.conf").write_text("loopback_users = none\n")
        (d / "enabled_plugins").write_text("[].\n")
        self.account.own(d)

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>//`` (the default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return _clean_env(
            **self.account.env(),
            RABBITMQ_CONF_ENV_FILE=str(self.env_file),
            ERL_EPMD_ADDRESS="127.0.0.1",
            LANG="C.UTF-8",
            LC_ALL="C.UTF-8",
        )

    def log_files(self) -> list[Path]:
        return [self.console_path, self.directory / "log" / f"{self.nodename}.log"]

    def _data_paths(self) -> list[Path]:
        return [self.directory / "mnesia"]

    def _argv(self) -> list[str]:
        return [str(self.sbin / "rabbitmq-server")]

    def _ready(self) -> bool:
        return amqp_handshake(self.port)

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` as the node's account; return stdout."""
        result = self.account.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self._env(), cwd=self.directory, timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def _table(self, command: str, columns: Sequence[str]) -> list[list[str]]:
        out = self.rabbitmqctl(command, "--quiet", "--no-table-headers", *columns)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    def list_queues(self, *columns: str) -> list[list[str]]:
        """``rabbitmqctl list_queues`` rows (default columns: name, messages)."""
        return self._table("list_queues", columns or ("name", "messages"))

    def list_connections(self, *columns: str) -> list[list[str]]:
        """``rabbitmqctl list_connections`` rows (default columns: pid, name, state)."""
        return self._table("list_connections", columns or ("pid", "name", "state"))

    def close_all_connections(self, reason: str = "closed by the test harness") -> None:
        """Close every client connection (clients get connection.close 320)."""
        self.rabbitmqctl("close_all_connections", reason)


# -- memcached ---------------------------------------------------------------------------


def memcached_command(address: tuple[str, int], line: str, timeout: float = 2.0) -> bytes:
    """Send one text-protocol command line and return the reply (up to the first
    line for a simple command, up to ``END`` for ``stats``/``get``)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(line.encode() + b"\r\n")
        reply = b""
        multi = line.split(" ", 1)[0] in ("stats", "get", "gets", "gat", "gats")
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk
            if multi and (reply.endswith(b"END\r\n") or reply.startswith(b"ERROR")):
                return reply
            if not multi and reply.endswith(b"\r\n"):
                return reply


class MemcachedServer(_Server):
    """A private memcached (64 MB, TCP only), dropping to ``nobody`` when root.

    It keeps nothing across restarts (memcached has no persistence).
    """

    kind = "memcached"

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` (pymemcache's and Celery's node name)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``memcached://127.0.0.1:<port>/``."""
        return f"memcached://{self.address}/"

    def _argv(self) -> list[str]:
        binary = shutil.which("memcached")
        if binary is None:
            raise RuntimeError("memcached not found: run scripts/install")
        return [
            binary,
            "-u",
            "nobody",
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-m",
            "64",
        ]

    def _ready(self) -> bool:
        return self.version().startswith("VERSION ")

    def _send_stop(self) -> None:
        super()._send_stop()
        # memcached looks at the signal's flag when its event loop wakes up, which
        # its clock does once a second; a connection wakes it at once.
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()

    def command(self, line: str) -> bytes:
        """Send one text-protocol line (e.g. ``"stats"``) and return the raw reply."""
        return memcached_command(("127.0.0.1", self.port), line)

    def version(self) -> str:
        """The ``version`` reply line, e.g. ``VERSION 1.6.18``."""
        return self.command("version").decode().strip()

    def flush_all(self) -> None:
        """Empty the cache."""
        reply = self.command("flush_all")
        if reply != b"OK\r\n":
            raise RuntimeError(f"flush_all answered {reply!r}")


class MemcachedCluster(_Service):
    """``n`` independent memcached servers, as a client spreads keys over them."""

    def __init__(self, n: int = 3) -> None:
        ports = free_ports(n)
        self.nodes = [MemcachedServer(port) for port in ports]

    @property
    def addresses(self) -> list[str]:
        """``["127.0.0.1:<port>", ...]`` in node order."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """``memcached://127.0.0.1:<p1>;127.0.0.1:<p2>;.../`` (Celery's multi-server form)."""
        return "memcached://" + ";".join(self.addresses) + "/"

    def start(self) -> MemcachedCluster:
        for node in self.nodes:
            node.start()
        return self

    def flush_all(self) -> None:
        for node in self.nodes:
            node.flush_all()

    def __iter__(self) -> Iterator[MemcachedServer]:
        return iter(self.nodes)

    def close(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


# -- NATS --------------------------------------------------------------------------------


def nats_info(port: int, timeout: float = 1.0) -> dict[str, Any]:
    """The JSON of the ``INFO`` line a NATS server sends on connect."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            line += chunk
    if not line.startswith(b"INFO "):
        raise ConnectionError(f"not a NATS INFO line: {line[:80]!r}")
    info: dict[str, Any] = json.loads(line[5:])
    return info


class NatsServer(_Server):
    """A private ``nats-server`` with JetStream, its store in :attr:`store_dir`.

    Restarts keep the store (so JetStream KV buckets survive), unless
    ``restart(wipe=True)``.
    """

    kind = "nats"

    def __init__(self, port: int | None = None, config: str = "") -> None:
        """:param config: the text of a configuration file to start it with
        (e.g. an ``authorization`` block); the flags set the rest."""
        super().__init__(port)
        self.store_dir = self.directory / "js"
        self.config = config

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def _data_paths(self) -> list[Path]:
        return [self.store_dir]

    def _argv(self) -> list[str]:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        argv = [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.config:
            path = self.directory / "nats.conf"
            path.write_text(self.config)
            argv += ["-c", str(path)]
        return argv

    def _ready(self) -> bool:
        return bool(self.info().get("jetstream"))

    def info(self) -> dict[str, Any]:
        """The server's ``INFO`` (``server_id``, ``version``, ``jetstream``...)."""
        return nats_info(self.port)

    def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """Publish ``payload`` to ``subject`` and return the first reply's payload
        (raw protocol, no client library), e.g. ``$JS.API.STREAM.NAMES``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            inbox = f"_INBOX.{secrets.token_hex(8)}"
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}'
                + f"\r\nSUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode()
                + payload
                + b"\r\n"
            )
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buffer += chunk
                while b"\r\n" in buffer:
                    line, rest = buffer.split(b"\r\n", 1)
                    words = line.split()
                    if words[:1] == [b"PING"]:
                        sock.sendall(b"PONG\r\n")
                    elif words[:1] == [b"-ERR"]:
                        raise RuntimeError(line.decode(errors="replace"))
                    elif words[:1] in ([b"MSG"], [b"HMSG"]):
                        size = int(words[-1])
                        if len(rest) < size + 2:
                            break  # the payload is not all here yet
                        body = rest[:size]
                        if words[0] == b"HMSG":  # headers only: no responders (503)
                            raise RuntimeError(f"no reply on {subject}: {body!r}")
                        return body
                    buffer = rest
