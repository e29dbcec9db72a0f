"""Codecs for stored payloads.

JSON is the default and speaks kombu's dialect (:mod:`._json`), so Celery reads
what aioresults writes and the reverse. msgpack is optional. Pickle is refused
unless the backend's ``accept`` names it. Celery's compression prefix
(``b"\\x00celery-compressed\\x00" + content type + b"\\x00" + body``) is always
recognised on read and written when ``compression`` is set. Exceptions go to
and from their stored form in :mod:`._failures`.
"""

from __future__ import annotations

import bz2
import lzma
import pickle
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
    ResultTooLarge,
    SerializationError,
)
from ._failures import exception_from_dict, exception_to_dict
from ._json import (
    _json_default,
    _json_dumps,
    _json_loads,
    _json_object_hook,
    _scan_once,
    register_type,
)

__all__ = ["Codec", "exception_from_dict", "exception_to_dict", "register_type"]

COMPRESSED_MAGIC = b"\x00celery-compressed\x00"
DEFAULT_MAX_VALUE_SIZE = 512 * 1024 * 1024

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
