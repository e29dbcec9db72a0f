"""Celery 5.7's database backend and aioresults on one PostgreSQL or MariaDB database.

Celery runs as shipped: SQLAlchemy with psycopg (``db+postgresql+psycopg://``)
or PyMySQL (``db+mysql+pymysql://``), in a thread, as a worker or a client would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import celery
import pytest
from celery.app.task import Context
from celery.result import AsyncResult as CeleryResult, GroupResult as CeleryGroup

import aioresults as ar
from aioresults import states
from aioresults.backends.mysql import MySQLBackend
from aioresults.backends.postgres import PostgresBackend

DRIVERS = {"postgres": "psycopg", "mysql": "pymysql"}
# Seconds between polls where the backend polls: on PostgreSQL far above a pushed
# wake (there, with the trigger, nothing polls at all).
POLL = {"postgres": 5.0, "mysql": 1.0}


def new_id() -> str:
    return str(uuid.uuid4())


async def in_thread(func: Any, *args: Any) -> Any:
    """Run Celery's blocking calls off the event loop."""
    return await anyio.to_thread.run_sync(func, *args)


@pytest.fixture(params=["postgres", "mysql"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str:
    found: str = request.getfixturevalue(
        "postgres_database" if kind == "postgres" else "mariadb_database"
    )
    return found


@pytest.fixture
def app(kind: str, url: str) -> Iterator[celery.Celery]:
    """A Celery app whose result backend is the database backend on the test's database."""
    backend_url = "db+" + url.replace("://", f"+{DRIVERS[kind]}://", 1)
    app = celery.Celery("interop", backend=backend_url, broker="memory://")
    app.conf.result_extended = True
    yield app
    for engine_url in list(app.backend.session_manager._engines):
        app.backend.session_manager.invalidate(engine_url)
    app.close()


@pytest.fixture
async def backend(kind: str, url: str) -> AsyncIterator[ar.BaseBackend]:
    cls = PostgresBackend if kind == "postgres" else MySQLBackend
    async with cls(url) as opened:
        yield opened


# ------------------------------------------------------------------ Celery writes, aioresults reads


async def test_celery_success_and_failure_are_read(
    app: celery.Celery, backend: ar.BaseBackend
) -> None:
    ok, bad = new_id(), new_id()
    request = Context(
        task="tasks.add",
        args=[2, 3],
        kwargs={"z": 1},
        hostname="w1@host",
        retries=2,
        delivery_info={"routing_key": "celery"},
    )
    await in_thread(
        lambda: app.backend.store_result(ok, {"sum": 5}, states.SUCCESS, request=request)
    )
    try:
        raise ValueError("boom", 3)
    except ValueError as exc:
        failure = exc
    await in_thread(lambda: app.backend.mark_as_failure(bad, failure, traceback="Traceback..."))

    assert await ar.AsyncResult(ok, backend).get(timeout=5) == {"sum": 5}
    meta = await backend.get_meta(ok)
    assert (meta.name, meta.args, meta.kwargs) == ("tasks.add", [2, 3], {"z": 1})
    assert (meta.worker, meta.retries, meta.queue) == ("w1@host", 2, "celery")
    assert meta.date_done is not None
    assert abs(meta.date_done - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    with pytest.raises(ValueError) as caught:
        await ar.AsyncResult(bad, backend).get(timeout=5)
    assert type(caught.value) is ValueError and caught.value.args == ("boom", 3)
    assert (await backend.get_meta(bad)).traceback == "Traceback..."


async def test_celery_write_wakes_a_waiter(kind: str, app: celery.Celery, url: str) -> None:
    cls = PostgresBackend if kind == "postgres" else MySQLBackend
    async with cls(url, poll_interval=POLL[kind], max_poll_interval=POLL[kind]) as backend:
        task_id = new_id()
        waiting = asyncio.create_task(ar.AsyncResult(task_id, backend).get(timeout=30))
        with anyio.fail_after(10):
            while backend.wait_stats().unsettled or not backend.wait_stats().waiters:
                await asyncio.sleep(0.01)
        began = time.monotonic()
        await in_thread(lambda: app.backend.store_result(task_id, "from celery", states.SUCCESS))
        assert await waiting == "from celery"
        waited = time.monotonic() - began
        stats = backend.wait_stats()
    if kind == "postgres":
        # The trigger's NOTIFY: well under the poll interval, and no poll at all.
        assert waited < 1.0 and stats.mode == "signal" and stats.polls == 0
    else:
        # MySQL says nothing: the poller finds it, within its pause.
        assert waited <= POLL[kind] + 2 and stats.mode == "poll" and stats.polls >= 2


# ------------------------------------------------------------------ aioresults writes, Celery reads


async def test_celery_reads_what_aioresults_writes(
    app: celery.Celery, backend: ar.BaseBackend
) -> None:
    ok, bad, started = new_id(), new_id(), new_id()
    await backend.store_result(
        ok,
        {"sum": 5},
        states.SUCCESS,
        name="tasks.add",
        args=[2, 3],
        kwargs={"z": 1},
        worker="w1",
        retries=0,
        queue="celery",
    )
    try:
        raise ValueError("boom", 3)
    except ValueError as exc:
        await backend.mark_as_failure(bad, exc)
    await backend.mark_as_started(started, {"pid": 7})

    result = CeleryResult(ok, app=app)
    assert await in_thread(lambda: result.get(timeout=5, interval=0.05)) == {"sum": 5}
    assert (result.name, result.args, result.kwargs) == ("tasks.add", [2, 3], {"z": 1})
    assert (result.worker, result.queue) == ("w1", "celery")
    assert isinstance(result.date_done, dt.datetime)
    failed = CeleryResult(bad, app=app)
    with pytest.raises(ValueError, match="boom"):
        await in_thread(lambda: failed.get(timeout=5, interval=0.05))
    assert "raise ValueError" in failed.traceback
    assert await in_thread(lambda: CeleryResult(started, app=app).state) == states.STARTED
    assert await in_thread(lambda: CeleryResult(started, app=app).info) == {"pid": 7}


async def test_celery_waiter_sees_a_later_aioresults_write(
    app: celery.Celery, backend: ar.BaseBackend
) -> None:
    task_id = new_id()
    result = CeleryResult(task_id, app=app)
    got: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            got.append(await in_thread(lambda: result.get(timeout=10, interval=0.05)))

        tg.start_soon(wait)
        await asyncio.sleep(0.2)
        await backend.mark_as_done(task_id, [1, "two"])
    assert got == [[1, "two"]]


async def test_success_guard_holds_against_celery(
    app: celery.Celery, backend: ar.BaseBackend
) -> None:
    task_id = new_id()
    await in_thread(lambda: app.backend.store_result(task_id, "celery's", states.SUCCESS))
    assert not await backend.mark_as_failure(task_id, ValueError("late"))
    await backend.mark_as_done(other := new_id(), "ours")
    await in_thread(lambda: app.backend.store_result(other, "late", states.STARTED))
    metas = await backend.get_many([task_id, other])
    assert [m.result for m in metas] == ["celery's", "ours"]


# ------------------------------------------------------------------ groups


async def test_groups_saved_by_either_side(app: celery.Celery, backend: ar.BaseBackend) -> None:
    celery_gid, ours_gid = new_id(), new_id()
    celery_ids, our_ids = [new_id() for _ in range(3)], [new_id() for _ in range(3)]
    celery_group = CeleryGroup(celery_gid, [CeleryResult(i, app=app) for i in celery_ids], app=app)
    await in_thread(celery_group.save)
    restored = await ar.GroupResult.restore(celery_gid, backend)
    assert restored is not None and [r.id for r in restored] == celery_ids

    await ar.GroupResult(ours_gid, [ar.AsyncResult(i, backend) for i in our_ids]).save()
    theirs = await in_thread(lambda: CeleryGroup.restore(ours_gid, app=app))
    assert theirs is not None and [r.id for r in theirs.results] == our_ids
    for i, task_id in enumerate(our_ids):
        await backend.mark_as_done(task_id, i)
    assert await in_thread(lambda: theirs.get(timeout=5, interval=0.05)) == [0, 1, 2]
    await in_thread(lambda: app.backend.delete_group(ours_gid))
    assert await ar.GroupResult.restore(ours_gid, backend) is None


async def test_celery_forget_removes_our_record(
    app: celery.Celery, backend: ar.BaseBackend
) -> None:
    task_id = new_id()
    await backend.mark_as_done(task_id, 1)
    await in_thread(lambda: CeleryResult(task_id, app=app).forget())
    assert (await backend.get_meta(task_id)).status == states.PENDING
