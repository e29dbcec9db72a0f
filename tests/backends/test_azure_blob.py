"""What is specific to the Azure Block Blob backend, against a private Azurite."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import celery
import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ServiceRequestError
from azure.storage.blob.aio import BlobServiceClient

import aioresults as ar
from aioresults import states
from aioresults.backends.azure_blob import AzureBlockBlobBackend
from aioresults.backends.azure_blob._client import EXPIRES_KEY
from tests.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite, free_port
from tests.faultproxy import FaultProxy, http_request
from tests.plugins.azure import AzureFactory

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return str(uuid.uuid4())


@contextlib.asynccontextmanager
async def raw_container(factory: AzureFactory) -> AsyncIterator[Any]:
    """The test's container through the plain SDK, to look at what was stored."""
    async with BlobServiceClient.from_connection_string(
        factory.connection_string, use_env_settings=False
    ) as service:
        yield service.get_container_client(factory.container)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------ names and bytes


async def test_blob_names_are_celerys(make_azure_backend: AzureFactory) -> None:
    plain = await make_azure_backend()
    nested = await make_azure_backend(base_path="results/")
    assert isinstance(plain, AzureBlockBlobBackend) and isinstance(nested, AzureBlockBlobBackend)
    task_id, group_id = new_id(), new_id()
    await plain.mark_as_done(task_id, 1)
    await nested.mark_as_done(task_id, 2)
    await nested.save_group(group_id, [[group_id, None], [[[task_id, None], None]]])
    async with raw_container(make_azure_backend) as container:
        names = {blob.name async for blob in container.list_blobs()}
    assert names == {
        f"celery-task-meta-{task_id}",
        f"results/celery-task-meta-{task_id}",
        f"results/celery-taskset-meta-{group_id}",
    }
    # Celery computes the same names from the same settings.
    app = celery.Celery("names", backend="azureblockblob://" + make_azure_backend.connection_string)
    app.conf.azureblockblob_base_path = "results/"
    try:
        celery_backend = app.backend
        key = celery_backend.get_key_for_task(task_id).decode()
        assert celery_backend.base_path + key == nested.blob_name(nested.task_key(task_id))
        key = celery_backend.get_key_for_group(group_id).decode()
        assert celery_backend.base_path + key == nested.blob_name(nested.group_key(group_id))
    finally:
        app.close()
    assert (await plain.get_meta(task_id)).result == 1
    assert (await nested.get_meta(task_id)).result == 2


async def test_stored_bytes_are_what_celery_would_write(
    make_azure_backend: AzureFactory,
) -> None:
    backend = await make_azure_backend()
    task_id = new_id()
    await backend.mark_as_done(task_id, {"text": "ünïcode ид", "n": [1, 2.5, None]})
    async with raw_container(make_azure_backend) as container:
        raw = await (await container.download_blob(f"celery-task-meta-{task_id}")).readall()
        properties = await container.get_blob_client(
            f"celery-task-meta-{task_id}"
        ).get_blob_properties()
    app = celery.Celery("bytes", backend="azureblockblob://" + make_azure_backend.connection_string)
    try:
        # Celery downloads the blob as text and decodes it; encoding it again
        # gives the very same text: the bytes are Celery's.
        text = raw.decode("utf-8")
        assert app.backend.encode(app.backend.decode(text)).encode() == raw
    finally:
        app.close()
    assert float(properties.metadata[EXPIRES_KEY]) > 0


@pytest.mark.parametrize("bad", ["a/../b", "a/./b", "x/..", "a\\b"])
async def test_ids_naming_another_blob_are_refused(
    make_azure_backend: AzureFactory, bad: str
) -> None:
    backend = await make_azure_backend()
    with pytest.raises(ar.InvalidTaskId):
        await backend.mark_as_done(bad, 1)
    with pytest.raises(ar.ConfigurationError):
        AzureBlockBlobBackend(make_azure_backend.connection_string, base_path="a/../")


# ------------------------------------------------------------------ conditional writes


async def test_a_stale_writer_cannot_clobber_success(make_azure_backend: AzureFactory) -> None:
    slow, fast = await make_azure_backend(), await make_azure_backend()
    assert isinstance(slow, AzureBlockBlobBackend)
    task_id = new_id()
    # `slow` remembers the ETag of its own STARTED; `fast` then stores SUCCESS.
    assert await slow.mark_as_started(task_id)
    assert await fast.mark_as_done(task_id, "fast")
    # `slow` writes conditionally on its old ETag: the service refuses (412),
    # it reads again, finds SUCCESS and gives up instead of overwriting it.
    assert not await slow.mark_as_failure(task_id, ValueError("slow"))
    assert slow.stats["conflicts"] == 1
    meta = await slow.get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, "fast")


async def test_exactly_one_success_among_concurrent_writers(
    make_azure_backend: AzureFactory,
) -> None:
    backends = [await make_azure_backend() for _ in range(4)]
    task_id = new_id()

    async def write(i: int) -> bool:
        backend = backends[i % len(backends)]
        if i % 2:
            return await backend.mark_as_done(task_id, i)
        return await backend.update_state(task_id, states.PROGRESS, i)

    written = await asyncio.gather(*(write(i) for i in range(40)))
    successes = [i for i, ok in enumerate(written) if ok and i % 2]
    assert len(successes) == 1
    meta = await backends[0].get_meta(task_id)
    assert (meta.status, meta.result) == (states.SUCCESS, successes[0])


async def test_chord_with_fifty_writers_on_five_instances(
    make_azure_backend: AzureFactory,
) -> None:
    backends = [await make_azure_backend() for _ in range(5)]
    group_id = new_id()
    parts = [new_id() for _ in range(50)]
    await backends[0].set_chord_size(group_id, 50)

    async def deliver(n: int, index: int) -> ar.ChordProgress:
        return await backends[n % 5].chord_part_return(
            group_id, parts[index], states.SUCCESS, index * 10, index=index
        )

    # Every part is delivered twice, by two different instances, all at once.
    calls = [deliver(n, i) for n, i in enumerate(list(range(50)) * 2)]
    outcomes = await asyncio.gather(*calls)
    assert sum(o.counted for o in outcomes) == 50
    assert sorted(o.count for o in outcomes if o.counted) == list(range(1, 51))
    # A redelivered part reports the count it got when it was counted.
    counts = {o.task_id: o.count for o in outcomes if o.counted}
    assert all(o.count == counts[o.task_id] for o in outcomes if not o.counted)
    # The part that completed the chord says so; its redelivery may say so again
    # (the body runs at least once), never any other part, and exactly one of
    # those calls counted it.
    completes = [o for o in outcomes if o.complete]
    assert 1 <= len(completes) <= 2
    assert len({o.task_id for o in completes}) == 1
    assert sum(o.counted for o in completes) == 1
    assert all(o.count == 50 for o in completes)
    for final in completes:
        assert final.results == [i * 10 for i in range(50)]
    # A new run of the same chord starts from nothing.
    await backends[1].set_chord_size(group_id, 1)
    again = await backends[2].chord_part_return(group_id, parts[0], states.SUCCESS, "x")
    assert again.complete and again.results == ["x"]


# ------------------------------------------------------------------ polling


async def test_unchanged_blobs_are_polled_with_304(make_azure_backend: AzureFactory) -> None:
    writer = await make_azure_backend()
    reader = await make_azure_backend(poll_interval=0.01, max_poll_interval=0.02)
    assert isinstance(reader, AzureBlockBlobBackend)
    task_id = new_id()
    await writer.update_state(task_id, states.PROGRESS, {"done": 1})
    seen: list[Any] = []

    async def watch() -> None:
        async for meta in ar.AsyncResult(task_id, reader).watch(timeout=20):
            seen.append(meta.result)

    watcher = asyncio.create_task(watch())
    await until(lambda: list(reader.wait_stats().watched_ids) == [task_id])
    await until(lambda: reader.stats["not_modified"] >= 1)
    before = dict(reader.stats)
    await asyncio.sleep(0.3)
    after = dict(reader.stats)
    assert after["not_modified"] - before["not_modified"] >= 5
    assert after["downloads"] == before["downloads"]  # every poll answered 304, no body
    await writer.update_state(task_id, states.PROGRESS, {"done": 2})
    await writer.mark_as_done(task_id, "end")
    await asyncio.wait_for(watcher, 20)
    assert seen[0] == {"done": 1} and seen[-1] == "end"
    assert list(reader.wait_stats().watched_ids) == []
    # Nothing of the watch stays behind: the next read is a whole GET again,
    # not a conditional one on the ETag the poller knew.
    before = dict(reader.stats)
    assert (await reader.get_meta(task_id)).result == "end"
    assert reader.stats["downloads"] - before["downloads"] == 1
    assert reader.stats["not_modified"] == before["not_modified"]


async def test_polling_backs_off_while_nothing_changes(make_azure_backend: AzureFactory) -> None:
    writer = await make_azure_backend()
    reader = await make_azure_backend(poll_interval=0.02, max_poll_interval=0.64)
    assert isinstance(reader, AzureBlockBlobBackend)
    missing, retrying = new_id(), new_id()
    # A RETRY record holds an exception: read again, it must still count as unchanged.
    await writer.mark_as_retry(retrying, ConnectionError("flaky"))
    waiting = [
        asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=20))
        for task_id in (missing, retrying)
    ]
    await until(lambda: reader.wait_stats().waiters == 2)
    start = reader.stats["requests"]
    await asyncio.sleep(0.6)
    early = reader.stats["requests"] - start
    await asyncio.sleep(1.2)
    late = reader.stats["requests"] - start - early
    # Pauses double from 0.02 s: about 5 polls in the first 0.6 s, 2 in the next 1.2 s
    # (two requests each).
    assert early / 0.6 > 2 * (late / 1.2)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # Nobody waits: nothing is sent.
    idle = reader.stats["requests"]
    await asyncio.sleep(0.3)
    assert reader.stats["requests"] == idle


@pytest.mark.parametrize("list_threshold", [16, 0])
async def test_many_waiters_share_one_poller(
    make_azure_backend: AzureFactory, list_threshold: int
) -> None:
    writer = await make_azure_backend()
    reader = await make_azure_backend(
        poll_interval=0.02, max_poll_interval=0.05, list_threshold=list_threshold
    )
    assert isinstance(reader, AzureBlockBlobBackend)
    ids = [new_id() for _ in range(40)]
    # Half the results exist (started, not ready), half are missing.
    await asyncio.gather(*(writer.mark_as_started(t) for t in ids[:20]))
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=20)) for i in ids]
    # Every first read is done: the ETags of the 20 existing blobs are known.
    await until(lambda: reader.wait_stats().waiters == 40 and not reader.wait_stats().unsettled)
    # Let the polls that began before those ETags were known end.
    start = dict(reader.stats)
    if list_threshold:
        await until(lambda: reader.stats["listings"] - start["listings"] >= 2)
    else:
        await until(lambda: reader.stats["not_modified"] - start["not_modified"] >= 20)
    before = dict(reader.stats)
    if list_threshold:
        # A poll is one listing: missing blobs are absent from it, the others
        # show the ETags already known, so no GET is needed.
        await until(lambda: reader.stats["listings"] - before["listings"] >= 3)
        after = dict(reader.stats)
        assert after["requests"] - before["requests"] == after["listings"] - before["listings"]
    else:
        # A poll is 40 GETs: 404 for the missing, 304 for the unchanged.
        await until(lambda: reader.stats["not_modified"] - before["not_modified"] >= 40)
        after = dict(reader.stats)
        assert after["listings"] == 0 and after["requests"] - before["requests"] >= 60
    assert after["downloads"] == before["downloads"]  # nothing changed: no body read
    await asyncio.gather(*(writer.mark_as_done(t, i) for i, t in enumerate(ids)))
    assert await asyncio.gather(*waits) == list(range(40))


async def test_a_large_container_is_not_listed_again(make_azure_backend: AzureFactory) -> None:
    writer = await make_azure_backend()
    reader = await make_azure_backend(poll_interval=0.02, max_poll_interval=0.05)
    assert isinstance(reader, AzureBlockBlobBackend)
    await asyncio.gather(*(writer.mark_as_done(new_id(), i) for i in range(100)))
    ids = [new_id() for _ in range(20)]
    waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=20)) for i in ids]
    # Waiters register, then read: wait for those first reads, and for the polls
    # that may have begun beside them, to be over.
    await until(lambda: reader.wait_stats().waiters == 20 and not reader.wait_stats().unsettled)
    polls = reader.wait_stats().polls
    await until(lambda: reader.wait_stats().polls >= polls + 2)
    # 100 blobs are more than twice 20 reads: after one try, polls GET each blob.
    listings = reader.stats["listings"]
    requests = reader.stats["requests"]
    await asyncio.sleep(0.3)
    assert reader.stats["listings"] == listings <= 2
    assert reader.stats["requests"] - requests >= 20
    await asyncio.gather(*(writer.mark_as_done(t, i) for i, t in enumerate(ids)))
    assert await asyncio.gather(*waits) == list(range(20))


async def test_restarting_azurite_loses_no_result() -> None:
    with Azurite(on_disk=True) as server:
        options: dict[str, Any] = dict(
            container_name="restart",
            poll_interval=0.02,
            max_poll_interval=0.2,
            retries=2,
            retry_backoff=0.05,
        )
        reader = AzureBlockBlobBackend(server.connection_string(), **options)
        writer = AzureBlockBlobBackend(server.connection_string(), **options)
        async with reader, writer:
            ids = [new_id() for _ in range(20)]
            await writer.mark_as_started(ids[0])
            waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=40)) for i in ids]
            # Registered, and their first read done: only the poller reads now.
            await until(
                lambda: reader.wait_stats().waiters == 20 and not reader.wait_stats().unsettled
            )
            await anyio.to_thread.run_sync(server.stop)
            await asyncio.sleep(0.5)  # polls fail meanwhile
            with pytest.raises(ar.BackendUnavailable):
                await writer.mark_as_done(ids[0], "lost")
            await anyio.to_thread.run_sync(server.start)
            # What was stored before the restart is still there.
            assert (await writer.get_meta(ids[0])).status == states.STARTED
            for i, task_id in enumerate(ids):
                assert await writer.mark_as_done(task_id, i)
            assert await asyncio.gather(*waits) == list(range(20))
            assert reader.wait_stats().waiters == 0


# ------------------------------------------------------------------ errors


async def test_bad_credentials_are_a_clear_error(make_azure_backend: AzureFactory) -> None:
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    backend = AzureBlockBlobBackend(
        make_azure_backend.server.connection_string(wrong_key),
        container_name=make_azure_backend.container,
    )
    try:
        with pytest.raises(ar.BackendError, match="refused the credentials") as caught:
            await backend.get_meta(new_id())
        assert not isinstance(caught.value, ar.BackendUnavailable)
        assert wrong_key not in str(caught.value) and wrong_key not in repr(backend)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("option", ["create_container", "create"])
async def test_missing_container_is_a_clear_error(
    make_azure_backend: AzureFactory, option: str
) -> None:
    backend = await make_azure_backend(container_name="never-created", **{option: False})
    with pytest.raises(ar.StoreNotFound, match="'never-created' does not exist"):
        await backend.mark_as_done(new_id(), 1)
    # Created on first use by default.
    name = f"c-{uuid.uuid4().hex[:12]}"
    created = await make_azure_backend(container_name=name)
    assert await created.mark_as_done(new_id(), 1)
    async with BlobServiceClient.from_connection_string(
        make_azure_backend.connection_string, use_env_settings=False
    ) as service:
        assert not await service.get_container_client("never-created").exists()
        assert await service.get_container_client(name).exists()
        await service.delete_container(name)


async def test_unreachable_endpoint_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT_NAME};"
    )
    backend = AzureBlockBlobBackend(connection, retries=1, retry_backoff=0.01)
    try:
        with pytest.raises(ar.BackendUnavailable, match="cannot reach") as caught:
            await backend.get_meta(new_id())
        assert isinstance(caught.value.__cause__, ServiceRequestError)
        assert ACCOUNT_KEY not in str(caught.value)
    finally:
        await backend.aclose()


def _answer(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("status", ["503 Server Busy", "429 Too Many Requests"])
async def test_throttling_is_retried_with_backoff(
    make_azure_backend: AzureFactory, status: str
) -> None:
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        busy = proxy.answer(_answer(status), times=2)
        backend = await make_azure_backend(port=proxy.port, retry_backoff=0.01)
        task_id = new_id()
        assert await backend.mark_as_done(task_id, "through")
        assert (await backend.get_meta(task_id)).result == "through"
        assert busy.hits == 2
        if status.startswith("429"):
            assert backend.stats["throttled"] == 2


async def test_throttling_that_lasts_is_unavailable(make_azure_backend: AzureFactory) -> None:
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        busy = proxy.answer(_answer("503 Server Busy"), times=None)
        backend = await make_azure_backend(port=proxy.port, retries=2, retry_backoff=0.01)
        with pytest.raises(ar.BackendUnavailable, match="503"):
            await backend.get_meta(new_id())
        assert busy.hits == 3  # the request and its two retries


# ------------------------------------------------------------------ expiry and housekeeping


async def test_expiry_and_cleanup(make_azure_backend: AzureFactory) -> None:
    short = await make_azure_backend(expires=1)
    keeper = await make_azure_backend(expires=None)
    gone = [new_id() for _ in range(3)]
    kept, group_id = new_id(), new_id()
    for task_id in gone:
        await short.mark_as_done(task_id, "soon gone")
    await short.save_group(group_id, [[group_id, None], []])
    await keeper.mark_as_done(kept, "kept")
    assert (await short.get_meta(gone[0])).status == states.SUCCESS
    await asyncio.sleep(1.2)
    # Expired: never returned, and no longer guarding against an overwrite.
    assert (await short.get_meta(gone[0])).status == states.PENDING
    assert await short.restore_group(group_id) is None
    assert await keeper.mark_as_done(gone[2], "again")
    assert await short.cleanup() == 3  # two results and the group
    assert await short.cleanup() == 0
    async with raw_container(make_azure_backend) as container:
        names = sorted([blob.name async for blob in container.list_blobs()])
    assert names == sorted([f"celery-task-meta-{kept}", f"celery-task-meta-{gone[2]}"])
    assert (await short.get_meta(kept)).result == "kept"


async def test_forget_of_a_missing_result_is_a_no_op(make_azure_backend: AzureFactory) -> None:
    backend = await make_azure_backend()
    await backend.forget(new_id())
    await backend.delete_group(new_id())
    task_id = new_id()
    await backend.mark_as_done(task_id, 1)
    await backend.forget(task_id)
    await backend.forget(task_id)
    assert (await backend.get_meta(task_id)).status == states.PENDING


# ------------------------------------------------------------------ configuration and secrets


async def test_urls_credentials_and_redaction(
    make_azure_backend: AzureFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioresults")
    caplog.set_level(logging.DEBUG, logger="azure")
    connection = make_azure_backend.connection_string
    task_id = new_id()
    by_url = ar.connect(
        "azureblockblob://" + connection, container_name=make_azure_backend.container
    )
    by_credential = AzureBlockBlobBackend(
        account_url=make_azure_backend.server.blob_endpoint,
        credential=AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY),
        container_name=make_azure_backend.container,
    )
    async with by_url, by_credential:
        assert isinstance(by_url, AzureBlockBlobBackend)
        assert await by_url.mark_as_done(task_id, "secret-free")
        assert await ar.AsyncResult(task_id, by_credential).get(timeout=5) == "secret-free"
        assert "AccountKey=***" in repr(by_url) and ACCOUNT_KEY not in repr(by_url)
    assert caplog.records  # the SDK did log its requests
    assert ACCOUNT_KEY not in caplog.text
    assert "SharedKey" not in caplog.text  # no Authorization header, no signature
    # Celery's credential URL form: the account URL after the credential's name.
    # Without azure-identity (hidden here, so nothing is sent anywhere) the first
    # use names the credential, the account it is for and the fix.
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    named = ar.connect("azureblockblob://DefaultAzureCredential@https://acct.blob.core.windows.net")
    assert isinstance(named, AzureBlockBlobBackend)
    with pytest.raises(
        ar.MissingDependency,
        match=r"^DefaultAzureCredential \(for https://acct\.blob\.core\.windows\.net\) "
        r"needs the azure-identity package",
    ):
        await named.get_meta(new_id())
    await named.aclose()
    with pytest.raises(ar.ConfigurationError):
        ar.connect("azureblockblob://")
    with pytest.raises(ar.ConfigurationError):
        AzureBlockBlobBackend("not a connection string")
    with pytest.raises(ar.ConfigurationError):
        AzureBlockBlobBackend(connection, poll_interval=0)


# ------------------------------------------------------------------ nothing lost at the edges
#
# A FaultProxy between the backend and Azurite loses replies: the request is
# done by the service, the client's connection is reset and the SDK sends it
# again, which then finds its own earlier work.


def _put(factory: AzureFactory, blob_prefix: str) -> Any:
    """A predicate for the PUTs of the blobs whose names start with ``blob_prefix``."""
    return http_request("PUT", f"/{ACCOUNT_NAME}/{factory.container}/{blob_prefix}")


@pytest.mark.parametrize("lost", ["part", "count", "completing"])
async def test_a_lost_reply_neither_loses_nor_doubles_a_chord_part(
    make_azure_backend: AzureFactory, lost: str
) -> None:
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        backend = await make_azure_backend(port=proxy.port, retry_backoff=0.01)
        assert isinstance(backend, AzureBlockBlobBackend)
        group_id, parts = new_id(), [new_id() for _ in range(5)]
        group_blob = backend.blob_name(backend.group_key(group_id))
        part_values = _put(make_azure_backend, f"{group_blob}.p/")
        # The chord's count (not a part's value): set_chord_size writes it once first.
        bookkeeping = _put(make_azure_backend, f"{group_blob}.")

        def count_write(head: bytes) -> bool:
            return bookkeeping(head) and not part_values(head)

        if lost == "part":  # the value of the third part
            fault = proxy.drop_reply(part_values, after=2)
        elif lost == "count":  # the count of the third part
            fault = proxy.drop_reply(count_write, after=1 + 2)
        else:  # the count of the last part: the call that completes the chord
            fault = proxy.drop_reply(count_write, after=1 + 4)
        await backend.set_chord_size(group_id, 5)
        outcomes = [
            await backend.chord_part_return(group_id, part, states.SUCCESS, i * 10, index=i)
            for i, part in enumerate(parts)
        ]
        assert fault.hits == 1
        # Each call counted its part once (the retried one recognised its own
        # receipt), in order, never past the size.
        assert [(o.counted, o.count) for o in outcomes] == [(True, n) for n in range(1, 6)], (
            f"counts {[o.count for o in outcomes]}, "
            f"complete at calls {[i + 1 for i, o in enumerate(outcomes) if o.complete]}"
        )
        assert [o.complete for o in outcomes] == [False] * 4 + [True]
        assert outcomes[-1].task_id == parts[4]
        assert outcomes[-1].results == [0, 10, 20, 30, 40]
        # Redelivered: only the completing part says complete again, counted by nobody.
        again = [
            await backend.chord_part_return(group_id, part, states.SUCCESS, i * 10, index=i)
            for i, part in enumerate(parts)
        ]
        assert [(o.counted, o.count, o.complete) for o in again] == [
            (False, n, n == 5) for n in range(1, 6)
        ]
        assert again[-1].results == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("before", ["nothing", "own-started", "foreign-started"])
async def test_a_lost_reply_on_a_guarded_store_finds_its_own_write(
    make_azure_backend: AzureFactory, before: str
) -> None:
    other = await make_azure_backend()
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        backend = await make_azure_backend(port=proxy.port, retry_backoff=0.01)
        task_id = new_id()
        record = _put(make_azure_backend, f"celery-task-meta-{task_id}")
        if before == "own-started":
            # Conditional on this backend's own ETag (If-Match).
            assert await backend.mark_as_started(task_id)
        elif before == "foreign-started":
            # If-None-Match fails (409), a read, then If-Match on the read ETag:
            # the reply of that second PUT, the one that writes, is lost.
            assert await other.mark_as_started(task_id)
        fault = proxy.drop_reply(record, after=1 if before == "foreign-started" else 0)
        assert await backend.mark_as_done(task_id, "mine")
        assert fault.hits == 1
        meta = await other.get_meta(task_id)
        assert (meta.status, meta.result) == (states.SUCCESS, "mine")
        # Still a SUCCESS that nothing overwrites.
        assert not await backend.mark_as_done(task_id, "another")
        assert not await other.mark_as_failure(task_id, ValueError("late"))
        assert (await other.get_meta(task_id)).result == "mine"


async def test_a_deleted_container_is_created_again_or_named(
    make_azure_backend: AzureFactory,
) -> None:
    writer = await make_azure_backend()
    reader = await make_azure_backend(poll_interval=0.02, max_poll_interval=0.1)
    strict = await make_azure_backend(create_container=False)
    started, missing = new_id(), new_id()
    assert await writer.mark_as_started(started)  # `writer` knows its ETag
    assert (await strict.get_meta(started)).status == states.STARTED  # opened
    waits = [
        asyncio.create_task(ar.AsyncResult(task_id, reader).get(timeout=30))
        for task_id in (started, missing)
    ]
    await until(lambda: reader.wait_stats().waiters == 2 and not reader.wait_stats().unsettled)
    await make_azure_backend.delete_container()
    # A deleted container reads as empty.
    assert (await writer.get_meta(started)).status == states.PENDING
    polls = reader.wait_stats().polls
    await until(lambda: reader.wait_stats().polls >= polls + 2)  # the waiters polled it gone
    # Without create_container, a write names what is missing (and creates nothing).
    with anyio.fail_after(5):
        with pytest.raises(
            ar.BackendError, match=f"container '{make_azure_backend.container}' does not exist"
        ):
            await strict.mark_as_done(started, "not stored")
    async with raw_container(make_azure_backend) as container:
        assert not await container.exists()
    # With it (the default), the next write creates it again, and the waiters
    # that waited across the deletion get their results.
    assert await writer.mark_as_done(started, "after")
    assert await writer.mark_as_done(missing, "too")
    assert await asyncio.gather(*waits) == ["after", "too"]
    assert (await strict.get_meta(started)).result == "after"


async def test_waiters_outlast_reset_and_refused_connections(
    make_azure_backend: AzureFactory,
) -> None:
    writer = await make_azure_backend()
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        reader = await make_azure_backend(
            port=proxy.port,
            poll_interval=0.02,
            max_poll_interval=0.1,
            retries=1,
            retry_backoff=0.01,
        )
        ids = [new_id() for _ in range(5)]
        waits = [asyncio.create_task(ar.AsyncResult(i, reader).get(timeout=30)) for i in ids]
        await until(lambda: reader.wait_stats().waiters == 5 and not reader.wait_stats().unsettled)
        await proxy.refuse()
        assert proxy.reset_all() >= 1  # the reader's keep-alive connections
        accepted, polls = proxy.accepted, reader.wait_stats().polls
        await until(lambda: reader.wait_stats().polls >= polls + 3)  # and failed
        assert proxy.accepted == accepted
        for i, task_id in enumerate(ids):
            assert await writer.mark_as_done(task_id, i)
        # An outage is not a result: the waiters wait on, and get theirs once it ends.
        assert not any(wait.done() for wait in waits)
        await proxy.refuse(False)
        assert await asyncio.gather(*waits) == list(range(5))
        assert proxy.accepted > accepted


@pytest.mark.parametrize("phase", ["queued", "sent"])
async def test_aclose_ends_200_reads_in_flight_at_once(
    make_azure_backend: AzureFactory, phase: str
) -> None:
    writer = await make_azure_backend()
    done = [new_id() for _ in range(10)]
    for i, task_id in enumerate(done):
        assert await writer.mark_as_done(task_id, i)
    async with FaultProxy(("127.0.0.1", make_azure_backend.server.port)) as proxy:
        backend = await make_azure_backend(port=proxy.port)
        await backend.get_many([new_id()])  # open: the reads start at once
        if phase == "sent":
            held = proxy.delay(
                30, http_request("GET", f"/{ACCOUNT_NAME}/{make_azure_backend.container}/")
            )
        ids = [done[i % 10] if i % 4 == 0 else new_id() for i in range(200)]

        async def read(i: int, task_id: str) -> Any:
            if i % 2:
                return (await backend.get_many([task_id]))[0].result
            return await ar.AsyncResult(task_id, backend).get(timeout=60)

        calls = [asyncio.create_task(read(i, task_id)) for i, task_id in enumerate(ids)]
        if phase == "queued":
            await asyncio.sleep(0)  # every call is in: reads queued, none sent yet
        else:
            await held.wait()  # reads under way, held by the proxy
        with anyio.fail_after(5):
            await backend.aclose()
        finished, hung = await asyncio.wait(calls, timeout=3)
        for call in hung:
            call.cancel()
        outcomes = [call.exception() or call.result() for call in finished]
        closed = [o for o in outcomes if isinstance(o, ar.BackendClosed)]
        other = [o for o in outcomes if isinstance(o, BaseException) and o not in closed]
        assert (len(hung), other) == (0, []), (
            f"of 200 reads, {len(hung)} hung and {len(other)} ended with another error: "
            f"{other[:3]!r}"
        )
        # A read that finished before the close has its result.
        for i, call in enumerate(calls):
            if not isinstance(call.exception(), ar.BackendClosed):
                assert call.result() == (done.index(ids[i]) if ids[i] in done else None)
        assert closed  # the close did interrupt reads
