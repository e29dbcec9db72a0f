"""The MySQL/MariaDB backend's tables: Celery's own and aioresults' beside them.

Celery's tables are created as Celery 5.7's SQLAlchemy models create them on
each server: on MariaDB (10.3 and later) SQLAlchemy turns ``Sequence(...)`` into
real sequences, ``task_id_sequence`` and ``taskset_id_sequence``, and ``id``
gets no default, so every insert must name ``NEXTVAL(task_id_sequence)``; on
MySQL ``id`` is ``AUTO_INCREMENT``. Opening finds out which (for tables made
by either) and inserts accordingly. The payload columns are ``BLOB``, which
holds 64 KiB: opening reads what each column holds, so a value too large is
refused before the write (and a table widened to ``LONGBLOB`` is used as such).

One deliberate difference: in tables aioresults creates, the id columns
compare exactly (``utf8mb4_bin``), as ids do everywhere else; with the usual
case- and accent-insensitive collation ``"a"`` and ``"A"`` would share a row.
Tables that exist are used as they are. DDL runs under ``GET_LOCK``, so
processes that start together create things once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..._exceptions import BackendCorrupted, StoreNotFound
from .._sql import Names

__all__ = ["SCHEMA_VERSION", "Layout", "prepare"]

logger = logging.getLogger("aioresults.backends")

#: The layout of aioresults' own tables this version reads and writes.
SCHEMA_VERSION = 1

_LATE_COLUMNS = {
    "children": "BLOB",
    "name": "VARCHAR(155)",
    "args": "BLOB",
    "kwargs": "BLOB",
    "worker": "VARCHAR(155)",
    "retries": "INTEGER",
    "queue": "VARCHAR(155)",
    "stamps": "BLOB",
}
_REQUIRED_TASK = {"id", "task_id", "status", "result", "date_done", "traceback"}
_REQUIRED_GROUP = {"id", "taskset_id", "result", "date_done"}
# Columns whose size the server caps (BLOB, TEXT): checked before each write.
_CAPPED = ("result", "traceback", "children", "args", "kwargs", "stamps")
_EXACT = "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"


@dataclass(frozen=True)
class Layout:
    """What opening found: how rows get their ids, what columns hold."""

    #: The expressions that give a new row of each Celery table its ``id``
    #: (``{key}`` stands for the row's key).
    task_id_value: str
    group_id_value: str
    #: Bytes each capped column holds, and its type: ``{"result": (65535, "blob")}``;
    #: the group table's ``result`` is ``"group"``.
    limits: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: Whether ``date_done`` keeps whole seconds only (``DATETIME`` without a precision).
    whole_seconds: bool = True


def celery_ddl(names: Names, mariadb: bool) -> list[str]:
    # As SQLAlchemy emits them: sequences on MariaDB, AUTO_INCREMENT on MySQL;
    # the date_done index inside CREATE TABLE (MySQL has no CREATE INDEX IF NOT EXISTS).
    id_column = "id INTEGER NOT NULL" if mariadb else "id INTEGER NOT NULL AUTO_INCREMENT"
    ddl = []
    if mariadb:
        ddl += [
            f"CREATE SEQUENCE IF NOT EXISTS {names.task_sequence}",
            f"CREATE SEQUENCE IF NOT EXISTS {names.group_sequence}",
        ]
    return [
        *ddl,
        f"""CREATE TABLE IF NOT EXISTS {names.task} (
    {id_column},
    task_id VARCHAR(155) {_EXACT},
    status VARCHAR(50),
    result BLOB,
    date_done DATETIME,
    traceback TEXT,
    children BLOB,
    name VARCHAR(155),
    args BLOB,
    kwargs BLOB,
    worker VARCHAR(155),
    retries INTEGER,
    queue VARCHAR(155),
    stamps BLOB,
    PRIMARY KEY (id),
    UNIQUE (task_id),
    INDEX `ix_{names.task_name}_date_done` (date_done)
)""",
        f"""CREATE TABLE IF NOT EXISTS {names.group} (
    {id_column},
    taskset_id VARCHAR(155) {_EXACT},
    result BLOB,
    date_done DATETIME,
    PRIMARY KEY (id),
    UNIQUE (taskset_id),
    INDEX `ix_{names.group_name}_date_done` (date_done)
)""",
    ]


def own_ddl(names: Names, task_ids: str, group_ids: str) -> list[str]:
    """aioresults' tables; their ids compare as the Celery table's they join."""
    p = names.prefix
    return [
        f"CREATE TABLE IF NOT EXISTS {names.own('schema')} (version INTEGER NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {names.own('meta')} (task_id VARCHAR(155) {task_ids} "
        "NOT NULL PRIMARY KEY, expires_at DOUBLE, group_id VARCHAR(155), "
        f"parent_id VARCHAR(155), extra LONGBLOB, INDEX `{p}meta_expires_at` (expires_at))",
        f"CREATE TABLE IF NOT EXISTS {names.own('group')} (group_id VARCHAR(155) {group_ids} "
        "NOT NULL PRIMARY KEY, expires_at DOUBLE)",
        f"CREATE TABLE IF NOT EXISTS {names.own('chord')} (group_id VARCHAR(155) {_EXACT} "
        "NOT NULL PRIMARY KEY, size INTEGER NOT NULL, count INTEGER NOT NULL DEFAULT 0, "
        "expires_at DOUBLE)",
        f"CREATE TABLE IF NOT EXISTS {names.own('chord_part')} (group_id VARCHAR(155) {_EXACT} "
        f"NOT NULL, part_id VARCHAR(200) {_EXACT} NOT NULL, count INTEGER NOT NULL, "
        "receipt VARCHAR(64) NOT NULL, payload LONGBLOB NOT NULL, PRIMARY KEY (group_id, part_id))",
    ]


#: ``await run(sql, args)``: run one statement, return its rows.
Run = Callable[[str, Sequence[Any]], Awaitable[list[tuple[Any, ...]]]]


async def _columns(run: Run, schema: str | None, table: str) -> dict[str, tuple[Any, ...]]:
    """A table's columns: name -> (data type, octet length, extra, precision,
    charset, collation); empty if there is no such table."""
    rows = await run(
        "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_OCTET_LENGTH, EXTRA, DATETIME_PRECISION, "
        "CHARACTER_SET_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
        (schema, table),
    )
    return {str(row[0]).lower(): tuple(row[1:]) for row in rows}


async def _exists(run: Run, schema: str | None, table: str, kind: str = "BASE TABLE") -> bool:
    rows = await run(
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) "
        "AND TABLE_NAME = %s AND TABLE_TYPE = %s",
        (schema, table, kind),
    )
    return bool(rows)


def _collation(column: tuple[Any, ...] | None) -> str:
    if column is None or not column[4]:
        return _EXACT
    return f"CHARACTER SET {column[4]} COLLATE {column[5]}"


async def _missing(run: Run, names: Names, mariadb: bool) -> list[str]:
    """The changes the store needs, after checking what is there.

    :raises BackendCorrupted: a table neither Celery nor aioresults made, or a
        newer aioresults layout.
    """
    schema = names.schema
    version_table = names.prefix + "schema"
    version = None
    if await _exists(run, schema, version_table):
        rows = await run(f"SELECT max(version) FROM {names.own('schema')}", ())
        version = rows[0][0] if rows else None
        if version is not None and int(version) > SCHEMA_VERSION:
            raise BackendCorrupted(
                f"{names.own('schema')} says the tables were made by a newer aioresults "
                f"(layout {version}; this version knows up to {SCHEMA_VERSION}): upgrade"
            )
    task = await _columns(run, schema, names.task_name)
    group = await _columns(run, names.group_schema, names.group_name)
    for table, found, required in (
        (names.task, task, _REQUIRED_TASK),
        (names.group, group, _REQUIRED_GROUP),
    ):
        if found and not required <= set(found):
            missing = ", ".join(sorted(required - set(found)))
            raise BackendCorrupted(
                f"{table} is not a table Celery made (it lacks {missing}); refusing to use it"
            )
    changes = [
        f"ALTER TABLE {names.task} ADD COLUMN {column} {kind}"
        for column, kind in _LATE_COLUMNS.items()
        if task and column not in task
    ]
    if not task or not group:
        changes += celery_ddl(names, mariadb)
    if version is None:
        changes += own_ddl(
            names, _collation(task.get("task_id")), _collation(group.get("taskset_id"))
        )
        changes.append(f"INSERT INTO {names.own('schema')} VALUES ({SCHEMA_VERSION})")
    return changes


async def _id_value(
    run: Run, names: Names, columns: dict[str, tuple[Any, ...]], table: str, key: str
) -> str:
    """How a new row gets its ``id``: an existing row of the same key names its
    own (an update never takes a number), a new one the next number of Celery's
    sequence (MariaDB) or of ``AUTO_INCREMENT`` (NULL; MySQL).

    The existing id is read through a derived table: MySQL refuses a subquery
    on the table being inserted into, but not on one it has materialized.
    """
    existing = f"(SELECT e.id FROM (SELECT id FROM {table} WHERE {key} = {{key}}) AS e)"
    if "auto_increment" in str(columns["id"][2]).lower():
        return existing
    if key == "task_id":
        sequence, schema, name = names.task_sequence, names.schema, "task_id_sequence"
    else:
        sequence, schema, name = names.group_sequence, names.group_schema, "taskset_id_sequence"
    if not await _exists(run, schema, name, "SEQUENCE"):
        raise BackendCorrupted(
            f"{table}.id has no default and there is no sequence {sequence} to number "
            "new rows from; refusing to guess"
        )
    return f"COALESCE({existing}, NEXTVAL({sequence}))"


async def prepare(run: Run, names: Names, *, create: bool, mariadb: bool) -> Layout:
    """Check the tables, create what is missing (with ``create``), and describe them.

    ``run(sql, args)`` runs one statement and returns its rows.

    :raises StoreNotFound: something is missing and ``create`` is False.
    :raises BackendCorrupted: a foreign or newer layout (never altered).
    """
    changes = await _missing(run, names, mariadb)
    if changes and not create:
        raise StoreNotFound(
            f"the result tables are not there ({names.task}, {names.own('meta')}, ...) "
            "and create=False"
        )
    if changes:
        # On failure the connection is closed, which releases the lock too.
        lock = f"aioresults:{names.task}"
        await run("SELECT GET_LOCK(%s, 60)", (lock,))
        # Checked again under the lock: another process may have been first.
        for statement in await _missing(run, names, mariadb):
            await run(statement, ())
        await run("SELECT RELEASE_LOCK(%s)", (lock,))
    task = await _columns(run, names.schema, names.task_name)
    group = await _columns(run, names.group_schema, names.group_name)
    limits = {
        column: (int(task[column][1]), str(task[column][0]))
        for column in _CAPPED
        if column in task and task[column][1] is not None
    }
    if group["result"][1] is not None:
        limits["group"] = (int(group["result"][1]), str(group["result"][0]))
    return Layout(
        await _id_value(run, names, task, names.task, "task_id"),
        await _id_value(run, names, group, names.group, "taskset_id"),
        limits,
        whole_seconds=not task["date_done"][3],
    )
