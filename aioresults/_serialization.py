"""Codecs for stored payloads, and exceptions to and from their stored form.

JSON is the default and speaks kombu's dialect, so Celery reads what aioresults
writes and the reverse: datetimes, dates, times, UUIDs, decimals and bytes are
wrapped as ``{"__type__": ..., "__value__": ...}``. msgpack is optional. Pickle
is refused unless the backend's ``accept`` names it. Celery's compression
prefix (``b"\\x00celery-compressed\\x00" + content type + b"\\x00" + body``) is
always recognised on read and written when ``compression`` is set.

Decoding an exception never imports a module and never calls anything that is
not an exception class. Builtin exceptions come back as themselves; classes the
caller lists in ``known_exceptions`` come back as themselves; anything else is
rebuilt as a subclass of :class:`~aioresults.RemoteTaskError` that keeps the
remote name, module, arguments and traceback text.
"""

from __future__ import annotations

import base64
import builtins
import bz2
import datetime as dt
import decimal
import inspect
import json
import lzma
import pickle
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._exceptions import (
    AioResultsError,
    ConfigurationError,
    ContentDisallowed,
    DecodeError,
    MissingDependency,
    RemoteTaskError,
    ResultTooLarge,
    SecurityError,
    SerializationError,
    TaskRevokedError,
)

__all__ = ["Codec", "exception_from_dict", "exception_to_dict", "register_type"]

COMPRESSED_MAGIC = b"\x00celery-compressed\x00"
DEFAULT_MAX_VALUE_SIZE = 512 * 1024 * 1024

# ---------------------------------------------------------------- JSON (kombu dialect)


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


# ---------------------------------------------------------------- msgpack, pickle


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(
            "the msgpack serializer needs the msgpack package: pip install 'aioresults[msgpack]'"
        ) from exc
    return msgpack


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    return _json_default(obj)


def _msgpack_hook(obj: dict[Any, Any]) -> Any:
    return _json_object_hook(obj)


def _msgpack_dumps(obj: Any) -> bytes:
    packed: bytes = _msgpack().packb(obj, use_bin_type=True, default=_msgpack_default)
    return packed


def _msgpack_loads(data: bytes) -> Any:
    return _msgpack().unpackb(data, raw=False, object_hook=_msgpack_hook, strict_map_key=False)


def _pickle_dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(frozen=True)
class _Format:
    name: str
    content_type: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]


_FORMATS = {
    f.name: f
    for f in (
        _Format("json", "application/json", _json_dumps, _json_loads),
        _Format("msgpack", "application/x-msgpack", _msgpack_dumps, _msgpack_loads),
        _Format("pickle", "application/x-python-serialize", _pickle_dumps, pickle.loads),
    )
}


def _sniff(data: bytes) -> str:
    """Name the format of an (uncompressed) payload from its first bytes."""
    first = data[:1]
    if first == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if first and (0x80 <= first[0] <= 0x9F or first[0] in (0xDC, 0xDD, 0xDE, 0xDF)):
        return "msgpack"
    return "json"


# ---------------------------------------------------------------- compression

_COMPRESSORS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    # kombu registers zlib under both names with the gzip content type.
    "zlib": ("application/x-gzip", zlib.compress),
    "gzip": ("application/x-gzip", zlib.compress),
    "bzip2": ("application/x-bz2", bz2.compress),
    "lzma": ("application/x-lzma", lzma.compress),
    "xz": ("application/x-lzma", lzma.compress),
}


def _decompress(content_type: str, body: bytes, limit: int) -> bytes:
    decompressor: Any
    if content_type == "application/x-gzip":
        decompressor = zlib.decompressobj()
        out = decompressor.decompress(body, limit + 1)
    elif content_type == "application/x-bz2":
        decompressor = bz2.BZ2Decompressor()
        out = decompressor.decompress(body, max_length=limit + 1)
    elif content_type == "application/x-lzma":
        decompressor = lzma.LZMADecompressor()
        out = decompressor.decompress(body, max_length=limit + 1)
    else:
        raise DecodeError(f"unsupported compression {content_type!r} in stored payload")
    if len(out) > limit:
        raise ResultTooLarge(f"compressed payload expands beyond max_value_size ({limit} bytes)")
    return bytes(out)


# ---------------------------------------------------------------- exceptions

_REVOKED_MODULE = "celery.exceptions"
_synthesized: dict[tuple[str, str], type[RemoteTaskError]] = {}
_MAX_SYNTHESIZED = 1024


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """Return Celery's stored form of ``exc``: ``{exc_type, exc_message, exc_module}``.

    Arguments that JSON cannot carry are stored as their ``repr()``, as Celery does.
    """
    if isinstance(exc, RemoteTaskError):
        exc_type, exc_module = exc.remote_type, exc.remote_module
    elif isinstance(exc, TaskRevokedError):
        exc_type, exc_module = "TaskRevokedError", _REVOKED_MODULE
    else:
        exc_type, exc_module = type(exc).__qualname__, type(exc).__module__
    return {
        "exc_type": exc_type,
        "exc_message": [_storable(arg) for arg in exc.args],
        "exc_module": exc_module,
    }


def _storable(value: Any) -> Any:
    try:
        _json_dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _synthesize(exc_type: str, exc_module: str) -> type[RemoteTaskError]:
    key = (exc_module, exc_type)
    cls = _synthesized.get(key)
    if cls is None:
        name = exc_type.rpartition(".")[2] or "RemoteTaskError"
        cls = type(
            name,
            (RemoteTaskError,),
            {
                "remote_type": exc_type,
                "remote_module": exc_module,
                "__module__": exc_module,
                "__qualname__": exc_type,
                "__doc__": f"Rebuilt from a stored {exc_module}.{exc_type}.",
            },
        )
        if len(_synthesized) < _MAX_SYNTHESIZED:
            _synthesized[key] = cls
    return cls


def _refuse_non_exception(exc_type: str, exc_module: str) -> None:
    """Raise SecurityError when an already-imported module names a non-exception."""
    target: Any = builtins if exc_module == "builtins" else sys.modules.get(exc_module)
    if target is None:
        return
    for part in exc_type.split("."):
        try:
            # Static lookup: a module's __getattr__ may import other modules.
            target = inspect.getattr_static(target, part)
        except AttributeError:
            return
    if not (isinstance(target, type) and issubclass(target, BaseException)):
        raise SecurityError(
            f"stored failure names {exc_module}.{exc_type}, which is not an exception class"
        )


def exception_from_dict(
    data: Any,
    traceback: str | None = None,
    known_exceptions: Iterable[type[BaseException]] = (),
) -> BaseException | None:
    """Rebuild an exception from its stored form without importing anything.

    :param data: the stored ``{exc_type, exc_message, exc_module}`` mapping (an
        exception instance, as stored by the pickle serializer, is returned as is).
    :param traceback: the stored traceback text, attached as ``remote_traceback``
        and as a note on the exception.
    :param known_exceptions: classes that may come back as themselves.
    :raises DecodeError: the mapping is malformed.
    :raises SecurityError: it names something that is not an exception class.
    """
    if data is None:
        return None
    if isinstance(data, BaseException):
        return data
    if not isinstance(data, dict):
        raise DecodeError(f"stored exception must be a mapping, not {type(data).__name__}")
    exc_type = data.get("exc_type")
    exc_module = data.get("exc_module") or "builtins"
    if not isinstance(exc_type, str) or not exc_type or not isinstance(exc_module, str):
        raise DecodeError("stored exception has no valid exc_type/exc_module")
    message = data.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)

    exc = _instantiate(exc_type, exc_module, args, known_exceptions)
    if traceback:
        try:
            exc.remote_traceback = traceback  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - slotted exception classes
            pass
        exc.add_note(f"Remote traceback:\n{traceback.rstrip()}")
    return exc


def _instantiate(
    exc_type: str,
    exc_module: str,
    args: tuple[Any, ...],
    known_exceptions: Iterable[type[BaseException]],
) -> BaseException:
    for cls in known_exceptions:
        if cls.__qualname__ == exc_type and cls.__module__ == exc_module:
            return _construct(cls, exc_type, exc_module, args)
    if exc_type == "TaskRevokedError" and exc_module == _REVOKED_MODULE:
        return TaskRevokedError(*args)
    if exc_module == "builtins" and "." not in exc_type:
        found = getattr(builtins, exc_type, None)
        # StopIteration and friends would be turned into RuntimeError by await.
        if (
            isinstance(found, type)
            and issubclass(found, Exception)
            and not issubclass(found, (StopIteration, StopAsyncIteration))
        ):
            return _construct(found, exc_type, exc_module, args)
    _refuse_non_exception(exc_type, exc_module)
    return _synthesize(exc_type, exc_module)(*args)


def _construct(
    cls: type[BaseException], exc_type: str, exc_module: str, args: tuple[Any, ...]
) -> BaseException:
    try:
        return cls(*args)
    except Exception:
        # Some constructors want other arguments (UnicodeDecodeError wants 5).
        return _synthesize(exc_type, exc_module)(*args)


# ---------------------------------------------------------------- codec


class Codec:
    """Encodes values to stored payloads and decodes them back.

    :param serializer: ``"json"`` (default), ``"msgpack"`` or ``"pickle"``.
    :param accept: serializers allowed on read; defaults to ``[serializer]``.
        Pickle payloads are refused unless this names ``"pickle"``.
    :param compression: ``None``, ``"zlib"``/``"gzip"``, ``"bzip2"`` or ``"lzma"``;
        compressed payloads are read whatever this says.
    :param max_value_size: largest encoded (or decompressed) payload in bytes.
    :param known_exceptions: exception classes that decode as themselves.
    """

    __slots__ = (
        "_format", "_json_read", "accept", "compression", "known_exceptions", "max_value_size",
    )  # fmt: skip

    def __init__(
        self,
        serializer: str = "json",
        *,
        accept: Sequence[str] | None = None,
        compression: str | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        known_exceptions: Iterable[type[BaseException]] = (),
    ) -> None:
        fmt = _FORMATS.get(serializer)
        if fmt is None:
            raise ConfigurationError(
                f"unknown serializer {serializer!r}; known: {', '.join(_FORMATS)}"
            )
        if accept is None and serializer == "pickle":
            raise ConfigurationError(
                "the pickle serializer must be named in accept too, e.g. accept=['pickle']: "
                "reading pickle runs code chosen by whoever wrote the payload"
            )
        accepted = tuple(accept) if accept is not None else (serializer,)
        for name in accepted:
            if name not in _FORMATS:
                raise ConfigurationError(
                    f"unknown serializer {name!r} in accept; known: {', '.join(_FORMATS)}"
                )
        if serializer not in accepted:
            raise ConfigurationError(
                f"serializer {serializer!r} is not in accept={list(accepted)!r}; "
                "the backend could not read its own results"
            )
        if serializer == "msgpack" or "msgpack" in accepted:
            _msgpack()
        if compression is not None and compression not in _COMPRESSORS:
            raise ConfigurationError(
                f"unknown compression {compression!r}; known: {', '.join(_COMPRESSORS)}"
            )
        if max_value_size <= 0:
            raise ConfigurationError("max_value_size must be positive")
        self._format = fmt
        self._json_read = "json" in accepted
        self.accept = accepted
        self.compression = compression
        self.max_value_size = max_value_size
        self.known_exceptions = tuple(known_exceptions)

    @property
    def serializer(self) -> str:
        """The name of the serializer used for writing."""
        return self._format.name

    @property
    def content_type(self) -> str:
        """The MIME type of the serializer used for writing."""
        return self._format.content_type

    def encode(self, value: Any) -> bytes:
        """Serialize (and compress, if configured) ``value``.

        :raises SerializationError: the value cannot be serialized.
        :raises ResultTooLarge: the payload exceeds ``max_value_size``.
        """
        try:
            payload = self._format.dumps(value)
        except AioResultsError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize {type(value).__name__} with {self.serializer}: {exc}"
            ) from exc
        if self.compression is not None:
            content_type, compress = _COMPRESSORS[self.compression]
            payload = b"".join(
                (COMPRESSED_MAGIC, content_type.encode(), b"\x00", compress(payload))
            )
        if len(payload) > self.max_value_size:
            raise ResultTooLarge(
                f"encoded value is {len(payload)} bytes; max_value_size is {self.max_value_size}"
            )
        return payload

    def decode(self, payload: bytes | bytearray | memoryview | str) -> Any:
        """Decompress and deserialize a stored payload.

        :raises ContentDisallowed: its serializer is not in ``accept``.
        :raises DecodeError: it is corrupt.
        """
        if type(payload) is bytes and payload[:1] == b"{" and self._json_read:
            # The common case, straight to the JSON reader (the checks below pass).
            if len(payload) > self.max_value_size:
                raise ResultTooLarge(
                    f"stored payload is {len(payload)} bytes; "
                    f"max_value_size is {self.max_value_size}"
                )
            try:
                text = payload.decode("utf-8")
                if '"__type__"' not in text:
                    # _json_loads, inlined: joins decode thousands of records.
                    try:
                        value, end = _scan_once(text, 0)
                    except StopIteration:
                        pass  # corrupt: the full path says how
                    else:
                        if end == len(text):
                            return value
                return _json_loads(payload)
            except AioResultsError:
                raise
            except Exception as exc:
                raise DecodeError(f"corrupt json payload: {exc}") from exc
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode("utf-8")
        else:
            data = bytes(payload)
        if len(data) > self.max_value_size:
            raise ResultTooLarge(
                f"stored payload is {len(data)} bytes; max_value_size is {self.max_value_size}"
            )
        if data.startswith(COMPRESSED_MAGIC):
            content_type, sep, body = data[len(COMPRESSED_MAGIC) :].partition(b"\x00")
            if not sep:
                raise DecodeError("truncated compressed payload")
            try:
                data = _decompress(content_type.decode("ascii"), body, self.max_value_size)
            except (zlib.error, OSError, lzma.LZMAError, EOFError, UnicodeDecodeError) as exc:
                raise DecodeError(f"corrupt compressed payload: {exc}") from exc
        kind = _sniff(data)
        if kind not in self.accept:
            raise ContentDisallowed(
                f"refusing to decode a {kind} payload: accept={list(self.accept)!r}"
                + (
                    "; unpickling runs code chosen by the writer, so pickle is only read "
                    "when accept names it"
                    if kind == "pickle"
                    else ""
                )
            )
        try:
            return _FORMATS[kind].loads(data)
        except AioResultsError:
            raise
        except Exception as exc:
            raise DecodeError(f"corrupt {kind} payload: {exc}") from exc

    def exception_from_dict(self, data: Any, traceback: str | None = None) -> BaseException | None:
        """Rebuild a stored exception; see :func:`exception_from_dict`."""
        return exception_from_dict(data, traceback, self.known_exceptions)
