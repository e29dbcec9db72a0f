"""Where the broker is: ``rpc://`` URLs, Celery's ``broker_url`` forms, the environment.

::

    rpc://user:password@host:port/vhost        names the broker itself
    rpc://                                     the broker is broker_url=, else
                                               $AIORESULTS_BROKER_URL
    amqp://, amqps://, pyamqp://, pyamqps://, librabbitmq://   (broker_url forms)

The virtual host follows kombu: the path after the first ``/``, percent-decoded
(``//`` and ``/%2F`` are the default vhost ``/``, so is an empty path). A
``?ssl=true`` query, or an ``amqps``/``pyamqps`` scheme, connects with TLS.

Query options are the backend's own (:data:`BACKEND_OPTIONS`) or aiormq's
connection options (:data:`DRIVER_OPTIONS`: TLS files, authentication, a
connection name); anything else is an error, as is a failover list
(``amqp://a;amqp://b``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ..._exceptions import ConfigurationError

__all__ = ["BACKEND_OPTIONS", "BROKER_VARIABLE", "Broker", "find_broker", "positive"]

#: The environment variable a bare ``rpc://`` takes its broker from.
BROKER_VARIABLE = "AIORESULTS_BROKER_URL"

_TLS = {"amqps": True, "pyamqps": True, "amqp": False, "pyamqp": False, "librabbitmq": False}


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


#: Options of the backend itself that a URL may carry.
BACKEND_OPTIONS: dict[str, Callable[[str], Any]] = {
    "expires": float,
    "max_buffered": int,
    "persistent": _boolean,
    "connect_timeout": float,
    "command_timeout": float,
    "heartbeat": int,
    "reply_queue": str,
    "default_queue": str,
}
#: Connection options passed on to aiormq (it reads them from its URL).
DRIVER_OPTIONS = frozenset(
    ("cafile", "capath", "cadata", "keyfile", "certfile", "no_verify_ssl", "auth", "name")
)


@dataclass(frozen=True)
class Broker:
    """One AMQP broker: address, credentials, virtual host and driver options."""

    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool = False
    driver_options: Mapping[str, str] = field(default_factory=dict)

    def driver_url(self, heartbeat: int) -> str:
        """The URL aiormq connects to (secrets included: never show it)."""
        query = {**self.driver_options, "heartbeat": str(heartbeat)}
        return (
            f"{'amqps' if self.tls else 'amqp'}://{quote(self.user, safe='')}:"
            f"{quote(self.password, safe='')}@{self._netloc()}/{quote(self.vhost, safe='')}"
            f"?{urlencode(query)}"
        )

    def display(self) -> str:
        """The broker's URL without its password, for messages and ``repr()``."""
        vhost = "/" if self.vhost == "/" else quote(self.vhost, safe="")
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(self.user, safe='')}:***@{self._netloc()}/{vhost}"

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def find_broker(url: str | None, broker_url: str | None) -> tuple[Broker, dict[str, Any]]:
    """The broker a backend URL (or ``broker_url``, or the environment) names,
    and the backend options its query carries.

    :raises ConfigurationError: no broker is named, or the URL is malformed.
    """
    options: dict[str, Any] = {}
    if url is not None:
        parts = _split(url)
        if parts.scheme == "rpc":
            options = _backend_options(parts.query)
            if parts.hostname is None:
                unknown = {k for k, _ in parse_qsl(parts.query)} - set(BACKEND_OPTIONS)
                if unknown:
                    raise ConfigurationError(
                        f"unknown option {min(unknown)!r} in a bare rpc:// URL "
                        "(connection options belong in the broker URL)"
                    )
                url = broker_url or os.environ.get(BROKER_VARIABLE)
                if not url:
                    raise ConfigurationError(
                        "rpc:// names no broker: give broker_url='amqp://user:password@host//' "
                        f"or set {BROKER_VARIABLE} (or write rpc://user:password@host/vhost)"
                    )
                return _broker(url, allow_rpc=False), options
        elif broker_url is not None:
            raise ConfigurationError("give the broker as the URL or as broker_url=, not both")
        return _broker(url, allow_rpc=True), options
    url = broker_url or os.environ.get(BROKER_VARIABLE)
    if not url:
        raise ConfigurationError(f"RPCBackend needs a broker URL (or {BROKER_VARIABLE})")
    return _broker(url, allow_rpc=False), options


def _split(url: str) -> Any:
    if ";" in url:
        raise ConfigurationError("a list of brokers (failover) is not supported: name one")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port raises ValueError when it is invalid
    except ValueError as exc:
        raise ConfigurationError(f"invalid broker URL: {exc}") from None
    return parts


def _broker(url: str, *, allow_rpc: bool) -> Broker:
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme not in _TLS and not (allow_rpc and scheme == "rpc"):
        raise ConfigurationError(
            f"unsupported broker URL scheme {scheme!r}: use amqp://, amqps:// or pyamqp://"
        )
    driver: dict[str, str] = {}
    tls = _TLS.get(scheme, False)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ssl":
            tls = _parse(key, value, _boolean)
        elif key in DRIVER_OPTIONS:
            driver[key] = value
        elif key not in BACKEND_OPTIONS:
            raise ConfigurationError(f"unknown option {key!r} in the broker URL")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return Broker(
        host=parts.hostname or "localhost",
        port=parts.port or (5671 if tls else 5672),
        user=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=unquote(path) or "/",
        tls=tls,
        driver_options=driver,
    )


def _backend_options(query: str) -> dict[str, Any]:
    return {
        key: _parse(key, value, BACKEND_OPTIONS[key])
        for key, value in parse_qsl(query, keep_blank_values=True)
        if key in BACKEND_OPTIONS
    }


def _parse(key: str, value: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(value)
    except ValueError:
        raise ConfigurationError(f"invalid value {value!r} for {key!r} in the URL") from None


def positive(value: Any, name: str) -> int:
    """``value`` if it is a positive integer (a count option)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer")
    return value
