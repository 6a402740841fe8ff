"""The money core against real Postgres and Redis: no overspend, exactly-once settlement."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from dpp.actors.kernel import ActorCrashed
from dpp.faults import InjectedCrash, armed
from dpp.money import drift, ledger
from dpp.money.ledger import ConcurrencyLimited, InsufficientBudget, Reserved
from dpp.money.mirror import hold_id
from dpp.money.rules import Outcome, RunStatus
from dpp.runs.admission import ReservationBusy, ReservationOutcomeUnknown
from dpp.runs.service import SettlementUnavailable
from tests.moneykit import claim_for_test, create_plan, create_tenant, draft, open_replica
from tests.redis_cluster import single_and_cluster
from tests.services import delete_redis_prefix

RESERVATION = 1_000


async def _storm(replicas, tenant_id: str, count: int) -> list[object]:
    outcomes: list[object] = []

    async def one(index: int) -> None:
        replica = replicas[index % len(replicas)]
        outcomes.append(await replica.budgets.reserve(tenant_id, draft(RESERVATION)))

    async with anyio.create_task_group() as group:
        for index in range(count):
            group.start_soon(one, index)
    return outcomes


@single_and_cluster
@pytest.mark.parametrize("replica_count", [1, 2])
async def test_exactly_ten_of_a_hundred_concurrent_reservations_fit(
    database_url, services, redis_prefix, replica_count
) -> None:
    async with contextlib_replicas(database_url, services, redis_prefix, replica_count) as replicas:
        first = replicas[0]
        await create_plan(first.pool, "wide", max_concurrent_runs=1000)
        tenant = await create_tenant(first.pool, plan_id="wide")
        await first.budgets.credit(tenant, 10 * RESERVATION, "credit:seed")
        outcomes = await _storm(replicas, tenant, 100)
        accepted = [o for o in outcomes if isinstance(o, Reserved)]
        refused = [o for o in outcomes if isinstance(o, InsufficientBudget)]
        assert len(accepted) == 10
        assert len(refused) == 90
        assert all(o.required_usd_micros == RESERVATION for o in refused)
        budget = await first.accounts.budget(tenant)
        assert budget["balance_usd_micros"] - budget["reserved_usd_micros"] == 0
        report = await first.accounts.audit()
        assert report.ok, report.violations


def contextlib_replicas(database_url, services, prefix, count):
    import contextlib

    @contextlib.asynccontextmanager
    async def opened():
        async with contextlib.AsyncExitStack() as stack:
            replicas = [
                await stack.enter_async_context(
                    open_replica(database_url, services.redis_url, prefix)
                )
                for _ in range(count)
            ]
            yield replicas

    return opened()


async def test_plan_concurrency_limit_refuses_with_429_outcome(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        await create_plan(replica.pool, "two", max_concurrent_runs=2)
        tenant = await create_tenant(replica.pool, plan_id="two")
        await replica.budgets.credit(tenant, 100 * RESERVATION, "credit:seed")
        outcomes = [await replica.budgets.reserve(tenant, draft()) for _ in range(3)]
        assert [type(o) for o in outcomes] == [Reserved, Reserved, ConcurrencyLimited]
        assert (await replica.accounts.audit()).ok


async def test_runs_being_executed_or_finalized_count_toward_the_concurrency_limit(
    database_url, services, redis_prefix
) -> None:
    """The limit counts every open run: one a worker holds (PROCESSING) or is
    finalizing (CLAIMED) is as open as one waiting in the queue."""
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        await create_plan(replica.pool, "two", max_concurrent_runs=2)
        tenant = await create_tenant(replica.pool, plan_id="two")
        await replica.budgets.credit(tenant, 100 * RESERVATION, "credit:seed")
        for _ in range(2):
            assert isinstance(await replica.budgets.reserve(tenant, draft()), Reserved)
        claimed = await replica.pool.fetch(replica.queries["claim_queued_runs"], 2, 30)
        assert len(claimed) == 2  # both PROCESSING now, none QUEUED
        refused = await replica.budgets.reserve(tenant, draft())
        assert isinstance(refused, ConcurrencyLimited)
        first = claimed[0]
        version = await replica.pool.fetchval(
            replica.queries["claim_for_finalize"],
            first["id"],
            first["lease_token"],
            first["version"],
        )
        assert version is not None  # CLAIMED: finalizing, still open
        assert isinstance(await replica.budgets.reserve(tenant, draft()), ConcurrencyLimited)
        assert (await replica.accounts.audit()).ok


async def test_settlement_follows_the_table_exactly_once(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(5_000, minimum_fee_usd_micros=500)
        assert isinstance(await replica.budgets.reserve(tenant, run), Reserved)
        token = await claim_for_test(replica.pool, run.run_id)
        request = ledger.SettleRequest(
            run.run_id, Outcome.COMPLETED, actual_cost_usd_micros=9_999_999, lease_token=token
        )
        results = []

        async def settle_once() -> None:
            results.append(await replica.budgets.settle(tenant, request))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(settle_once)
        applied = [r for r in results if r.applied]
        assert len(applied) == 1
        # actual cost above R is clamped to R
        assert applied[0].settlement.charged_usd_micros == 5_000
        assert applied[0].settlement.refunded_usd_micros == 0
        budget = await replica.accounts.budget(tenant)
        assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (5_000, 0)
        report = await replica.accounts.audit()
        assert report.ok, report.violations


async def test_stale_lease_token_cannot_settle(database_url, services, redis_prefix) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(2_000, minimum_fee_usd_micros=100)
        await replica.budgets.reserve(tenant, run)
        await claim_for_test(replica.pool, run.run_id)
        stale = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(ledger.SettleRefused, match="lease token is stale"):
            await replica.budgets.settle(
                tenant,
                ledger.SettleRequest(
                    run.run_id, Outcome.COMPLETED, actual_cost_usd_micros=1, lease_token=stale
                ),
            )
        status = await replica.pool.fetchval("SELECT status FROM runs WHERE id=$1", run.run_id)
        assert status == "CLAIMED"


async def test_a_cancel_of_a_run_a_worker_claimed_is_refused_and_moves_nothing(
    database_url, services, redis_prefix
) -> None:
    """The cancel read QUEUED, then a worker claimed the run: the settlement,
    allowed from QUEUED only, refuses it under the row lock (SPEC §2: a cancel
    moves a QUEUED run only), whatever the caller read before."""
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(3_000, minimum_fee_usd_micros=300)
        await replica.budgets.reserve(tenant, run)
        await replica.pool.execute(
            "UPDATE runs SET status = 'PROCESSING', lease_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 minute', started_at = now(),"
            " attempts = attempts + 1, version = version + 1 WHERE id = $1",
            run.run_id,
        )
        cancel = ledger.SettleRequest(
            run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        )
        with pytest.raises(ledger.SettleRefused, match="not settleable from this state"):
            await replica.budgets.settle(tenant, cancel)
        row = await replica.pool.fetchrow("SELECT * FROM runs WHERE id = $1", run.run_id)
        assert (row["status"], row["charged_usd_micros"]) == ("PROCESSING", None)
        budget = await replica.accounts.budget(tenant)
        assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (10_000, 3_000)


async def test_cancel_refunds_everything_and_is_idempotent(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(3_000, minimum_fee_usd_micros=300)
        await replica.budgets.reserve(tenant, run)
        cancel = ledger.SettleRequest(
            run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        )
        first = await replica.budgets.settle(tenant, cancel)
        again = await replica.budgets.settle(tenant, cancel)
        assert first.applied and not again.applied
        assert first.settlement.charged_usd_micros == 0
        assert first.settlement.refunded_usd_micros == 3_000
        budget = await replica.accounts.budget(tenant)
        assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (10_000, 0)
        assert (await replica.accounts.audit()).ok


@single_and_cluster
async def test_credit_replay_adds_nothing_and_conflict_is_refused(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        first = await replica.budgets.credit(tenant, 7_000, "credit:k1")
        again = await replica.budgets.credit(tenant, 7_000, "credit:k1")
        assert not first.replayed and again.replayed
        assert again.budget.balance_usd_micros == 7_000
        with pytest.raises(ledger.CreditConflict):
            await replica.budgets.credit(tenant, 8_000, "credit:k1")
        assert (await replica.accounts.audit()).ok


@single_and_cluster
async def test_redis_loss_mid_storm_never_overspends(database_url, services, redis_prefix) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        await create_plan(replica.pool, "wide", max_concurrent_runs=1000)
        tenant = await create_tenant(replica.pool, plan_id="wide")
        await replica.budgets.credit(tenant, 30 * RESERVATION, "credit:seed")
        outcomes: list[object] = []

        async def one() -> None:
            outcomes.append(await replica.budgets.reserve(tenant, draft(RESERVATION)))

        async with anyio.create_task_group() as group:
            for index in range(100):
                group.start_soon(one)
                if index == 40:
                    await anyio.lowlevel.checkpoint()
                    # the cache loses everything (FLUSHALL on this test's keys)
                    await anyio.to_thread.run_sync(
                        delete_redis_prefix, services.redis_url, redis_prefix
                    )
        accepted = [o for o in outcomes if isinstance(o, Reserved)]
        assert len(accepted) == 30
        budget = await replica.accounts.budget(tenant)
        assert budget["balance_usd_micros"] - budget["reserved_usd_micros"] == 0
        # the mirror was rebuilt from Postgres and agrees once quiet
        await drift.repair_drift(replica.pool, replica.queries, replica.mirror, settle_s=0.05)
        report = await replica.accounts.audit()
        assert report.ok, report.violations


async def _storm_with_flushes(replicas, tenant: str, redis_url: str, prefix: str) -> list[object]:
    """100 reservations alternating between replicas; Redis loses everything twice."""
    outcomes: list[object] = []

    async def one(replica) -> None:
        try:
            outcomes.append(await replica.budgets.reserve(tenant, draft(RESERVATION)))
        except (ReservationOutcomeUnknown, ReservationBusy) as unavailable:
            # Busy: a flush landed while the actor rebuilt the mirror (MirrorMissing),
            # answered 503 with nothing placed; the counts below prove nothing was.
            outcomes.append(unavailable)

    async with anyio.create_task_group() as group:
        for index in range(100):
            group.start_soon(one, replicas[index % len(replicas)])
            if index in (20, 50):
                await anyio.lowlevel.checkpoint()
                await anyio.to_thread.run_sync(delete_redis_prefix, redis_url, prefix)
    return outcomes


@single_and_cluster
async def test_two_replicas_and_a_redis_flush_mid_storm_admit_exactly_the_budget(
    database_url, services, redis_prefix
) -> None:
    """The probe that Postgres alone holds the budget: two replicas each rebuild the
    mirror after Redis loses it while the other's reservations are in flight, so
    Redis admits more than fits; Postgres's decision, the ledger trigger's CHECK
    and the read-side check must refuse every one of them. Several storms, since
    a single one may not race."""
    budget_runs = 30
    async with contextlib_replicas(database_url, services, redis_prefix, 2) as replicas:
        first = replicas[0]
        await create_plan(first.pool, "wide", max_concurrent_runs=10_000)
        for storm in range(4):
            tenant = await create_tenant(first.pool, plan_id="wide")
            await first.budgets.credit(tenant, budget_runs * RESERVATION, f"credit:seed{storm}")
            outcomes = await _storm_with_flushes(replicas, tenant, services.redis_url, redis_prefix)
            accepted = [o for o in outcomes if isinstance(o, Reserved)]
            assert len(accepted) == budget_runs, (storm, len(accepted))
            assert all(
                isinstance(o, Reserved | InsufficientBudget | ReservationBusy) for o in outcomes
            ), outcomes
            committed = await first.pool.fetchval(
                "SELECT count(*) FROM runs WHERE tenant_id = $1", tenant
            )
            assert committed == budget_runs
            budget = await first.accounts.budget(tenant)
            assert budget["balance_usd_micros"] - budget["reserved_usd_micros"] == 0
        await drift.repair_drift(first.pool, first.queries, first.mirror, settle_s=0.05)
        report = await first.accounts.audit()
        assert report.ok, report.violations


@pytest.mark.parametrize(
    "point", ["reserve.after_redis_hold", "reserve.before_commit", "reserve.after_commit"]
)
async def test_crash_during_reservation_recovers_clean(
    database_url, services, redis_prefix, point
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(4_000)
        with armed(point), pytest.raises((ReservationOutcomeUnknown, InjectedCrash)):
            await replica.budgets.reserve(tenant, run)
        committed = await replica.pool.fetchval(
            "SELECT count(*) FROM runs WHERE id = $1", run.run_id
        )
        assert committed == (1 if point == "reserve.after_commit" else 0)
        # the supervisor restarted the actor; the next reservation works
        assert isinstance(await replica.budgets.reserve(tenant, draft(1_000)), Reserved)
        repairs, _ = await drift.repair_drift(
            replica.pool, replica.queries, replica.mirror, settle_s=0.05
        )
        if point == "reserve.after_redis_hold":
            # The leaked hold is pending: while young it may still commit, so it
            # is left alone; once abandoned (placed long ago) it is dropped.
            assert repairs == []
            await replica.redis.hset(
                replica.mirror.pending_key(tenant), hold_id(run.run_id), "4000:0"
            )
            repairs, _ = await drift.repair_drift(
                replica.pool, replica.queries, replica.mirror, settle_s=0.05
            )
            assert repairs, "the leaked hold must be repaired"
        report = await replica.accounts.audit()
        assert report.ok, report.violations


@pytest.mark.parametrize("point", ["settle.before_commit", "settle.after_commit"])
async def test_crash_during_settlement_recovers_clean(
    database_url, services, redis_prefix, point
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 10_000, "credit:seed")
        run = draft(4_000, minimum_fee_usd_micros=400)
        await replica.budgets.reserve(tenant, run)
        token = await claim_for_test(replica.pool, run.run_id)
        request = ledger.SettleRequest(
            run.run_id, Outcome.COMPLETED, actual_cost_usd_micros=1_500, lease_token=token
        )
        # before the commit the store's error is the answer; after it the actor
        # crashed, which the budget handle reports as "not now" (a 503 upstream)
        with armed(point), pytest.raises((InjectedCrash, SettlementUnavailable)) as raised:
            await replica.budgets.settle(tenant, request)
        if isinstance(raised.value, SettlementUnavailable):
            assert isinstance(raised.value.__cause__, ActorCrashed)
        # the retry (worker or reconciler) settles exactly once
        result = await replica.budgets.settle(tenant, request)
        assert result.applied == (point == "settle.before_commit")
        assert result.settlement.charged_usd_micros == 1_500
        await drift.repair_drift(replica.pool, replica.queries, replica.mirror, settle_s=0.05)
        budget = await replica.accounts.budget(tenant)
        assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (8_500, 0)
        report = await replica.accounts.audit()
        assert report.ok, report.violations


async def test_a_settlement_batch_answers_each_request_on_its_own(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant, 100_000, "credit:seed")
        good, stale, canceled = draft(5_000), draft(5_000), draft(5_000)
        for run in (good, stale, canceled):
            await replica.budgets.reserve(tenant, run)
        good_token = await claim_for_test(replica.pool, good.run_id)
        await claim_for_test(replica.pool, stale.run_id)
        complete = ledger.SettleRequest(
            good.run_id, Outcome.COMPLETED, actual_cost_usd_micros=2_000, lease_token=good_token
        )
        cancel = ledger.SettleRequest(
            canceled.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        )
        outcomes = await ledger.settle_batch(
            replica.pool,
            replica.queries,
            [
                complete,
                ledger.SettleRequest(
                    stale.run_id,
                    Outcome.COMPLETED,
                    actual_cost_usd_micros=1,
                    lease_token="00000000-0000-4000-8000-000000000000",
                ),
                complete,  # the same run twice in one batch: the second is a replay
                cancel,
                ledger.SettleRequest("run_00000000000000000000000000", Outcome.FAILED),
            ],
        )
        first, refused, replay, canceled_result, missing = outcomes
        assert first.applied and first.settlement.charged_usd_micros == 2_000
        assert isinstance(refused, ledger.SettleRefused) and "stale" in refused.reason
        assert not replay.applied and replay.settlement == first.settlement
        assert canceled_result.applied and canceled_result.settlement.refunded_usd_micros == 5_000
        assert isinstance(missing, ledger.RunNotFound)
        budget = await replica.accounts.budget(tenant)
        # 100,000 - 2,000 charged; the stale run's 5,000 is still reserved
        assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (98_000, 5_000)
        await replica.budgets.settle(
            tenant,
            ledger.SettleRequest(
                stale.run_id, Outcome.FAILED, from_statuses=frozenset({RunStatus.CLAIMED})
            ),
        )
        # the mirror missed the direct ledger call above; drift repair brings it back
        await drift.repair_drift(replica.pool, replica.queries, replica.mirror, settle_s=0.05)
        report = await replica.accounts.audit()
        assert report.ok, report.violations


async def test_concurrent_settlements_of_one_tenant_are_group_committed(
    database_url, services, redis_prefix
) -> None:
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        await create_plan(replica.pool, "wide", max_concurrent_runs=1000)
        tenant = await create_tenant(replica.pool, plan_id="wide")
        await replica.budgets.credit(tenant, 10_000_000, "credit:seed")
        runs = [draft(1_000) for _ in range(50)]
        for run in runs:
            await replica.budgets.reserve(tenant, run)
        tokens = [await claim_for_test(replica.pool, run.run_id) for run in runs]

        async def settle(run, token) -> None:
            await replica.budgets.settle(
                tenant,
                ledger.SettleRequest(
                    run.run_id, Outcome.COMPLETED, actual_cost_usd_micros=600, lease_token=token
                ),
            )

        version_before = (await replica.accounts.budget(tenant))["ledger_version"]
        async with anyio.create_task_group() as group:
            for run, token in zip(runs, tokens, strict=True):
                group.start_soon(settle, run, token)
        budget = await replica.accounts.budget(tenant)
        # one ledger_version step per transaction: fewer steps than settlements
        # means some were committed together (with batch_max=1 it would be 50)
        transactions = budget["ledger_version"] - version_before
        assert 1 <= transactions < len(runs) // 2, transactions
        assert budget["balance_usd_micros"] == 10_000_000 - 50 * 600
        assert budget["reserved_usd_micros"] == 0
        report = await replica.accounts.audit()
        assert report.ok, report.violations
