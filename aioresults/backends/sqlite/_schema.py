"""The SQLite backend's tables: Celery's own, and the ``aioresults_*`` ones beside them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from ..._exceptions import BackendCorrupted, StoreNotFound

__all__ = ["SCHEMA_VERSION", "prepare", "run_transaction"]

T = TypeVar("T")

#: The layout of aioresults' tables and columns this version reads and writes.
#: 2 added the count and receipt of each chord part; 3 moved what Celery has no
#: column for into columns of ``celery_taskmeta`` (it was a row of
#: ``aioresults_meta`` beside it): a store writes one row, not two.
SCHEMA_VERSION = 3

# Celery 5.7's tables, as SQLAlchemy creates them (Celery skips tables that exist).
CELERY_DDL = (
    """CREATE TABLE IF NOT EXISTS celery_taskmeta (
\tid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
\ttask_id VARCHAR(155),
\tstatus VARCHAR(50),
\tresult BLOB,
\tdate_done DATETIME,
\ttraceback TEXT,
\tchildren BLOB,
\tname VARCHAR(155),
\targs BLOB,
\tkwargs BLOB,
\tworker VARCHAR(155),
\tretries INTEGER,
\tqueue VARCHAR(155),
\tstamps BLOB,
\tUNIQUE (task_id)
)""",
    "CREATE INDEX IF NOT EXISTS ix_celery_taskmeta_date_done ON celery_taskmeta (date_done)",
    """CREATE TABLE IF NOT EXISTS celery_tasksetmeta (
\tid INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
\ttaskset_id VARCHAR(155),
\tresult BLOB,
\tdate_done DATETIME,
\tUNIQUE (taskset_id)
)""",
    "CREATE INDEX IF NOT EXISTS ix_celery_tasksetmeta_date_done ON celery_tasksetmeta (date_done)",
)
#: aioresults' columns of ``celery_taskmeta`` (Celery ignores columns it does
#: not map). ``aioresults_expires_at`` is NULL in a row Celery wrote (it expires
#: at ``date_done + expires``); in one aioresults wrote, it is the deadline its
#: writer set, ``inf`` for never. It has no index: one would cost every store
#: a b-tree page more, and only ``cleanup()`` looks rows up by it (a scan of
#: the table, 0.12-0.15 s per million rows cached, in the writer's thread).
OWN_COLUMNS = {
    "aioresults_expires_at": "REAL",
    "aioresults_group_id": "TEXT",
    "aioresults_parent_id": "TEXT",
    "aioresults_extra": "BLOB",
}
OWN_DDL = (
    "CREATE TABLE IF NOT EXISTS aioresults_schema (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS aioresults_group (group_id TEXT PRIMARY KEY, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS aioresults_chord (group_id TEXT PRIMARY KEY, "
    "size INTEGER NOT NULL, count INTEGER NOT NULL DEFAULT 0, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS aioresults_chord_part (group_id TEXT NOT NULL, "
    "field TEXT NOT NULL, payload BLOB NOT NULL, count INTEGER, receipt TEXT, "
    "PRIMARY KEY (group_id, field))",
)
# Schema 1 -> 2: a chord part's count and receipt.
_PART_COLUMNS = {"count": "INTEGER", "receipt": "TEXT"}
# Schema 2 -> 3 (after OWN_COLUMNS are added): aioresults_meta's rows into them.
_MIGRATE_2 = (
    "UPDATE celery_taskmeta SET (aioresults_expires_at, aioresults_group_id, "
    "aioresults_parent_id, aioresults_extra) = (SELECT coalesce(m.expires_at, 9e999), "
    "m.group_id, m.parent_id, m.extra FROM aioresults_meta AS m "
    "WHERE m.task_id = celery_taskmeta.task_id) "
    "WHERE task_id IN (SELECT task_id FROM aioresults_meta)",
    "DROP TABLE aioresults_meta",
)
# table -> (columns it must have, a column that must be UNIQUE or None)
_REQUIRED: dict[str, tuple[str, str | None]] = {
    "celery_taskmeta": ("task_id status result date_done traceback", "task_id"),
    "celery_tasksetmeta": ("taskset_id result date_done", "taskset_id"),
    "aioresults_group": ("group_id expires_at", "group_id"),
    "aioresults_chord": ("group_id size count expires_at", "group_id"),
    "aioresults_chord_part": ("group_id field payload", None),
}
# aioresults_meta of schema 1 and 2, read once to migrate it.
_OLD_META = ("task_id expires_at group_id parent_id extra", "task_id")
# Nullable columns Celery 5.7 adds to tables made by older versions; we do the same.
_CELERY_LATE_COLUMNS = dict(
    column.split(":")
    for column in "children:BLOB name:VARCHAR(155) args:BLOB kwargs:BLOB worker:VARCHAR(155) "
    "retries:INTEGER queue:VARCHAR(155) stamps:BLOB".split()
)


def run_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """``work(conn)`` between ``BEGIN IMMEDIATE`` and ``COMMIT``; rolled back if it raises.

    Runs in the writer's thread. BEGIN IMMEDIATE takes the write lock first, so
    what ``work`` reads stays true until the commit (the busy handler waits for
    the lock up to the connection's timeout).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # the original error is the one to report
                pass
        raise
    return result


def _is_unique(conn: sqlite3.Connection, table: str, column: str) -> bool:
    for index in conn.execute(f"PRAGMA index_list({table})").fetchall():
        if index[2]:
            info = conn.execute(f"PRAGMA index_info('{index[1]}')").fetchall()
            if [row[2] for row in info] == [column]:
                return True
    return False


def _changes(conn: sqlite3.Connection, path: str) -> list[str]:
    rows = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
    tables = {name for kind, name in rows if kind == "table"}
    version = None
    if "aioresults_schema" in tables:
        (version,) = conn.execute("SELECT max(version) FROM aioresults_schema").fetchone()
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise BackendCorrupted(
                f"{path} was written by a newer aioresults (schema {version}; this "
                f"version knows up to {SCHEMA_VERSION}); upgrade aioresults to use it"
            )
    # Schema 1 or 2, also when its version row is missing (an empty table).
    migrating = version in (None, 1, 2) and "aioresults_meta" in tables
    required = {**_REQUIRED, **({"aioresults_meta": _OLD_META} if migrating else {})}
    changes: list[str] = []
    task_columns: set[str] = set()
    part_columns: set[str] = set(_PART_COLUMNS)
    for table, (needed, unique) in required.items():
        if table not in tables:
            continue
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        missing = set(needed.split()) - columns
        if not missing and unique is not None and not _is_unique(conn, table, unique):
            missing = {f"UNIQUE({unique})"}
        if missing:
            raise BackendCorrupted(
                f"{path} has a table {table} that neither Celery nor aioresults "
                f"made (it lacks {', '.join(sorted(missing))}); refusing to use it"
            )
        if table == "aioresults_chord_part":
            part_columns = columns
        if table == "celery_taskmeta":
            task_columns = columns
            changes += [
                f"ALTER TABLE celery_taskmeta ADD COLUMN {name} {kind}"
                for name, kind in _CELERY_LATE_COLUMNS.items()
                if name not in columns
            ]
    if not tables >= set(_REQUIRED) | {"aioresults_schema"}:
        changes += [*CELERY_DDL, *OWN_DDL]
    # A table Celery made, or one of schema 1 or 2, lacks aioresults' columns.
    changes += [
        f"ALTER TABLE celery_taskmeta ADD COLUMN {name} {kind}"
        for name, kind in OWN_COLUMNS.items()
        if name not in task_columns
    ]
    changes += [
        f"ALTER TABLE aioresults_chord_part ADD COLUMN {name} {kind}"
        for name, kind in _PART_COLUMNS.items()
        if name not in part_columns
    ]
    if migrating:
        changes += _MIGRATE_2
    if version is None:  # no table (created above), or an empty one
        changes.append(f"INSERT INTO aioresults_schema VALUES ({SCHEMA_VERSION})")
    elif version != SCHEMA_VERSION:
        changes.append(f"UPDATE aioresults_schema SET version = {SCHEMA_VERSION}")
    return changes


def prepare(conn: sqlite3.Connection, path: str, synchronous: str, create: bool = True) -> None:
    """Set the writer up, then create, migrate or check the tables (writer's thread).

    :param create: with False, nothing is created or altered, and a file without
        Celery's task table, or with tables this version would have to bring up
        to date, raises :class:`~aioresults.StoreNotFound`.
    :raises BackendCorrupted: a foreign or newer layout (never altered).
    """
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if not create:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'celery_taskmeta'"
        ).fetchone()
        if found is None:
            raise StoreNotFound(f"no store at {path}: it holds no results table")
    if not _changes(conn, path):
        return
    if not create:
        raise StoreNotFound(
            f"{path} holds results in an older layout, or Celery's tables alone: "
            "open it once with create=True (the default) to bring it up to date"
        )

    def apply(conn: sqlite3.Connection) -> None:
        # Checked again under the write lock: another process may have been first.
        for statement in _changes(conn, path):
            conn.execute(statement)

    run_transaction(conn, apply)
