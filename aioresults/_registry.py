"""connect(url): the scheme table and register_backend() for third parties."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigurationError, MissingDependency, UnknownBackend

if TYPE_CHECKING:
    from .backends.base import BaseBackend

__all__ = ["DEFAULT_URL", "connect", "known_schemes", "register_backend"]

#: What :func:`connect` uses when no URL is given and ``AIORESULTS_URL`` is unset.
DEFAULT_URL = "sqlite:///aioresults.db"

# scheme -> ("module:Class", extra that installs its driver, or None)
_SCHEMES: dict[str, tuple[str, str | None]] = {
    "memory": ("aioresults.backends.memory:MemoryBackend", None),
    "file": ("aioresults.backends.filesystem:FilesystemBackend", None),
    "sqlite": ("aioresults.backends.sqlite:SQLiteBackend", "sqlite"),
    "db+sqlite": ("aioresults.backends.sqlite:SQLiteBackend", "sqlite"),
    "redis": ("aioresults.backends.redis:RedisBackend", "redis"),
    "rediss": ("aioresults.backends.redis:RedisBackend", "redis"),
    "redis+socket": ("aioresults.backends.redis:RedisBackend", "redis"),
    "sentinel": ("aioresults.backends.redis:RedisBackend", "redis"),
    "azureblockblob": ("aioresults.backends.azure_blob:AzureBlockBlobBackend", "azure"),
    "postgresql": ("aioresults.backends.postgres:PostgresBackend", "postgres"),
    "postgres": ("aioresults.backends.postgres:PostgresBackend", "postgres"),
    "db+postgresql": ("aioresults.backends.postgres:PostgresBackend", "postgres"),
    "mysql": ("aioresults.backends.mysql:MySQLBackend", "mysql"),
    "mariadb": ("aioresults.backends.mysql:MySQLBackend", "mysql"),
    "db+mysql": ("aioresults.backends.mysql:MySQLBackend", "mysql"),
    "db+mariadb": ("aioresults.backends.mysql:MySQLBackend", "mysql"),
    "rpc": ("aioresults.backends.amqp:RPCBackend", "amqp"),
    "memcached": ("aioresults.backends.memcached:MemcachedBackend", "memcached"),
    "cache+memcached": ("aioresults.backends.memcached:MemcachedBackend", "memcached"),
    "nats": ("aioresults.backends.nats:NatsBackend", "nats"),
}
_loaded: dict[str, type[BaseBackend]] = {}


def known_schemes() -> list[str]:
    """The URL schemes :func:`connect` understands, sorted."""
    return sorted(_SCHEMES)


def register_backend(
    scheme: str | type[BaseBackend],
    backend: str | type[BaseBackend] | None = None,
    extra: str | None = None,
) -> None:
    """Make :func:`connect` serve a URL scheme with a backend.

    ``register_backend(MyBackend)`` registers every scheme in
    ``MyBackend.schemes``; ``register_backend("myscheme", MyBackend)`` (or
    ``"module:Class"``, imported on first use) registers one.

    :param extra: for an error message, the ``pip install`` argument that
        installs the backend's driver when importing it fails.
    :raises ConfigurationError: a scheme is invalid, or a class names none.
    """
    if not isinstance(scheme, str):
        if backend is not None:
            raise ConfigurationError("give the backend class alone, or a scheme and a backend")
        if not scheme.schemes:
            raise ConfigurationError(f"{scheme.__qualname__}.schemes names no URL scheme")
        for name in scheme.schemes:
            register_backend(name, scheme, extra)
        return
    if backend is None:
        raise ConfigurationError(f"register_backend({scheme!r}) needs the backend")
    scheme = scheme.lower()
    if not scheme or "://" in scheme:
        raise ConfigurationError(f"invalid scheme {scheme!r}")
    if isinstance(backend, str):
        if ":" not in backend:
            raise ConfigurationError("backend must be a class or 'module:Class'")
        _SCHEMES[scheme] = (backend, extra)
        _loaded.pop(scheme, None)
    else:
        _SCHEMES[scheme] = (f"{backend.__module__}:{backend.__qualname__}", extra)
        _loaded[scheme] = backend


def _load(scheme: str) -> type[BaseBackend]:
    loaded = _loaded.get(scheme)
    if loaded is not None:
        return loaded
    target, extra = _SCHEMES[scheme]
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, MissingDependency):
            raise
        hint = (
            f"pip install 'aioresults[{extra}]'"
            if extra and "aioresults" in module_name
            else f"pip install {extra}"
            if extra
            else "check that it is installed"
        )
        raise MissingDependency(
            f"the {scheme}:// backend needs a package that is not installed "
            f"({exc.name or exc}); run: {hint}"
        ) from exc
    cls: type[BaseBackend] = getattr(module, class_name)
    _loaded[scheme] = cls
    return cls


def connect(url: str | None = None, **options: Any) -> BaseBackend:
    """Create the backend a URL names.

    With no URL, ``AIORESULTS_URL`` is used, else the embedded default
    ``sqlite:///aioresults.db``. The backend connects lazily; use it as
    ``async with connect(...) as backend:`` or call ``await backend.aclose()``.

    :raises UnknownBackend: no backend serves the URL's scheme (the error lists them).
    :raises MissingDependency: the backend's driver is missing (the error names
        the ``pip install 'aioresults[extra]'`` command).
    :raises ConfigurationError: the URL or an option is invalid.
    """
    if url is None:
        url = os.environ.get("AIORESULTS_URL") or DEFAULT_URL
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError("a backend URL looks like scheme://..., e.g. redis://localhost")
    scheme = url.partition("://")[0].lower()
    if scheme not in _SCHEMES and scheme.startswith("db+") and "+" in scheme[3:]:
        # SQLAlchemy's driver suffix (db+postgresql+psycopg2://): the dialect decides.
        scheme = scheme.rpartition("+")[0]
    if scheme not in _SCHEMES:
        raise UnknownBackend(scheme, known_schemes())
    return _load(scheme).from_url(url, **options)
