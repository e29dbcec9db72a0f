"""Print the installed version of each dependency aioresults declares (every extra).

``python scripts/_dependency_versions.py lowest`` also fails unless each one is
exactly its declared lower bound: the check that the lowest-versions CI job
tests what ``pyproject.toml`` promises. ``newest`` only prints them.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def main(which: str) -> int:
    rows: dict[str, tuple[str, str]] = {}
    for line in metadata.requires("aioresults") or []:
        requirement = Requirement(line)
        if requirement.name == "aioresults":  # the `all` extra names the others
            continue
        bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        rows[requirement.name] = (bounds[0] if bounds else "", metadata.version(requirement.name))
    wrong = []
    print(f"{'dependency':<22}{'declared':<12}installed")
    for name, (lower, installed) in sorted(rows.items()):
        print(f"{name:<22}{'>=' + lower if lower else '':<12}{installed}")
        if which == "lowest" and (not lower or Version(installed) != Version(lower)):
            wrong.append(name)
    if wrong:
        print(f"not at the declared lower bound: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "newest"))
