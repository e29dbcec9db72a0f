"""An async worker that reports progress, and a client in another process awaiting it.

Run the client; it picks a task id and starts the worker as a separate process
with that id (standing in for a message queue, which aioresults does not
provide), then follows its progress and awaits its result::

    python examples/async_worker.py

or run the two halves yourself, in two terminals::

    python examples/async_worker.py worker <task-id> 20000
    python examples/async_worker.py client <task-id>

Both use the embedded default store (``sqlite:///aioresults.db`` in the
current directory) unless ``AIORESULTS_URL`` names another one.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

import aioresults as ar


async def count_primes(limit: int) -> int:
    """The work: count the primes below ``limit``, reporting progress as it goes."""
    tracker = ar.current_task()  # the tracked task this coroutine runs in
    found = 0
    step = max(limit // 10, 1)
    for n in range(2, limit):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            found += 1
        if n % step == 0:
            await tracker.progress(n, limit, primes=found)
            await asyncio.sleep(0.02)  # give other tasks (and the demo's viewer) a turn
    return found


async def worker(task_id: str, limit: int) -> None:
    """Run ``count_primes`` as the task ``task_id``: STARTED, PROGRESS..., SUCCESS."""
    async with ar.connect() as backend:
        tracked = ar.task(backend, name="examples.count_primes", report_worker=True)(count_primes)
        await tracked(limit, task_id=task_id)


async def client(task_id: str, timeout: float = 60) -> int:
    """Follow the task's states and return its result."""
    async with ar.connect() as backend:
        result: ar.AsyncResult[int] = ar.AsyncResult(task_id, backend)
        async for meta in result.watch(timeout=timeout):  # pushed, not polled
            if meta.status == ar.states.PROGRESS:
                info = meta.result
                share = info["current"] / info["total"]
                bar = "#" * round(share * 20)
                print(f"  [{bar:<20}] {share:4.0%}  {info['primes']} primes so far", flush=True)
            elif meta.status == ar.states.STARTED:
                print(f"  started by pid {meta.result['pid']} on {meta.worker}", flush=True)
            else:
                print(f"  {meta.status}", flush=True)
        return await result


async def demo(limit: int = 20000) -> None:
    """Start the worker in another process and await it from this one."""
    task_id = str(uuid.uuid4())
    print(f"task {task_id}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "worker", task_id, str(limit)
    )
    try:
        primes = await client(task_id)
    finally:
        await process.wait()
    print(f"{primes} primes below {limit}")


def main(argv: list[str]) -> None:
    if not argv:
        asyncio.run(demo())
    elif argv[0] == "worker" and len(argv) == 3:
        asyncio.run(worker(argv[1], int(argv[2])))
    elif argv[0] == "client" and len(argv) == 2:
        print(f"result: {asyncio.run(client(argv[1]))}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
