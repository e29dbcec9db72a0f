"""The MySQL/MariaDB backend's statements, built from its table names and layout.

MySQL has no ``RETURNING`` (MariaDB's is not in MySQL) and no upsert with a
``WHERE``, so "never overwrite SUCCESS" is written into the assignments of
``INSERT ... ON DUPLICATE KEY UPDATE``: each column takes the new value only if
the stored row may be replaced (the guard ``_MAY_REPLACE``). MySQL assigns left
to right and a later assignment sees the earlier ones, so the guard's own
columns (``status``, ``date_done``) are assigned last. Which rows now hold the
batch's records is then read back in the same transaction (the rows stay locked
by the upsert until the commit); a multi-row upsert reports only a total.

``@aior_now`` and ``@aior_cutoff`` are session variables set before each
batch: the current Unix time and the ``date_done`` before which Celery's rows
are expired.

Every transaction runs in READ COMMITTED (:data:`BEGIN`). In InnoDB's default,
REPEATABLE READ, the read of an existing row's id inside the upsert takes
next-key locks on the ids' index, and concurrent batches of new ids then
deadlock on the gaps between them; in READ COMMITTED it is a plain read.
"""

from __future__ import annotations

from .._sql import META_COLUMNS, TASK_COLUMNS, Names
from ._schema import Layout

__all__ = ["BEGIN", "Statements", "marks"]

#: How every transaction starts (see the module docstring).
BEGIN = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION"

# The columns a guarded upsert assigns, in an order that keeps the guard true to
# the stored row: its own columns last.
_GUARDED = ("name", "args", "kwargs", "worker", "retries", "queue", "traceback", "children")


def marks(n: int) -> str:
    """``%s, %s, ...`` (``n`` of them)."""
    return ", ".join(["%s"] * n)


class Statements:
    """Every statement of one store (see the module docstring)."""

    def __init__(self, names: Names, layout: Layout) -> None:
        task, meta = names.task, names.own("meta")
        group, own_group = names.group, names.own("group")
        chord, part = names.own("chord"), names.own("chord_part")
        self._task, self._meta = task, meta
        # The stored row may be replaced: it is no SUCCESS, or an expired one.
        may_replace = (
            "(status IS NULL OR status <> 'SUCCESS' OR COALESCE("
            f"(SELECT COALESCE(x.expires_at <= @aior_now, FALSE) FROM {meta} AS x "
            f"WHERE x.task_id = {task}.task_id), date_done < @aior_cutoff, FALSE))"
        )
        assignments = [f"{c} = IF({may_replace}, VALUES({c}), {c})" for c in _GUARDED]
        assignments += [
            f"stamps = IF({may_replace}, COALESCE(VALUES(stamps), stamps), stamps)",
            f"result = IF({may_replace}, VALUES(result), result)",
            f"status = IF({may_replace}, VALUES(status), status)",
            # status and result are the new ones now exactly when the row was replaced.
            "date_done = IF(status <=> VALUES(status) AND result <=> VALUES(result), "
            "VALUES(date_done), date_done)",
        ]
        self._row = f"({layout.task_id_value.format(key='%s')}, {marks(len(TASK_COLUMNS))})"
        self._upsert = (
            f"INSERT INTO {task} (id, {', '.join(TASK_COLUMNS)}) VALUES {{rows}} "
            f"ON DUPLICATE KEY UPDATE {', '.join(assignments)}"
        )
        self._own_row = f"({marks(1 + len(META_COLUMNS))})"
        self._own_upsert = (
            f"INSERT INTO {meta} (task_id, {', '.join(META_COLUMNS)}) VALUES {{rows}} "
            "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in META_COLUMNS)
        )
        self.begin = f"SET @aior_now = %s, @aior_cutoff = %s; {BEGIN}"
        self._read = (
            f"SELECT {', '.join('t.' + c for c in TASK_COLUMNS)}, m.task_id IS NOT NULL, "
            f"{', '.join('m.' + c for c in META_COLUMNS)} "
            f"FROM {task} AS t LEFT JOIN {meta} AS m ON m.task_id = t.task_id "
            "WHERE t.task_id IN ({marks})"
        )
        self.forget = (
            f"{BEGIN}; DELETE FROM {task} WHERE task_id = %s; "
            f"DELETE FROM {meta} WHERE task_id = %s; COMMIT"
        )

        self.store_group = (
            f"{BEGIN}; INSERT INTO {group} (id, taskset_id, result, date_done) "
            f"VALUES ({layout.group_id_value.format(key='%s')}, %s, %s, %s) "
            "ON DUPLICATE KEY UPDATE result = VALUES(result), date_done = VALUES(date_done); "
            f"INSERT INTO {own_group} (group_id, expires_at) VALUES (%s, %s) "
            "ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at); COMMIT"
        )
        self.read_group = (
            "SELECT s.result, s.date_done, g.group_id IS NOT NULL, g.expires_at "
            f"FROM {group} AS s LEFT JOIN {own_group} AS g ON g.group_id = s.taskset_id "
            "WHERE s.taskset_id = %s"
        )
        self.delete_group = (
            f"{BEGIN}; DELETE FROM {group} WHERE taskset_id = %s; "
            f"DELETE FROM {own_group} WHERE group_id = %s; COMMIT"
        )

        self.chord_start = (
            f"{BEGIN}; INSERT INTO {chord} (group_id, size, count, expires_at) "
            "VALUES (%s, %s, 0, %s) ON DUPLICATE KEY UPDATE size = VALUES(size), count = 0, "
            f"expires_at = VALUES(expires_at); DELETE FROM {part} WHERE group_id = %s; COMMIT"
        )
        # The chord's row locked (counts of one chord take turns), with the part if counted.
        self.chord_lock = (
            f"{BEGIN}; SELECT c.size, c.count, c.expires_at, p.count, p.receipt "
            f"FROM {chord} AS c LEFT JOIN {part} AS p "
            "ON p.group_id = c.group_id AND p.part_id = %s WHERE c.group_id = %s FOR UPDATE"
        )
        # LAST_INSERT_ID(expr) hands the new count to the next statement and to the client.
        self.chord_count = (
            f"UPDATE {chord} SET count = LAST_INSERT_ID(count + 1) WHERE group_id = %s; "
            f"INSERT INTO {part} (group_id, part_id, count, receipt, payload) "
            "VALUES (%s, %s, LAST_INSERT_ID(), %s, %s); COMMIT"
        )
        self.chord_parts = f"SELECT payload FROM {part} WHERE group_id = %s"

        #: cleanup(): after ``begin``, the statements whose deleted rows count
        #: (results, groups, chords), then bookkeeping, then COMMIT.
        self.cleanup = "; ".join(
            [
                # Records written by aioresults expire when their writer said.
                f"DELETE t FROM {task} AS t JOIN {meta} AS m ON m.task_id = t.task_id "
                "WHERE m.expires_at <= @aior_now",
                # Celery's records expire as Celery's own cleanup() says: date_done + expires.
                f"DELETE t FROM {task} AS t LEFT JOIN {meta} AS m ON m.task_id = t.task_id "
                "WHERE t.date_done < @aior_cutoff AND m.task_id IS NULL",
                f"DELETE s FROM {group} AS s JOIN {own_group} AS g ON g.group_id = s.taskset_id "
                "WHERE g.expires_at <= @aior_now",
                f"DELETE s FROM {group} AS s LEFT JOIN {own_group} AS g "
                "ON g.group_id = s.taskset_id "
                "WHERE s.date_done < @aior_cutoff AND g.group_id IS NULL",
                f"DELETE FROM {chord} WHERE expires_at <= @aior_now",
                f"DELETE m FROM {meta} AS m LEFT JOIN {task} AS t ON t.task_id = m.task_id "
                "WHERE m.expires_at <= @aior_now OR t.task_id IS NULL",
                f"DELETE g FROM {own_group} AS g LEFT JOIN {group} AS s "
                "ON s.taskset_id = g.group_id "
                "WHERE g.expires_at <= @aior_now OR s.taskset_id IS NULL",
                f"DELETE p FROM {part} AS p LEFT JOIN {chord} AS c ON c.group_id = p.group_id "
                "WHERE c.group_id IS NULL",
                "COMMIT",
            ]
        )
        self.cleanup_counted = 5

    def upsert(self, rows: int) -> str:
        """The guarded upsert of ``rows`` records (arguments: per row, its id,
        then its values in ``TASK_COLUMNS`` order)."""
        return self._upsert.format(rows=", ".join([self._row] * rows))

    def stored(self, rows: int) -> str:
        """What the rows of ``rows`` ids hold now: id, state, SHA-1 of the result, date_done."""
        return (
            f"SELECT task_id, status, SHA1(result), date_done FROM {self._task} "
            f"WHERE task_id IN ({marks(rows)})"
        )

    def own_upsert(self, rows: int) -> str:
        """aioresults' rows of ``rows`` written records (task id, then ``META_COLUMNS``)."""
        return self._own_upsert.format(rows=", ".join([self._own_row] * rows))

    def read(self, rows: int) -> str:
        """The records of ``rows`` ids, in the :data:`~aioresults.backends._sql.ROW` shape."""
        return self._read.format(marks=marks(rows))
