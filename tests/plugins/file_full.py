"""The filesystem backend with ``synchronous="FULL"`` in the contract suite:
every name change is fsynced with its directory before the call returns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aioresults.backends.filesystem import FilesystemBackend
from tests.conftest import BackendFactory


@pytest.fixture
async def make_file_full_backend(tmp_path: Path) -> AsyncIterator[BackendFactory]:
    directory = tmp_path / "results"

    def create(**options: Any) -> FilesystemBackend:
        options.setdefault("synchronous", "FULL")
        return FilesystemBackend(options.pop("location", directory), **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
