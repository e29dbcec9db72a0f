"""The Redis backend on a three-master Redis Cluster in the contract suite: a private
cluster per session, every master emptied per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aioresults.backends.redis import RedisBackend
from tests.conftest import BackendFactory
from tests.servers import RedisCluster


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One private three-master cluster on loopback for the whole session."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
async def make_redis_cluster_backend(
    redis_cluster: RedisCluster,
) -> AsyncIterator[BackendFactory]:
    """Cluster backends (``?cluster=true``), every master emptied first."""
    redis_cluster.flush()

    def create(**options: Any) -> RedisBackend:
        return RedisBackend.from_url(f"{redis_cluster.url}?cluster=true", **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
