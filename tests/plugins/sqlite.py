"""The SQLite backend in the contract suite: one database file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioresults.backends.sqlite import SQLiteBackend
from tests.conftest import BackendFactory


@pytest.fixture
async def make_sqlite_backend(tmp_path: Path) -> AsyncIterator[BackendFactory]:
    path = tmp_path / "results.db"
    factory = BackendFactory(lambda **options: SQLiteBackend(path, **options))
    yield factory
    await factory.aclose()
