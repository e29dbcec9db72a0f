"""Checks shared by the SQL backends' tests on a server of their own that is
frozen (SIGSTOP: the kernel still takes connections, nothing answers)."""

from __future__ import annotations

import asyncio
import uuid

import anyio

import aioresults as ar
from tests.services import MariaDBServer, PostgresServer


async def queued_callers_fail_in_time(
    backend: ar.BaseBackend, server: PostgresServer | MariaDBServer
) -> None:
    """40 callers on a backend of 2 pool connections and a 0.5 s command timeout
    each raise ``BackendUnavailable`` in time while ``server`` is frozen: the 38
    that wait for a connection (or make one, whose handshake never ends) are
    bounded by the command timeout too. The backend works once it thaws."""
    await backend.save_group(str(uuid.uuid4()), [])
    server.freeze()
    try:
        calls = [backend.restore_group(str(uuid.uuid4())) for _ in range(20)]
        calls += [backend.forget(str(uuid.uuid4())) for _ in range(20)]
        with anyio.fail_after(5):  # each caller: 0.5 s queued, 0.5 s running
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        server.thaw()
    assert [type(o) for o in outcomes] == [ar.BackendUnavailable] * 40
    group_id = str(uuid.uuid4())
    await backend.save_group(group_id, ["after"])
    assert await backend.restore_group(group_id) == ["after"]
