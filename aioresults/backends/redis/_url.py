"""Redis URLs: Celery's ``result_backend`` forms, the backend's options, driver options.

::

    redis://[[user]:password@]host[:port][/db][?options]
    rediss://...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem
    redis+socket:///path/to/redis.sock?virtual_host=0
    sentinel://host1:26379;sentinel://host2:26379/0?master_name=mymaster
    redis://host:port/0?cluster=true        (Redis Cluster; rediss:// too)

Query options are the backend's own (``global_keyprefix``, ``expires``,
``chord_expires``, ``health_check_interval``, ``command_timeout``, ``retries``,
``max_connections``, ``master_name``, ``cluster``, ``serializer``,
``compression``) or redis-py connection options (``socket_timeout``,
``client_name``, ``ssl_*``, ...), passed to the driver; anything else is an error.
"""

from __future__ import annotations

import inspect
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis import connection as redis_connection
from redis.asyncio import connection as async_connection

from ..._exceptions import ConfigurationError
from ..base import redact_url

__all__ = ["BACKEND_OPTIONS", "cluster_options", "parse_url"]

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def _boolean(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _cert_reqs(value: str) -> ssl.VerifyMode:
    return _CERT_REQS[value.lower().removeprefix("cert_")]


#: Options of the backend itself that a URL may carry.
BACKEND_OPTIONS: dict[str, Callable[[str], Any]] = {
    "global_keyprefix": str,
    "expires": float,
    "chord_expires": float,
    "health_check_interval": float,
    "command_timeout": float,
    "retries": int,
    "max_connections": int,
    "master_name": str,
    "cluster": _boolean,
    "serializer": str,
    "compression": str,
}
# Connection options, typed as Celery and redis-py read them.
_CONNECTION_OPTIONS: dict[str, Callable[[str], Any]] = {
    **redis_connection.URL_QUERY_ARGUMENT_PARSERS,  # type: ignore[dict-item]
    "virtual_host": int,
    "db": int,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _boolean,
    "client_name": str,
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _boolean,
}
_CONNECTION_OPTIONS.pop("health_check_interval", None)  # the backend's own (pub/sub PINGs)
_CONNECTION_OPTIONS.pop("max_connections", None)
# Any other keyword the backend's (asyncio) redis-py connections take passes through
# as text; one only the blocking client takes would fail at the first connection.
_DRIVER_KEYWORDS = frozenset(
    name
    for cls in (async_connection.AbstractConnection, async_connection.Connection)
    for name in inspect.signature(cls.__init__).parameters
    if name not in ("self", "args", "kwargs")
)


def _parse_option(name: str, value: str, where: str) -> Any:
    parse = BACKEND_OPTIONS.get(name) or _CONNECTION_OPTIONS.get(name)
    if parse is None:
        if name in _DRIVER_KEYWORDS:
            return value
        known = sorted({*BACKEND_OPTIONS, *_CONNECTION_OPTIONS})
        raise ConfigurationError(
            f"unknown option {name!r} in {where}; the backend's and redis-py's options are "
            f"known ({', '.join(known)}, ...)"
        )
    try:
        return parse(value)
    except (ValueError, KeyError) as exc:
        raise ConfigurationError(f"bad value for {name!r}: {value!r}") from exc


def parse_url(url: str) -> dict[str, Any]:
    """Turn a backend URL into settings (see the module docstring).

    :returns: keyword arguments for a redis-py connection, plus ``sentinels``
        (a list of ``(host, port)``) for ``sentinel://``, and the backend's own
        options (:data:`BACKEND_OPTIONS`) that the query names.
    :raises ConfigurationError: the URL or one of its options is invalid.
    """
    scheme = url.partition("://")[0].lower()
    chunks = [c.strip() for c in url.split(";") if c.strip()] if scheme == "sentinel" else [url]
    settings: dict[str, Any] = {}
    sentinels: list[tuple[str, int]] = []
    for chunk in chunks:
        parts = urlsplit(chunk)
        if parts.scheme.lower() != scheme:
            raise ConfigurationError(f"cannot mix schemes in {redact_url(url)!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"bad port in {redact_url(chunk)!r}") from exc
        if parts.username:
            settings.setdefault("username", unquote(parts.username))
        if parts.password:
            settings.setdefault("password", unquote(parts.password))
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            settings[name] = _parse_option(name, value, repr(redact_url(chunk)))
        path = unquote(parts.path)
        if scheme == "redis+socket":
            if not path or path == "/":
                raise ConfigurationError("a redis+socket:// URL needs the socket's path")
            settings["path"] = path
        else:
            db = path.strip("/")
            if db:
                if not db.isdigit():
                    raise ConfigurationError(
                        f"the database in {redact_url(chunk)!r} is not a number"
                    )
                settings["db"] = int(db)
            host = parts.hostname or "localhost"
            if scheme == "sentinel":
                sentinels.append((host, port or 26379))
            else:
                settings.update(host=host, port=port or 6379)
    if "virtual_host" in settings:
        settings["db"] = settings.pop("virtual_host")
    if scheme == "rediss":
        settings.setdefault("ssl_cert_reqs", ssl.CERT_REQUIRED)
        settings["connection_class"] = aioredis.SSLConnection
    elif any(key in settings for key in _SSL_KEYS):
        raise ConfigurationError("ssl_* options need a rediss:// URL")
    elif scheme == "redis+socket":
        settings["connection_class"] = aioredis.UnixDomainSocketConnection
    elif scheme == "sentinel":
        settings["sentinels"] = sentinels
    elif scheme != "redis":
        raise ConfigurationError(f"not a Redis URL: {redact_url(url)!r}")
    return settings


def cluster_options(settings: dict[str, Any]) -> dict[str, Any]:
    """A single server's connection settings, as ``RedisCluster`` takes them."""
    options = dict(settings)
    connection_class = options.pop("connection_class", None)
    if "path" in options:
        raise ConfigurationError("a Redis Cluster is reached at host:port, not by a Unix socket")
    if options.pop("db", 0):
        raise ConfigurationError("a Redis Cluster has only database 0")
    if connection_class is aioredis.SSLConnection:
        options["ssl"] = True
    # A MOVED reply patches that slot's entry; redis-py's default also closes every
    # connection (the ones in use too) on each fifth MOVED, failing commands in flight.
    options.setdefault("reinitialize_steps", 0)
    return options
