"""What a user's type checker sees: ``scripts/check`` runs ``mypy --strict`` on this file.

Each ``assert_type`` states a fact about the public types: an ``AsyncResult``
written without a type argument is ``AsyncResult[Any]`` (no error under
``--strict``), ``async with`` gives the backend's own class, and ``get()``,
``await``, ``join()`` and ``as_completed()`` carry the result type through.

It is also an ordinary module: ``assert_type`` does nothing at run time, and
``tests/test_packaging.py`` runs :func:`main` on the memory store, so every line
here is code that works, not only code that type-checks. Its name does not
start with ``test_``, so pytest does not collect it.
"""

from __future__ import annotations

import asyncio
from typing import Any, assert_type

import aioresults as ar
from aioresults.backends.filesystem import FilesystemBackend
from aioresults.backends.memory import MemoryBackend
from aioresults.backends.sqlite import SQLiteBackend


async def unannotated(backend: ar.BaseBackend) -> None:
    """No annotation: the README's quickstart, which must pass ``mypy --strict``."""
    result = ar.AsyncResult("task-1", backend)
    assert_type(result, ar.AsyncResult[Any])
    await backend.mark_as_done("task-1", {"answer": 42})
    value = await result
    assert_type(value, Any)
    assert value == {"answer": 42}
    group = ar.ResultSet([result])
    assert_type(group, ar.ResultSet[Any])
    assert await group.join(timeout=5) == [{"answer": 42}]


async def typed(backend: ar.BaseBackend) -> None:
    """An annotated result keeps its type through every way of waiting for it."""
    await backend.mark_as_done("task-2", 2)
    await backend.mark_as_done("task-3", 3)
    result: ar.AsyncResult[int] = ar.AsyncResult("task-2", backend)
    assert_type(await result, int)
    assert_type(await result.get(timeout=5), int)
    assert_type(await result.get(timeout=5, propagate=False), int | BaseException)

    group = ar.ResultSet([result, ar.AsyncResult[int]("task-3", backend)])
    assert_type(group, ar.ResultSet[int])
    assert_type(await group.join(timeout=5), list[int])
    assert_type(await group.join(timeout=5, propagate=False), list[int | BaseException])
    assert_type(await group, list[int])
    done: list[int] = []
    async for member in group.as_completed(timeout=5):
        assert_type(member, ar.AsyncResult[int])
        done.append(await member)
    assert sorted(done) == [2, 3]
    assert await group.join(timeout=5) == [2, 3]

    saved = ar.GroupResult("group-1", group.results, backend)
    assert_type(saved, ar.GroupResult[int])
    assert_type(await saved.join(timeout=5), list[int])


async def main(directory: str) -> None:
    """``async with`` gives the backend's own class, whichever way it is made."""
    async with MemoryBackend() as memory:
        assert_type(memory, MemoryBackend)
        await unannotated(memory)
        await typed(memory)
    async with FilesystemBackend(f"{directory}/files") as files:
        assert_type(files, FilesystemBackend)
        await typed(files)
    async with SQLiteBackend(f"{directory}/results.db") as sqlite:
        assert_type(sqlite, SQLiteBackend)
        await unannotated(sqlite)
    async with ar.connect("memory://") as connected:
        assert_type(connected, ar.BaseBackend)
        await unannotated(connected)


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else scratch))
    print("ok")
