"""Celery's cache backend (pymemcache) and aioresults on the same memcached servers.

Run on one server (Celery's ``Client``) and on three (Celery's ``HashClient``,
URL ``cache+memcached://h1:p1;h2:p2;h3:p3/``): each side reads what the other
writes, from the node pymemcache places the key on.
"""

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
from aioresults.backends.memcached import MemcachedBackend
from tests.services import MemcachedCluster, MemcachedServer

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(params=["one server", "three servers"])
def servers(
    request: pytest.FixtureRequest,
) -> list[MemcachedServer]:
    """The session's single server, or its three (both started once per session)."""
    if request.param == "one server":
        return [request.getfixturevalue("memcached_server")]
    cluster: MemcachedCluster = request.getfixturevalue("memcached_cluster")
    return list(cluster)


@pytest.fixture
def url(servers: list[MemcachedServer]) -> str:
    """Celery's URL for the servers."""
    return "cache+memcached://" + ";".join(s.address for s in servers) + "/"


@pytest.fixture
def app(url: str) -> Iterator[celery.Celery]:
    """A Celery app whose result backend is Celery's cache backend on ``url``."""
    app = celery.Celery("interop", backend=url, broker="memory://", set_as_current=False)
    app.conf.result_backend_thread_safe = True  # one pymemcache client, closed below
    yield app
    app.backend.client.close()
    app.close()


@pytest.fixture
def celery_backend(app: celery.Celery) -> Any:
    return app.backend


@pytest.fixture
async def backend(url: str) -> AsyncIterator[MemcachedBackend]:
    created = MemcachedBackend(url, poll_interval=0.02, max_poll_interval=0.2)
    yield created
    await created.aclose()


async def in_thread(func: Any, *args: Any) -> Any:
    """Run Celery's blocking calls off the event loop."""
    return await anyio.to_thread.run_sync(func, *args)


# ------------------------------------------------------------------ Celery writes, aioresults reads


async def test_celery_success_is_awaited(celery_backend: Any, backend: MemcachedBackend) -> None:
    task_id = new_id()
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=20))
    await asyncio.sleep(0.1)  # a waiter, then Celery's write (found by the poller)
    await in_thread(celery_backend.store_result, task_id, {"sum": 42, "items": [1, "b"]}, "SUCCESS")
    assert await waiting == {"sum": 42, "items": [1, "b"]}
    meta = await backend.get_meta(task_id)
    assert meta.status == states.SUCCESS and meta.date_done is not None


async def test_celery_failure_and_progress(celery_backend: Any, backend: MemcachedBackend) -> None:
    task_id = new_id()
    await in_thread(celery_backend.store_result, task_id, {"done": 3}, "PROGRESS")
    meta = await backend.get_meta(task_id)
    assert (meta.status, meta.result) == ("PROGRESS", {"done": 3})
    waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=20))
    await in_thread(celery_backend.mark_as_failure, task_id, ValueError("bad input", 7))
    with pytest.raises(ValueError) as caught:
        await waiting
    assert type(caught.value) is ValueError and caught.value.args == ("bad input", 7)


async def test_a_celery_success_is_never_overwritten(
    celery_backend: Any, backend: MemcachedBackend
) -> None:
    task_id = new_id()
    await in_thread(celery_backend.store_result, task_id, "celery's", "SUCCESS")
    assert not await backend.mark_as_started(task_id)
    assert not await backend.mark_as_done(task_id, "mine")
    assert (await backend.get_meta(task_id)).result == "celery's"
    await in_thread(celery_backend.forget, task_id)
    assert (await backend.get_meta(task_id)).status == states.PENDING


# ------------------------------------------------------------------ aioresults writes, Celery reads


async def test_aioresults_success_is_read_by_celery_from_the_right_node(
    app: celery.Celery,
    celery_backend: Any,
    backend: MemcachedBackend,
    servers: list[MemcachedServer],
) -> None:
    ids = [new_id() for _ in range(12)]
    for task_id in ids:
        await backend.mark_as_done(task_id, {"ünïcode": "ид", "id": task_id})
    for task_id in ids:
        result = CeleryResult(task_id, app=app, backend=celery_backend)
        value = await in_thread(lambda r=result: r.get(timeout=10, interval=0.05))
        assert value == {"ünïcode": "ид", "id": task_id}
    client = celery_backend.client
    for task_id in ids:
        key = celery_backend.get_key_for_task(task_id)
        holders = [s.address for s in servers if s.command(f"get {key}").startswith(b"VALUE ")]
        expected = client.hasher.get_node(key) if len(servers) > 1 else servers[0].address
        assert holders == [expected] == [backend.server_for(key)]
    if len(servers) > 1:
        assert len({backend.server_for(backend.task_key(i)) for i in ids}) > 1


async def test_aioresults_failure_is_raised_by_celery(
    app: celery.Celery, celery_backend: Any, backend: MemcachedBackend
) -> None:
    task_id = new_id()
    result = CeleryResult(task_id, app=app, backend=celery_backend)
    waiting = asyncio.create_task(in_thread(lambda: result.get(timeout=10, interval=0.05)))
    await asyncio.sleep(0.1)
    await backend.mark_as_failure(task_id, ValueError("from aioresults"))
    with pytest.raises(ValueError, match="from aioresults"):
        await waiting


async def test_groups_saved_by_either_side(
    app: celery.Celery, celery_backend: Any, backend: MemcachedBackend
) -> None:
    group_id, ids = new_id(), [new_id() for _ in range(3)]
    await ar.GroupResult(group_id, [ar.AsyncResult(i, backend) for i in ids]).save()
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


async def test_the_chord_counter_is_the_one_celery_increments(
    celery_backend: Any, backend: MemcachedBackend
) -> None:
    group_id = new_id()
    await backend.set_chord_size(group_id, 3)
    key = celery_backend.get_key_for_chord(group_id)
    assert await in_thread(celery_backend.get, key) == b"0"
    await backend.chord_part_return(group_id, "a", states.SUCCESS, 1)
    await backend.chord_part_return(group_id, "b", states.SUCCESS, 2)
    assert await in_thread(celery_backend.get, key) == b"2"
