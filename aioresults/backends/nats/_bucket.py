"""The NATS backend's connection and bucket: reads, conditional writes, expiry headers.

A bucket is a JetStream stream ``KV_<bucket>`` whose subjects are
``$KV.<bucket>.<key>``; a write is a message, a key's value its last message.
Writes here carry their expiry time in the header ``Aioresults-Expires`` (Unix
seconds), which reads honour; the bucket's TTL (``max_age``) removes values on
the server (see the backend's docstring). A conditional write names the
revision it replaces (``Nats-Expected-Last-Subject-Sequence``; 0: none).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..._exceptions import (
    BackendError,
    BackendUnavailable,
    MissingDependency,
    ResultTooLarge,
    StoreNotFound,
)
from .._support import ErrorRule, ErrorTable

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency(
        "the nats:// backend needs nats-py; run: pip install 'aioresults[nats]'"
    ) from exc

__all__ = ["EXPIRES_HEADER", "Bucket", "Entry", "WrongRevision"]

logger = logging.getLogger("aioresults.backends")

EXPIRES_HEADER = "Aioresults-Expires"
_OPERATION = "KV-Operation"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST = (10071, 10164)
_STREAM_IN_USE = 10058
#: What the server may answer instead while the same stream is being created
#: by another connection at the same moment.
_SUBJECTS_OVERLAP = 10065
_READS_IN_FLIGHT = 128
#: The key a direct get is tried for on opening (never written).
_PROBE_KEY = "aioresults-direct-get-probe"


class WrongRevision(Exception):
    """A conditional write found another revision of its key."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A key's last message: its value (None for a delete marker), revision, expiry."""

    value: bytes | None
    revision: int
    expires_at: float | None

    def live(self, now: float | None = None) -> bytes | None:
        """The value, unless deleted or expired."""
        if self.expires_at is not None and self.expires_at <= (now or time.time()):
            return None
        return self.value


def expiry(headers: dict[str, str] | None) -> float | None:
    try:
        return float((headers or {})[EXPIRES_HEADER])
    except (KeyError, ValueError):
        return None


def deleted(headers: dict[str, str] | None) -> bool:
    return (headers or {}).get(_OPERATION) in ("DEL", "PURGE")


class Bucket:
    """One KV bucket on one NATS connection.

    :param servers: server URLs (``nats://[user:password@]host:port``).
    :param display: how the servers are named in messages (no secret).
    """

    def __init__(
        self,
        servers: Sequence[str],
        name: str,
        *,
        display: str,
        connect_timeout: float,
        timeout: float,
        reconnect_wait: float,
        storage: str,
        replicas: int,
    ) -> None:
        self.servers = list(servers)
        self.name = name
        self.stream = f"KV_{name}"
        self.prefix = f"$KV.{name}."
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.reconnect_wait = reconnect_wait
        self.storage = storage
        self.replicas = replicas
        self.nc: Any = None
        self.js: Any = None
        self.direct = True
        #: The largest message the server and the bucket take.
        self.max_message = 1024 * 1024
        #: The bucket's TTL in seconds (None: none), known once open.
        self.ttl: float | None = None
        #: Called (synchronously) whenever the connection is lost.
        self.on_lost: set[Callable[[], None]] = set()
        self._reads = asyncio.Semaphore(_READS_IN_FLIGHT)
        self.errors = ErrorTable(
            [
                ErrorRule(nats.errors.AuthorizationError, BackendError, "credentials refused by"),
                ErrorRule(nats.errors.MaxPayloadError, ResultTooLarge, "a value too large for"),
                ErrorRule(
                    (
                        nats.errors.NoServersError,
                        nats.errors.TimeoutError,
                        nats.errors.ConnectionClosedError,
                        nats.errors.StaleConnectionError,
                        nats.errors.ConnectionReconnectingError,
                        nats.errors.NoRespondersError,
                        nats.js.errors.NoStreamResponseError,
                        nats.js.errors.ServiceUnavailableError,
                        OSError,
                        TimeoutError,
                    ),
                    BackendUnavailable,
                    "cannot reach",
                ),
                ErrorRule(
                    (nats.errors.Error, nats.js.errors.Error, WrongRevision),
                    BackendError,
                    "failed on",
                ),
            ],
            lambda: f"NATS {display} (bucket {name!r})",
        )

    # ------------------------------------------------------------ lifecycle

    async def open(self, *, create: bool, ttl: float | None) -> None:
        """Connect, then find the bucket, or create it (with ``ttl``) when allowed."""

        async def lost() -> None:
            for callback in list(self.on_lost):
                callback()

        async def error(exc: Exception) -> None:
            logger.debug("NATS client error on bucket %s: %s", self.name, exc)

        with self.errors.translating("connecting"):
            self.nc = await nats.connect(
                servers=self.servers,
                name="aioresults",
                connect_timeout=math.ceil(self.connect_timeout),
                reconnect_time_wait=self.reconnect_wait,
                # One retry per server at connect time: a server that is down fails
                # the open instead of hanging it ...
                max_reconnect_attempts=1,
                error_cb=error,
                disconnected_cb=lost,
            )
        # ... and once connected, reconnect for ever.
        self.nc.options["max_reconnect_attempts"] = -1
        self.js = self.nc.jetstream(timeout=self.timeout)
        try:
            with self.errors.translating(f"opening bucket {self.name!r}"):
                info = await self._bucket_info(create, ttl)
            self.direct = bool(info.config.allow_direct) and await self._direct_answers()
        except BaseException:
            await self.close()
            raise
        self.ttl = info.config.max_age or None
        limits = [self.nc.max_payload, info.config.max_msg_size or 0]
        self.max_message = min(limit for limit in limits if limit and limit > 0)

    async def _bucket_info(self, create: bool, ttl: float | None) -> Any:
        try:
            return await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not create:
                raise StoreNotFound(
                    f"opening bucket {self.name!r}: there is no such bucket and create is False"
                ) from None
        config = api.KeyValueConfig(
            bucket=self.name,
            history=1,
            ttl=ttl,
            storage=api.StorageType(self.storage),
            replicas=self.replicas,
            direct=True,
            description="aioresults: task results",
        )
        try:
            await self.js.create_key_value(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in (_STREAM_IN_USE, _SUBJECTS_OVERLAP):
                raise
            # Created by someone else meanwhile (perhaps with other settings):
            # use theirs. An overlap with a stream of another name is an error.
            try:
                return await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                raise exc from None
        return await self.js.stream_info(self.stream)

    async def _direct_answers(self) -> bool:
        """Whether the server answers direct gets on the stream; if not, reads
        go through the JetStream API (the stream leader), as they do where
        the stream does not allow direct gets.

        A stream that another client has just created can be found before
        it answers them (nats-server 2.9 registers the stream first), and a
        direct get sent then is never answered: it would time out. So one is
        tried here, for a key that is never written, again after a pause that
        doubles while none is answered, within ``timeout``; a permission that
        forbids direct gets ends the same way.
        """
        assert self.nc is not None
        subject = f"$JS.API.DIRECT.GET.{self.stream}.{self.prefix}{_PROBE_KEY}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        wait = 0.05
        while True:
            remaining = deadline - loop.time()
            with self.errors.translating(f"opening bucket {self.name!r}"):
                try:
                    await self.nc.request(subject, b"", timeout=max(min(wait, remaining), 0.001))
                    return True
                except nats.errors.TimeoutError:
                    if remaining <= wait:
                        break
                except nats.errors.NoRespondersError:
                    break
            wait *= 2
        logger.warning(
            "NATS bucket %r: the server does not answer direct gets; reading through "
            "the JetStream API instead",
            self.name,
        )
        return False

    async def close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        self.on_lost.clear()
        if nc is not None:
            await nc.close()

    # ------------------------------------------------------------ reads

    async def read(self, key: str) -> Entry | None:
        """The key's last message (a delete marker included), or None if it has none."""
        async with self._reads:
            try:
                msg = await self.js.get_msg(
                    self.stream, subject=self.prefix + key, direct=self.direct
                )
            except nats.js.errors.NotFoundError:
                return None
        headers = msg.headers
        if deleted(headers):
            return Entry(None, int(msg.seq), None)
        return Entry(msg.data or b"", int(msg.seq), expiry(headers))

    async def read_many(self, keys: Sequence[str]) -> list[Entry | None | Exception]:
        """:meth:`read` of each key, concurrently; a failed read gives its (translated) error."""

        async def one(key: str) -> Entry | None | Exception:
            try:
                with self.errors.translating(f"reading {key}"):
                    return await self.read(key)
            except Exception as exc:
                return exc

        if len(keys) == 1:
            return [await one(keys[0])]
        return list(await asyncio.gather(*(one(key) for key in keys)))

    # ------------------------------------------------------------ writes

    def headers(self, ttl: float | None) -> dict[str, str] | None:
        return None if ttl is None else {EXPIRES_HEADER: f"{time.time() + ttl:.3f}"}

    async def write(
        self, key: str, value: bytes, ttl: float | None, last: int | None = None
    ) -> int:
        """Store ``value`` at ``key``, only over revision ``last`` if given (0: only if
        the key has no message); its revision.

        :raises WrongRevision: the key is at another revision.
        :raises ResultTooLarge: the message would exceed the server's or bucket's limit.
        """
        if len(value) + 256 > self.max_message:
            raise ResultTooLarge(
                f"writing {key}: the value is {len(value)} bytes; NATS takes messages of at "
                f"most {self.max_message} bytes here (max_payload, the bucket's max value size)"
            )
        headers = self.headers(ttl) or {}
        if last is not None:
            headers[_EXPECTED_LAST] = str(last)
        try:
            ack = await self.js.publish(self.prefix + key, value, headers=headers or None)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise WrongRevision(key) from None
            raise
        return int(ack.seq)

    async def delete(self, key: str) -> None:
        """Leave a delete marker at ``key`` (watchers see the record go)."""
        await self.js.publish(self.prefix + key, b"", headers={_OPERATION: "DEL"})

    async def purge(self, subject: str, before: int | None = None) -> None:
        """Remove the messages of ``subject`` (a filter; with ``before``, only those
        older than that revision), leaving no marker."""
        await self.js.purge_stream(self.stream, subject=self.prefix + subject, seq=before)

    async def scan(self, subject: str) -> list[tuple[str, int, dict[str, str] | None]]:
        """``(key, revision, headers)`` of the last message of every key matching
        ``subject``, headers only (an ephemeral consumer, deleted after)."""
        found: list[tuple[str, int, dict[str, str] | None]] = []
        done = asyncio.get_running_loop().create_future()

        async def collect(msg: Any) -> None:
            if msg.headers and msg.headers.get("Status"):
                return  # a heartbeat
            found.append(
                (msg.subject[len(self.prefix) :], msg.metadata.sequence.stream, msg.headers)
            )
            if msg.metadata.num_pending == 0 and not done.done():
                done.set_result(None)

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=collect)
        consumer = None
        try:
            info = await self.js.add_consumer(
                self.stream,
                api.ConsumerConfig(
                    deliver_subject=inbox,
                    filter_subject=self.prefix + subject,
                    deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=api.AckPolicy.NONE,
                    headers_only=True,
                    mem_storage=True,
                    num_replicas=1,
                    inactive_threshold=60.0,
                ),
            )
            consumer = info.name
            if info.num_pending:
                await asyncio.wait_for(done, self.timeout * 4)
        finally:
            await sub.unsubscribe()
            if consumer is not None:
                try:
                    await self.js.delete_consumer(self.stream, consumer)
                except nats.errors.Error:
                    pass  # it goes away by itself once inactive
        return found
