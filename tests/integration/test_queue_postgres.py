"""The Postgres queue's announcements: every admission wakes every replica's
dispatcher with a NOTIFY sent after it asked, whether this replica's
announcer sends it (while the queue listens) or the caller does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import asyncpg
import pytest

from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.queue.base import QueuedRun
from dpp.adapters.queue.postgres import CHANNEL, PostgresQueue

WAIT_S = 5.0


def _queued(run_id: str) -> QueuedRun:
    return QueuedRun(run_id, "ten_x", "echo", None, datetime.now(UTC))


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[PostgresQueue]:
    pool = await create_pool(database_url)
    try:
        yield PostgresQueue(pool, Queries.load(), dsn=database_url, lease_sec=30)
    finally:
        await pool.close()


class _OtherReplica:
    """A LISTEN of its own, as another replica's dispatcher has."""

    def __init__(self) -> None:
        self.heard = 0
        self.changed = anyio.Event()

    def on_notify(self, *_: object) -> None:
        self.heard += 1
        self.changed.set()

    async def wait_for(self, heard: int) -> None:
        with anyio.fail_after(WAIT_S):
            while self.heard < heard:
                self.changed = anyio.Event()
                await self.changed.wait()


@pytest.fixture
async def other_replica(database_url: str) -> AsyncIterator[_OtherReplica]:
    listener = _OtherReplica()
    connection = await asyncpg.connect(database_url)
    try:
        await connection.add_listener(CHANNEL, listener.on_notify)
        yield listener
    finally:
        await connection.close()


async def test_without_a_listener_the_caller_sends_the_notify(
    queue: PostgresQueue, other_replica: _OtherReplica
) -> None:
    await queue.enqueue([_queued("run_a")])
    await other_replica.wait_for(1)
    await queue.enqueue([])  # nothing to announce: nothing sent
    await queue.enqueue([_queued("run_b")])
    await other_replica.wait_for(2)
    await anyio.sleep(0.2)
    assert other_replica.heard == 2


async def test_while_listening_the_announcer_sends_it_after_every_ask(
    queue: PostgresQueue, other_replica: _OtherReplica
) -> None:
    woken = 0
    heard_itself = anyio.Event()

    def wake() -> None:
        nonlocal woken
        woken += 1  # once on connecting, then once per NOTIFY
        if woken > 1:
            heard_itself.set()

    async with anyio.create_task_group() as group:
        await group.start(queue.listen, wake)
        for index in range(3):
            # one at a time: each ask is followed by a NOTIFY sent after it
            await queue.enqueue([_queued(f"run_{index}")])
            await other_replica.wait_for(index + 1)
        # asks that come while none is being sent share one NOTIFY, sent after
        # the last of them (the announcer runs once they let it)
        heard = other_replica.heard
        for index in range(20):
            await queue.enqueue([_queued(f"run_burst_{index}")])
        await other_replica.wait_for(heard + 1)
        await anyio.sleep(0.3)
        assert other_replica.heard == heard + 1
        with anyio.fail_after(WAIT_S):
            await heard_itself.wait()  # this replica's own dispatcher hears it too
        group.cancel_scope.cancel()
    # the listener is gone: the caller announces again
    heard = other_replica.heard
    await queue.enqueue([_queued("run_after")])
    await other_replica.wait_for(heard + 1)
