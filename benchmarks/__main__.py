"""Run the benchmarks: ``python -m benchmarks [redis|sqlite|azure ...]``.

Each suite rewrites its own section of docs/benchmarks.md and prints it.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

_ORDER = ["redis", "sqlite", "azure"]
#: One suite per ``benchmarks/<name>_bench.py``.
SUITES = sorted(
    (p.stem.removesuffix("_bench") for p in Path(__file__).parent.glob("*_bench.py")),
    key=lambda s: (_ORDER.index(s) if s in _ORDER else len(_ORDER), s),
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="*", choices=SUITES, default=[])
    args = parser.parse_args()
    for suite in args.suites or SUITES:
        module = importlib.import_module(f"benchmarks.{suite}_bench")
        module.main()


if __name__ == "__main__":
    main()
