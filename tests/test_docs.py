"""The documentation site builds with ``mkdocs build --strict``, and says what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from aioresults import _cli

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    api = (site / "api" / "index.html").read_text()
    # The API reference is generated from the docstrings.
    for name in (
        "AsyncResult.get",
        "TaskTracker.progress",
        "BaseBackend.chord_part_return",
        "register_backend",
    ):
        assert f'id="aioresults.{name}"' in api, name
    assert "Create the backend a URL names." in api
    for page in ("backends/redis", "backends/sqlite", "cli", "errors", "benchmarks"):
        assert (site / page / "index.html").is_file(), page


def test_cli_exit_codes_are_documented_as_implemented() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d) \|", text, re.MULTILINE)}
    implemented = {
        _cli.EXIT_OK,
        _cli.EXIT_FAILED,
        _cli.EXIT_USAGE,
        _cli.EXIT_TIMEOUT,
        _cli.EXIT_UNAVAILABLE,
    }
    assert documented == implemented == {0, 1, 2, 3, 4}
    assert "exit codes: 0 success" in (ROOT / "aioresults" / "_cli.py").read_text()
