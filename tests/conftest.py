"""Test configuration shared by the whole suite.

Backends join the contract suite through a plugin module
``tests/plugins/<kind>.py`` that defines a ``make_<kind>_backend`` fixture: a
factory ``await make(**options)`` returning a new backend instance. Every
instance a factory makes within one test shares one store (one directory, one
database file, one Redis database), so tests can write through one instance
and wait through another. The factory closes what it made at teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aioresults import BaseBackend

#: The order kinds are listed in; a plugin not named here comes after, by name.
_ORDER = ["memory", "file", "file_full", "sqlite", "redis", "redis_cluster", "azure"]
#: Every backend kind the contract suite runs on: one per plugin module.
BACKEND_KINDS = sorted(
    (
        path.stem
        for path in (Path(__file__).parent / "plugins").glob("*.py")
        if path.stem != "__init__"
    ),
    key=lambda kind: (_ORDER.index(kind) if kind in _ORDER else len(_ORDER), kind),
)

pytest_plugins = [f"tests.plugins.{kind}" for kind in BACKEND_KINDS]

MakeBackend = Callable[..., Awaitable[BaseBackend]]


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, backend_kind: str) -> MakeBackend:
    """A factory of backends of the kind under test, sharing one store."""
    factory: MakeBackend = request.getfixturevalue(f"make_{backend_kind}_backend")
    return factory


@pytest.fixture
async def backend(make_backend: MakeBackend) -> AsyncIterator[BaseBackend]:
    """One backend of the kind under test, with default options."""
    yield await make_backend()


class BackendFactory:
    """Helper for plugins: makes backends and closes them at teardown."""

    def __init__(self, create: Callable[..., Any]) -> None:
        self._create = create
        self.made: list[BaseBackend] = []

    async def __call__(self, **options: Any) -> BaseBackend:
        backend = self._create(**options)
        if isinstance(backend, Awaitable):
            backend = await backend
        self.made.append(backend)
        return backend

    async def aclose(self) -> None:
        for backend in reversed(self.made):
            await backend.aclose()
