"""What the PostgreSQL and MySQL backends share beyond the contract, run on both.

Chords when calls are lost, killed or duplicated across processes; stored
payloads that are corrupt or pickled; Celery's expiry by ``date_done`` and the
CLI's ``cleanup``; group commit. Rows are planted with each store's native
client, as a foreign writer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import pickle
import random
import sys
import textwrap
import uuid
from typing import Any

import pytest

import aioresults as ar
from aioresults import states
from aioresults.backends import PartCount
from tests.conftest import MakeBackend
from tests.plugins.mysql import mysql_sql
from tests.plugins.postgres import pg_sql

KINDS = ["postgres", "mysql"]
# How a planted row of Celery's table gets its id on each server (Celery's sequence).
NEXT_ID = {"postgres": "nextval('task_id_sequence')", "mysql": "NEXTVAL(task_id_sequence)"}
NEXT_GROUP_ID = {
    "postgres": "nextval('taskset_id_sequence')",
    "mysql": "NEXTVAL(taskset_id_sequence)",
}


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str:
    """The URL of the test's own database (the one ``make`` uses)."""
    found: str = request.getfixturevalue(
        "postgres_database" if kind == "postgres" else "mariadb_database"
    )
    return found


@pytest.fixture
def make(kind: str, request: pytest.FixtureRequest) -> MakeBackend:
    factory: MakeBackend = request.getfixturevalue(f"make_{kind}_backend")
    return factory


async def native(kind: str, url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await (pg_sql if kind == "postgres" else mysql_sql)(url, sql, *args)


async def plant(kind: str, url: str, task_id: str, result: bytes, date_done: dt.datetime) -> None:
    """A SUCCESS row as Celery writes it (no row of aioresults beside it)."""
    await native(
        kind,
        url,
        "INSERT INTO celery_taskmeta (id, task_id, status, result, date_done) "
        f"VALUES ({NEXT_ID[kind]}, ?, 'SUCCESS', ?, ?)",
        task_id,
        result,
        date_done,
    )


def utc_naive(**ago: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(**ago)


# ------------------------------------------------------------------ chords


async def test_chord_completing_reply_lost_and_retried(make: MakeBackend) -> None:
    backend = await make()
    group_id, parts = new_id(), [new_id() for _ in range(3)]
    await backend.set_chord_size(group_id, 3)
    for i in range(2):
        assert not (await backend.chord_part_return(group_id, parts[i], "SUCCESS", i)).complete
    first = await backend.chord_part_return(group_id, parts[2], "SUCCESS", 2)
    assert first.complete and first.counted and first.results == [0, 1, 2]
    # Its reply is lost after the commit: the part is delivered again, a new call.
    again = await backend.chord_part_return(group_id, parts[2], "SUCCESS", 2)
    assert again.complete and not again.counted
    assert (again.count, again.results) == (3, [0, 1, 2])
    for i in range(2):  # the other parts never complete the chord
        late = await backend.chord_part_return(group_id, parts[i], "SUCCESS", i)
        assert not late.complete and not late.counted and late.count == i + 1

    # The store primitive: a retry of the very call (same receipt) finds its own count.
    other = new_id()
    await backend.set_chord_size(other, 2)
    assert await backend._chord_count(other, "a", b"A", "r1") == PartCount(1, 2, True)
    assert await backend._chord_count(other, "a", b"A", "r1") == PartCount(1, 2, True)
    assert await backend._chord_count(other, "a", b"A", "r2") == PartCount(1, 2, False)
    assert await backend._chord_count(other, "b", b"B", "r3") == PartCount(2, 2, True)
    # A part beyond the size is not stored, and the count never passes the size.
    assert await backend._chord_count(other, "c", b"C", "r4") == PartCount(3, 2, False)
    assert sorted(await backend._chord_parts(other)) == [b"A", b"B"]
    assert await backend._chord_count(new_id(), "a", b"A", "r5") is None  # no size


async def test_chord_workers_killed_at_any_moment(make: MakeBackend) -> None:
    one, two = await make(), await make()
    group_id, size = new_id(), 24
    ids = [new_id() for _ in range(size)]
    await one.set_chord_size(group_id, size)

    async def killed(i: int) -> None:
        # The first delivery dies at a random moment: before its transaction,
        # inside it, or after its commit (its reply never arrives).
        call = asyncio.create_task(
            (one, two)[i % 2].chord_part_return(group_id, ids[i], "SUCCESS", i, index=i)
        )
        await asyncio.sleep(random.uniform(0, 0.006))
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call

    await asyncio.gather(*(killed(i) for i in range(size)))
    # Every part is delivered again, once, by the other worker.
    outcomes = await asyncio.gather(
        *(
            (two, one)[i % 2].chord_part_return(group_id, ids[i], "SUCCESS", i, index=i)
            for i in range(size)
        )
    )
    completing = [o for o in outcomes if o.complete]
    assert len(completing) == 1 and completing[0].results == list(range(size))
    assert all(o.count is not None and 1 <= o.count <= size for o in outcomes)
    assert len(await one._chord_parts(group_id)) == size  # each part counted once


CLIENT = textwrap.dedent(
    """
    import asyncio, json, random, sys
    import aioresults as ar

    async def main(url, group_id, ids):
        async with ar.connect(url) as backend:
            calls = list(enumerate(ids)) * 2
            random.shuffle(calls)
            outcomes = await asyncio.gather(*(
                backend.chord_part_return(group_id, task_id, "SUCCESS", i, index=i)
                for i, task_id in calls
            ))
        print(json.dumps([[o.task_id, o.counted, o.complete, o.count, o.results]
                          for o in outcomes]))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(",")))
    """
)


async def test_chord_three_client_processes_with_duplicates(url: str, make: MakeBackend) -> None:
    backend = await make()
    group_id, size = new_id(), 30
    ids = [new_id() for _ in range(size)]
    await backend.set_chord_size(group_id, size)
    clients = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            url,
            group_id,
            ",".join(ids),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(c.communicate() for c in clients)), 60)
    assert [c.returncode for c in clients] == [0, 0, 0]
    outcomes = [row for out, _ in outputs for row in json.loads(out)]
    assert len(outcomes) == 3 * 2 * size
    assert sum(counted for _, counted, _, _, _ in outcomes) == size
    completing = [row for row in outcomes if row[2]]
    assert len({task_id for task_id, *_ in completing}) == 1
    assert sum(counted for _, counted, _, _, _ in completing) == 1
    assert all(results == list(range(size)) for *_, results in completing)
    assert all(count is not None and count <= size for *_, count, _ in outcomes)


# ------------------------------------------------------------------ bad stored data


async def test_corrupt_blob_is_a_decode_error_for_its_reader_alone(
    kind: str, url: str, make: MakeBackend
) -> None:
    backend = await make()
    good, bad = new_id(), new_id()
    assert (await backend.get_meta(good)).status == states.PENDING  # opens: tables made
    waiting = asyncio.create_task(ar.AsyncResult(good, backend).get(timeout=10))
    await plant(kind, url, bad, b"\x00\xffnot a payload", utc_naive())
    with pytest.raises(ar.DecodeError):
        await backend.get_meta(bad)
    with pytest.raises(ar.DecodeError):
        await ar.AsyncResult(bad, backend).get(timeout=5)
    await backend.mark_as_done(good, "fine")
    assert await waiting == "fine"


async def test_pickled_blob_refused_unless_accepted(kind: str, url: str, make: MakeBackend) -> None:
    backend = await make()
    trusting = await make(accept=["json", "pickle"])
    task_id = new_id()
    await backend.get_meta(task_id)  # opens: tables made
    await plant(kind, url, task_id, pickle.dumps({"x": 1}), utc_naive())
    with pytest.raises(ar.ContentDisallowed, match="pickle"):
        await backend.get_meta(task_id)
    assert (await trusting.get_meta(task_id)).result == {"x": 1}


# ------------------------------------------------------------------ expiry and cleanup


async def test_celery_rows_expire_by_date_done_and_cleanup_deletes_them(
    kind: str, url: str, make: MakeBackend
) -> None:
    backend = await make()  # expires: one day, as Celery's result_expires
    short = await make(expires=0.2)
    old, recent = new_id(), new_id()
    await backend.get_meta(old)  # opens: tables made
    await plant(kind, url, old, b'"old"', utc_naive(days=2))
    await plant(kind, url, recent, b'"recent"', utc_naive(hours=1))
    await native(
        kind,
        url,
        "INSERT INTO celery_tasksetmeta (id, taskset_id, result, date_done) "
        f"VALUES ({NEXT_GROUP_ID[kind]}, ?, ?, ?)",
        "old-group",
        b'[["old-group", null], []]',
        utc_naive(days=2),
    )
    ours, gone = new_id(), new_id()
    await backend.mark_as_done(ours, "ours")
    await short.mark_as_done(gone, "gone soon")
    await asyncio.sleep(0.3)
    metas = await backend.get_many([old, recent, ours, gone])
    assert [m.status for m in metas] == ["PENDING", "SUCCESS", "SUCCESS", "PENDING"]
    assert await backend.restore_group("old-group") is None

    assert await backend.cleanup() == 3  # Celery's old row and group, our expired row
    left = await native(kind, url, "SELECT task_id FROM celery_taskmeta")
    assert sorted(row[0] for row in left) == sorted([recent, ours])
    assert await native(kind, url, "SELECT taskset_id FROM celery_tasksetmeta") == []
    assert await backend.cleanup() == 0

    # The CLI's cleanup command does the same.
    await plant(kind, url, new_id(), b'"old"', utc_naive(days=3))
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioresults._cli", "--url", url, "--json", "cleanup",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    assert json.loads(out) == {"deleted": 1}


# ------------------------------------------------------------------ writes


async def test_concurrent_writes_share_transactions(make: MakeBackend) -> None:
    backend = await make()
    ids = [new_id() for _ in range(300)]
    assert all(await asyncio.gather(*(backend.mark_as_done(i, n) for n, i in enumerate(ids))))
    stats = backend.stats  # type: ignore[attr-defined]
    assert stats["writes"] == 300
    assert stats["commits"] <= 30  # group commit: many records per transaction
    assert [m.result for m in await backend.get_many(ids)] == list(range(300))


async def test_ids_longer_than_celerys_column_are_refused(make: MakeBackend) -> None:
    backend = await make()
    longest = "x" * 155
    await backend.mark_as_done(longest, 1)
    assert (await backend.get_meta(longest)).result == 1
    with pytest.raises(ar.InvalidTaskId, match="155"):
        await backend.mark_as_done("x" * 156, 1)
    with pytest.raises(ar.InvalidTaskId):
        await backend.save_group("g" * 156, [["g", None], []])
    assert (await backend.get_meta(new_id())).status == states.PENDING


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"table_names": {"tasks": "x"}}, "'task' and 'group'"),
        ({"table_names": {"task": "x; DROP TABLE y"}}, "not a usable table"),
        ({"table_schemas": {"group": "1st"}}, "not a usable table"),
        ({"table_names": {"task": "t" * 60}}, "at most"),
        ({"pool_size": 0}, "pool_size"),
        ({"retries": -1}, "retries"),
        ({"command_timeout": 0}, "command_timeout"),
    ],
)
def test_bad_options_are_refused(scheme: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ar.ConfigurationError, match=message):
        ar.connect(f"{scheme}://127.0.0.1/results", **options)
