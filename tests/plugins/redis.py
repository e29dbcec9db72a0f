"""The Redis backend in the contract suite: a private server per session, emptied per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aioresults.backends.redis import RedisBackend
from tests.conftest import BackendFactory
from tests.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server (or valkey-server) for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def make_redis_backend(redis_server: RedisServer) -> AsyncIterator[BackendFactory]:
    """Backends on the session's server, emptied first (tests run one at a time)."""
    redis_server.command("FLUSHALL")

    def create(**options: Any) -> RedisBackend:
        return RedisBackend.from_url(redis_server.url, **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
