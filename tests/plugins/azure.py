"""The Azure Block Blob backend in the contract suite, on a private Azurite.

One Azurite (in memory) serves the whole session; each test gets a container of
its own, shared by every backend the test makes and deleted at teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob.aio import BlobServiceClient

from aioresults.backends.azure_blob import AzureBlockBlobBackend
from tests.azurite import Azurite
from tests.conftest import BackendFactory


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """The session's Azurite, in memory."""
    with Azurite() as server:
        yield server


@pytest.fixture
def azure_container() -> str:
    """A container name unique to this test."""
    return f"t-{uuid.uuid4().hex[:20]}"


class AzureFactory(BackendFactory):
    """Makes backends on one container; knows the connection string."""

    def __init__(self, server: Azurite, container: str) -> None:
        self.server = server
        self.container = container
        self.connection_string = server.connection_string()
        super().__init__(self._make)

    def _make(self, *, port: int | None = None, **options: Any) -> AzureBlockBlobBackend:
        """A backend on the test's container; ``port`` sends its requests to
        another port (a :class:`~tests.faultproxy.FaultProxy` in front of Azurite)."""
        options.setdefault("container_name", self.container)
        connection = (
            self.connection_string if port is None else self.server.connection_string(port=port)
        )
        return AzureBlockBlobBackend(connection, **options)

    async def delete_container(self) -> None:
        async with BlobServiceClient.from_connection_string(
            self.connection_string, use_env_settings=False
        ) as service:
            try:
                await service.delete_container(self.container)
            except ResourceNotFoundError:
                pass


@pytest.fixture
async def make_azure_backend(azurite: Azurite, azure_container: str) -> AsyncIterator[AzureFactory]:
    factory = AzureFactory(azurite, azure_container)
    yield factory
    await factory.aclose()
    await factory.delete_container()
