"""What users install: the wheel and the sdist, built as a release builds them.

``python -m build`` makes both once per session. The wheel is installed with
uv into clean virtualenvs: with no extra (as ``pip install aioresults``), with
each extra alone, and with no extra at the lowest versions it declares on the
newest Python available. In each, a smoke program imports the package, runs
the quickstart on the embedded default store, and checks that every backend
either works or raises a ``MissingDependency`` naming its own extra. The sdist
must hold what its tests need: its tests run from the unpacked sdist.

These need PyPI (the dependencies are installed from it) and ``uv`` and
``build`` (requirements/dev.txt).
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Every extra, and the backend URL it serves (None: no backend of its own).
EXTRAS: dict[str, str | None] = {
    "redis": "redis://127.0.0.1:1/0",
    "azure": "azureblockblob://DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;"
    "BlobEndpoint=http://127.0.0.1:1/a",
    "postgres": "postgresql://127.0.0.1:1/results",
    "mysql": "mysql://127.0.0.1:1/results",
    "amqp": "rpc://guest:guest@127.0.0.1:1//",
    "nats": "nats://127.0.0.1:1",
    "memcached": "memcached://127.0.0.1:1/",
    "sqlite": None,
    "cli": None,
    "msgpack": None,
}
#: Extras that install nothing: their backends work on a bare install.
NO_DRIVER = {"memcached", "sqlite"}

# Run in the clean virtualenv (argv[1]: the installed extra, or "none"), in an
# empty directory, with AIORESULTS_URL unset.
SMOKE = r"""
import asyncio, importlib.util, json, subprocess, sys
from pathlib import Path

extra, extras = sys.argv[1], json.loads(sys.argv[2])
import aioresults as ar

# The package imports nothing it does not declare (sniffio used to be one).
package = Path(ar.__file__).parent
for source in package.rglob("*.py"):
    assert "import sniffio" not in source.read_text(), source

# The quickstart, on the embedded default store (SQLite: a core dependency).
async def quickstart():
    async with ar.connect() as backend:
        assert type(backend).__name__ == "SQLiteBackend", backend
        result = ar.AsyncResult("task-1", backend)
        await backend.mark_as_done("task-1", {"answer": 42})
        return await result
assert asyncio.run(quickstart()) == {"answer": 42}
assert Path("aioresults.db").is_file()

# Each backend works with its extra (or needs none), else names the extra.
for name, url in extras.items():
    if url is None:
        continue
    try:
        backend = ar.connect(url)
    except ar.MissingDependency as exc:
        assert name != extra and name not in NO_DRIVER, f"{name}: {exc}"
        assert f"pip install 'aioresults[{name}]'" in str(exc), str(exc)
    else:
        assert name == extra or name in NO_DRIVER, f"{name} needs no extra?"

# The optional serializer and the CLI's progress bar.
try:
    ar.connect("memory://", serializer="msgpack")
except ar.MissingDependency as exc:
    assert extra != "msgpack" and "pip install 'aioresults[msgpack]'" in str(exc), str(exc)
else:
    assert extra == "msgpack"
assert (importlib.util.find_spec("rich") is not None) == (extra == "cli")

# The command is installed, and looking at a directory creates no store there.
cli = Path(sys.executable).with_name("aioresults")
assert subprocess.run([cli, "--version"], capture_output=True).returncode == 0
Path("aioresults.db").unlink()
looked = subprocess.run([cli, "get", "x"], capture_output=True, text=True)
assert looked.returncode == 2 and "no store at" in looked.stderr, looked
assert not Path("aioresults.db").exists()
print("smoke ok")
""".replace("NO_DRIVER", repr(NO_DRIVER))


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


def uv(*args: str | Path) -> str:
    """Run uv; ``uv pip`` calls name their environment with ``--python``."""
    done = subprocess.run(
        [sys.executable, "-m", "uv", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The wheel and the sdist, built from this checkout by ``python -m build``."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--installer", "uv", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("aioresults-*.whl")
    (sdist,) = out.glob("aioresults-*.tar.gz")
    return Dist(wheel, sdist)


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def newest_python() -> str:
    """The newest supported CPython installed here (pyenv's too), else this one."""
    pyenv = shutil.which("pyenv")
    root = (
        subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        if pyenv
        else ""
    )
    for version in ("3.13", "3.12"):
        candidates = [shutil.which(f"python{version}")]
        if root:
            candidates += sorted(map(str, Path(root).glob(f"versions/{version}.*/bin/python3")))
        for candidate in filter(None, candidates):
            if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
                return candidate
    return sys.executable


def install(venv: Path, *requirements: str | Path, python: str = sys.executable) -> Path:
    uv("venv", "--quiet", "--python", python, venv)
    uv("pip", "install", "--quiet", "--python", venv / "bin" / "python", *requirements)
    return venv / "bin" / "python"


def smoke(python: Path, extra: str, cwd: Path) -> None:
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("AIORESULTS_URL", "PYTHONPATH")}
    done = subprocess.run(
        [python, "-c", SMOKE, extra, json.dumps(EXTRAS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith("smoke ok\n")


# ------------------------------------------------------------------ the wheel


def test_wheel_metadata(dist: Dist) -> None:
    meta = wheel_metadata(dist.wheel)
    requires = meta.get_all("Requires-Dist") or []
    core = sorted(r for r in requires if "extra ==" not in r)
    assert core == ["aiosqlite>=0.20", "anyio>=4.7", "typing-extensions>=4.12"], core
    assert set(meta.get_all("Provides-Extra") or []) == {*EXTRAS, "all"}  # no `dev` extra
    assert not [r for r in requires if "==" in r.split(";")[0]], "a pinned dependency"
    urls = dict(line.split(", ", 1) for line in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_bare_install_works(dist: Dist, tmp_path: Path) -> None:
    python = install(tmp_path / "venv", dist.wheel)
    # Not even installed: importing aioresults cannot need it.
    assert "sniffio" not in uv("pip", "list", "--python", python)
    smoke(python, "none", tmp_path / "run")
    # The typed user script runs too (it is also what mypy checks).
    done = subprocess.run(
        [python, ROOT / "tests" / "typing_user.py", tmp_path], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_alone(dist: Dist, tmp_path: Path, extra: str) -> None:
    python = install(tmp_path / "venv", f"aioresults[{extra}] @ {dist.wheel.as_uri()}")
    smoke(python, extra, tmp_path / "run")


def test_lowest_declared_versions_on_the_newest_python(dist: Dist, tmp_path: Path) -> None:
    # scripts/test-deps lowest covers the oldest Python; this is the other end.
    floors = [
        re.sub(r">=", "==", r)
        for r in wheel_metadata(dist.wheel).get_all("Requires-Dist") or []
        if "extra ==" not in r
    ]
    (tmp_path / "floors.txt").write_text("\n".join(floors) + "\n")
    python = install(
        tmp_path / "venv", dist.wheel, "-c", tmp_path / "floors.txt", python=newest_python()
    )
    smoke(python, "none", tmp_path / "run")
    done = subprocess.run(
        [python, ROOT / "tests" / "typing_user.py", tmp_path], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


# ------------------------------------------------------------------ the sdist


def repository_files() -> set[str]:
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {name for name in done.stdout.splitlines() if (ROOT / name).is_file()}


@pytest.fixture(scope="session")
def unpacked_sdist(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("sdist")
    with tarfile.open(dist.sdist) as archive:
        archive.extractall(out, filter="data")
    (root,) = out.iterdir()
    yield root


def test_sdist_holds_the_repository(unpacked_sdist: Path) -> None:
    shipped = {
        str(path.relative_to(unpacked_sdist))
        for path in unpacked_sdist.rglob("*")
        if path.is_file()
    }
    missing = repository_files() - shipped
    assert not missing, f"not in the sdist: {sorted(missing)[:20]}"
    for needed in ("examples/quickstart.py", "docs/web.md", "mkdocs.yml", ".ci/run"):
        assert needed in shipped


def test_sdist_tests_run_from_the_unpacked_sdist(unpacked_sdist: Path) -> None:
    # Everything collects (no test imports a file the sdist lacks), and the tests
    # that read the docs and run the examples pass from it, with its own package.
    env = {**os.environ, "PYTHONPATH": str(unpacked_sdist)}
    env.pop("AIORESULTS_URL", None)
    common = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collected = subprocess.run(
        [*common, "--collect-only"], cwd=unpacked_sdist, env=env, capture_output=True, text=True
    )
    assert collected.returncode == 0, collected.stdout[-3000:]
    done = subprocess.run(
        [
            *common,
            "tests/test_docs.py",
            "tests/test_exports.py",
            "tests/test_examples.py::test_quickstart_runs_on_the_embedded_default",
            "-k",
            "not celery",  # Celery's blocks start a Redis server: the full suite runs them
        ],
        cwd=unpacked_sdist,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:]
    assert (
        str(unpacked_sdist / "aioresults")
        in subprocess.run(
            [sys.executable, "-c", "import aioresults; print(aioresults.__file__)"],
            cwd=unpacked_sdist,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    )
