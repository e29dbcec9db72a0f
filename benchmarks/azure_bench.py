"""The Azure Block Blob backend on a private Azurite: overhead, polling load, wake
latency, each for this checkout and for the code before the backend refactor.

Usage: ``python -m benchmarks.azure_bench`` (from the repository root). Prints:

* store and read time per call, next to the same call made with the SDK alone
  (the two alternate call by call, so a busy machine slows both alike);
* HTTP requests per second, second by second, while 1,000 waiters wait (their
  results missing, then present but not ready), with and without listings;
* how long a waiter takes to wake after a result is stored, at default
  settings, after quiet waits of several lengths.

Each aioresults runs in a process of its own (``benchmarks/_azure_subject.py``),
this checkout's and the older one's in turn, on the same Azurite.

Azurite is an emulator: its absolute speeds say little about Azure itself; the
request counts and the latency, which the poller's schedule sets, carry over.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks._common import machine, spread, version, write_section
from benchmarks.sqlite_bench import run_child, source_trees
from tests.azurite import AZURITE_VERSION, Azurite

#: The code before the backend refactor, for the "before" figures.
BEFORE = "0b6ff84"
ROUNDS = 3
CALLS = 300
WAITERS = 1000
SECONDS = 8
QUIET = (0.0, 1.0, 4.0)
SUBJECT = (Path(__file__).parent / "_azure_subject.py").read_text()


def measure(tree: Path | None, **spec: Any) -> dict[str, Any]:
    """One measurement in a child importing aioresults from ``tree`` (None: this checkout)."""
    figures: dict[str, Any] = json.loads(run_child(SUBJECT, [json.dumps(spec)], tree))
    return figures


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def run(server: Azurite, old: Path | None) -> list[str]:
    conn = server.connection_string()
    versions: dict[str, Path | None] = {"now": None}
    if old is not None:
        versions[BEFORE] = old
    names = {"now": f"aioresults {version('aioresults')}", BEFORE: f"aioresults {BEFORE}"}
    lines = [
        f"\n### Overhead per call (median of {CALLS} per round, {ROUNDS} rounds, one at a time)\n"
    ]
    rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
    for r in range(ROUNDS):
        order = list(versions) if r % 2 == 0 else list(reversed(versions))
        for v in order:
            container = f"bench-overhead-{r}-{v}".lower()
            rounds[v].append(
                measure(
                    versions[v], measure="overhead", conn=conn, container=container, calls=CALLS
                )
            )
    lines.append("| call | aioresults | SDK alone (same rounds) | aioresults / SDK | requests |")
    lines.append("|---|---|---|---|---|")
    for call, requests in (("store", "one PUT, If-None-Match: *"), ("read", "GET")):
        for v in versions:
            ours = [f[call] for f in rounds[v]]
            sdk = [f[f"sdk {call}"] for f in rounds[v]]
            ratio = [o / s for o, s in zip(ours, sdk, strict=True)]
            lines.append(
                f"| {call}: {names[v]} | {ms(statistics.median(ours))} "
                f"| {ms(statistics.median(sdk))} | {spread(ratio)}× | {requests} |"
            )
    if old is not None:
        lines.append("")
        for call in ("store", "read"):
            now = [f[call] / f[f"sdk {call}"] for f in rounds["now"]]
            then = [f[call] / f[f"sdk {call}"] for f in rounds[BEFORE]]
            ratio = [a / b for a, b in zip(now, then, strict=True)]
            lines.append(
                f"- {call}, now / {BEFORE} (each against its own SDK calls): {spread(ratio)}×"
            )

    lines.append(
        f"\n### HTTP requests per second while {WAITERS} waiters wait (default intervals)\n"
    )
    lines.append("| their results | reads | code | requests in each second | poll rounds |")
    lines.append("|---|---|---|---|---|")
    for present in (False, True):
        for threshold in (16, 0):
            for v in versions:
                container = f"bench-poll-{int(present)}-{threshold}-{v}".lower()
                figures = measure(
                    versions[v], measure="polling", conn=conn, container=container,
                    waiters=WAITERS, present=present, list_threshold=threshold, seconds=SECONDS,
                )  # fmt: skip
                what = "STARTED (present, unchanged)" if present else "missing"
                how = "listing" if threshold else "conditional GETs only"
                rates = " ".join(map(str, figures["rates"]))
                counted = "n/a" if figures["rounds"] is None else figures["rounds"]
                lines.append(f"| {what} | {how} | {names[v]} | {rates} | {counted} |")
    lines.append(
        "\nThe poller's schedule is the same in both: a round reads every watched id "
        "(one listing, or one conditional GET each), then waits from 0.05 s, doubling "
        "to 2 s while nothing changes. Without listings, the requests in a second "
        "depend on how fast Azurite answers a round of 1,000 GETs (32 at a time); "
        f"the poll rounds column counts the rounds in those {SECONDS} s (the older code "
        "does not count them). The older code does not tell when the waiters' first "
        "reads are done either: its window starts 1 s after they register, and with "
        "results present its first reads (one GET each) still fill the first seconds."
    )
    lines.append("\n### Wake latency at default settings (5 samples each)\n")
    lines.append("| quiet wait before the store | code | median | max |")
    lines.append("|---|---|---|---|")
    woken = {
        v: measure(
            versions[v],
            measure="wake",
            conn=conn,
            container=f"bench-latency-{v}".lower(),
            quiet=list(QUIET),
            samples=5,
        )["latencies"]  # fmt: skip
        for v in versions
    }
    for quiet in QUIET:
        for v in versions:
            found = woken[v][str(quiet)]
            lines.append(
                f"| {quiet:.0f} s | {names[v]} | {statistics.median(found) * 1e3:.0f} ms "
                f"| {max(found) * 1e3:.0f} ms |"
            )
    return lines


def main() -> None:
    """Run every measurement, print the results and write them to docs/benchmarks.md."""
    with Azurite() as server, source_trees([BEFORE]) as trees:
        lines = run(server, trees.get(BEFORE))
    missing = (
        "" if trees.get(BEFORE) else f" (commit {BEFORE} was not available: no before figures)"
    )
    body = "\n".join(
        [
            "## Azure Block Blob",
            "",
            f"Machine: {machine()}. Azurite {AZURITE_VERSION} on loopback, private; "
            f"azure-storage-blob {version('azure-storage-blob')}. "
            f"Run: `scripts/bench azure`. Before: commit `{BEFORE}`, before the backend "
            f"refactor, in the same run{missing}.",
            *lines,
        ]
    )
    write_section("azure", body)
    print(body)


if __name__ == "__main__":
    main()
