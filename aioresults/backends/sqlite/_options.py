"""The SQLite backend's options: its URL, the watch option, its error table."""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..._exceptions import BackendCorrupted, BackendError, BackendUnavailable, ConfigurationError
from .._support import ErrorRule, ErrorTable

__all__ = ["SCHEMES", "error_table", "url_path", "watch_option"]

SCHEMES = ("sqlite", "db+sqlite")


def _is(*names: str) -> Any:
    return lambda exc: (getattr(exc, "sqlite_errorname", "") or "").startswith(names)


def watch_option(watch: str, watch_mode: str | None) -> str:
    if watch_mode is not None:  # the 0.1 spelling
        warnings.warn(
            "watch_mode= is deprecated since 0.2: use watch='auto', 'notify' or 'poll'",
            DeprecationWarning,
            stacklevel=4,
        )
        watch = {"inotify": "notify"}.get(watch_mode, watch_mode)
    if watch not in ("auto", "notify", "poll"):
        raise ConfigurationError(f'watch must be "auto", "notify" or "poll", not {watch!r}')
    return watch


def error_table(where: Callable[[], str]) -> ErrorTable:
    """sqlite3's errors (by their SQLite error names) and what each becomes."""
    return ErrorTable(
        [
            ErrorRule(
                sqlite3.Error,
                BackendUnavailable,
                "the database is locked (busy_timeout passed) at",
                lambda e: _is("SQLITE_BUSY", "SQLITE_LOCKED")(e) or "locked" in str(e),
            ),
            ErrorRule(
                sqlite3.Error,
                BackendCorrupted,
                "not a SQLite database, or damaged:",
                _is("SQLITE_CORRUPT", "SQLITE_NOTADB"),
            ),
            ErrorRule(
                sqlite3.Error,
                BackendUnavailable,
                "cannot use",
                _is("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY"),
            ),
            ErrorRule(sqlite3.Error, BackendUnavailable, "cannot use", _is("SQLITE_PERM")),
            ErrorRule(sqlite3.Error, BackendError, "failed on"),
            ErrorRule(ValueError, BackendError, "failed (the connection is closed?) on"),
        ],
        where,
    )


def url_path(url: str, options: dict[str, Any]) -> str:
    """The file a ``sqlite:///`` URL names; its query options go into ``options``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigurationError(f"not a sqlite:// URL: {url!r}")
    if parts.netloc or not parts.path.startswith("/"):
        raise ConfigurationError(
            f"bad SQLite URL {url!r}: use sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db (three slashes, then the path)"
        )
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ("busy_timeout", "timeout"):
            try:
                options.setdefault("busy_timeout", float(value))
            except ValueError as exc:
                raise ConfigurationError(f"{key} must be a number of seconds") from exc
        elif key != "check_same_thread":  # pysqlite's; meaningless here
            raise ConfigurationError(f"unknown option {key!r} in SQLite URL {url!r}")
    return unquote(parts.path[1:])
