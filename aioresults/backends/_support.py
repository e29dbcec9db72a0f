"""The backend toolkit: what every store needs and none should write again.

* :class:`ErrorTable`: a backend's driver errors translated into the aioresults
  tree, from one table per backend, always chained with ``from``;
* :class:`Backoff`: the one retry pause policy (doubling, capped, jittered);
* :class:`Batcher`: calls made in one event-loop iteration travel together (one
  MGET, one pipeline, one transaction), each caller still getting its own
  answer or error; closing it fails whatever is queued or in flight;
* expiry arithmetic (:func:`seconds`, :func:`expires_at`, :func:`expired`,
  :func:`milliseconds`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

from .. import _runtime
from .._exceptions import AioResultsError, BackendClosed, ConfigurationError

__all__ = [
    "Backoff",
    "Batcher",
    "ErrorRule",
    "ErrorTable",
    "expired",
    "expires_at",
    "milliseconds",
    "redact_url",
    "seconds",
]

logger = logging.getLogger("aioresults.backends")

A = TypeVar("A")
R = TypeVar("R")

# ---------------------------------------------------------------- errors


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with passwords, account keys and signatures replaced by ``***``.

    Handles every ``scheme://user:password@host`` in the string (Sentinel URLs
    hold several) and Azure connection-string secrets.
    """
    if url is None:
        return None
    url = re.sub(r"(://[^:/@;?#]*:)[^@/;?#]*@", r"\1***@", url)
    return re.sub(
        r"(?i)((?:AccountKey|SharedAccessSignature|sig|password|key)=)[^;&]+", r"\1***", url
    )


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """One row of an :class:`ErrorTable`: driver errors of ``types`` (for which
    ``when`` holds) become ``error`` with the message ``"<doing>: <phrase> <where>: <exc>"``."""

    types: type[BaseException] | tuple[type[BaseException], ...]
    error: type[AioResultsError]
    phrase: str
    when: Callable[[BaseException], bool] | None = None


class ErrorTable:
    """A backend's driver errors and what each becomes; see :class:`ErrorRule`.

    The first matching rule wins, so list the specific before the general.
    Errors that match no rule are not caught.

    :param rules: the table.
    :param where: names the store in messages (called at translation time;
        must never reveal a secret).
    """

    def __init__(self, rules: Sequence[ErrorRule], where: Callable[[], str]) -> None:
        self.rules = tuple(rules)
        self.catches: tuple[type[BaseException], ...] = tuple(
            t
            for rule in self.rules
            for t in (rule.types if isinstance(rule.types, tuple) else (rule.types,))
        )
        self._where = where

    def translate(self, exc: BaseException, doing: str) -> AioResultsError | None:
        """The aioresults error for ``exc``, or None if no rule matches."""
        for rule in self.rules:
            if isinstance(exc, rule.types) and (rule.when is None or rule.when(exc)):
                text = str(exc)
                detail = redact_url(text.splitlines()[0]) if text else type(exc).__name__
                return rule.error(f"{doing}: {rule.phrase} {self._where()}: {detail}")
        return None

    @contextlib.contextmanager
    def translating(self, doing: str) -> Iterator[None]:
        """Translate the driver errors the block raises (``raise ... from exc``)."""
        try:
            yield
        except self.catches as exc:
            if isinstance(exc, AioResultsError):
                raise
            error = self.translate(exc, doing)
            if error is None:
                raise
            raise error from exc


# ---------------------------------------------------------------- back-off


class Backoff:
    """Pauses between retries: ``first`` seconds, doubling up to ``cap``, each
    drawn at random from its upper half so retrying clients spread out."""

    __slots__ = ("attempts", "cap", "first")

    def __init__(self, first: float = 0.05, cap: float = 1.0) -> None:
        self.first = first
        self.cap = cap
        #: Failures since the last :meth:`reset`.
        self.attempts = 0

    def delay(self) -> float:
        """The pause before the next attempt (and count this failure)."""
        self.attempts += 1
        ceiling = min(self.cap, self.first * 2 ** (self.attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def sleep(self) -> None:
        """Sleep for :meth:`delay`."""
        await anyio.sleep(self.delay())

    def reset(self) -> None:
        """Start from ``first`` again (after a success)."""
        self.attempts = 0


# ---------------------------------------------------------------- same-tick batching


class _Call(Generic[A, R]):
    __slots__ = ("arg", "promise", "taken")

    def __init__(self, arg: A) -> None:
        self.arg = arg
        self.promise: _runtime.Promise[R] = _runtime.Promise()
        self.taken = False


class Batcher(Generic[A, R]):
    """Calls made in one event-loop iteration run as one batch.

    ``await batcher(arg)`` queues ``arg``; one background run per batch calls
    ``run(args)``, which returns one answer per argument in order, where an
    answer that is an exception is raised to that caller alone. If ``run``
    itself raises, every caller of that batch gets (a copy of) the error.

    :param run: the batch operation.
    :param start: starts the background run (the backend's task owner).
    :param name: names the background task.
    :param max_size: the most calls in one batch (more make further batches).
    :param linger: called before each batch; a positive result waits that many
        seconds for more calls to join (e.g. while writes keep arriving).

    A caller cancelled before its batch started is left out of it. :meth:`close`
    fails every queued and running call at once, so no caller waits on a run
    that was cancelled before it began.
    """

    def __init__(
        self,
        run: Callable[[list[A]], Awaitable[Sequence[R | BaseException]]],
        *,
        start: Callable[..., None],
        name: str,
        max_size: int | None = None,
        linger: Callable[[int], float] | None = None,
    ) -> None:
        self._run = run
        self._start = start
        self._name = name
        self._max_size = max_size
        self._linger = linger
        self._queue: deque[_Call[A, R]] = deque()
        self._running: list[_Call[A, R]] = []
        self._scheduled = False
        self._closed: BaseException | None = None
        self._last_size = 0
        self._idle: anyio.Event | None = None

    def __len__(self) -> int:
        """Calls queued or running."""
        return len(self._queue) + len(self._running)

    async def __call__(self, arg: A) -> R:
        if self._closed is not None:
            raise _copy(self._closed)
        call: _Call[A, R] = _Call(arg)
        self._queue.append(call)
        if not self._scheduled:
            self._scheduled = True
            try:
                self._start(self._drain, name=self._name)
            except BaseException:
                self._scheduled = False
                self._queue.remove(call)
                raise
        try:
            return await call.promise
        except BaseException:
            if not call.taken:
                with contextlib.suppress(ValueError):
                    self._queue.remove(call)  # never run: it will not be
            raise

    async def _drain(self) -> None:
        try:
            # This task's first step runs after every task that was ready when the
            # first call was queued: the calls of that iteration are all in.
            while self._queue:
                if self._linger is not None and (
                    self._max_size is None or len(self._queue) < self._max_size
                ):
                    pause = self._linger(self._last_size)
                    if pause > 0:
                        await anyio.sleep(pause)
                batch: list[_Call[A, R]] = []
                while self._queue and (self._max_size is None or len(batch) < self._max_size):
                    call = self._queue.popleft()
                    call.taken = True
                    batch.append(call)
                if not batch:
                    break
                self._last_size = len(batch)
                self._running = batch
                try:
                    answers = await self._run([c.arg for c in batch])
                except Exception as exc:
                    for call in batch:
                        call.promise.set_exception(_copy(exc))
                except BaseException:
                    # Cancelled mid-run (not by close()): its callers must not wait for ever.
                    for call in batch:
                        call.promise.set_exception(
                            BackendClosed(
                                f"{self._name} was stopped while running the operation; "
                                "it may or may not have been carried out"
                            )
                        )
                    raise
                else:
                    for call, answer in zip(batch, answers, strict=True):
                        if isinstance(answer, BaseException):
                            call.promise.set_exception(answer)
                        else:
                            call.promise.set_result(answer)
                finally:
                    self._running = []
        finally:
            self._scheduled = False
            if self._queue and self._closed is None:
                # Queued while the run was being cancelled (not by close()): run them too.
                self._scheduled = True
                self._start(self._drain, name=self._name)
            if self._idle is not None and not self._queue:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running."""
        while self._queue or self._running:
            self._idle = anyio.Event()
            await self._idle.wait()

    def close(self, error: BaseException) -> None:
        """Fail every queued and running call with ``error`` and refuse new ones."""
        self._closed = error
        calls = [*self._queue, *self._running]
        self._queue.clear()
        for call in calls:
            call.taken = True
            call.promise.set_exception(_copy(error))


def _copy(error: BaseException) -> BaseException:
    """A fresh instance of ``error`` for one caller, chained to the same cause.

    One exception object raised in many tasks would collect all their tracebacks.
    """
    try:
        own = type(error)(*error.args)
    except Exception:
        return error
    own.__cause__ = error.__cause__ if error.__cause__ is not None else None
    return own


# ---------------------------------------------------------------- expiry


def seconds(value: float | dt.timedelta | None, name: str) -> float | None:
    """Normalise an expiry option: seconds as a float; None or 0 means never.

    :raises ConfigurationError: not a non-negative number, timedelta or None.
    """
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{name} must be a non-negative number of seconds or None")
    return float(value) or None


def expires_at(ttl: float | None, now: float | None = None) -> float | None:
    """The Unix time at which something written now with ``ttl`` expires (None: never)."""
    if ttl is None:
        return None
    return (time.time() if now is None else now) + ttl


def expired(deadline: float | None, now: float | None = None) -> bool:
    """Whether a Unix-time ``deadline`` (None: never) has passed."""
    return deadline is not None and deadline <= (time.time() if now is None else now)


def milliseconds(ttl: float | None) -> int:
    """A TTL in whole milliseconds, at least 1; 0 means none (never ``EXPIRE key 0``)."""
    return 0 if not ttl else max(1, round(ttl * 1000))
