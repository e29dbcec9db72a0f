"""The PostgreSQL backend's statements, built once per backend from its table names.

A batch of records is written by one statement: the rows arrive as arrays
(``unnest``), Celery's table is upserted with the "never overwrite SUCCESS"
guard in its ``ON CONFLICT ... DO UPDATE ... WHERE`` (the stored row may be
replaced unless it is a SUCCESS, the same record again, or an expired one),
aioresults' own rows are upserted for the records written, and each written id
is NOTIFYed, all in the statement's one transaction.

The statements are prepared once per connection and run with a generic plan
(see the backend): re-planning the write for each batch would cost more than
running it.
"""

from __future__ import annotations

from .._sql import META_COLUMNS, TASK_COLUMNS, Names
from ._schema import Layout

__all__ = ["Statements"]

_TYPES = {
    "task_id": "varchar",
    "status": "varchar",
    "result": "bytea",
    "date_done": "timestamp",
    "traceback": "text",
    "children": "bytea",
    "name": "varchar",
    "args": "bytea",
    "kwargs": "bytea",
    "worker": "varchar",
    "retries": "int4",
    "queue": "varchar",
    "stamps": "bytea",
    "expires_at": "float8",
    "group_id": "varchar",
    "parent_id": "varchar",
    "extra": "bytea",
}


class Statements:
    """Every statement of one store (see the module docstring)."""

    def __init__(self, names: Names, layout: Layout) -> None:
        task, meta = names.task, names.own("meta")
        group, own_group = names.group, names.own("group")
        chord, part = names.own("chord"), names.own("chord_part")
        columns = [*TASK_COLUMNS, *META_COLUMNS]
        arrays = ", ".join(f"${n}::{_TYPES[c]}[]" for n, c in enumerate(columns, 1))
        now, cutoff, channel = (f"${len(columns) + n}" for n in (1, 2, 3))
        updates = ", ".join(f"{c} = excluded.{c}" for c in TASK_COLUMNS[1:-1])
        own_updates = ", ".join(f"{c} = excluded.{c}" for c in META_COLUMNS)
        #: Parameters: one array per column (``TASK_COLUMNS`` then ``META_COLUMNS``),
        #: now (Unix time), the cutoff of Celery's rows (naive UTC, or None), the channel.
        self.store = f"""WITH i AS (
    SELECT * FROM unnest({arrays}) AS i({", ".join(columns)})
), t AS (
    INSERT INTO {task} AS t (id, {", ".join(TASK_COLUMNS)})
    SELECT {layout.task_id_value.format(key="i.task_id")}, {", ".join("i." + c for c in TASK_COLUMNS)}
    FROM i
    ON CONFLICT (task_id) DO UPDATE SET {updates},
        stamps = coalesce(excluded.stamps, t.stamps)
    WHERE t.status IS DISTINCT FROM 'SUCCESS'
        OR (t.status = excluded.status AND t.result IS NOT DISTINCT FROM excluded.result
            AND t.date_done IS NOT DISTINCT FROM excluded.date_done)
        OR coalesce(
            (SELECT coalesce(x.expires_at <= {now}, false) FROM {meta} AS x
             WHERE x.task_id = t.task_id),
            t.date_done < {cutoff},
            false
        )
    RETURNING t.task_id
), m AS (
    INSERT INTO {meta} AS m (task_id, {", ".join(META_COLUMNS)})
    SELECT i.task_id, {", ".join("i." + c for c in META_COLUMNS)} FROM i JOIN t USING (task_id)
    ON CONFLICT (task_id) DO UPDATE SET {own_updates}
)
SELECT t.task_id, pg_notify({channel}, t.task_id) FROM t"""  # noqa: E501
        self.read = (
            f"SELECT {', '.join('t.' + c for c in TASK_COLUMNS)}, m.task_id IS NOT NULL, "
            f"{', '.join('m.' + c for c in META_COLUMNS)} "
            f"FROM {task} AS t LEFT JOIN {meta} AS m ON m.task_id = t.task_id "
            "WHERE t.task_id = ANY($1::varchar[])"
        )
        self.forget = (
            f"WITH d AS (DELETE FROM {task} WHERE task_id = $1) "
            f"DELETE FROM {meta} WHERE task_id = $1"
        )

        self.store_group = f"""WITH s AS (
    INSERT INTO {group} AS s (id, taskset_id, result, date_done)
    VALUES ({layout.group_id_value.format(key="$1::varchar")}, $1, $2, $3)
    ON CONFLICT (taskset_id) DO UPDATE SET result = excluded.result, date_done = excluded.date_done
)
INSERT INTO {own_group} (group_id, expires_at) VALUES ($1, $4)
ON CONFLICT (group_id) DO UPDATE SET expires_at = excluded.expires_at"""
        self.read_group = (
            "SELECT s.result, s.date_done, g.group_id IS NOT NULL, g.expires_at "
            f"FROM {group} AS s LEFT JOIN {own_group} AS g ON g.group_id = s.taskset_id "
            "WHERE s.taskset_id = $1"
        )
        self.delete_group = (
            f"WITH d AS (DELETE FROM {group} WHERE taskset_id = $1) "
            f"DELETE FROM {own_group} WHERE group_id = $1"
        )

        # Chords: the size first (its row locked, so counts of one chord take
        # turns), then the part's count, in one transaction.
        self.chord_start = (
            f"INSERT INTO {chord} (group_id, size, count, expires_at) VALUES ($1, $2, 0, $3) "
            "ON CONFLICT (group_id) DO UPDATE SET size = excluded.size, count = 0, "
            "expires_at = excluded.expires_at"
        )
        self.chord_forget_parts = f"DELETE FROM {part} WHERE group_id = $1"
        self.chord_lock = f"SELECT size, expires_at FROM {chord} WHERE group_id = $1 FOR UPDATE"
        # Runs after chord_lock, so it sees every part counted before this one.
        self.chord_count = f"""WITH old AS (
    SELECT count, receipt FROM {part} WHERE group_id = $1 AND part_id = $2
), c AS (
    UPDATE {chord} SET count = count + 1
    WHERE group_id = $1 AND count < size AND NOT EXISTS (SELECT 1 FROM old)
    RETURNING count
), p AS (
    INSERT INTO {part} (group_id, part_id, count, receipt, payload)
    SELECT $1, $2, c.count, $3, $4 FROM c
)
SELECT (SELECT count FROM c), (SELECT count FROM old), (SELECT receipt FROM old)"""
        self.chord_parts = f"SELECT payload FROM {part} WHERE group_id = $1"

        # cleanup(): (statement, takes now, takes the cutoff); the counted ones first.
        self.cleanup_counted = [
            # Records written by aioresults expire when their writer said.
            (f"DELETE FROM {task} AS t USING {meta} AS m "
             "WHERE m.task_id = t.task_id AND m.expires_at <= $1", True, False),
            # Celery's records expire as Celery's own cleanup() says: date_done + expires.
            (f"DELETE FROM {task} AS t WHERE t.date_done < $1 "
             f"AND NOT EXISTS (SELECT 1 FROM {meta} AS m WHERE m.task_id = t.task_id)",
             False, True),
            (f"DELETE FROM {group} AS s USING {own_group} AS g "
             "WHERE g.group_id = s.taskset_id AND g.expires_at <= $1", True, False),
            (f"DELETE FROM {group} AS s WHERE s.date_done < $1 "
             f"AND NOT EXISTS (SELECT 1 FROM {own_group} AS g WHERE g.group_id = s.taskset_id)",
             False, True),
            (f"DELETE FROM {chord} WHERE expires_at <= $1", True, False),
        ]  # fmt: skip
        self.cleanup_bookkeeping = [
            (f"DELETE FROM {meta} AS m WHERE m.expires_at <= $1 "
             f"OR NOT EXISTS (SELECT 1 FROM {task} AS t WHERE t.task_id = m.task_id)", True),
            (f"DELETE FROM {own_group} AS g WHERE g.expires_at <= $1 "
             f"OR NOT EXISTS (SELECT 1 FROM {group} AS s WHERE s.taskset_id = g.group_id)", True),
            (f"DELETE FROM {part} AS p "
             f"WHERE NOT EXISTS (SELECT 1 FROM {chord} AS c WHERE c.group_id = p.group_id)", False),
        ]  # fmt: skip
