"""Finalize claims (PROCESSING -> CLAIMED) group-committed, on real Postgres.

Run actors that finish while a finalize claim is on the wire share the next
round trip; each claim keeps its own guard (lease token, status, version) and
each caller learns its own outcome, even when some guards fail in a batch.
"""

from __future__ import annotations

from typing import Any

import anyio

from tests.integration.test_execution import WAIT_S, Harness, eventually, open_harness


async def _claimed(h: Harness, count: int) -> list[Any]:
    for n in range(count):
        await h.submit({"payload": n}, announce=False)
    claimed = await h.queue.claim_batch(count)
    assert len(claimed) == count
    return sorted(claimed, key=lambda run: run.run_id)


async def _wait_blocked(h: Harness) -> None:
    """Until a statement waits for a row lock (the first claim, on the wire)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with anyio.fail_after(WAIT_S):
        while True:
            if await h.pool.fetchval(query):
                return
            await anyio.sleep(0.02)


async def test_claims_asked_for_meanwhile_share_one_round_trip_each_with_its_guard(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        leases = h.run_services.leases
        first, *runs = await _claimed(h, 5)
        stale = runs[-1]
        # the stale claimant's run moved on (a heartbeat it did not see)
        assert await leases.renew(stale, stale.version, 30) == stale.version + 1
        outcomes: dict[str, int | None] = {}

        async def claim(run: Any) -> None:
            outcomes[run.run_id] = await leases.claim_for_finalize(run, run.version)

        locker = await h.pool.acquire()
        try:
            async with anyio.create_task_group() as tasks:
                # hold the first claim on the wire: its row is locked elsewhere
                transaction = locker.transaction()
                await transaction.start()
                await locker.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", first.run_id)
                tasks.start_soon(claim, first)
                await _wait_blocked(h)
                for run in runs:
                    tasks.start_soon(claim, run)
                await eventually(lambda: leases.finalize_claims_waiting() == len(runs))
                await transaction.rollback()
        finally:
            await h.pool.release(locker)
        assert leases.finalize_batches == 1  # the four waiting went as one
        assert outcomes == {
            **{run.run_id: run.version + 1 for run in [first, *runs[:-1]]},
            stale.run_id: None,
        }
        for run in [first, *runs[:-1]]:
            row = await h.row(run.run_id)
            assert (row["status"], row["version"]) == ("CLAIMED", run.version + 1)
        row = await h.row(stale.run_id)
        assert (row["status"], row["version"]) == ("PROCESSING", stale.version + 1)


async def test_a_batch_where_every_guard_holds_answers_each_in_its_order(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        leases = h.run_services.leases
        runs = await _claimed(h, 6)
        outcomes: dict[str, int | None] = {}

        async def claim(run: Any) -> None:
            outcomes[run.run_id] = await leases.claim_for_finalize(run, run.version)

        with anyio.fail_after(WAIT_S):
            async with anyio.create_task_group() as tasks:
                for run in reversed(runs):  # asked out of id order
                    tasks.start_soon(claim, run)
        assert outcomes == {run.run_id: run.version + 1 for run in runs}
        assert leases.finalize_batches == 1  # the first alone, then the other five
        for run in runs:
            assert (await h.row(run.run_id))["status"] == "CLAIMED"
