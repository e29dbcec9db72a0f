"""Celery's Azure Block Blob backend and aioresults on one Azurite container."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import celery
import pytest
from celery.result import AsyncResult as CeleryResult, GroupResult as CeleryGroup

import aioresults as ar
from aioresults import states
from aioresults.backends.azure_blob import AzureBlockBlobBackend
from tests.plugins.azure import AzureFactory

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def app(make_azure_backend: AzureFactory) -> Iterator[celery.Celery]:
    """A Celery app whose result backend is Celery's Azure backend on the test's container."""
    app = celery.Celery(
        "interop",
        backend="azureblockblob://" + make_azure_backend.connection_string,
        broker="memory://",
    )
    app.conf.azureblockblob_container_name = make_azure_backend.container
    yield app
    for backend in [app.backend]:
        client = backend.__dict__.get("_blob_service_client")
        if client is not None:
            client.close()
    app.close()


@pytest.fixture
def celery_backend(app: celery.Celery) -> Any:
    """Celery's backend object; handed to threads explicitly (``app.backend`` is per thread)."""
    return app.backend


@pytest.fixture
async def backend(make_azure_backend: AzureFactory) -> AsyncIterator[AzureBlockBlobBackend]:
    created = await make_azure_backend(poll_interval=0.02, max_poll_interval=0.2)
    assert isinstance(created, AzureBlockBlobBackend)
    yield created


async def in_thread(func: Any, *args: Any) -> Any:
    """Run Celery's blocking calls off the event loop."""
    return await anyio.to_thread.run_sync(func, *args)


# ------------------------------------------------------------------ Celery writes, aioresults reads


async def test_celery_success_is_awaited(
    celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
    await asyncio.sleep(0.1)  # a waiter, then Celery's write
    await in_thread(celery_backend.store_result, task_id, {"sum": 42, "items": [1, "b"]}, "SUCCESS")
    assert await waiting == {"sum": 42, "items": [1, "b"]}
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS and meta.date_done is not None


async def test_celery_failure_is_raised(
    celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=10))
    await asyncio.sleep(0.1)
    await in_thread(celery_backend.mark_as_failure, task_id, ValueError("bad input", 7))
    with pytest.raises(ValueError) as caught:
        await waiting
    assert type(caught.value) is ValueError and caught.value.args == ("bad input", 7)


async def test_celery_progress_and_forget(
    celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    task_id = new_id()
    await in_thread(celery_backend.store_result, task_id, {"done": 3}, "PROGRESS")
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result) == ("PROGRESS", {"done": 3})
    await in_thread(celery_backend.forget, task_id)
    assert (await backend.get_meta(task_id)).status == states.PENDING


# ------------------------------------------------------------------ aioresults writes, Celery reads


async def test_aioresults_success_is_read_by_celery(
    app: celery.Celery, celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    task_id = new_id()
    result = CeleryResult(task_id, app=app, backend=celery_backend)
    waiting = asyncio.create_task(in_thread(lambda: result.get(timeout=10, interval=0.05)))
    await asyncio.sleep(0.1)
    await backend.mark_as_done(task_id, {"ünïcode": "ид", "n": [1, 2.5, None]})
    assert await waiting == {"ünïcode": "ид", "n": [1, 2.5, None]}
    assert await in_thread(lambda: result.state) == "SUCCESS"


async def test_aioresults_failure_is_raised_by_celery(
    app: celery.Celery, celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    task_id = new_id()
    await backend.mark_as_failure(task_id, ValueError("from aioresults"))
    result = CeleryResult(task_id, app=app, backend=celery_backend)
    with pytest.raises(ValueError, match="from aioresults"):
        await in_thread(lambda: result.get(timeout=10, interval=0.05))
    assert await in_thread(lambda: result.failed())


async def test_groups_saved_by_either_side(
    app: celery.Celery, celery_backend: Any, backend: AzureBlockBlobBackend
) -> None:
    group_id, ids = new_id(), [new_id() for _ in range(3)]
    group = ar.GroupResult(group_id, [ar.AsyncResult(i, backend) for i in ids])
    await group.save()
    restored = await in_thread(
        lambda: CeleryGroup.restore(group_id, app=app, backend=celery_backend)
    )
    assert [r.id for r in restored.results] == ids
    other_id = new_id()
    await in_thread(
        lambda: CeleryGroup(other_id, [CeleryResult(i, app=app) for i in ids], app=app).save(
            backend=celery_backend
        )
    )
    mine = await ar.GroupResult.restore(other_id, backend)
    assert mine is not None and [r.id for r in mine] == ids
