"""Every module imports where the package says it runs; what cannot work says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Drivers and the stdlib are imported first with the real platform (asyncio would
# look for Windows' own modules otherwise); then the interpreter pretends to be
# Windows, without fcntl, and every aioresults module is imported.
PRETEND_WINDOWS = textwrap.dedent(
    """
    import asyncio, ssl, ctypes, ctypes.util, anyio, sys
    import redis.asyncio, aiosqlite, azure.storage.blob.aio
    sys.modules["fcntl"] = None
    sys.platform = "win32"
    import importlib, pkgutil
    import aioresults
    failed = []
    for module in pkgutil.walk_packages(aioresults.__path__, "aioresults."):
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            failed.append(f"{module.name}: {type(exc).__name__}: {exc}")
    print("\\n".join(failed) or "ok")

    from aioresults.backends import _inotify
    assert not _inotify.available()

    async def main():
        try:
            async with aioresults.connect("file:///tmp/aioresults-windows-test"):
                pass
        except aioresults.ConfigurationError as exc:
            print("file://:", exc)
        async with aioresults.connect("memory://") as backend:
            await backend.mark_as_done("t", 1)
            print("memory://:", await aioresults.AsyncResult("t", backend).get(timeout=1))

    asyncio.run(main())
    """
)


def test_every_module_imports_on_windows_and_file_says_it_cannot() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRETEND_WINDOWS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "ok", done.stdout
    assert any(line.startswith("file://:") and "POSIX" in line for line in lines), done.stdout
    assert "memory://: 1" in lines
