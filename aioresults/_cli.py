"""The ``aioresults`` command: read, wait for, watch and delete stored results.

::

    aioresults [--url URL] [--json] get ID
    aioresults [--url URL] [--json] wait ID [--timeout S]
    aioresults [--url URL] [--json] watch ID [--timeout S]
    aioresults [--url URL] [--json] group ID [--timeout S]
    aioresults [--url URL] [--json] forget [--group] ID [ID ...]
    aioresults [--url URL] [--json] cleanup

The store is ``--url``, else ``AIORESULTS_URL``, else the library default
(``sqlite:///aioresults.db``). The command never creates a store: it opens it
with ``create=False``, so a mistyped path or an empty directory is an error
(exit 2, "no store at ...") instead of a new, empty store that answers PENDING.

Exit codes: 0 success, 1 a task failed (FAILURE or REVOKED), 2 usage error or
no store there, 3 timeout, 4 the store is unreachable or failed. A timeout (3)
means the store answered and the result was not ready in time: ``wait``,
``watch`` and ``group`` read the store first (within ``--timeout``), and read it
again when the timeout runs out, so a store that cannot be reached is 4 even
though the wait itself only reconnects until its deadline.

With ``rich`` installed (``pip install 'aioresults[cli]'``) and a terminal,
``group`` draws a live progress bar.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Sequence
from contextlib import aclosing
from typing import Any, TextIO, TypeVar

from . import __version__, states
from ._exceptions import (
    AioResultsError,
    BackendError,
    ConfigurationError,
    InvalidTaskId,
    MissingDependency,
    ResultTimeout,
    SerializationError,
    StoreNotFound,
)
from ._group import GroupResult
from ._meta import ResultMeta
from ._registry import DEFAULT_URL, connect
from ._result import AsyncResult
from .backends.base import BaseBackend

T = TypeVar("T")

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "main",
]

#: The command did what was asked and no task it reports on failed.
EXIT_OK = 0
#: A task (or a member of a group) is FAILURE or REVOKED.
EXIT_FAILED = 1
#: Bad arguments, URL, option or id; no store at that URL; or no saved group with that id.
EXIT_USAGE = 2
#: ``--timeout`` ran out before the result was ready.
EXIT_TIMEOUT = 3
#: The store cannot be reached, failed, or holds a payload that cannot be read.
EXIT_UNAVAILABLE = 4

#: How long the read at the end of a timed-out wait may take: a store that does
#: not answer by then is reported unreachable (4) rather than not ready (3).
_CONFIRM_SECONDS = 2.0


class _UsageError(Exception):
    """A request that names nothing (e.g. a group that was never saved)."""


class _Unreachable(Exception):
    """The store did not answer in time (a read was still waiting on it)."""


class _Clock:
    """The ``--timeout`` of a command, counted from its start."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout

    def remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def reach(self, backend: BaseBackend, read: Awaitable[T]) -> T:
        """The first read of a wait: the store must answer before the deadline.

        A store that cannot be reached raises its BackendUnavailable (exit 4)
        when the driver gives up first, or :class:`_Unreachable` at the deadline.
        """
        remaining = self.remaining()
        if remaining is None or self.timeout == 0:
            return await read  # no deadline, or "check once": the driver's own limits
        try:
            async with asyncio.timeout(remaining):
                return await read
        except TimeoutError:
            raise _Unreachable(
                f"cannot reach {backend!r}: no answer within {self.timeout:g} s"
            ) from None

    async def confirm(self, backend: BaseBackend, task_ids: Sequence[str]) -> None:
        """After a wait timed out: make sure the store still answers.

        The hub keeps reconnecting to a lost store until the deadline, so a
        timeout alone does not say whether the result is ready; the store is
        read once more, and one that does not answer is unreachable (exit 4).
        """
        try:
            async with asyncio.timeout(_CONFIRM_SECONDS):
                await backend.get_many(list(task_ids))
        except TimeoutError:
            raise _Unreachable(
                f"cannot reach {backend!r}: no answer when the timeout of "
                f"{self.timeout:g} s ran out"
            ) from None


# ------------------------------------------------------------------ output


def _jsonable(meta: ResultMeta) -> dict[str, Any]:
    data = meta.to_dict()
    data["ready"] = meta.ready
    return data


def _emit_json(data: Any, out: TextIO) -> None:
    # default=str: kombu-tagged values (datetime, Decimal, UUID, bytes) print as text.
    out.write(json.dumps(data, default=str) + "\n")
    out.flush()


def _show_value(value: Any) -> str:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _print_meta(meta: ResultMeta, out: TextIO) -> None:
    rows = [("task", meta.task_id), ("state", meta.status), ("result", _show_value(meta.result))]
    for name in ("date_done", "name", "worker", "group_id"):
        value = getattr(meta, name)
        if value is not None:
            rows.append((name, value.isoformat() if name == "date_done" else str(value)))
    for label, value in rows:
        out.write(f"{label + ':':<11}{value}\n")
    if meta.traceback:
        out.write("traceback:\n" + "".join(f"  {line}\n" for line in meta.traceback.splitlines()))
    out.flush()


def _report(meta: ResultMeta, args: argparse.Namespace, out: TextIO) -> int:
    if args.json:
        _emit_json(_jsonable(meta), out)
    else:
        _print_meta(meta, out)
    return _exit_for(meta)


def _exit_for(meta: ResultMeta) -> int:
    return EXIT_FAILED if meta.status in states.PROPAGATE_STATES else EXIT_OK


# ------------------------------------------------------------------ commands


async def _get(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    return _report(await backend.get_meta(args.id), args, out)


async def _wait(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    clock = _Clock(args.timeout)
    meta = await clock.reach(backend, backend.get_meta(args.id))
    if not meta.ready:
        try:
            meta = await AsyncResult(args.id, backend).wait_ready(timeout=clock.remaining())
        except ResultTimeout:
            await clock.confirm(backend, [args.id])
            raise ResultTimeout([args.id], args.timeout) from None
    return _report(meta, args, out)


async def _watch(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    clock = _Clock(args.timeout)
    await clock.reach(backend, backend.get_meta(args.id))
    last: ResultMeta | None = None
    try:
        async with aclosing(
            AsyncResult(args.id, backend).watch(timeout=clock.remaining())
        ) as updates:
            async for meta in updates:
                last = meta
                if args.json:
                    _emit_json(_jsonable(meta), out)
                else:
                    out.write(f"{meta.status:<9}{_show_value(meta.result)}\n")
                    out.flush()
    except ResultTimeout:
        await clock.confirm(backend, [args.id])
        raise ResultTimeout([args.id], args.timeout) from None
    assert last is not None  # watch() always yields the record it read first
    return _exit_for(last)


async def _group(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    clock = _Clock(args.timeout)
    group = await clock.reach(backend, GroupResult.restore(args.id, backend))
    if group is None:
        raise _UsageError(f"no saved group {args.id!r} in {backend!r}")
    total = len(group)
    by_id: dict[str, ResultMeta] = {}
    with _ProgressDisplay(f"group {args.id}", total, out, quiet=args.json) as display:
        try:
            async with aclosing(group.as_completed(timeout=clock.remaining())) as finished:
                async for result in finished:
                    meta = await result.meta()  # cached: as_completed hands over ready records
                    by_id[meta.task_id] = meta
                    display.update(len(by_id))
        except ResultTimeout as exc:
            await clock.confirm(backend, exc.task_ids)
            raise ResultTimeout(exc.task_ids, args.timeout) from None
    counts = Counter(m.status for m in by_id.values())
    failed = [m.task_id for m in by_id.values() if m.status in states.PROPAGATE_STATES]
    if args.json:
        _emit_json(
            {"group_id": args.id, "total": total, "states": dict(counts), "failed": failed}, out
        )
    else:
        out.write(f"group {args.id}: {total} results\n")
        for state, count in sorted(counts.items()):
            out.write(f"  {state:<9}{count}\n")
        for task_id in failed:
            out.write(f"  failed: {task_id} ({by_id[task_id].status})\n")
        out.flush()
    return EXIT_FAILED if failed else EXIT_OK


async def _forget(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    for item_id in args.ids:
        if args.group:
            group = await GroupResult.restore(item_id, backend)
            if group is None:
                raise _UsageError(f"no saved group {item_id!r} in {backend!r}")
            await group.forget()
            await group.delete()
        else:
            await backend.forget(item_id)
        if args.json:
            _emit_json({"forgotten": item_id, "group": args.group}, out)
        else:
            out.write(f"forgot {'group ' if args.group else ''}{item_id}\n")
    return EXIT_OK


async def _cleanup(backend: BaseBackend, args: argparse.Namespace, out: TextIO) -> int:
    deleted = await backend.cleanup()
    if args.json:
        _emit_json({"deleted": deleted}, out)
    else:
        out.write(f"deleted {deleted} expired records\n")
    return EXIT_OK


_COMMANDS = {
    "get": _get,
    "wait": _wait,
    "watch": _watch,
    "group": _group,
    "forget": _forget,
    "cleanup": _cleanup,
}


class _ProgressDisplay:
    """A live bar with rich on a terminal, else a line per change (nothing if quiet)."""

    def __init__(self, label: str, total: int, out: TextIO, *, quiet: bool) -> None:
        self.label = label
        self.total = total
        self.out = out
        self.quiet = quiet
        self._progress: Any = None
        self._task: Any = None
        self._shown = -1

    def __enter__(self) -> _ProgressDisplay:
        if self.quiet:
            return self
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            return self
        console = Console(file=self.out)
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(self.label, total=self.total)
            self._progress.start()
        return self

    def update(self, done: int) -> None:
        if self.quiet or done == self._shown:
            return
        self._shown = done
        if self._progress is not None:
            self._progress.update(self._task, completed=done)
        else:
            self.out.write(f"{done}/{self.total} finished\n")
            self.out.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# ------------------------------------------------------------------ arguments


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a timeout cannot be negative")
    return value


def _add_common(parser: argparse.ArgumentParser, *, url: Any, json: Any) -> None:
    parser.add_argument(
        "--url",
        default=url,
        help=f"the result store (default: $AIORESULTS_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=json,
        help="print JSON (one object per line) instead of text",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioresults",
        description="Read, wait for, watch and delete task results.",
        epilog="exit codes: 0 success, 1 a task failed (FAILURE/REVOKED), 2 usage error "
        "or no store at the URL (none is created), 3 timeout, 4 store unreachable or failed",
    )
    _add_common(parser, url=None, json=False)
    parser.add_argument("--version", action="version", version=f"aioresults {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        # Accepted after the command too; SUPPRESS keeps one given before it.
        _add_common(sub, url=argparse.SUPPRESS, json=argparse.SUPPRESS)
        return sub

    get = command("get", "print a task's stored state and result (PENDING if none)")
    get.add_argument("id", help="the task id")
    for name, text in (
        ("wait", "wait until a task is ready, then print its result"),
        ("watch", "print each state change of a task until it is ready"),
        ("group", "follow a saved group until every member is ready, then summarise"),
    ):
        sub = command(name, text)
        sub.add_argument("id", help="the group id" if name == "group" else "the task id")
        sub.add_argument(
            "--timeout", type=_timeout, default=None, help="give up after S seconds (exit 3)"
        )
    forget = command("forget", "delete stored results (or saved groups with --group)")
    forget.add_argument("ids", nargs="+", metavar="ID", help="task ids (group ids with --group)")
    forget.add_argument(
        "--group", action="store_true", help="the ids name saved groups: delete them and results"
    )
    command("cleanup", "delete expired records (stores that expire by themselves report 0)")
    return parser


# ------------------------------------------------------------------ entry point


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    # create=False: looking at results never makes a store (a file, a directory,
    # tables, a container); one that is not there raises StoreNotFound.
    async with connect(args.url, create=False) as backend:
        return await _COMMANDS[args.command](backend, args, out)


def _error(message: str) -> None:
    sys.stderr.write(f"aioresults: error: {message}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return asyncio.run(_run(args, sys.stdout))
    except ResultTimeout as exc:
        _error(str(exc))
        return EXIT_TIMEOUT
    except (_UsageError, StoreNotFound) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except _Unreachable as exc:
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except (ConfigurationError, InvalidTaskId, MissingDependency) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (BackendError, SerializationError, OSError) as exc:
        # BackendUnavailable is a BackendError (and a ConnectionError, an OSError).
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except AioResultsError as exc:  # ChordError and the like: the commands raise none
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
