"""The MySQL backend in the contract suite: a private MariaDB per session, a database per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncmy
import pytest

from aioresults.backends.mysql import MySQLBackend
from tests.conftest import BackendFactory
from tests.services import MariaDBServer


async def mysql_sql(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement with asyncmy (the native client, as a foreign writer
    or an administrator would); ``?`` marks the arguments. Its rows."""
    parts = urlsplit(url)
    conn = await asyncmy.connect(
        host=parts.hostname,
        port=parts.port,
        user=parts.username,
        password=parts.password or "",
        database=parts.path.lstrip("/") or None,
        autocommit=True,
        charset="utf8mb4",
    )
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql.replace("?", "%s"), args or None)
            return [tuple(row) for row in await cursor.fetchall()]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """One private MariaDB for the whole session (fault tests start their own)."""
    with MariaDBServer() as server:
        yield server


@contextlib.asynccontextmanager
async def fresh_database(server: MariaDBServer) -> AsyncIterator[str]:
    """A new, empty database (utf8mb4, as usual), dropped afterwards; its root URL."""
    name = f"t{uuid.uuid4().hex[:16]}"
    url = server.url_for(name)
    await mysql_sql(
        server.url, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    )
    try:
        yield url
    finally:
        await mysql_sql(server.url, f"DROP DATABASE `{name}`")


@pytest.fixture
async def mariadb_database(mariadb_server: MariaDBServer) -> AsyncIterator[str]:
    """A new, empty database for the test (root's URL)."""
    async with fresh_database(mariadb_server) as url:
        yield url


@pytest.fixture
async def make_mysql_backend(mariadb_database: str) -> AsyncIterator[BackendFactory]:
    def create(**options: Any) -> MySQLBackend:
        return MySQLBackend(mariadb_database, **options)

    factory = BackendFactory(create)
    yield factory
    await factory.aclose()
