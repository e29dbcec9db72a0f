"""Codecs and exception encoding, checked against kombu's and Celery's own code."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import pickle
import uuid
import zlib
from typing import Any

import pytest
from celery.backends.base import compress_payload, decompress_payload
from kombu.utils import json as kombu_json

import aioresults as ar
from aioresults import Codec, exception_from_dict, exception_to_dict

TYPED: dict[str, Any] = {
    "when": dt.datetime(2026, 11, 21, 9, 31, 47, 941024, tzinfo=dt.UTC),
    "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
    "day": dt.date(2026, 11, 21),
    "at": dt.time(9, 31, 47, 5),
    "id": uuid.UUID("0560e8f4-2d0a-4b46-9d1b-2d1a6d1f3c11"),
    "price": decimal.Decimal("1.10"),
    "text": b"utf8 \xc3\xa9",
    "binary": b"\xff\x00\xfe",
    "nested": [{"a": None, "b": True, "c": 1.5}],
}


def test_json_matches_kombu_in_both_directions() -> None:
    codec = Codec()
    ours = codec.encode(TYPED)
    assert json.loads(ours) == json.loads(kombu_json.dumps(TYPED))
    assert kombu_json.loads(ours) == TYPED
    assert codec.decode(kombu_json.dumps(TYPED).encode()) == TYPED


def test_json_rejects_sets_and_objects() -> None:
    with pytest.raises(ar.SerializationError, match="set"):
        Codec().encode({"s": {1, 2}})
    with pytest.raises(ar.SerializationError, match="object"):
        Codec().encode(object())


@pytest.mark.parametrize("method", ["zlib", "gzip", "bzip2", "lzma"])
def test_compression_prefix_is_celerys(method: str) -> None:
    codec = Codec(compression=method)
    payload = codec.encode({"big": "x" * 5000})
    assert payload.startswith(b"\x00celery-compressed\x00")
    assert len(payload) < 1000
    assert json.loads(decompress_payload(payload)) == {"big": "x" * 5000}
    celery_payload = compress_payload(kombu_json.dumps({"n": 1}).encode(), method)
    assert Codec().decode(celery_payload) == {"n": 1}


def test_decompression_bomb_is_refused() -> None:
    body = zlib.compress(b"[" + b"0," * 1_000_000 + b"0]")
    payload = b"\x00celery-compressed\x00application/x-gzip\x00" + body
    with pytest.raises(ar.ResultTooLarge):
        Codec(max_value_size=100_000).decode(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"\xff\xfe\xfd",
        b"",
        b'{"__type__": "evil", "__value__": 1}',
        b'{"__type__": "uuid", "__value__": {"hex": "nope"}}',
        b"\x00celery-compressed\x00application/x-gzip",
        b"\x00celery-compressed\x00application/x-gzip\x00not zlib",
        b"\x00celery-compressed\x00application/x-unknown\x00abc",
    ],
)
def test_corrupt_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(ar.DecodeError):
        Codec().decode(payload)


class Boom:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


def test_pickle_is_refused_unless_accepted() -> None:
    hostile = pickle.dumps(Boom())
    with pytest.raises(ar.ContentDisallowed, match="pickle"):
        Codec().decode(hostile)
    with pytest.raises(ar.ContentDisallowed):
        Codec("json", accept=["json", "msgpack"]).decode(pickle.dumps({"a": 1}))
    trusting = Codec("json", accept=["json", "pickle"])
    assert trusting.decode(pickle.dumps({"a": 1})) == {"a": 1}
    assert Codec("pickle", accept=["pickle"]).decode(
        Codec("pickle", accept=["pickle"]).encode({"t": (1, 2)})
    ) == {"t": (1, 2)}


def test_msgpack_round_trip_and_accept() -> None:
    codec = Codec("msgpack")
    assert codec.decode(codec.encode(TYPED)) == TYPED
    with pytest.raises(ar.ContentDisallowed):
        Codec().decode(codec.encode({"a": 1}))
    assert Codec("json", accept=["json", "msgpack"]).decode(codec.encode({"a": 1})) == {"a": 1}


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ar.ConfigurationError, match="known: json, msgpack, pickle"):
        Codec("yaml")
    with pytest.raises(ar.ConfigurationError, match="named in accept"):
        Codec("pickle")
    with pytest.raises(ar.ConfigurationError, match="could not read its own"):
        Codec("msgpack", accept=["json"])
    with pytest.raises(ar.ConfigurationError, match="unknown serializer"):
        Codec(accept=["json", "xml"])
    with pytest.raises(ar.ConfigurationError, match="compression"):
        Codec(compression="snappy")


# ------------------------------------------------------------------ exceptions


class AppError(Exception):
    pass


def test_builtin_exception_round_trip_matches_celery() -> None:
    stored = exception_to_dict(ValueError("bad", 42))
    assert stored == {
        "exc_type": "ValueError",
        "exc_message": ["bad", 42],
        "exc_module": "builtins",
    }
    back = exception_from_dict(stored, traceback="Traceback (most recent call last):\n  x\n")
    assert type(back) is ValueError and back.args == ("bad", 42)
    assert back.remote_traceback.startswith("Traceback")  # type: ignore[union-attr]
    assert any("Remote traceback" in note for note in back.__notes__)  # type: ignore[union-attr]


def test_unserializable_arguments_are_stored_as_repr() -> None:
    stored = exception_to_dict(KeyError(object))
    assert stored["exc_message"] == [repr(object)]


def test_unknown_type_is_synthesized_never_imported() -> None:
    data = {"exc_type": "Outer.InnerError", "exc_message": ["x"], "exc_module": "not_a_module_xyz"}
    exc = exception_from_dict(data)
    assert isinstance(exc, ar.RemoteTaskError)
    assert (exc.remote_type, exc.remote_module, exc.args) == (
        "Outer.InnerError",
        "not_a_module_xyz",
        ("x",),
    )
    assert type(exc).__name__ == "InnerError"
    assert type(exception_from_dict(data)) is type(exc)
    import sys

    assert "not_a_module_xyz" not in sys.modules
    assert exception_to_dict(exc) == {**data, "exc_message": ["x"]}


def test_imported_application_exception_is_not_instantiated() -> None:
    exc = exception_from_dict(exception_to_dict(AppError("a")))
    assert isinstance(exc, ar.RemoteTaskError) and not isinstance(exc, AppError)
    allowed = exception_from_dict(exception_to_dict(AppError("a")), known_exceptions=[AppError])
    assert type(allowed) is AppError and allowed.args == ("a",)


@pytest.mark.parametrize(
    ("exc_type", "exc_module"),
    [
        ("system", "os"),
        ("print", "builtins"),
        ("object", "builtins"),
        ("loads", "pickle"),
        ("path.join", "os"),
    ],
)
def test_non_exception_types_are_refused(exc_type: str, exc_module: str) -> None:
    with pytest.raises(ar.SecurityError, match="not an exception"):
        exception_from_dict(
            {"exc_type": exc_type, "exc_message": ["echo pwned"], "exc_module": exc_module}
        )


def test_base_exceptions_are_not_raised_as_themselves() -> None:
    for name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        exc = exception_from_dict({"exc_type": name, "exc_message": [1], "exc_module": "builtins"})
        assert isinstance(exc, ar.RemoteTaskError) and exc.remote_type == name


def test_constructor_mismatch_is_synthesized() -> None:
    exc = exception_from_dict(
        {"exc_type": "UnicodeDecodeError", "exc_message": ["only one"], "exc_module": "builtins"}
    )
    assert isinstance(exc, ar.RemoteTaskError) and exc.args == ("only one",)


@pytest.mark.parametrize(
    "data",
    ["a string", 42, {"exc_message": ["x"]}, {"exc_type": 5}, {"exc_type": ""}],
)
def test_malformed_exception_dicts(data: Any) -> None:
    with pytest.raises(ar.DecodeError):
        exception_from_dict(data)


def test_revoked_uses_celerys_type_and_celery_reads_ours() -> None:
    from celery import Celery
    from celery.exceptions import TaskRevokedError as CeleryRevoked

    stored = exception_to_dict(ar.TaskRevokedError("terminated"))
    assert stored == {
        "exc_type": "TaskRevokedError",
        "exc_message": ["terminated"],
        "exc_module": "celery.exceptions",
    }
    assert isinstance(exception_from_dict(stored), ar.TaskRevokedError)
    app = Celery(broker="memory://", backend="cache+memory://")
    try:
        assert isinstance(app.backend.exception_to_python(stored), CeleryRevoked)
        celery_value = app.backend.exception_to_python(exception_to_dict(ValueError("v", 1)))
        assert type(celery_value) is ValueError and celery_value.args == ("v", 1)
        celery_form = app.backend.prepare_exception(ValueError("v", 1))
        assert exception_to_dict(ValueError("v", 1)) == json.loads(json.dumps(celery_form))
    finally:
        app.close()


def test_decoding_never_imports_through_module_getattr() -> None:
    import subprocess
    import sys

    code = (
        "import sys, concurrent.futures as cf\n"
        "from aioresults import exception_from_dict\n"
        "exc = exception_from_dict({'exc_type': 'ProcessPoolExecutor', 'exc_message': [],"
        " 'exc_module': 'concurrent.futures'})\n"
        "print(type(exc).__name__, 'concurrent.futures.process' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ProcessPoolExecutor", "False"]


def test_stop_iteration_is_not_rebuilt_as_itself() -> None:
    for name in ("StopIteration", "StopAsyncIteration"):
        exc = exception_from_dict({"exc_type": name, "exc_message": [1], "exc_module": "builtins"})
        assert isinstance(exc, ar.RemoteTaskError) and exc.remote_type == name


class Money:
    """A type of the application's own, registered with kombu and with aioresults."""

    def __init__(self, amount: str, currency: str) -> None:
        self.amount, self.currency = amount, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.amount, self.currency) == (
            other.amount,
            other.currency,
        )

    __hash__ = None  # type: ignore[assignment]


def _money_in() -> Any:
    return lambda m: {"amount": m.amount, "currency": m.currency}


def _money_out() -> Any:
    return lambda v: Money(v["amount"], v["currency"])


async def test_custom_json_types_round_trip_with_kombu_and_fail_alone() -> None:
    from aioresults.backends.memory import MemoryBackend

    value = {"price": Money("9.99", "EUR")}
    celery_payload = None
    backend = MemoryBackend()
    try:
        # The writer (Celery) registered a type the reader does not know yet.
        kombu_json.register_type(Money, "money-test", _money_in(), _money_out())
        celery_payload = kombu_json.dumps(
            {"status": "SUCCESS", "result": value, "task_id": "m"}
        ).encode()
        await backend._ensure_open()
        await backend._set(backend.task_key("m"), celery_payload, None)
        await backend.mark_as_done("plain", 1)
        with pytest.raises(ar.DecodeError, match="money-test.*register_type"):
            await backend.get_meta("m")
        assert (await backend.get_meta("plain")).result == 1  # only that record fails
        # Registered with the same arguments as kombu's: both directions work.
        ar.register_type(Money, "money-test", _money_in(), _money_out())
        assert (await backend.get_meta("m")).result == value
        ours = Codec().encode({"price": Money("1.00", "USD")})
        assert kombu_json.loads(ours) == {"price": Money("1.00", "USD")}
        assert json.loads(ours)["price"] == {
            "__type__": "money-test",
            "__value__": {"amount": "1.00", "currency": "USD"},
        }
    finally:
        await backend.aclose()
        kombu_json._encoders.pop(Money, None)
        kombu_json._decoders.pop("money-test", None)
        from aioresults import _json

        _json._CUSTOM_ENCODERS.pop(Money, None)
        _json._TAG_DECODERS.pop("money-test", None)
