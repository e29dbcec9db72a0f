"""The PostgreSQL backend in the contract suite: one private server, one database per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from aioresults.backends.postgres import PostgresBackend
from tests.conftest import BackendFactory
from tests.services import PostgresServer


async def pg_sql(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement with asyncpg (the native client, as a foreign writer
    or an administrator would); ``?`` marks the arguments. Its rows."""
    parts = sql.split("?")
    sql = "".join(part + (f"${n}" if n < len(parts) else "") for n, part in enumerate(parts, 1))
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole session (fault tests start their own)."""
    with PostgresServer() as server:
        yield server


@contextlib.asynccontextmanager
async def fresh_database(server: PostgresServer) -> AsyncIterator[str]:
    """A new, empty database (the superuser's URL), dropped afterwards."""
    name = f"t{uuid.uuid4().hex[:16]}"
    await pg_sql(server.url, f'CREATE DATABASE "{name}"')
    try:
        yield server.url_for(name)
    finally:  # on a connection of its own: the test may have restarted the server
        await pg_sql(server.url, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def postgres_database(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A new, empty database for the test (the superuser's URL)."""
    async with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture
async def make_postgres_backend(postgres_database: str) -> AsyncIterator[BackendFactory]:
    def create(**options: Any) -> PostgresBackend:
        return PostgresBackend(postgres_database, **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
