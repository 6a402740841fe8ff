"""Failure injection at every crash point of a run's execution, then recovery.

Each test arms one named point (``dpp.faults``), lets a real dispatcher run an
echo run into it, and then lets the reconciler (short thresholds, aged rows
instead of waiting) bring the run to the terminal state SPEC §2 prescribes,
with the money SPEC §1 prescribes. docs/crash-points.md is the table these
tests prove.
"""

from __future__ import annotations

from typing import Any

import pytest

from dpp.actors.run import RunEnding, result_key
from dpp.adapters.blobs import RECEIPT_COST
from dpp.faults import armed, disarm_all
from tests.integration.test_execution import (
    ECHO_COST_USD_MICROS,
    MINIMUM_FEE_USD_MICROS,
    RESERVED_USD_MICROS,
    Harness,
    eventually,
    open_harness,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _disarmed() -> Any:
    yield
    disarm_all()


async def crash_run_at(h: Harness, point: str) -> tuple[str, Any]:
    """Run one echo run into the armed ``point``; return it once its actor ended."""
    run_id = await h.submit({"payload": {"crash": point}})
    crashes: list[str] = []
    with armed(point):
        dispatcher = await h.start_dispatcher(on_run_crash=lambda run, error: crashes.append(run))
        await eventually(lambda: sum(dispatcher.endings.values()) == 1)
    return run_id, (dispatcher, crashes)


async def test_crash_after_claim_is_reaped_expired_with_the_minimum_fee(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id, (dispatcher, crashes) = await crash_run_at(h, "run.after_claim")
        assert crashes == [run_id]
        assert dispatcher.endings[RunEnding.CRASHED] == 1
        row = await h.row(run_id)
        assert row["status"] == "PROCESSING", "a dead worker's run waits for its lease"
        reconciler = await h.start_reconciler()
        assert (await reconciler.reconcile_once())["expired"] == 0, "lease still live"
        await h.age_lease(run_id)
        assert (await reconciler.reconcile_once())["expired"] == 1
        row = await h.row(run_id)
        assert row["status"] == "EXPIRED"
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        assert row["refunded_usd_micros"] == RESERVED_USD_MICROS - MINIMUM_FEE_USD_MICROS
        await h.assert_audit_ok()


async def test_crash_after_finalize_claim_rolls_back_failed_with_the_minimum_fee(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id, (dispatcher, _) = await crash_run_at(h, "run.after_finalize_claim")
        assert dispatcher.endings[RunEnding.CRASHED] == 1
        assert (await h.row(run_id))["status"] == "CLAIMED"
        assert await h.adapters.blobs.head(result_key(h.tenant_id, run_id)) is None
        await h.age_claim(run_id)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["rolled_back"] == 1
        row = await h.row(run_id)
        assert row["status"] == "FAILED"
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        assert row["error"]["type"] == "https://dpp.dev/problems/result-missing"
        await h.assert_audit_ok()


async def test_crash_after_result_put_rolls_forward_charging_the_receipts_cost(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id, _ = await crash_run_at(h, "run.after_result_put")
        assert (await h.row(run_id))["status"] == "CLAIMED"
        key = result_key(h.tenant_id, run_id)
        stored = await h.adapters.blobs.head(key)
        assert stored is not None
        assert stored.metadata[RECEIPT_COST] == str(ECHO_COST_USD_MICROS)
        await h.age_claim(run_id)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["rolled_forward"] == 1
        row = await h.row(run_id)
        assert row["status"] == "COMPLETED"
        # the receipt's cost, not the reservation, not the minimum fee
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS != RESERVED_USD_MICROS
        assert row["result_key"] == key and row["result_bytes"] == stored.bytes
        await h.assert_audit_ok()


async def test_crash_inside_the_settlement_before_commit_rolls_forward_later(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id, (dispatcher, _) = await crash_run_at(h, "settle.before_commit")
        # the settlement rolled back: the worker cannot tell, so it leaves the run
        assert dispatcher.endings[RunEnding.UNKNOWN] == 1
        row = await h.row(run_id)
        assert row["status"] == "CLAIMED" and row["charged_usd_micros"] is None
        assert await h.entries(run_id) == {"reserve": RESERVED_USD_MICROS}
        await h.age_claim(run_id)
        assert (await (await h.start_reconciler()).reconcile_once())["rolled_forward"] == 1
        row = await h.row(run_id)
        assert row["status"] == "COMPLETED"
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS
        await h.assert_audit_ok()


async def test_crash_after_the_settlement_commit_leaves_drift_that_repair_fixes(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id, _ = await crash_run_at(h, "settle.after_commit")
        row = await h.row(run_id)
        assert row["status"] == "COMPLETED"
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS
        audit = await h.context.accounts.audit()
        assert [v["invariant"] for v in audit.violations] == [5], "only the mirror lags"
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["drift_repairs"] == 1
        await h.assert_audit_ok()


@pytest.mark.parametrize(
    "point", ["run.after_claim", "run.after_finalize_claim", "run.after_result_put"]
)
async def test_every_run_crash_point_ends_terminal_with_money_balanced(
    services, database_url, redis_prefix, result_store, point
) -> None:
    """The same recovery with the lease and claim left to age for real."""
    async with open_harness(
        services,
        database_url,
        redis_prefix,
        **result_store,
        DPP_LEASE_SEC="2",
        DPP_RECONCILE_THRESHOLD_SEC="1",
    ) as h:
        run_id, _ = await crash_run_at(h, point)
        reconciler = await h.start_reconciler(reaper_interval_s=0.5, reconcile_interval_s=0.5)
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED", timeout_s=10)
        expected = {
            "run.after_claim": ("EXPIRED", MINIMUM_FEE_USD_MICROS),
            "run.after_finalize_claim": ("FAILED", MINIMUM_FEE_USD_MICROS),
            "run.after_result_put": ("COMPLETED", ECHO_COST_USD_MICROS),
        }[point]
        assert (row["status"], row["charged_usd_micros"]) == expected
        assert reconciler.passes >= 1
        await h.assert_audit_ok()
