"""The front door: ``aioresults.__all__`` is sorted and complete."""

from __future__ import annotations

import types

import aioresults as ar


def test_all_is_sorted_and_complete() -> None:
    assert ar.__all__ == sorted(ar.__all__, key=lambda n: (not n.isupper(), n))
    public = {
        name
        for name, value in vars(ar).items()
        if not name.startswith("_")
        and name != "annotations"
        and not (isinstance(value, types.ModuleType) and name != "states")
    }
    assert set(ar.__all__) == public


def test_import_needs_no_extra() -> None:
    import sys

    for driver in ("redis", "aiosqlite", "azure.storage.blob"):
        assert not any(
            m == driver or m.startswith(driver + ".") for m in _modules_imported_by("aioresults")
        ), driver
    assert "aioresults" in sys.modules


def _modules_imported_by(module: str) -> set[str]:
    import subprocess
    import sys

    code = f"import sys; import {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())
