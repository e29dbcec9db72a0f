"""Quickstart: a worker stores results while a client awaits them.

Runs on the embedded default (``sqlite:///aioresults.db`` in the current
directory) unless ``AIORESULTS_URL`` names another store::

    python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import uuid

import aioresults as ar


async def worker(backend: ar.BaseBackend, task_id: str, numbers: list[int]) -> None:
    """Pretend to be a worker: report progress, then the result."""
    await backend.mark_as_started(task_id)
    total = 0
    for done, n in enumerate(numbers, 1):
        await asyncio.sleep(0.05)
        total += n
        await backend.update_state(task_id, ar.states.PROGRESS, {"done": done, "of": len(numbers)})
    await backend.mark_as_done(task_id, total)


async def main() -> None:
    async with ar.connect() as backend:
        print(f"store: {backend!r}")
        task_id = str(uuid.uuid4())
        result: ar.AsyncResult[int] = ar.AsyncResult(task_id, backend)
        job = asyncio.create_task(worker(backend, task_id, [1, 2, 3, 4]))

        async for meta in result.watch(timeout=30):  # every state change, pushed
            print(f"  {meta.status:<8} {meta.result}")
        print(f"sum = {await result}")
        await job

        # A group: wait for many results, in completion order.
        ids = [str(uuid.uuid4()) for _ in range(3)]
        group = ar.ResultSet([ar.AsyncResult(i, backend) for i in ids])

        async def finish_in_reverse() -> None:
            for i, member in reversed(list(enumerate(ids))):
                await asyncio.sleep(0.05)
                await backend.mark_as_done(member, i * i)

        finishing = asyncio.create_task(finish_in_reverse())
        async for done in group.as_completed(timeout=30):
            print(f"  finished member {ids.index(done.id)} -> {await done}")
        await finishing
        print(f"joined in order: {await group.join(timeout=30)}")

        # A failure comes back as the task's exception.
        failing = str(uuid.uuid4())
        await backend.mark_as_failure(failing, ValueError("bad input", 42))
        try:
            await ar.AsyncResult(failing, backend)
        except ValueError as exc:
            print(f"task failed: {exc!r}")


if __name__ == "__main__":
    asyncio.run(main())
