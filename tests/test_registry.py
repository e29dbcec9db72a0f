"""connect(), the scheme table, register_backend() and credential redaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import aioresults as ar
from aioresults import _registry
from aioresults.backends.base import redact_url
from aioresults.backends.memory import MemoryBackend


@pytest.fixture(autouse=True)
def scheme_table() -> Iterator[None]:
    """Schemes a test registers are gone after it (other tests list every scheme)."""
    schemes, loaded = dict(_registry._SCHEMES), dict(_registry._loaded)
    yield
    _registry._SCHEMES.clear()
    _registry._SCHEMES.update(schemes)
    _registry._loaded.clear()
    _registry._loaded.update(loaded)


async def test_connect_memory_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = ar.connect("memory://")
    assert isinstance(backend, MemoryBackend)
    monkeypatch.setenv("AIORESULTS_URL", "memory://from-env")
    from_env = ar.connect()
    assert isinstance(from_env, MemoryBackend) and from_env.name == "from-env"
    await backend.aclose()
    await from_env.aclose()


def test_default_url_is_embedded_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AIORESULTS_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert ar.DEFAULT_URL == "sqlite:///aioresults.db"
    backend = ar.connect()
    assert type(backend).__name__ == "SQLiteBackend"


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(ar.UnknownBackend) as caught:
        ar.connect("mongodb://localhost")
    message = str(caught.value)
    for scheme in (
        "memory",
        "file",
        "sqlite",
        "db+sqlite",
        "redis",
        "rediss",
        "redis+socket",
        "sentinel",
        "azureblockblob",
    ):
        assert scheme in message
    assert isinstance(caught.value, ValueError)


def test_not_a_url() -> None:
    with pytest.raises(ar.ConfigurationError):
        ar.connect("localhost:6379")


def test_missing_driver_names_the_install_command() -> None:
    ar.register_backend(
        "brokenstore", "aioresults.backends.no_such_driver:Backend", extra="brokenstore"
    )
    with pytest.raises(ar.MissingDependency) as caught:
        ar.connect("brokenstore://x")
    assert "pip install 'aioresults[brokenstore]'" in str(caught.value)
    assert isinstance(caught.value, ImportError)


async def test_register_backend_class() -> None:
    class Custom(MemoryBackend):
        pass

    ar.register_backend("custom", Custom)
    backend = ar.connect("custom://name")
    assert type(backend) is Custom
    with pytest.raises(ar.ConfigurationError):
        ar.register_backend("bad://", Custom)
    assert "custom" in ar.known_schemes()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://:s3cret@localhost:6379/0", "s3cret"),
        ("redis://user:s3cret@localhost/0", "s3cret"),
        ("sentinel://:s3cret@h1:26379;sentinel://:s3cret@h2:26379", "s3cret"),
        (
            "azureblockblob://DefaultEndpointsProtocol=https;AccountName=a;AccountKey=s3cret==;"
            "EndpointSuffix=core.windows.net",
            "s3cret",
        ),
        (
            "azureblockblob://BlobEndpoint=https://a/;SharedAccessSignature=sv=1&sig=s3cret",
            "s3cret",
        ),
    ],
)
def test_credentials_are_redacted(url: str, secret: str) -> None:
    redacted = redact_url(url)
    assert redacted is not None and secret not in redacted and "***" in redacted


async def test_repr_and_logs_hide_credentials(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend(url="memory://user:s3cret@name")
    caplog.set_level(logging.DEBUG)
    logging.getLogger("aioresults").debug("using %r", backend)
    assert "s3cret" not in repr(backend)
    assert "s3cret" not in caplog.text
