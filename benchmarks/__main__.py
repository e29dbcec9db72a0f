"""Run the benchmarks: ``python -m benchmarks [redis|sqlite|azure ...]``.

Each suite rewrites its own section of docs/benchmarks.md and prints it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

_ORDER = ["redis", "sqlite", "azure"]
#: One suite per ``benchmarks/<name>_bench.py``.
SUITES = sorted(
    (p.stem.removesuffix("_bench") for p in Path(__file__).parent.glob("*_bench.py")),
    key=lambda s: (_ORDER.index(s) if s in _ORDER else len(_ORDER), s),
)


def chosen(argv: Sequence[str] | None = None) -> list[str]:
    """The suites a command line names, in run order: every suite if none."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    # No `choices=`: argparse checks an empty `nargs="*"` list against them and
    # refuses it, so a run with no suite named (every suite) would fail.
    parser.add_argument("suites", nargs="*", metavar="suite", help=", ".join(SUITES))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)} (choose from {', '.join(SUITES)})")
    return [s for s in SUITES if s in args.suites] or list(SUITES)


def main() -> None:
    for suite in chosen():
        module = importlib.import_module(f"benchmarks.{suite}_bench")
        module.main()


if __name__ == "__main__":
    main()
