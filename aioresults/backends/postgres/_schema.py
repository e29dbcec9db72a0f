"""The PostgreSQL backend's tables: Celery's own, aioresults' beside them, the NOTIFY trigger.

Celery's tables are created as Celery 5.7's SQLAlchemy models create them (the
DDL below is what ``pg_dump -s`` shows after Celery made them): ``id`` has no
default, Celery takes it from the sequences ``task_id_sequence`` and
``taskset_id_sequence``, and so does aioresults. Tables that exist are used as
they are; nullable columns Celery 5.7 added later are added when missing, as
Celery does. Everything runs under an advisory lock, so processes that start
together create things once.

The trigger ``aioresults_notify`` (``AFTER INSERT OR UPDATE ... FOR EACH ROW``)
sends the task id on the store's channel whenever a row of ``celery_taskmeta``
is written, by anyone: an unmodified Celery worker included. Creating it needs
the ``TRIGGER`` privilege on the table (its owner has it) and ``CREATE`` on the
schema; without them aioresults goes on without it (see the backend).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import asyncpg

from ..._exceptions import BackendCorrupted, StoreNotFound
from .._sql import Names

__all__ = ["SCHEMA_VERSION", "Layout", "prepare"]

logger = logging.getLogger("aioresults.backends")

#: The layout of aioresults' own tables this version reads and writes.
SCHEMA_VERSION = 1

# Nullable columns of celery_taskmeta that Celery 5.7 adds to older tables.
_LATE_COLUMNS = {
    "children": "BYTEA",
    "name": "VARCHAR(155)",
    "args": "BYTEA",
    "kwargs": "BYTEA",
    "worker": "VARCHAR(155)",
    "retries": "INTEGER",
    "queue": "VARCHAR(155)",
    "stamps": "BYTEA",
}
_REQUIRED_TASK = {"id", "task_id", "status", "result", "date_done", "traceback"}
_REQUIRED_GROUP = {"id", "taskset_id", "result", "date_done"}


@dataclass(frozen=True)
class Layout:
    """What opening found: where things are and how rows get their ids."""

    #: The NOTIFY channel of the task table (its schema and name, resolved).
    channel: str
    #: The expressions that give a new row of each Celery table its ``id``.
    task_id_value: str
    group_id_value: str
    #: Whether the NOTIFY trigger is on the task table.
    trigger: bool


def channel_for(schema: str, table: str) -> str:
    """The NOTIFY channel of a task table: readable, within the 63 bytes allowed."""
    name = f"aioresults:{schema}.{table}"
    if len(name.encode()) <= 63:
        return name
    return "aioresults:" + hashlib.sha1(f"{schema}.{table}".encode()).hexdigest()


def celery_ddl(names: Names) -> list[str]:
    task, group = names.task_name, names.group_name
    return [
        f"CREATE SEQUENCE IF NOT EXISTS {names.task_sequence}",
        f"""CREATE TABLE IF NOT EXISTS {names.task} (
    id INTEGER NOT NULL,
    task_id VARCHAR(155),
    status VARCHAR(50),
    result BYTEA,
    date_done TIMESTAMP WITHOUT TIME ZONE,
    traceback TEXT,
    children BYTEA,
    name VARCHAR(155),
    args BYTEA,
    kwargs BYTEA,
    worker VARCHAR(155),
    retries INTEGER,
    queue VARCHAR(155),
    stamps BYTEA,
    PRIMARY KEY (id),
    UNIQUE (task_id)
)""",
        f'CREATE INDEX IF NOT EXISTS "ix_{task}_date_done" ON {names.task} (date_done)',
        f"CREATE SEQUENCE IF NOT EXISTS {names.group_sequence}",
        f"""CREATE TABLE IF NOT EXISTS {names.group} (
    id INTEGER NOT NULL,
    taskset_id VARCHAR(155),
    result BYTEA,
    date_done TIMESTAMP WITHOUT TIME ZONE,
    PRIMARY KEY (id),
    UNIQUE (taskset_id)
)""",
        f'CREATE INDEX IF NOT EXISTS "ix_{group}_date_done" ON {names.group} (date_done)',
    ]


def own_ddl(names: Names) -> list[str]:
    p = names.prefix
    return [
        f"CREATE TABLE IF NOT EXISTS {names.own('schema')} (version INTEGER NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {names.own('meta')} (task_id VARCHAR(155) PRIMARY KEY, "
        "expires_at DOUBLE PRECISION, group_id VARCHAR(155), parent_id VARCHAR(155), "
        "extra BYTEA)",
        f'CREATE INDEX IF NOT EXISTS "{p}meta_expires_at" ON {names.own("meta")} (expires_at)',
        f"CREATE TABLE IF NOT EXISTS {names.own('group')} (group_id VARCHAR(155) PRIMARY KEY, "
        "expires_at DOUBLE PRECISION)",
        f"CREATE TABLE IF NOT EXISTS {names.own('chord')} (group_id VARCHAR(155) PRIMARY KEY, "
        "size INTEGER NOT NULL, count INTEGER NOT NULL DEFAULT 0, expires_at DOUBLE PRECISION)",
        f"CREATE TABLE IF NOT EXISTS {names.own('chord_part')} (group_id VARCHAR(155) NOT NULL, "
        "part_id VARCHAR(200) NOT NULL, count INTEGER NOT NULL, receipt VARCHAR(64) NOT NULL, "
        "payload BYTEA NOT NULL, PRIMARY KEY (group_id, part_id))",
    ]


def trigger_ddl(names: Names, channel: str) -> list[str]:
    function = names.own("notify")
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], NEW.task_id);
    RETURN NULL;
END
$$""",
        f'CREATE TRIGGER "{names.prefix}notify" AFTER INSERT OR UPDATE ON {names.task} '
        f"FOR EACH ROW WHEN (NEW.task_id IS NOT NULL) "
        f"EXECUTE FUNCTION {function}('{channel}')",
    ]


async def _columns(conn: asyncpg.Connection, table: str) -> dict[str, str | None] | None:
    """A table's columns and their defaults (None if there is no such table)."""
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        return None
    rows = await conn.fetch(
        "SELECT attname, pg_get_expr(adbin, adrelid) FROM pg_attribute "
        "LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum "
        "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
        oid,
    )
    return {row[0]: row[1] for row in rows}


async def has_trigger(conn: asyncpg.Connection, names: Names) -> bool:
    """Whether the NOTIFY trigger is on the task table (and enabled)."""
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) "
        "AND tgname = $2 AND tgenabled <> 'D'",
        names.task,
        f"{names.prefix}notify",
    )
    return bool(found)


async def _version(conn: asyncpg.Connection, names: Names) -> int | None:
    if await conn.fetchval("SELECT to_regclass($1)", names.own("schema")) is None:
        return None
    version = await conn.fetchval(f"SELECT max(version) FROM {names.own('schema')}")
    return int(version) if version is not None else None


async def _missing(conn: asyncpg.Connection, names: Names) -> list[str]:
    """The changes the store needs, after checking what is there.

    :raises BackendCorrupted: a table neither Celery nor aioresults made, or a
        newer aioresults layout.
    """
    changes: list[str] = []
    version = await _version(conn, names)
    if version is not None and version > SCHEMA_VERSION:
        raise BackendCorrupted(
            f"{names.own('schema')} says the tables were made by a newer aioresults "
            f"(layout {version}; this version knows up to {SCHEMA_VERSION}): upgrade aioresults"
        )
    task = await _columns(conn, names.task)
    group = await _columns(conn, names.group)
    for table, found, required in (
        (names.task, task, _REQUIRED_TASK),
        (names.group, group, _REQUIRED_GROUP),
    ):
        if found is not None and not required <= set(found):
            missing = ", ".join(sorted(required - set(found)))
            raise BackendCorrupted(
                f"{table} is not a table Celery made (it lacks {missing}); refusing to use it"
            )
    if task is not None:
        changes += [
            f"ALTER TABLE {names.task} ADD COLUMN {column} {kind}"
            for column, kind in _LATE_COLUMNS.items()
            if column not in task
        ]
    if task is None or group is None:
        changes += celery_ddl(names)
    for sequence, table, found in (
        (names.task_sequence, names.task, task),
        (names.group_sequence, names.group, group),
    ):
        if found is not None and found["id"] is None:
            if await conn.fetchval("SELECT to_regclass($1)", sequence) is None:
                # A table made by something else than Celery: number on from its rows.
                changes += [
                    f"CREATE SEQUENCE IF NOT EXISTS {sequence}",
                    f"SELECT setval('{sequence}', "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)",
                ]
    if version is None:
        changes += [*own_ddl(names), f"INSERT INTO {names.own('schema')} VALUES ({SCHEMA_VERSION})"]
    return changes


def _id_value(table: str, key: str, sequence: str, default: str | None) -> str:
    """How a new row gets its ``id``: an existing row of the same key keeps its
    own (so an update never takes a number from the sequence), else the next
    number of Celery's sequence, or the column's own default where it has one."""
    fresh = default if default is not None else f"nextval('{sequence}')"
    return f"COALESCE((SELECT e.id FROM {table} AS e WHERE e.{key} = {{key}}), {fresh})"


async def prepare(conn: asyncpg.Connection, names: Names, *, create: bool, trigger: bool) -> Layout:
    """Check the tables, create what is missing (with ``create``), install the
    trigger (with ``trigger``, where the role may) and describe the layout.

    :raises StoreNotFound: a table is missing and ``create`` is False.
    :raises BackendCorrupted: a foreign or newer layout (never altered).
    """
    changes = await _missing(conn, names)
    if changes and not create:
        raise StoreNotFound(
            f"the result tables are not there ({names.task}, {names.own('meta')}, ...) "
            "and create=False"
        )
    if changes:
        async with conn.transaction():
            # Processes starting together: one creates, the others then find it done.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", names.task)
            for statement in await _missing(conn, names):
                await conn.execute(statement)
    schema = names.schema or await conn.fetchval(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass($1)",
        names.task,
    )
    channel = channel_for(schema, names.task_name)
    installed = await has_trigger(conn, names)
    if trigger and create and not installed:
        installed = await _install_trigger(conn, names, channel)
    task = await _columns(conn, names.task) or {}
    group = await _columns(conn, names.group) or {}
    return Layout(
        channel,
        _id_value(names.task, "task_id", names.task_sequence, task.get("id")),
        _id_value(names.group, "taskset_id", names.group_sequence, group.get("id")),
        installed,
    )


async def _install_trigger(conn: asyncpg.Connection, names: Names, channel: str) -> bool:
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", names.task)
            if not await has_trigger(conn, names):
                for statement in trigger_ddl(names, channel):
                    await conn.execute(statement)
    except asyncpg.DuplicateObjectError:
        return True  # made by another process meanwhile
    except asyncpg.InsufficientPrivilegeError as exc:
        logger.info(
            "cannot create the NOTIFY trigger on %s (%s): results written by others "
            "(Celery) are found by polling",
            names.task,
            exc,
        )
        return False
    return True
