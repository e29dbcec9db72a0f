"""Where a SQL store is: Celery-style URLs, and the names of its tables."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlsplit

from ..._exceptions import ConfigurationError

__all__ = ["URL_OPTIONS", "Names", "boolean", "parse_url", "take_options"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


@dataclass(frozen=True)
class Names:
    """The tables (quoted and qualified) of one store, from Celery's
    ``database_table_names`` and ``database_table_schemas`` (keys ``"task"``
    and ``"group"``). aioresults' own tables go to the task table's schema and
    are named after it: ``aioresults_meta`` beside ``celery_taskmeta``,
    ``aioresults_<name>_meta`` beside a table renamed ``<name>``."""

    #: The schema of the task table (None: the connection's default).
    schema: str | None
    task_name: str
    group_name: str
    group_schema: str | None
    #: The prefix of aioresults' own names in the task table's schema.
    prefix: str
    quote_char: str

    @classmethod
    def build(
        cls,
        table_names: Mapping[str, str] | None,
        table_schemas: Mapping[str, str] | None,
        quote_char: str,
        limit: int,
    ) -> Names:
        names, schemas = dict(table_names or {}), dict(table_schemas or {})
        for option, given in (("table_names", names), ("table_schemas", schemas)):
            unknown = set(given) - {"task", "group"}
            if unknown:
                raise ConfigurationError(
                    f"{option} takes the keys 'task' and 'group' (as Celery's database_"
                    f"{option}), not {', '.join(sorted(map(repr, unknown)))}"
                )
        task = names.get("task", "celery_taskmeta")
        prefix = "aioresults_" if task == "celery_taskmeta" else f"aioresults_{task}_"
        for name in (*names.values(), *schemas.values(), prefix + "chord_part"):
            if not _IDENTIFIER.fullmatch(name) or len(name) > limit:
                raise ConfigurationError(
                    f"{name!r} is not a usable table or schema name here: letters, digits, "
                    f"_ and $, not starting with a digit, at most {limit} characters "
                    "(with aioresults' own prefix)"
                )
        return cls(
            schemas.get("task"),
            task,
            names.get("group", "celery_tasksetmeta"),
            schemas.get("group"),
            prefix,
            quote_char,
        )

    def qualified(self, name: str, schema: str | None = None) -> str:
        q = self.quote_char
        return f"{q}{schema}{q}.{q}{name}{q}" if schema else f"{q}{name}{q}"

    def own(self, suffix: str) -> str:
        """One of aioresults' own tables (or objects), quoted."""
        return self.qualified(self.prefix + suffix, self.schema)

    @property
    def task(self) -> str:
        return self.qualified(self.task_name, self.schema)

    @property
    def group(self) -> str:
        return self.qualified(self.group_name, self.group_schema)

    @property
    def task_sequence(self) -> str:
        return self.qualified("task_id_sequence", self.schema)

    @property
    def group_sequence(self) -> str:
        return self.qualified("taskset_id_sequence", self.group_schema)


def parse_url(url: str, dialects: Collection[str]) -> tuple[str, SplitResult, dict[str, str]]:
    """The dialect, the parts and the query options of a Celery-style database URL.

    ``db+<dialect>[+<driver>]://`` and ``<dialect>://`` are accepted; the
    SQLAlchemy driver suffix is ignored (aioresults has its own driver), and
    ``postgres`` means ``postgresql``.

    :raises ConfigurationError: another dialect, or a malformed URL.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"malformed database URL: {exc}") from None
    dialect = parts.scheme.lower().removeprefix("db+").partition("+")[0]
    dialect = {"postgres": "postgresql"}.get(dialect, dialect)
    if dialect not in dialects:
        raise ConfigurationError(f"not a {' or '.join(sorted(dialects))} URL: {parts.scheme}://...")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return dialect, parts, query


def take_options(
    query: dict[str, str], known: Mapping[str, Callable[[str], Any]], options: dict[str, Any]
) -> None:
    """Move the backend's own options out of a URL's ``query`` into ``options``
    (an argument given in code wins)."""
    for key, convert in known.items():
        if key in query:
            text = query.pop(key)
            try:
                value = convert(text)
            except ValueError:
                raise ConfigurationError(f"bad value {text!r} for {key} in the URL") from None
            options.setdefault(key, value)


def boolean(value: str) -> bool:
    """A URL's boolean option."""
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


#: URL options every SQL backend takes.
URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "pool_size": int,
    "retries": int,
    "command_timeout": float,
    "expires": float,
    "chord_expires": float,
    "serializer": str,
    "compression": str,
    "create": boolean,
}
