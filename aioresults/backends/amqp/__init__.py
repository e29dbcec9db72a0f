"""RPCBackend: Celery's ``rpc://`` result backend on AMQP, with an async task sender.

Results travel as messages, not as records in a store. A worker publishes each
state of a task to the queue its sender named in the task's ``reply_to``, with
the task id as ``correlation_id``; so **only the sender receives the results of
its tasks** (Celery's rule). This backend is such a sender: it owns one reply
queue (:attr:`RPCBackend.reply_to`), consumes it on one connection, and hands
each reply to whoever waits for that task id. Send tasks with
:meth:`RPCBackend.send_task` (a Celery protocol 2 message a stock worker runs),
or with Celery's own ``apply_async(reply_to=backend.reply_to)``.

What it keeps: the latest record per task id, for the replies it received, in
a buffer bounded to ``max_buffered`` task ids (the oldest evicted first) and
``expires`` seconds (see :mod:`._buffer`). ``get_meta()``/``get_many()`` read
that buffer: a task this backend did not send, or whose reply has not arrived
(or was evicted), reads PENDING, and waiting for it lasts until its timeout.
``forget()`` drops a buffered record (the broker keeps nothing to delete).

The reply queue is declared durable with ``x-expires`` = ``expires`` (as
Celery's) but *not* auto-delete: RabbitMQ deletes an auto-delete queue when
its consumer's connection drops, and the replies published before the
consumer is back with it. When the connection drops, the backend reconnects with back-off,
consumes the same queue again, and the replies published meanwhile arrive
then (see :mod:`._consumer`). ``aclose()`` deletes the queue; a process that
dies without it leaves the queue to ``x-expires``.

No groups and no chords, as in Celery's RPC backend: ``save_group()``,
``restore_group()``, ``delete_group()`` raise :class:`~aioresults.ConfigurationError`,
``set_chord_size()``/``chord_part_return()`` raise :class:`~aioresults.ChordError`,
at once. (``ResultSet.join()`` of tasks it sent works.)

Storing (the worker side): a reply goes to the queue its task's sender named.
``store_result()`` and everything built on it (``mark_as_done()``,
``track()``) publish to the ``reply_to`` set with :meth:`RPCBackend.replying_to`,
and raise :class:`~aioresults.ConfigurationError` outside of it.

URLs: see :mod:`._url`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Self

from ... import states
from ..._exceptions import (
    BackendError,
    ChordError,
    ConfigurationError,
    InvalidTaskId,
    MissingDependency,
)
from ..._meta import ResultMeta
from ..._result import AsyncResult
from ..._serialization import Codec
from .._feeds import Feed
from .._support import milliseconds, redact_url
from ..base import BaseBackend, validate_id

try:
    import aiormq
    from pamqp.encode import field_table
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency(
        f"the rpc:// backend needs aiormq ({exc}): pip install 'aioresults[amqp]'"
    ) from exc

from ._buffer import ReplyBuffer
from ._connection import declare_reply_queue, error_table, open_connection
from ._consumer import ReplyConsumer, ReplyFeed
from ._messages import result_message, short_string, task_message
from ._publisher import Publisher, Unroutable
from ._refused import E_NO_CHORDS, NoGroupsOrChords
from ._url import BROKER_VARIABLE, Broker, find_broker, positive

__all__ = ["BROKER_VARIABLE", "RPCBackend"]

logger = logging.getLogger("aioresults.backends.amqp")


class RPCBackend(NoGroupsOrChords, BaseBackend):
    """Results pushed to this process's reply queue; see the module docstring.

    :param location: the broker: ``rpc://user:password@host:port/vhost``, or an
        ``amqp://`` (``amqps://``, ``pyamqp://``) URL; a bare ``rpc://`` takes it
        from ``broker_url``, else from ``$AIORESULTS_BROKER_URL``.
    :param broker_url: the broker, Celery's ``broker_url`` (for a bare ``rpc://``).
    :param reply_queue: the reply queue's name; by default a new UUID per backend
        (deleted by ``aclose()``). A named queue is kept on close, so a process
        that restarts with the same name receives the replies that arrived
        meanwhile; only one backend may consume it at a time.
    :param max_buffered: task ids whose latest record is kept (oldest evicted first).
    :param prefetch: replies the broker sends ahead of their acknowledgement.
    :param persistent: publish replies (``store_result``) as persistent
        messages (``delivery_mode`` 2), Celery's ``result_persistent``.
    :param default_queue: where :meth:`send_task` sends by default, Celery's
        ``task_default_queue``.
    :param task_serializer: ``"json"`` (default) or ``"msgpack"``, for task messages.
    :param connect_timeout: seconds to connect before giving up.
    :param command_timeout: seconds a publish may wait for the broker's
        confirmation; then it raises :class:`~aioresults.BackendUnavailable`
        (the message may still arrive: it is not sent again).
    :param heartbeat: seconds between AMQP heartbeats (a dead peer is noticed
        after about three).
    :param publish_retries: new connections a publish tries after a lost one.
    :param options: see :class:`~aioresults.BaseBackend`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("rpc",)

    def __init__(
        self,
        location: str | None = None,
        *,
        url: str | None = None,
        broker_url: str | None = None,
        reply_queue: str | None = None,
        max_buffered: int | None = None,
        prefetch: int = 1000,
        persistent: bool | None = None,
        default_queue: str | None = None,
        task_serializer: str = "json",
        connect_timeout: float | None = None,
        command_timeout: float | None = None,
        heartbeat: int | None = None,
        publish_retries: int = 3,
        **options: Any,
    ) -> None:
        url = location or url
        broker, from_url = find_broker(url, broker_url)
        if "expires" in from_url:
            options.setdefault("expires", from_url.pop("expires"))
        super().__init__(url=url or broker.display(), **options)
        self.broker: Broker = broker

        def pick(given: Any, key: str, default: Any) -> Any:
            # An argument wins over the URL's query, which wins over the default.
            return given if given is not None else from_url.get(key, default)

        self.max_buffered = positive(pick(max_buffered, "max_buffered", 10_000), "max_buffered")
        self.prefetch = positive(prefetch, "prefetch")
        self.persistent = bool(pick(persistent, "persistent", False))
        self.default_queue: str = pick(default_queue, "default_queue", "celery")
        self.connect_timeout = float(pick(connect_timeout, "connect_timeout", 10.0))
        self.command_timeout = float(pick(command_timeout, "command_timeout", 10.0))
        self.heartbeat = int(pick(heartbeat, "heartbeat", 10))
        if not (self.connect_timeout > 0 and self.command_timeout > 0) or self.heartbeat < 0:
            raise ConfigurationError(
                "connect_timeout and command_timeout must be positive, heartbeat not negative"
            )
        if task_serializer not in ("json", "msgpack"):
            raise ConfigurationError("task_serializer must be 'json' or 'msgpack'")
        self._task_codec = Codec(task_serializer)
        reply_queue = pick(reply_queue, "reply_queue", None)
        self._owns_queue = reply_queue is None
        self._queue = reply_queue or str(uuid.uuid4())
        self._queue_arguments: dict[str, Any] = (
            {"x-expires": milliseconds(self.expires)} if self.expires else {}
        )
        self._errors = error_table(lambda: repr(self))
        self._buffer = ReplyBuffer(self.max_buffered, self.expires, self._is_success)
        self._consumer = ReplyConsumer(
            lambda: self._connect("consumer"),
            self._queue,
            self._queue_arguments,
            self.prefetch,
            self._on_reply,
            self._errors,
        )
        #: Replies reach the hub through it.
        self._replies = ReplyFeed(self._consumer)
        self._publisher = Publisher(
            lambda: self._connect("publisher"),
            lambda channel: declare_reply_queue(channel, self._queue, self._queue_arguments),
            self._errors,
            publish_retries,
            self.command_timeout,
        )
        self._destination: contextvars.ContextVar[tuple[str, str | None] | None] = (
            contextvars.ContextVar(f"aioresults rpc reply_to {id(self):x}", default=None)
        )

    def __repr__(self) -> str:
        shown = redact_url(self.url)
        if self.url is not None and self.url.rstrip("/") == "rpc:":
            shown = f"{self.url} (broker {self.broker.display()})"
        return f"<{type(self).__name__} url={shown!r}>"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """``rpc://...`` (see :mod:`._url`)."""
        return cls(url, **options)

    # ------------------------------------------------------------ the reply queue

    @property
    def reply_to(self) -> str:
        """The reply queue's name: give it to Celery as ``apply_async(reply_to=...)``.

        :raises BackendError: the backend is not open yet, so the queue may not
            exist and replies to it would be dropped (use ``async with`` or
            :meth:`open` first).
        """
        if not self._opened:
            raise BackendError(
                f"{self!r} is not open, so its reply queue may not exist yet: "
                "use `async with` or `await backend.open()` first"
            )
        return self._queue

    @property
    def buffered(self) -> int:
        """Task ids whose latest record is kept now."""
        return len(self._buffer)

    @property
    def evicted(self) -> int:
        """Records evicted so far because ``max_buffered`` task ids were kept."""
        return self._buffer.evicted

    async def open(self) -> Self:
        """Connect, declare the reply queue and consume it (done by any first
        operation, or ``async with``); return the backend. Idempotent."""
        await self._ensure_open()
        return self

    async def _connect(self, role: str) -> aiormq.Connection:
        return await open_connection(
            self.broker.driver_url(self.heartbeat),
            f"aioresults rpc {role} {self._queue}",
            self.connect_timeout,
            self._errors,
            f"connecting the {role}",
        )

    async def _open(self) -> None:
        await self._consumer.connect()
        self._start_task(self._consumer.run, name=f"reply consumer of {self!r}")

    async def _close(self) -> None:
        await self._consumer.close(delete_queue=self._owns_queue)
        await self._publisher.close()

    def _feed(self) -> Feed:
        return self._replies

    def _on_reply(self, task_id: str | None, raw: bytes, redelivered: bool) -> None:
        if task_id is None:  # old Celery versions name the task in the body only
            try:
                task_id = str(self.codec.decode(raw)["task_id"])
            except Exception:
                logger.warning("%r: dropped a reply with no correlation_id", self)
                return
        try:
            task_id = validate_id(task_id)
        except InvalidTaskId as exc:
            logger.warning("%r: dropped a reply: %s", self, exc)
            return
        # Before the first wait there is no hub, and nobody to tell: the
        # buffer keeps the reply for the first read.
        if self._buffer.put(task_id, raw, redelivered=redelivered) and self._hub_ is not None:
            self._replies.deliver(task_id, raw)

    def _is_success(self, task_id: str, raw: bytes) -> bool:
        try:
            return self._decode(task_id, raw).status == states.SUCCESS
        except Exception:
            return False

    def _check_id(self, task_id: object, what: str = "task id") -> str:
        """Ids travel as ``correlation_id``, an AMQP short string: 255 bytes at most."""
        task_id = validate_id(task_id, what)
        if not task_id.isascii() and len(task_id.encode("utf-8")) > 255:
            raise InvalidTaskId(f"{what} {task_id[:20]!r}... is over 255 bytes in UTF-8")
        return task_id

    # ------------------------------------------------------------ sending tasks

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        exchange: str | None = None,
        routing_key: str | None = None,
        countdown: float | dt.timedelta | None = None,
        eta: dt.datetime | str | None = None,
        expires: float | dt.timedelta | dt.datetime | str | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        shadow: str | None = None,
        retries: int = 0,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_id: str | None = None,
        group_index: int | None = None,
        ignore_result: bool | None = None,
        argsrepr: str | None = None,
        kwargsrepr: str | None = None,
        chord: Any = None,
    ) -> AsyncResult[Any]:
        """Send task ``name`` as Celery's ``app.send_task`` does, with this
        backend's queue as ``reply_to``; return its :class:`~aioresults.AsyncResult`.

        The message is Celery's protocol 2, field for field, so a stock worker
        runs it (and, with ``result_backend="rpc://"``, replies here). By
        default it goes to ``default_queue`` ("celery") through the default
        exchange, and that queue is declared first as Celery declares it
        (unless it exists). With ``exchange`` (and ``routing_key``), it goes
        there and nothing is declared. Returns once the broker confirmed the
        message; a connection lost meanwhile is retried, so a task may be sent
        twice (at least once, as Celery).

        :param countdown: run no sooner than this many seconds from now (an ``eta``).
        :param expires: seconds (or a datetime): the worker discards it after that.
        :param chord: refused: the rpc:// backend has no chords.
        :raises ChordError: ``chord`` was given.
        :raises BackendError: no queue is bound for the routing key, or the broker refused.
        :raises BackendUnavailable: the broker cannot be reached.
        """
        if chord is not None:
            raise ChordError(E_NO_CHORDS)
        task_id = str(uuid.uuid4()) if task_id is None else self._check_id(task_id)
        for key, value in (("root id", root_id), ("parent id", parent_id), ("group id", group_id)):
            if value is not None:
                self._check_id(value, key)
        for key, value in (("queue", queue), ("exchange", exchange), ("routing_key", routing_key)):
            short_string(value, key)
        if priority is not None and not (isinstance(priority, int) and 0 <= priority <= 255):
            raise ConfigurationError("priority must be an integer from 0 to 255")
        if headers:
            try:
                field_table(dict(headers))
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"headers must be AMQP table values: {exc}") from exc
        message = task_message(
            self._task_codec,
            name,
            args,
            kwargs or {},
            task_id=task_id,
            reply_to=self._queue,
            countdown=countdown,
            eta=eta,
            expires=expires,
            priority=priority,
            headers=headers,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            shadow=shadow,
            retries=retries,
            root_id=root_id,
            parent_id=parent_id,
            group_id=group_id,
            group_index=group_index,
            ignore_result=ignore_result,
            argsrepr=argsrepr,
            kwargsrepr=kwargsrepr,
        )
        await self._ensure_open()
        target = queue or self.default_queue
        if exchange is None:
            await self._publisher.publish(message, exchange="", routing_key=target, declare=target)
        else:
            key = target if routing_key is None else routing_key
            await self._publisher.publish(message, exchange=exchange, routing_key=key)
        return AsyncResult(task_id, self)

    # ------------------------------------------------------------ storing (worker side)

    @contextlib.contextmanager
    def replying_to(self, reply_to: str, correlation_id: str | None = None) -> Iterator[None]:
        """Within this block (this task and what it starts), stores publish to
        ``reply_to``: the queue the task's sender named in its message.

        As a Celery worker's RPC backend answers a task: give the message's
        ``reply_to`` and ``correlation_id`` properties (the correlation id
        defaults to the task id of each record)::

            with backend.replying_to(message.reply_to, message.correlation_id):
                async with backend.track(task_id) as task:
                    task.set_result(await run(...))
        """
        if not reply_to:
            raise ConfigurationError("reply_to must be a queue name")
        short_string(reply_to, "reply_to")
        short_string(correlation_id, "correlation_id")
        token = self._destination.set((reply_to, correlation_id))
        try:
            yield
        finally:
            self._destination.reset(token)

    async def _write_meta(self, meta: ResultMeta) -> bool:
        """Publish the record to the queue named by :meth:`replying_to`.

        True once the broker confirmed it; False if no such queue exists (its
        sender is gone: a Celery worker drops such a reply silently too). Whether
        a SUCCESS was already received is known only to the receiver, which
        keeps it (see :mod:`._buffer`).
        """
        destination = self._destination.get()
        if destination is None:
            raise ConfigurationError(
                "the rpc:// backend publishes a result to its task's sender: "
                "store it within `with backend.replying_to(reply_to):` (the task "
                "message's reply_to property)"
            )
        reply_to, correlation_id = destination
        message = result_message(
            self.codec,
            self.codec.encode(meta.to_dict()),
            correlation_id or meta.task_id,
            persistent=self.persistent,
        )
        try:
            await self._publisher.publish(message, exchange="", routing_key=reply_to)
        except Unroutable:
            logger.info("%r: no reply queue %r: the reply is dropped", self, reply_to)
            return False
        return True

    # ------------------------------------------------------------ reading

    async def _read_raw(self, task_ids: Sequence[str]) -> Sequence[Any]:
        get = self._buffer.get
        return [get(task_id) for task_id in task_ids]

    def _decode(self, task_id: str, raw: Any) -> ResultMeta:
        return self._decode_payload(task_id, raw)

    async def _forget(self, task_id: str) -> None:
        self._buffer.forget(task_id)

    async def _cleanup(self) -> int:
        return self._buffer.cleanup()
