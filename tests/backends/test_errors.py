"""Every driver error a backend catches becomes an error of the aioresults tree.

Each backend translates its driver's errors through one table
(``aioresults.backends._support.ErrorTable``). This walks the table of every
registered backend: each exception type it catches, raised with a plain
message, must come out as an :class:`~aioresults.AioResultsError`, chained to
the original, with no secret of the URL in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import aioresults as ar
from aioresults import _registry
from aioresults.backends._support import ErrorTable

SECRET = "s3cr3t-value"


def example_urls(tmp_path: Path) -> dict[str, str]:
    """A URL per scheme (nothing is connected: only the tables are read)."""
    azure = (
        f"azureblockblob://DefaultEndpointsProtocol=http;AccountName=a;AccountKey={SECRET};"
        "BlobEndpoint=http://127.0.0.1:1/a;"
    )
    return {
        "memory": "memory://",
        "file": f"file://{tmp_path}/results",
        "sqlite": f"sqlite:///{tmp_path}/results.db",
        "db+sqlite": f"db+sqlite:///{tmp_path}/results.db",
        "redis": f"redis://:{SECRET}@127.0.0.1:1/0",
        "rediss": f"rediss://:{SECRET}@127.0.0.1:1/0",
        "redis+socket": f"redis+socket://{tmp_path}/redis.sock",
        "sentinel": f"sentinel://:{SECRET}@127.0.0.1:1/0?master_name=m",
        "azureblockblob": azure,
        "postgresql": f"postgresql://user:{SECRET}@127.0.0.1:1/results",
        "postgres": f"postgres://user:{SECRET}@127.0.0.1:1/results",
        "db+postgresql": f"db+postgresql://user:{SECRET}@127.0.0.1:1/results",
        "mysql": f"mysql://user:{SECRET}@127.0.0.1:1/results",
        "mariadb": f"mariadb://user:{SECRET}@127.0.0.1:1/results",
        "db+mysql": f"db+mysql+pymysql://user:{SECRET}@127.0.0.1:1/results",
        "db+mariadb": f"db+mariadb://user:{SECRET}@127.0.0.1:1/results",
        "rpc": f"rpc://user:{SECRET}@127.0.0.1:1/",
        "memcached": "memcached://127.0.0.1:1/",
        "cache+memcached": "cache+memcached://127.0.0.1:1;127.0.0.1:2/",
        "nats": f"nats://user:{SECRET}@127.0.0.1:1",
    }


# Drivers echo URLs and connection strings in their messages.
MESSAGE = f"boom at redis://user:{SECRET}@host/0 with AccountKey={SECRET};"


def instance(cls: type[BaseException]) -> BaseException:
    """An instance of a driver exception type, whatever its constructor wants."""
    for args, kwargs in (((MESSAGE,), {}), ((), {"message": MESSAGE}), ((), {})):
        try:
            return cls(*args, **kwargs)
        except Exception:
            continue
    exc = cls.__new__(cls)
    BaseException.__init__(exc, MESSAGE)
    return exc


def builtin_schemes() -> list[str]:
    """The schemes aioresults' own backends serve (tests may register others)."""
    return sorted(
        scheme
        for scheme, (target, _) in _registry._SCHEMES.items()
        if target.startswith("aioresults.backends.")
    )


def tables(tmp_path: Path) -> list[tuple[str, ErrorTable]]:
    urls = example_urls(tmp_path)
    missing = set(builtin_schemes()) - set(urls)
    assert not missing, f"add an example URL for {missing} to this test"
    found = []
    for scheme in builtin_schemes():
        backend = ar.connect(urls[scheme])
        table = getattr(backend, "_errors", None)
        if table is not None:
            found.append((scheme, table))
    return found


def test_every_registered_backend_has_an_error_table(tmp_path: Path) -> None:
    with_table = {scheme for scheme, _ in tables(tmp_path)}
    # The memory backend has no driver: nothing to translate.
    assert with_table == set(builtin_schemes()) - {"memory"}


@pytest.mark.parametrize("scheme", sorted(set(example_urls(Path("/tmp"))) - {"memory"}))
def test_every_caught_driver_error_maps_to_the_tree(scheme: str, tmp_path: Path) -> None:
    table = dict(tables(tmp_path))[scheme]
    assert table.catches
    for cls in table.catches:
        original = instance(cls)
        with pytest.raises(ar.AioResultsError) as caught:
            with table.translating("testing"):
                raise original
        error: Any = caught.value
        assert error.__cause__ is original
        assert str(error).startswith("testing: ")
        assert SECRET not in str(error), str(error)
