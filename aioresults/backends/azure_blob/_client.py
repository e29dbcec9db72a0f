"""The Azure backend's requests: conditional GETs and PUTs, listings, retries, errors."""

from __future__ import annotations

import random
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from ..._exceptions import (
    AioResultsError,
    BackendClosed,
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    MissingDependency,
    StoreNotFound,
)
from .._support import ErrorRule, ErrorTable
from ..base import redact_url

try:
    from azure.core import MatchConditions
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.storage.blob.aio import BlobClient, BlobServiceClient, ExponentialRetry
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependency(
        "the azureblockblob:// backend needs azure-storage-blob with aiohttp; "
        "run: pip install 'aioresults[azure]'"
    ) from exc

__all__ = ["NOT_MODIFIED", "Blob", "Blobs", "container_missing"]

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item

#: Blob metadata: when the record expires (Unix seconds).
EXPIRES_KEY = "aioresults_expires_at"
_CACHE_SIZE = 4096
NOT_MODIFIED: Any = object()
_CREDENTIAL_NAMES = ("DefaultAzureCredential", "ManagedIdentityCredential")


@dataclass(frozen=True, slots=True)
class Blob:
    payload: bytes
    etag: str
    expires_at: float | None

    def live(self) -> bool:
        return self.expires_at is None or self.expires_at > time.time()


def expiry(metadata: dict[str, str] | None) -> float | None:
    try:
        return float((metadata or {})[EXPIRES_KEY])
    except (KeyError, ValueError):
        return None  # not written by aioresults: never expires


def live(metadata: dict[str, str] | None) -> bool:
    expires_at = expiry(metadata)
    return expires_at is None or expires_at > time.time()


def container_missing(exc: BaseException) -> bool:
    """Whether the service said the container does not exist."""
    return getattr(exc, "error_code", None) == "ContainerNotFound"


class _Retry(ExponentialRetry):
    """The SDK's retry (connection errors, 408, 5xx) with a back-off that starts at
    ``backoff`` seconds and doubles (±25 %), instead of the SDK's 15 s start."""

    def __init__(self, backoff: float, retries: int) -> None:
        super().__init__(retry_total=retries)
        self.backoff = backoff

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        # The SDK counts the retry about to be made from 1.
        delay = self.backoff * 2 ** max(0, int(settings["count"]) - 1)
        return float(min(delay, 30.0) * random.uniform(0.75, 1.25))


def _identity_credential(name: str, account_url: str | None) -> Any:
    try:
        from azure.identity import aio as identity
    except ImportError as exc:
        raise MissingDependency(
            f"{name} (for {redact_url(account_url)}) needs the azure-identity package; "
            "run: pip install azure-identity"
        ) from exc
    return getattr(identity, name)()


class _AzureErrors(ErrorTable):
    """The error table, with the service's status and error code after the detail
    (``... (503 ServerBusy)``): what to look up in Azure's documentation."""

    def translate(self, exc: BaseException, doing: str) -> AioResultsError | None:
        error = super().translate(exc, doing)
        status = _status(exc)
        if error is None or status is None:
            return error
        code = getattr(exc, "error_code", None)
        code = getattr(code, "value", code)  # the SDK's enum: its value is the service's code
        return type(error)(f"{error} ({status}{' ' + str(code) if code else ''})")


class Blobs:
    """One container and the requests made to it.

    :param stats: the backend's request counters (see ``AzureBlockBlobBackend.stats``).
    """

    def __init__(
        self,
        *,
        connection_string: str | None,
        account_url: str | None,
        credential: Any,
        container_name: str,
        base_path: str,
        max_concurrency: int,
        retries: int,
        retry_backoff: float,
        client_options: dict[str, Any],
        stats: dict[str, int],
    ) -> None:
        self.container_name = container_name
        self.base_path = base_path
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.stats = stats
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        self._client_options = client_options
        self._owned_credential: Any = None
        self.service: Any = None
        self.container: Any = None
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._clients: OrderedDict[str, BlobClient] = OrderedDict()
        self.errors = _AzureErrors(
            [
                ErrorRule(
                    (ServiceRequestError, ServiceResponseError), BackendUnavailable, "cannot reach"
                ),
                ErrorRule(
                    AzureError,
                    BackendError,
                    "the service refused the credentials (check the account name and key, "
                    "or the SAS token) at",
                    lambda e: isinstance(e, ClientAuthenticationError) or _status(e) in (401, 403),
                ),
                ErrorRule(
                    AzureError,
                    BackendUnavailable,
                    "the service stayed busy or failing (after retries) at",
                    lambda e: _status(e) == 429 or (_status(e) or 0) >= 500,
                ),
                ErrorRule(
                    AzureError,
                    StoreNotFound,
                    f"container {container_name!r} does not exist at",
                    container_missing,
                ),
                ErrorRule(AzureError, BackendError, "failed on"),
            ],
            lambda: (
                redact_url(self.service.url if self.service is not None else self._account_url)
                or "Azure"
            ),
        )

    def open(self, retry_backoff: float, retries: int) -> None:
        options = dict(self._client_options, retry_policy=_Retry(retry_backoff, retries))
        if options["use_env_settings"] is None:
            # Else the SDK looks proxies up in a thread for every request.
            options["use_env_settings"] = bool(urllib.request.getproxies())
        with self.errors.translating("connecting"):
            if self._connection_string is not None:
                try:
                    service = BlobServiceClient.from_connection_string(
                        self._connection_string, **options
                    )
                except ValueError as exc:
                    raise ConfigurationError(
                        f"invalid connection string: {redact_url(str(exc))}"
                    ) from None
            else:
                credential = self._credential
                if credential in _CREDENTIAL_NAMES:
                    credential = self._owned_credential = _identity_credential(
                        credential, self._account_url
                    )
                service = BlobServiceClient(str(self._account_url), credential, **options)
        self.service = service
        self.container = service.get_container_client(self.container_name)

    async def close(self) -> None:
        service, self.service, self.container = self.service, None, None
        credential, self._owned_credential = self._owned_credential, None
        self._clients.clear()
        if service is not None:
            await service.close()
        if credential is not None:
            await credential.close()

    def open_container(self) -> Any:
        """The container client; :class:`~aioresults.BackendClosed` once closed."""
        container = self.container
        if container is None:
            raise BackendClosed(f"the container {self.container_name!r} is closed")
        return container

    def name(self, key: str) -> str:
        """The blob that holds ``key`` (Celery's ``<base_path><key>``)."""
        return f"{self.base_path}{key}"

    def blob(self, key: str) -> BlobClient:
        # A client costs about as much CPU as a request: keep those in use.
        client = self._clients.pop(key, None)
        if client is None:
            client = self.open_container().get_blob_client(self.name(key))
        self._clients[key] = client
        if len(self._clients) > _CACHE_SIZE:
            self._clients.popitem(last=False)
        return client

    async def call(self, func: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
        """One request; 429 answers are retried here (the SDK's policy does not)."""
        attempt = 0
        while True:
            self.stats["requests"] += 1
            try:
                return await func(*args, **kwargs)
            except HttpResponseError as exc:
                if exc.status_code != 429 or attempt >= self.retries:
                    raise
                self.stats["throttled"] += 1
                await anyio.sleep(self.retry_backoff * 2**attempt * random.uniform(0.75, 1.25))
                attempt += 1

    async def fetch(self, key: str, etag: str | None = None) -> Any:
        """GET a blob: a :class:`Blob`, None if missing (or its container is), or
        :data:`NOT_MODIFIED` when it still has ``etag``."""
        async with self._limiter:
            client = self.blob(key)
            try:
                if etag is None:
                    stream = await self.call(client.download_blob)
                else:
                    stream = await self.call(
                        client.download_blob, etag=etag, match_condition=MatchConditions.IfModified
                    )
                data = await stream.readall()
            except ResourceNotFoundError:
                return None
            except HttpResponseError as exc:
                if exc.status_code != 304:
                    raise
                self.stats["not_modified"] += 1
                return NOT_MODIFIED
        self.stats["downloads"] += 1
        payload = data if isinstance(data, bytes) else data.encode()  # bytes: no encoding asked
        return Blob(payload, stream.properties.etag, expiry(stream.properties.metadata))

    async def put(
        self,
        key: str,
        value: bytes,
        ttl: float | None,
        *,
        etag: str | None = None,
        create: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> Blob:
        """Upload a blob: always, only if it still has ``etag``, or only if there
        is none (``create``). Raises the SDK's 412/409 error otherwise."""
        expires_at = None if ttl is None else time.time() + ttl
        meta = dict(metadata or {})
        if expires_at is not None:
            meta[EXPIRES_KEY] = f"{expires_at:.3f}"
        kwargs: dict[str, Any] = {"metadata": meta, "overwrite": not create}
        if etag is not None:
            kwargs.update(etag=etag, match_condition=MatchConditions.IfNotModified)
        async with self._limiter:
            result = await self.call(self.blob(key).upload_blob, value, **kwargs)
        return Blob(value, result["etag"], expires_at)

    async def delete(self, key: str) -> None:
        async with self._limiter:
            try:
                await self.call(self.blob(key).delete_blob)
            except ResourceNotFoundError:
                pass

    async def delete_if_unchanged(self, name: str, etag: str) -> bool:
        """Delete blob ``name`` only in the version ``etag``; whether it was."""
        try:
            async with self._limiter:
                await self.call(
                    self.open_container().delete_blob,
                    name,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )
        except HttpResponseError as exc:
            if exc.status_code in (404, 409, 412):
                return False
            raise
        return True

    async def list_blobs(self, prefix: str, limit: int | None = None) -> tuple[list[Any], bool]:
        """The blobs (with metadata) whose names start with ``prefix``, up to about
        ``limit``; and whether that is all of them."""
        found: list[Any] = []
        pages = (
            self.open_container()
            .list_blobs(name_starts_with=prefix, include=["metadata"], results_per_page=limit)
            .by_page()
        )
        try:
            async for page in pages:
                self.stats["requests"] += 1
                self.stats["listings"] += 1
                found.extend([blob async for blob in page])
                if limit is not None and len(found) >= limit:
                    break
        except ResourceNotFoundError as exc:
            if not container_missing(exc):
                raise
            return [], True
        return found, pages.continuation_token is None

    async def gather(self, func: Callable[[I], Awaitable[T]], items: Sequence[I]) -> list[T]:
        """``func`` over ``items`` concurrently, ``max_concurrency`` at a time."""
        if len(items) == 1:
            return [await func(items[0])]
        results: list[Any] = [None] * len(items)
        work = iter(enumerate(items))

        async def worker() -> None:
            for i, item in work:
                results[i] = await func(item)

        try:
            async with anyio.create_task_group() as group:
                for _ in range(min(len(items), self.max_concurrency)):
                    group.start_soon(worker)
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        return results


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error in a task group's (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first
