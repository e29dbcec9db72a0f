"""The memcached backend in the contract suite: three private servers per session
(keys spread over them as pymemcache's HashClient spreads them), emptied per test.

Also the session's single server, for tests of the one-server form (not emptied:
those tests use fresh ids).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aioresults.backends.memcached import MemcachedBackend
from tests.conftest import BackendFactory
from tests.services import MemcachedCluster, MemcachedServer


@pytest.fixture(scope="session")
def memcached_cluster() -> Iterator[MemcachedCluster]:
    """Three private memcached servers for the whole session."""
    with MemcachedCluster(3) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedServer]:
    """One private memcached server for the whole session."""
    with MemcachedServer() as server:
        yield server


@pytest.fixture
async def make_memcached_backend(
    memcached_cluster: MemcachedCluster,
) -> AsyncIterator[BackendFactory]:
    """Backends on the session's servers, emptied first (tests run one at a time)."""
    memcached_cluster.flush_all()

    def create(**options: Any) -> MemcachedBackend:
        return MemcachedBackend.from_url("cache+" + memcached_cluster.url, **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
