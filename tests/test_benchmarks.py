"""The benchmark runner's command line (the suites themselves run with `scripts/bench`)."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import SUITES, chosen


def test_no_suite_named_runs_every_suite() -> None:
    assert chosen([]) == SUITES
    assert {"redis", "sqlite", "filesystem", "postgres", "mysql"} <= set(SUITES)


def test_named_suites_run_in_suite_order() -> None:
    assert chosen(["sqlite", "redis"]) == ["redis", "sqlite"]


def test_an_unknown_suite_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        chosen(["redis", "nosuch"])
    assert exited.value.code == 2
    assert "unknown suite nosuch" in capsys.readouterr().err
