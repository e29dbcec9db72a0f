"""JSON in kombu's dialect: what Celery writes and reads.

Datetimes, dates, times, UUIDs, decimals and bytes are wrapped as
``{"__type__": ..., "__value__": ...}``, as kombu does; :func:`register_type`
adds types of the application's own, with kombu's arguments.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any

from ._exceptions import ConfigurationError, DecodeError

__all__ = ["register_type"]


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


#: Types registered with :func:`register_type`: type -> (marker or None, encoder).
_CUSTOM_ENCODERS: dict[type, tuple[str | None, Callable[[Any], Any]]] = {}


def register_type(
    t: type[Any],
    marker: str | None,
    encoder: Callable[[Any], Any],
    decoder: Callable[[Any], Any] = lambda value: value,
) -> None:
    """Teach the JSON codec a type of your own, as kombu's ``register_type`` does.

    The arguments are those of ``kombu.utils.json.register_type``, so a type
    registered the same way on both sides round-trips between Celery and
    aioresults: an instance of ``t`` is stored as ``{"__type__": marker,
    "__value__": encoder(obj)}`` and read back with ``decoder(value)``. With
    ``marker=None`` the value is stored as ``encoder(obj)`` with no envelope
    (and read back as that). Registrations are process-wide, as kombu's are;
    registering a marker again replaces its decoder.

    A stored record that uses a marker nobody registered raises a
    :class:`~aioresults.DecodeError` naming the marker, for that record only.
    """
    if not isinstance(t, type):
        raise ConfigurationError(f"register_type needs a type, not {t!r}")
    if marker is not None and (not isinstance(marker, str) or not marker):
        raise ConfigurationError("a type marker is a non-empty string (or None)")
    _CUSTOM_ENCODERS[t] = (marker, encoder)
    if marker is not None:
        _TAG_DECODERS[marker] = decoder


def _json_default(obj: Any) -> Any:
    if _CUSTOM_ENCODERS:
        for kind, (marker, encoder) in _CUSTOM_ENCODERS.items():
            if isinstance(obj, kind):
                value = encoder(obj)
                return value if marker is None else _tag(marker, value)
    # Order matters: datetime is a subclass of date.
    if isinstance(obj, dt.datetime):
        return _tag("datetime", obj.isoformat())
    if isinstance(obj, dt.date):
        return _tag("date", obj.isoformat())
    if isinstance(obj, dt.time):
        return _tag("time", obj.isoformat())
    if isinstance(obj, decimal.Decimal):
        return _tag("decimal", str(obj))
    if isinstance(obj, uuid.UUID):
        return _tag("uuid", {"hex": obj.hex})
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        try:
            return _tag("bytes", raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _tag("base64", base64.b64encode(raw).decode("ascii"))
    if isinstance(obj, (set, frozenset)):
        raise TypeError(f"a {type(obj).__name__} cannot be stored as JSON; convert it to a list")
    raise TypeError(f"object of type {type(obj).__name__} cannot be stored as JSON")


_TAG_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": lambda v: dt.datetime.fromisoformat(v).date(),
    "time": dt.time.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": lambda v: base64.b64decode(v.encode("ascii"), validate=True),
}


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
        decoder = _TAG_DECODERS.get(obj["__type__"])
        if decoder is None:
            raise DecodeError(
                f"unknown JSON type tag {obj['__type__']!r}: the writer registered a type "
                "(kombu's register_type); register its decoder with aioresults.register_type()"
            )
        try:
            return decoder(obj["__value__"])
        except Exception as exc:  # a registered decoder may raise anything
            raise DecodeError(f"bad value for JSON type tag {obj['__type__']!r}: {exc}") from exc
    return obj


try:
    from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - an interpreter without the C accelerator
    _c_make_encoder = None

if _c_make_encoder is not None:
    # json.dumps(obj, default=...) builds an encoder per call; the C encoder
    # keeps no state between calls, so one serves every write. Same output
    # (kombu's separators, ASCII); no circular check: a cycle fails as a
    # RecursionError instead of a ValueError, a SerializationError either way.
    _iterencode = _c_make_encoder(
        None, _json_default, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, True,
    )  # fmt: skip

    def _json_dumps(obj: Any) -> bytes:
        if type(obj) is str:
            return json.encoder.encode_basestring_ascii(obj).encode()
        return "".join(_iterencode(obj, 0)).encode()

else:  # pragma: no cover

    def _json_dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=_json_default).encode("utf-8")


_TAGGED_DECODER = json.JSONDecoder(object_hook=_json_object_hook)
_PLAIN_DECODER = json.JSONDecoder()
_scan_once: Callable[[str, int], tuple[Any, int]] = _PLAIN_DECODER.scan_once  # type: ignore[attr-defined]


def _json_loads(data: bytes) -> Any:
    text = data.decode("utf-8")
    # Most records hold no tagged value: skip the per-object hook for them.
    if '"__type__"' in text:
        return _TAGGED_DECODER.decode(text)
    # The C scanner directly (what json.loads ends up calling), checking for
    # trailing data as json.loads does; joins decode thousands of records.
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return _PLAIN_DECODER.decode(text)  # leading whitespace or empty: the full path
    if end != len(text) and text[end:].strip():
        raise json.JSONDecodeError("Extra data", text, end)
    return value
