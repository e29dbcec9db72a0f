"""The memory backend in the contract suite: a store named per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from aioresults.backends.memory import MemoryBackend
from tests.conftest import BackendFactory


@pytest.fixture
async def make_memory_backend() -> AsyncIterator[BackendFactory]:
    name = f"test-{uuid.uuid4().hex}"
    factory = BackendFactory(lambda **options: MemoryBackend(name=name, **options))
    yield factory
    await factory.aclose()
