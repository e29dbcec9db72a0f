"""What every key-value backend shares: Celery's keys and bytes, corrupt payloads."""

from __future__ import annotations

import asyncio
import json
import pickle
import uuid
from typing import Any

import pytest

import aioresults as ar
from aioresults import KeyValueBackend, states
from tests.conftest import BACKEND_KINDS, MakeBackend

#: The kinds whose backend keeps records under keys (the SQL ones keep rows).
KV_KINDS = [kind for kind in BACKEND_KINDS if kind not in ("sqlite", "postgres", "mysql")]


@pytest.fixture(params=KV_KINDS)
def make_kv(request: pytest.FixtureRequest) -> MakeBackend:
    factory: MakeBackend = request.getfixturevalue(f"make_{request.param}_backend")
    return factory


@pytest.fixture
async def kv(make_kv: MakeBackend) -> KeyValueBackend:
    backend = await make_kv()
    assert isinstance(backend, KeyValueBackend)
    return backend


def new_id() -> str:
    return str(uuid.uuid4())


async def plant(kv: KeyValueBackend, key: str, payload: bytes) -> None:
    """Put raw bytes at ``key`` as Celery's writer does for this store (value,
    and its notification where the store has one): a foreign, hostile writer."""
    await kv._ensure_open()
    await kv._set(key, payload, None)


async def raw(kv: KeyValueBackend, key: str) -> bytes | None:
    """The raw bytes at ``key``."""
    await kv._ensure_open()
    return await kv._get(key)


async def test_record_bytes_are_celerys(kv: KeyValueBackend) -> None:
    task_id = new_id()
    await kv.store_result(task_id, {"a": 1}, states.SUCCESS, name="tasks.add", args=[1])
    stored = await raw(kv, kv.task_key(task_id))
    assert stored is not None
    assert kv.task_key(task_id).endswith(f"celery-task-meta-{task_id}")
    record = json.loads(stored)
    assert list(record) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "name",
        "args",
        "kwargs",
        "worker",
        "retries",
        "queue",
        "task_id",
    ]
    assert record["status"] == "SUCCESS" and record["result"] == {"a": 1}
    assert stored.startswith(b'{"status": "SUCCESS", "result": {"a": 1}, "traceback": null')


async def test_corrupt_payload_fails_only_its_own_waiter(kv: KeyValueBackend) -> None:
    bad, good = new_id(), new_id()
    waiting_bad = asyncio.create_task(ar.AsyncResult(bad, kv).get(timeout=10))
    waiting_good = asyncio.create_task(ar.AsyncResult(good, kv).get(timeout=10))
    await asyncio.sleep(0.2)
    await plant(kv, kv.task_key(bad), b'{"status": "SUCC')
    await kv.mark_as_done(good, "fine")
    with pytest.raises(ar.DecodeError):
        await waiting_bad
    assert await waiting_good == "fine"
    with pytest.raises(ar.DecodeError):
        await kv.get_meta(bad)
    # The corrupt record is replaced by a good one: nothing is lost for later readers.
    await kv.mark_as_done(bad, "repaired")
    assert await ar.AsyncResult(bad, kv).get(timeout=5) == "repaired"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x04\x95",
        pickle.dumps({"status": "SUCCESS"}),
        b"[1, 2]",
        b'{"status": 5}',
        b"null",
        b'{"status": "SUCCESS", "result": 1, "date_done": "yesterday"}',
        b'{"status": "SUCCESS", "result": 1, "task_id": "another"}',
    ],
)
async def test_hostile_payloads_are_clear_errors(kv: KeyValueBackend, payload: bytes) -> None:
    task_id = new_id()
    await plant(kv, kv.task_key(task_id), payload)
    with pytest.raises((ar.DecodeError, ar.ContentDisallowed)):
        await kv.get_meta(task_id)
    with pytest.raises((ar.DecodeError, ar.ContentDisallowed)):
        await ar.ResultSet([ar.AsyncResult(task_id, kv)]).join(timeout=0)


async def test_non_exception_failure_payload_is_refused(kv: KeyValueBackend) -> None:
    task_id = new_id()
    record: dict[str, Any] = {
        "status": "FAILURE",
        "result": {"exc_type": "system", "exc_message": ["echo pwned"], "exc_module": "os"},
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": task_id,
    }
    await plant(kv, kv.task_key(task_id), json.dumps(record).encode())
    with pytest.raises(ar.SecurityError):
        await ar.AsyncResult(task_id, kv).get(timeout=1)


async def test_global_keyprefix(make_kv: MakeBackend, kv: KeyValueBackend) -> None:
    assert kv.global_keyprefix == ""
    prefixed = await make_kv(global_keyprefix="app1")
    assert isinstance(prefixed, KeyValueBackend)
    task_id = new_id()
    await prefixed.mark_as_done(task_id, 1)
    assert prefixed.task_key(task_id) == f"app1_celery-task-meta-{task_id}"
    assert await raw(prefixed, prefixed.task_key(task_id)) is not None
    assert (await kv.get_meta(task_id)).status == states.PENDING
