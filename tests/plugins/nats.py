"""The NATS JetStream KV backend in the contract suite: a private nats-server per
session, a bucket per test (deleted at teardown).

The test's buckets have no TTL of their own (``bucket_ttl=None``): each record
expires by the expiry its writer gave it, so backends with different
``expires`` can share the bucket, as the contract's expiry test needs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from aioresults.backends.nats import NatsBackend
from tests.conftest import BackendFactory
from tests.services import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One private nats-server with JetStream for the whole session."""
    with NatsServer() as server:
        yield server


class NatsFactory(BackendFactory):
    """Makes backends on one bucket of the session's server."""

    def __init__(self, server: NatsServer, bucket: str) -> None:
        self.server = server
        self.bucket = bucket
        super().__init__(self._make)

    def _make(self, **options: Any) -> NatsBackend:
        options.setdefault("bucket", self.bucket)
        options.setdefault("bucket_ttl", None)
        return NatsBackend(self.server.url, **options)

    def delete_bucket(self) -> None:
        try:
            self.server.request(f"$JS.API.STREAM.DELETE.KV_{self.bucket}")
        except RuntimeError:
            pass  # never created


@pytest.fixture
async def make_nats_backend(nats_server: NatsServer) -> AsyncIterator[NatsFactory]:
    factory = NatsFactory(nats_server, f"t-{uuid.uuid4().hex[:16]}")
    yield factory
    await factory.aclose()
    factory.delete_bucket()
