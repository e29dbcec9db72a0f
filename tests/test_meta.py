"""ResultMeta: Celery's record, field names and order, round trips."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

import aioresults as ar
from aioresults import DecodeError, ResultMeta, states
from aioresults._meta import _BASIC

# Captured from a Celery 5.7 worker with result_extended and a group (see the reference notes).
CELERY_STORED = (
    '{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], '
    '"date_done": "2026-11-21T09:31:47.941024+00:00", "group_id": "g-1", '
    '"name": "tasks.add", "args": [2, 3], "kwargs": {}, "worker": "w1@localhost", '
    '"retries": 0, "queue": "celery", "stamped_headers": ["x"], "x": "y", '
    '"task_id": "0560e8f4-2d0a-4b46-9d1b-2d1a6d1f3c11"}'
)
CELERY_MINIMAL = (
    '{"status": "STARTED", "result": {"pid": 14214, "hostname": "w1@localhost"}, '
    '"traceback": null, "children": null, "date_done": null, "task_id": "abc"}'
)
CELERY_FAILURE = (
    '{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad", 42], '
    '"exc_module": "builtins"}, "traceback": "Traceback (most recent call last): ...", '
    '"children": [], "date_done": "2026-11-21T09:31:48+00:00", "task_id": "f"}'
)


@pytest.mark.parametrize("stored", [CELERY_STORED, CELERY_MINIMAL, CELERY_FAILURE])
def test_lossless_round_trip_of_celerys_record(stored: str) -> None:
    meta = ResultMeta.from_dict(json.loads(stored))
    assert json.dumps(meta.to_dict()) == stored


def test_fields_are_parsed() -> None:
    meta = ResultMeta.from_dict(json.loads(CELERY_STORED))
    assert meta.status == states.SUCCESS and meta.ready and meta.successful
    assert meta.date_done == dt.datetime(2026, 11, 21, 9, 31, 47, 941024, tzinfo=dt.UTC)
    assert (meta.group_id, meta.name, meta.args, meta.retries) == ("g-1", "tasks.add", [2, 3], 0)
    assert meta.extra == {"stamped_headers": ["x"], "x": "y"}
    failure = ResultMeta.from_dict(json.loads(CELERY_FAILURE))
    assert type(failure.result) is ValueError and failure.failed
    assert failure.result.args == ("bad", 42)


def test_new_meta_writes_celerys_keys_in_order() -> None:
    meta = ResultMeta(task_id="t", status=states.SUCCESS, result=1, parent_id="p")
    assert list(meta.to_dict()) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "parent_id",
        "task_id",
    ]
    extended = ResultMeta(task_id="t", name="n")
    assert list(extended.to_dict())[5:] == [
        "name",
        "args",
        "kwargs",
        "worker",
        "retries",
        "queue",
        "task_id",
    ]


def test_pending_and_custom_states() -> None:
    assert ResultMeta.pending("x").status == states.PENDING
    assert not ResultMeta(task_id="x", status="PROGRESS").ready
    assert states.is_ready(states.REVOKED) and not states.is_ready("PROGRESS")
    assert states.READY_STATES == {"SUCCESS", "FAILURE", "REVOKED"}
    assert states.PROPAGATE_STATES == {"FAILURE", "REVOKED"}
    assert states.EXCEPTION_STATES == {"RETRY", "FAILURE", "REVOKED"}
    assert states.UNREADY_STATES >= {"PENDING", "RECEIVED", "STARTED", "RETRY"}


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {"status": 5, "task_id": "x"},
        {"status": "SUCCESS"},
        {"status": "SUCCESS", "task_id": "x", "date_done": "yesterday"},
    ],
)
def test_malformed_records(bad: object) -> None:
    with pytest.raises(ar.DecodeError):
        ResultMeta.from_dict(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        {
            "status": "SUCCESS",
            "result": 3,
            "traceback": None,
            "children": [],
            "task_id": "t",
            "date_done": "2026-01-02T03:04:05.123456+00:00",
        },
        {"status": "SUCCESS", "result": {"a": [1]}, "date_done": None},
        {"status": "SUCCESS", "result": 1, "task_id": "other"},
        {"status": "SUCCESS", "result": 1, "date_done": "yesterday"},
        {"status": "SUCCESS", "result": 1, "date_done": 5},
        {"status": "SUCCESS", "result": 1, "group_id": "g"},
        {"status": "FAILURE", "result": {"exc_type": "KeyError", "exc_message": ["k"]}},
        {"status": 7, "result": 1},
        ["SUCCESS"],
    ],
)
def test_the_join_fast_path_reads_exactly_as_from_dict(record: Any) -> None:
    from aioresults._meta import success_from_dict

    try:
        expected: ResultMeta | Exception = ResultMeta.from_dict(record, "t")
    except DecodeError as exc:
        expected = exc
    fast = success_from_dict(record, "t")
    if fast is None:  # left to from_dict: only what it would not read as a plain SUCCESS
        assert (
            isinstance(expected, Exception)
            or expected.present != _BASIC
            or (expected.status != "SUCCESS")
        )
    else:
        assert isinstance(expected, ResultMeta)
        assert fast == expected and fast.present == expected.present
        assert fast.date_done == expected.date_done and fast.children == expected.children


def test_the_join_fast_path_takes_celerys_plain_success_record() -> None:
    from aioresults._meta import success_from_dict

    record = {"status": "SUCCESS", "result": 3, "traceback": None, "children": [],
              "date_done": "2026-01-02T03:04:05+00:00", "task_id": "t"}  # fmt: skip
    fast = success_from_dict(record, "t")
    assert fast is not None and fast.result == 3 and fast.date_done is not None
    assert fast == ResultMeta.from_dict(record, "t")
