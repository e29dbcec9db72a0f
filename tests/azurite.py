"""A private Azurite (the Azure Storage emulator) for the tests.

:class:`Azurite` runs ``azurite-blob`` from ``.cache/azurite`` on a free
loopback port, in memory by default or in a directory (``location``) so that
its data survives :meth:`Azurite.stop` and :meth:`Azurite.start` on the same
port. When ``.cache/azurite`` is missing, :func:`azurite_binary` installs the
pinned version there with npm first, as ``scripts/install`` does.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["ACCOUNT_KEY", "ACCOUNT_NAME", "Azurite", "azurite_binary", "free_port"]

AZURITE_VERSION = "3.35.0"
PREFIX = Path(__file__).resolve().parent.parent / ".cache" / "azurite"
#: Azurite's well-known development account.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def azurite_binary() -> Path:
    """The ``azurite-blob`` executable, installed with npm if it is not there yet."""
    binary = PREFIX / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "Azurite is not installed and npm is not on PATH (run scripts/install)"
            )
        PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund", "--no-save",
             "--loglevel=error", f"azurite@{AZURITE_VERSION}"],
            check=True,
        )  # fmt: skip
    return binary


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Azurite:
    """One Azurite blob service process; see the module docstring.

    :param port: the TCP port (a free one by default); kept across restarts.
    :param on_disk: keep data in a temporary directory instead of memory, so
        that it survives a restart.
    """

    def __init__(self, port: int | None = None, *, on_disk: bool = False) -> None:
        self.port = port or free_port()
        self.on_disk = on_disk
        self._tmp = tempfile.TemporaryDirectory(prefix="aioresults-azurite-")
        self.directory = Path(self._tmp.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def blob_endpoint(self) -> str:
        """The account's blob endpoint URL."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    def connection_string(self, key: str = ACCOUNT_KEY, *, port: int | None = None) -> str:
        """The development account's connection string (``key`` may be replaced;
        ``port`` points it at another port, such as a proxy's in front of this one)."""
        endpoint = self.blob_endpoint if port is None else f"http://127.0.0.1:{port}/{ACCOUNT_NAME}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={key};"
            f"BlobEndpoint={endpoint};"
        )

    def start(self) -> None:
        """Start the process and return once its port answers."""
        if self.process is not None:
            return
        args = [
            str(azurite_binary()),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]  # fmt: skip
        if self.on_disk:
            args += ["--location", str(self.directory / "data")]
        else:
            args += ["--inMemoryPersistence"]
        log = open(self.directory / "azurite.log", "ab")
        try:
            self.process = subprocess.Popen(
                args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()  # the child has its own copy
        deadline = time.monotonic() + _START_TIMEOUT
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "azurite.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"Azurite did not start on port {self.port}:\n{output}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the process and wait until it is gone (its port no longer answers)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (data kept only when ``on_disk``)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the process and remove its directory."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
