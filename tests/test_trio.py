"""Under trio: backends that need no driver work; the others say they need asyncio.

Each test runs a whole trio program in a thread (pytest's loop is asyncio).
An opening that fails must surface as the real error and leave trio's task
groups intact: the program carries on and its own task group still works.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import aioresults as ar
from aioresults.backends.filesystem import FilesystemBackend


async def run_trio(main: Callable[[], Awaitable[Any]]) -> Any:
    return await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio"))


async def opening_error(url: str, **options: Any) -> tuple[type[BaseException], str, bool]:
    """Open ``url`` under trio; return the error, and whether trio still works after."""

    async def main() -> tuple[type[BaseException], str, bool]:
        caught: BaseException | None = None
        try:
            async with ar.connect(url, **options):
                pass
        except Exception as exc:
            caught = exc
        assert caught is not None
        # The program's own task group still works: nothing was left half-entered.
        ran = []
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: anyio.sleep(0.01))
            group.start_soon(lambda: ran.append(True) or anyio.lowlevel.checkpoint())  # type: ignore[func-returns-value]
        return type(caught), str(caught), ran == [True]

    result: tuple[type[BaseException], str, bool] = await run_trio(main)
    return result


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "azureblockblob://AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:1/a",
    ],
)
async def test_asyncio_only_backends_say_so_under_trio(url: str) -> None:
    kind, message, intact = await opening_error(url)
    assert issubclass(kind, ar.ConfigurationError), (kind, message)
    assert "asyncio" in message
    assert intact


async def test_sqlite_in_a_missing_directory_under_trio(tmp_path: Path) -> None:
    kind, message, intact = await opening_error(f"sqlite:///{tmp_path}/missing/dir/r.db")
    # The SQLite driver is asyncio-only: that is what the user learns, not a trio crash.
    assert issubclass(kind, ar.ConfigurationError) and "asyncio" in message
    assert intact


async def test_filesystem_open_failure_under_trio_is_the_real_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    kind, message, intact = await opening_error(f"file://{blocker}/results")
    assert issubclass(kind, ar.AioResultsError), (kind, message)
    assert str(blocker) in message
    assert intact


async def test_filesystem_waits_under_trio(tmp_path: Path) -> None:
    async def main() -> list[Any]:
        async with FilesystemBackend(tmp_path / "results", watch="poll", poll_interval=0.01) as b:
            async with anyio.create_task_group() as group:

                async def store() -> None:
                    await anyio.sleep(0.05)
                    await b.mark_as_done("t", "trio")

                group.start_soon(store)
                value = await ar.AsyncResult("t", b).get(timeout=5)
            with pytest.raises(ar.ResultTimeout):
                await ar.AsyncResult("never", b).get(timeout=0.05)
            return [value]

    assert await run_trio(main) == ["trio"]
