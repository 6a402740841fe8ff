"""The Redis mirror applies each committed movement once, and drift repair never
mistakes an operation in flight for drift (issue 9, holes 3 and 4)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest
import redis as redis_sync

from dpp.money import drift, ledger
from dpp.money.ledger import Reserved
from dpp.money.mirror import hold_id
from dpp.money.rules import Outcome, RunStatus
from tests.moneykit import Replica, create_tenant, draft, open_replica
from tests.services import delete_redis_prefix


async def assert_mirror_equals_postgres(replica: Replica, tenant: str) -> None:
    budget = await replica.accounts.budget(tenant)
    mirrored = await replica.mirror.read(tenant)
    assert mirrored is not None
    assert (mirrored.balance_usd_micros, mirrored.reserved_usd_micros) == (
        budget["balance_usd_micros"],
        budget["reserved_usd_micros"],
    )
    report = await replica.accounts.audit()  # invariant 5 included: the mirror is read
    assert report.ok, report.violations


def forget_markers(redis_url: str, prefix: str) -> int:
    """What a 7-day expiry, volatile-* eviction or a partial flush does to markers."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        markers = list(client.scan_iter(match=f"{prefix}:*:op:*", count=1000))
        if markers:
            client.delete(*markers)
        return len(markers)
    finally:
        client.close()


@pytest.mark.parametrize("lost", ["markers", "everything"])
async def test_a_replayed_cancel_or_credit_whose_marker_is_gone_moves_the_mirror_not(
    database_url, services, redis_prefix, lost
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(3_000, minimum_fee_usd_micros=300)
        assert isinstance(await replica.budgets.reserve(tenant, run), Reserved)
        cancel = ledger.SettleRequest(
            run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        )
        assert (await replica.budgets.settle(tenant, cancel)).applied
        if lost == "markers":
            assert forget_markers(services.redis_url, redis_prefix) >= 3
        else:
            await anyio.to_thread.run_sync(delete_redis_prefix, services.redis_url, redis_prefix)
            # the next reservation finds the mirror gone and rebuilds it from Postgres
            assert isinstance(await replica.budgets.reserve(tenant, draft(1_000)), Reserved)
        # a client retrying its cancel, an operator re-running a credit
        assert not (await replica.budgets.settle(tenant, cancel)).applied
        assert (await replica.budgets.credit(tenant, 10_000, "credit:seed")).replayed
        await assert_mirror_equals_postgres(replica, tenant)


async def cancel_unmirrored(replica: Replica) -> tuple[str, list[tuple[str, int, int]], int]:
    """A tenant with a run reserved, then cancelled in Postgres only: its mirror
    write not sent yet. The tenant, that write's items and its ledger version."""
    tenant = await create_tenant(replica.pool)
    await replica.budgets.credit(tenant, 10_000, "credit:seed")
    run = draft(3_000, minimum_fee_usd_micros=300)
    assert isinstance(await replica.budgets.reserve(tenant, run), Reserved)
    cancel = ledger.SettleRequest(
        run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
    )
    result = await ledger.settle(replica.pool, replica.queries, cancel)
    assert result.applied and result.budget is not None
    return tenant, [(f"settle:{run.run_id}", 3_000, 0)], result.budget.ledger_version


async def test_a_settlement_mirrored_after_a_repair_copied_it_is_not_counted_twice(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        # Committed in Postgres; its mirror write is slow (not landed yet)...
        tenant, items, version = await cancel_unmirrored(replica)
        # ...for longer than drift repair's stability window: repaired from Postgres
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        assert len(repairs) == 1
        # then the late write lands: the repair already holds it
        assert not await replica.mirror.settle_many(tenant, items, version)
        await assert_mirror_equals_postgres(replica, tenant)


async def test_a_mirror_write_delivered_twice_is_applied_once(
    database_url, services, redis_prefix
) -> None:
    # A script call whose reply is lost is sent again (the caller cannot tell
    # whether it ran): its operation marker makes the second delivery a no-op.
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant, items, version = await cancel_unmirrored(replica)
        assert await replica.mirror.settle_many(tenant, items, version)
        await replica.mirror.settle_many(tenant, items, version)  # the same call, again
        await assert_mirror_equals_postgres(replica, tenant)


async def test_a_reservation_whose_commit_is_held_is_not_taken_for_drift(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(4_000)
        blocker = await asyncpg.connect(database_url)
        outcome: list[object] = []
        try:
            transaction = blocker.transaction()
            await transaction.start()
            # another transaction holds the tenant row: the reservation's commit waits
            await blocker.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant)
            async with anyio.create_task_group() as group:

                async def reserve() -> None:
                    outcome.append(await replica.budgets.reserve(tenant, run))

                group.start_soon(reserve)
                with anyio.fail_after(10):  # the hold is placed in Redis first
                    while True:
                        mirrored = await replica.mirror.read(tenant)
                        if mirrored is not None and mirrored.reserved_usd_micros == 4_000:
                            break
                        await anyio.sleep(0.02)
                # several stability windows pass with the commit still held
                for _ in range(2):
                    repairs, _ = await drift.repair_drift(
                        replica.pool, replica.queries, replica.mirror, settle_s=0.05
                    )
                    assert repairs == []
                mirrored = await replica.mirror.read(tenant)
                assert mirrored is not None and mirrored.reserved_usd_micros == 4_000
                await transaction.rollback()
        finally:
            await blocker.close()
        assert isinstance(outcome[0], Reserved)
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        assert repairs == []
        pending = await replica.redis.hgetall(replica.mirror.pending_key(tenant))
        assert pending == {}  # the commit was reported back
        await assert_mirror_equals_postgres(replica, tenant)


async def test_a_hold_abandoned_by_a_crash_is_dropped_once_old_enough(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        await replica.budgets.reserve(tenant, draft(1_000))  # loads the mirror
        # A process died between its Redis hold and its Postgres commit.
        orphan = hold_id("run_" + "o" * 26)
        assert (await replica.mirror.reserve(tenant, [(orphan, 2_000)])).accepted == [True]
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        assert repairs == []  # young: it may still commit
        # time passes (without the test waiting): placed long ago
        await replica.redis.hset(replica.mirror.pending_key(tenant), orphan, "2000:0")
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        assert [r["dropped_holds"] for r in repairs] == [1]
        assert await replica.redis.hgetall(replica.mirror.pending_key(tenant)) == {}
        await assert_mirror_equals_postgres(replica, tenant)
        # its actor was only slow after all, and now hears Postgres refuse it:
        # the hold the repair dropped is not given back a second time
        await replica.mirror.resolve_holds(tenant, [], [(orphan, 2_000)])
        await assert_mirror_equals_postgres(replica, tenant)


async def test_a_commit_is_reported_to_the_mirror_with_the_next_reserve_call(
    database_url, services, redis_prefix
) -> None:
    """Reporting a commit moves no money in the mirror (the hold is already in
    ``reserved``), so the budget actor sends it with its next reserve script
    call instead of a call of its own, and its stop reports what is left.
    Meanwhile the committed hold is still pending, and the mirror equals
    Postgres: drift repair and the audit take it as committed, not as drift."""
    async with open_replica(
        database_url, services.redis_url, redis_prefix, idle_timeout_s=5.0
    ) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        first, second = draft(1_000), draft(2_000)

        async def pending() -> list[str]:
            observed = await replica.mirror.observe(tenant)
            assert observed is not None
            return [hold.hold_id for hold in observed.pending]

        assert isinstance(await replica.budgets.reserve(tenant, first), Reserved)
        assert await pending() == [hold_id(first.run_id)]
        assert isinstance(await replica.budgets.reserve(tenant, second), Reserved)
        assert await pending() == [hold_id(second.run_id)]
        await assert_mirror_equals_postgres(replica, tenant)
        # drift repair takes the committed pending hold for what it is, not drift
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        assert repairs == []
        with anyio.fail_after(30):  # the actor idles out after 5 s
            while True:
                if tenant not in replica.budgets.registry:
                    break
                await anyio.sleep(0.1)
        assert await pending() == []
        await assert_mirror_equals_postgres(replica, tenant)
