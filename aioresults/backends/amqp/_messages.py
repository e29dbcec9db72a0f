"""Celery's messages on AMQP: protocol 2 task messages, and result replies.

A **task message** is what Celery 5.7's ``app.send_task`` publishes (and a stock
worker consumes), field by field:

* headers: ``lang``, ``task``, ``id``, ``shadow``, ``eta``, ``expires``,
  ``group``, ``group_index``, ``retries``, ``timelimit``, ``root_id``,
  ``parent_id``, ``argsrepr``, ``kwargsrepr``, ``origin``, ``ignore_result``,
  ``replaced_task_nesting``, ``stamped_headers``, ``stamps``, then the
  caller's own headers;
* properties: ``correlation_id`` (the task id), ``reply_to``,
  ``content_type``/``content_encoding`` (``application/json``/``utf-8``),
  ``delivery_mode`` 2 (persistent), ``priority`` (0 unless given), and
  ``expiration`` (milliseconds, as text) when the task expires;
* body: ``[args, kwargs, {"callbacks": null, "errbacks": null, "chain": null,
  "chord": null}]``.

``countdown`` becomes an ISO 8601 ``eta`` header in UTC, as Celery computes
it. ``argsrepr``/``kwargsrepr`` are for display only (Flower, logs): they
equal Celery's ``saferepr`` for ordinary arguments; for very long or deeply
nested ones both truncate, not always at the same place.

A **result reply** is what Celery's RPC backend publishes from the worker:
the record (the same dict the key-value stores keep) to the default exchange,
routed by the sender's ``reply_to``, with ``correlation_id`` = the task id,
``delivery_mode`` 1 (2 with ``persistent``), ``priority`` 0 and empty headers.
Compression travels as kombu's ``compression`` header beside a compressed body.
"""

from __future__ import annotations

import datetime as dt
import os
import reprlib
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..._exceptions import ConfigurationError
from ..._serialization import COMPRESSED_MAGIC, Codec

__all__ = [
    "Outgoing",
    "origin",
    "received_payload",
    "result_message",
    "short_string",
    "task_message",
]

#: Celery's ``argsrepr_maxsize``/``kwargsrepr_maxsize`` and ``task_repr_maxlevels``.
REPR_MAXSIZE = 1024
REPR_MAXLEVELS = 3
_ENCODINGS = {"application/json": "utf-8", "application/x-msgpack": "binary"}


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message ready to publish: its body and its AMQP properties (by pamqp's names)."""

    body: bytes
    properties: dict[str, Any]


def origin() -> str:
    """Celery's anonymous node name of this process, ``gen<pid>@<host>``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _repr(value: Any) -> str:
    # Unbounded per container, REPR_MAXLEVELS deep, then cut to the size limit.
    shorten = reprlib.Repr()
    shorten.maxlevel = REPR_MAXLEVELS
    for attribute in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset"):
        setattr(shorten, attribute, 1 << 30)
    shorten.maxdeque = shorten.maxstring = shorten.maxlong = shorten.maxother = 1 << 30
    text = shorten.repr(value)
    return text if len(text) <= REPR_MAXSIZE else text[:REPR_MAXSIZE] + "..."


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigurationError(f"{what} must be a number of seconds")
    return float(value)


def task_message(
    codec: Codec,
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    task_id: str,
    reply_to: str,
    countdown: float | dt.timedelta | None = None,
    eta: dt.datetime | str | None = None,
    expires: float | dt.timedelta | dt.datetime | str | None = None,
    priority: int | None = None,
    headers: Mapping[str, Any] | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    shadow: str | None = None,
    retries: int = 0,
    root_id: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
    group_index: int | None = None,
    ignore_result: bool | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
    now: dt.datetime | None = None,
) -> Outgoing:
    """The protocol 2 message ``app.send_task(name, args, kwargs, ...)`` publishes.

    :raises ConfigurationError: an argument Celery would refuse too.
    :raises SerializationError: ``args``/``kwargs`` cannot be encoded.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError("the task name must be a non-empty string")
    if not isinstance(args, (list, tuple)):
        raise ConfigurationError("task args must be a list or tuple")
    if not isinstance(kwargs, Mapping):
        raise ConfigurationError("task keyword arguments must be a mapping")
    now = now or dt.datetime.now(dt.UTC)
    expiration: float | None = None
    if countdown:
        eta = now + dt.timedelta(seconds=_seconds(countdown, "countdown"))
    if isinstance(expires, (int, float, dt.timedelta)) and not isinstance(expires, bool):
        expiration = _seconds(expires, "expires")
        expires = now + dt.timedelta(seconds=expiration)
    elif isinstance(expires, str):
        expiration = (_aware(dt.datetime.fromisoformat(expires)) - now).total_seconds()
    elif isinstance(expires, dt.datetime):
        expiration = (_aware(expires) - now).total_seconds()
    elif expires is not None:
        raise ConfigurationError("expires must be seconds, a datetime or ISO 8601 text")
    message_headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta.isoformat() if isinstance(eta, dt.datetime) else eta,
        "expires": expires.isoformat() if isinstance(expires, dt.datetime) else expires,
        "group": group_id,
        "group_index": group_index,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": _repr(args) if argsrepr is None else argsrepr,
        "kwargsrepr": _repr(kwargs) if kwargsrepr is None else kwargsrepr,
        "origin": origin(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if headers:
        message_headers.update(headers)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = codec.encode([list(args), dict(kwargs), embed])
    properties: dict[str, Any] = {
        "content_type": codec.content_type,
        "content_encoding": _ENCODINGS.get(codec.content_type, "binary"),
        "headers": message_headers,
        "delivery_mode": 2,
        "priority": priority or 0,
        "correlation_id": task_id,
        "reply_to": reply_to,
    }
    if expiration is not None:
        # A TTL in the past expires the message on arrival, as Celery sets it.
        properties["expiration"] = str(int(max(0.0, expiration) * 1000))
    return Outgoing(body, properties)


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def result_message(
    codec: Codec, payload: bytes, correlation_id: str, *, persistent: bool = False
) -> Outgoing:
    """The reply a Celery worker's RPC backend publishes for one record
    (``payload``: the encoded record, as :meth:`Codec.encode` returns it)."""
    headers: dict[str, Any] = {}
    if payload.startswith(COMPRESSED_MAGIC):
        # kombu sends the compressed bytes alone and names the method in a header.
        content_type, _, payload = payload[len(COMPRESSED_MAGIC) :].partition(b"\x00")
        headers["compression"] = content_type.decode("ascii")
    return Outgoing(
        payload,
        {
            "content_type": codec.content_type,
            "content_encoding": _ENCODINGS.get(codec.content_type, "binary"),
            "headers": headers,
            "delivery_mode": 2 if persistent else 1,
            "priority": 0,
            "correlation_id": correlation_id,
        },
    )


def received_payload(body: bytes, headers: Mapping[str, Any] | None) -> bytes:
    """A received reply's body as the codec reads payloads: a kombu-compressed
    body gets the compression prefix the key-value stores use."""
    compression = (headers or {}).get("compression")
    if isinstance(compression, bytes):
        compression = compression.decode("ascii", "replace")
    if isinstance(compression, str) and compression:
        return b"".join((COMPRESSED_MAGIC, compression.encode("ascii", "replace"), b"\x00", body))
    return body


def short_string(value: str | None, name: str) -> None:
    """AMQP names (queues, exchanges, routing keys, ids) are at most 255 bytes."""
    if value is None:
        return
    try:
        if isinstance(value, str) and len(value.encode("utf-8")) <= 255:
            return
    except UnicodeEncodeError:
        pass
    raise ConfigurationError(f"{name} must be a string of at most 255 bytes in UTF-8")
