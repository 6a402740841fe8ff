"""The reconciler against real stores: evidence decides, guards make races harmless."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
import pytest

from dpp.actors.reconciler import (
    NeedsAudit,
    ReconcilerUnavailable,
    RollBack,
    RollForward,
    judge_claimed,
)
from dpp.actors.run import result_key
from dpp.actors.supervisor import Supervisor, SupervisorSpec
from dpp.adapters.blobs import (
    RECEIPT_COST,
    RECEIPT_RUN,
    RECEIPT_SHA256,
    StoredObject,
    open_blobs,
)
from dpp.adapters.local_results import LocalResults
from dpp.http.app import create_app
from dpp.http.endpoints import routes_for
from dpp.http.routes import admin_reconcile
from dpp.limits import EVIDENCE_READ_FAILURES_MAX
from dpp.money import ledger
from dpp.money.rules import Outcome, RunStatus
from dpp.runs.store import RunStore
from tests.conftest import TEST_RESULT_SIGNING_KEY
from tests.integration.test_execution import (
    ECHO_COST_USD_MICROS,
    MINIMUM_FEE_USD_MICROS,
    RESERVED_USD_MICROS,
    Harness,
    eventually,
    open_harness,
)
from tests.s3proxy import refusing_s3_proxy

RUN_ID = "run_" + "a" * 26
SHA = hashlib.sha256(b"{}").hexdigest()


def stored(**metadata: str) -> StoredObject:
    receipt = {RECEIPT_RUN: RUN_ID, RECEIPT_COST: "1000", RECEIPT_SHA256: SHA}
    receipt.update(metadata)
    return StoredObject("k", 2, "application/json", {k: v for k, v in receipt.items() if v})


# --------------------------------------------------------- pure verdicts


def test_no_object_rolls_back() -> None:
    assert judge_claimed(RUN_ID, "k", None) == RollBack()


def test_a_valid_receipt_rolls_forward_at_its_own_cost() -> None:
    verdict = judge_claimed(RUN_ID, "k", stored())
    assert isinstance(verdict, RollForward)
    assert verdict.actual_cost_usd_micros == 1000
    assert verdict.receipt.sha256 == SHA and verdict.receipt.bytes == 2


@pytest.mark.parametrize(
    "metadata",
    [
        {RECEIPT_RUN: "run_" + "b" * 26},  # another run's result
        {RECEIPT_RUN: ""},  # missing
        {RECEIPT_COST: "-5"},
        {RECEIPT_COST: "1.5"},
        {RECEIPT_COST: ""},
        {RECEIPT_COST: "99999999999999999999"},  # past bigint
        {RECEIPT_SHA256: ""},
        {RECEIPT_SHA256: SHA.upper()},
    ],
)
def test_a_contradictory_receipt_is_never_guessed(metadata: dict[str, str]) -> None:
    assert isinstance(judge_claimed(RUN_ID, "k", stored(**metadata)), NeedsAudit)


# ------------------------------------------------------------- helpers


async def claimed_run(h: Harness, *, receipt: dict[str, str] | None) -> str:
    """A run left CLAIMED by a dead worker, its object stored with ``receipt``
    (None: never stored), and old enough for the reconciler."""
    run_id = await h.submit({"payload": 1})
    claimed = await h.claim_one()
    assert claimed.run_id == run_id
    version = await h.run_services.leases.claim_for_finalize(claimed, claimed.version)
    assert version == claimed.version + 1
    if receipt is not None:
        body = orjson.dumps({"payload": 1})
        metadata = {
            RECEIPT_COST: str(ECHO_COST_USD_MICROS),
            RECEIPT_RUN: run_id,
            RECEIPT_SHA256: hashlib.sha256(body).hexdigest(),
            **receipt,
        }
        await h.adapters.blobs.put(
            result_key(h.tenant_id, run_id), body, "application/json", metadata
        )
    await h.age_claim(run_id)
    return run_id


async def expired_run(h: Harness) -> str:
    run_id = await h.submit({"payload": 1})
    claimed = await h.claim_one()
    assert claimed.run_id == run_id
    await h.age_lease(run_id)
    return run_id


# --------------------------------------------------------------- tests


async def test_contradictory_receipt_sets_the_run_aside_with_a_critical_alert(
    services, database_url, redis_prefix, result_store, caplog
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id = await claimed_run(h, receipt={RECEIPT_RUN: "run_" + "z" * 26})
        reconciler = await h.start_reconciler()
        with caplog.at_level(logging.ERROR, logger="dpp.reconciler"):
            report = await reconciler.reconcile_once()
        assert report["audit_required"] == 1
        assert report["rolled_forward"] == report["rolled_back"] == 0
        row = await h.row(run_id)
        assert row["status"] == "AUDIT_REQUIRED" and row["charged_usd_micros"] is None
        assert row["error"]["type"] == "https://dpp.dev/problems/audit-required"
        alerts = [r for r in caplog.records if getattr(r, "severity", None) == "CRITICAL"]
        assert len(alerts) == 1
        assert alerts[0].alert_channel == "money" and alerts[0].run_id == run_id
        # The reservation stays held; the audit is consistent but not ok until resolved.
        audit = await h.context.accounts.audit()
        assert audit.violations == []
        assert [r["run_id"] for r in audit.audit_required_runs] == [run_id]
        # A second pass leaves it alone.
        assert (await reconciler.reconcile_once())["audit_required"] == 0
        # An operator resolves it (POST /admin/runs/{id}/resolve): settled once.
        resolved = await h.budgets.settle(
            h.tenant_id,
            ledger.SettleRequest(
                run_id,
                Outcome.COMPLETED,
                from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
                charged_override_usd_micros=ECHO_COST_USD_MICROS,
            ),
        )
        assert resolved.applied
        await h.assert_audit_ok()


@pytest.mark.audit_exempt  # the broken row stays for an operator, by design
async def test_a_run_without_its_reserve_entry_is_never_settled(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id = "run_" + "q" * 26
        # A row no reservation produced (a restore gone wrong): the database's
        # rules refuse it, so write it the way a restore does, as a superuser with
        # triggers off (session_replication_role = replica; docs/money.md).
        async with h.pool.acquire() as connection, connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(
                "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
                " minimum_fee_usd_micros, timebox_sec, lease_token, lease_expires_at, started_at,"
                " claimed_at, version, attempts)"
                " VALUES ($1, $2, 'echo', 'CLAIMED', '{}', 1000, 100, 30, gen_random_uuid(),"
                " now(), now(), now() - interval '1 hour', 2, 1)",
                run_id,
                h.tenant_id,
            )
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["audit_required"] == 1
        assert (await h.row(run_id))["status"] == "AUDIT_REQUIRED"
        assert await h.entries(run_id) == {}
        audit = await h.context.accounts.audit()
        assert audit.violations == [] and len(audit.audit_required_runs) == 1
        # An operator's resolve is refused: settling would release money never reserved.
        budget_before = await h.context.accounts.budget(h.tenant_id)
        with pytest.raises(ledger.SettleRefused, match="holds no reservation"):
            await h.budgets.settle(
                h.tenant_id,
                ledger.SettleRequest(
                    run_id,
                    Outcome.FAILED,
                    from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
                    charged_override_usd_micros=0,
                ),
            )
        assert (await h.row(run_id))["status"] == "AUDIT_REQUIRED"
        assert await h.entries(run_id) == {}
        assert await h.context.accounts.budget(h.tenant_id) == budget_before


async def test_two_reconcilers_racing_settle_each_run_exactly_once(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        expired = [await expired_run(h) for _ in range(4)]
        forward = [await claimed_run(h, receipt={}) for _ in range(3)]
        back = [await claimed_run(h, receipt=None) for _ in range(3)]
        first, second = await h.start_reconciler(), await h.start_reconciler(name="peer")
        reports: list[dict[str, Any]] = []

        async def reconcile(reconciler: Any) -> None:
            reports.append(await reconciler.reconcile_once())

        async with anyio.create_task_group() as group:
            group.start_soon(reconcile, first)
            group.start_soon(reconcile, second)

        assert sum(r["expired"] for r in reports) == len(expired)
        assert sum(r["rolled_forward"] for r in reports) == len(forward)
        assert sum(r["rolled_back"] for r in reports) == len(back)
        assert all(r["errors"] == [] for r in reports)
        for run_id in expired:
            row = await h.row(run_id)
            assert row["status"] == "EXPIRED"
            assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
            assert row["error"]["type"] == "https://dpp.dev/problems/lease-expired"
        for run_id in forward:
            row = await h.row(run_id)
            assert row["status"] == "COMPLETED"
            assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS
            assert row["result_key"] == result_key(h.tenant_id, run_id)
        for run_id in back:
            row = await h.row(run_id)
            assert row["status"] == "FAILED"
            assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        for run_id in expired + forward + back:
            assert set(await h.entries(run_id)) == {"reserve", "charge", "refund"}
        await h.assert_audit_ok()


async def test_receipt_cost_is_clamped_by_the_settlement(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        above = await claimed_run(h, receipt={RECEIPT_COST: str(10 * RESERVED_USD_MICROS)})
        below = await claimed_run(h, receipt={RECEIPT_COST: "0"})
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["rolled_forward"] == 2
        assert (await h.row(above))["charged_usd_micros"] == RESERVED_USD_MICROS
        assert (await h.row(below))["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        await h.assert_audit_ok()


async def test_young_claimed_and_live_leases_are_left_alone(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(
        services, database_url, redis_prefix, **result_store, DPP_RECONCILE_THRESHOLD_SEC="3600"
    ) as h:
        working = await h.submit({"payload": 1})
        await h.claim_one()
        finishing = await h.submit({"payload": 2})
        claimed = await h.claim_one()
        await h.run_services.leases.claim_for_finalize(claimed, claimed.version)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["expired"] == report["rolled_back"] == report["rolled_forward"] == 0
        assert (await h.row(working))["status"] == "PROCESSING"
        assert (await h.row(finishing))["status"] == "CLAIMED"
        await h.assert_audit_ok()


async def test_retention_deletes_the_object_then_marks_the_row(
    services, database_url, redis_prefix, result_store
) -> None:
    async with open_harness(services, database_url, redis_prefix, **result_store) as h:
        run_id = await claimed_run(h, receipt={})
        reconciler = await h.start_reconciler()
        assert (await reconciler.reconcile_once())["rolled_forward"] == 1
        key = result_key(h.tenant_id, run_id)
        assert await h.adapters.blobs.head(key) is not None
        await h.pool.execute(
            "UPDATE runs SET retention_until = now() - interval '1 second' WHERE id = $1", run_id
        )
        assert (await reconciler.reconcile_once())["results_deleted"] == 1
        assert await h.adapters.blobs.head(key) is None
        row = await h.row(run_id)
        assert row["result_deleted_at"] is not None and row["status"] == "COMPLETED"
        assert (await reconciler.reconcile_once())["results_deleted"] == 0
        await h.assert_audit_ok()


async def test_drift_repair_and_idempotency_sweep_run_in_each_pass(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        await h.adapters.redis.hset(h.adapters.mirror.key(h.tenant_id), "reserved", 777)
        await h.pool.execute(
            "INSERT INTO idempotency_keys (tenant_id, method, path, key, request_sha256, state,"
            " response_status, created_at, locked_until)"
            " VALUES ($1, 'POST', '/v1/runs', 'old', '\\x00', 'done', 202,"
            " now() - interval '2 days', now() - interval '2 days')",
            h.tenant_id,
        )
        assert not (await h.context.accounts.audit()).ok
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["drift_repairs"] == 1
        assert report["idempotency_keys_swept"] == 1
        await h.assert_audit_ok()


async def test_trigger_runs_a_pass_soon(services, database_url, redis_prefix) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await expired_run(h)
        reconciler = await h.start_reconciler()
        reconciler.trigger()
        reconciler.trigger()  # coalesced with the first
        await h.wait_status(run_id, "EXPIRED", timeout_s=5)
        # the pass counts itself once all of it is done, a moment after the reap commits
        await eventually(lambda: reconciler.passes >= 1)
        assert reconciler.passes == 1
        await h.assert_audit_ok()


async def test_reaper_timer_expires_lapsed_leases_on_its_own(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await expired_run(h)
        await h.start_reconciler(reaper_interval_s=0.2)
        row = await h.wait_status(run_id, "EXPIRED", timeout_s=5)
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        await h.assert_audit_ok()


async def test_post_admin_reconcile_answers_the_pass_report(
    services, database_url, redis_prefix
) -> None:
    token = "reconcile-admin-token-0123456789"
    async with open_harness(services, database_url, redis_prefix, DPP_ADMIN_TOKEN=token) as h:
        await expired_run(h)
        reconciler = await h.start_reconciler()
        context = dataclasses.replace(h.context, reconciler=reconciler)
        app = create_app(context, extra_routes=routes_for(admin_reconcile.ENDPOINTS))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            denied = await client.post("/admin/reconcile")
            assert denied.status_code == 401
            answer = await client.post(
                "/admin/reconcile", headers={"Authorization": f"Bearer {token}"}
            )
        assert answer.status_code == 200
        report = answer.json()
        assert report["expired"] == 1
        assert set(report) >= {
            "expired",
            "rolled_forward",
            "rolled_back",
            "audit_required",
            "drift_repairs",
            "results_deleted",
            "idempotency_keys_swept",
        }
        await h.assert_audit_ok()


async def test_a_crashed_reconciler_is_restarted_and_answers_again(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        reconciler = h.reconciler()
        supervisor = Supervisor("test", SupervisorSpec(), [reconciler.child_spec()])
        await h.group.start(supervisor.run)
        reconcile_pass = reconciler.reconcile_pass

        async def broken() -> Any:
            raise AssertionError("injected bug")

        reconciler.reconcile_pass = broken  # type: ignore[method-assign]
        with pytest.raises(ReconcilerUnavailable):
            await reconciler.reconcile_once()
        reconciler.reconcile_pass = reconcile_pass  # type: ignore[method-assign]
        run_id = await expired_run(h)
        await eventually(lambda: reconciler.restarts == 1, timeout_s=5)
        assert (await reconciler.reconcile_once())["expired"] == 1
        assert (await h.row(run_id))["status"] == "EXPIRED"
        await supervisor.shutdown()
        await h.assert_audit_ok()


# ------------------------------------ one bad item never blocks the others


@contextlib.asynccontextmanager
async def refused_results(h: Harness, services: Any) -> AsyncIterator[tuple[Any, Any]]:
    """The result bucket through a proxy that refuses what the test says (403)."""
    settings = h.settings
    async with (
        refusing_s3_proxy(services.object_store_url) as proxy,
        open_blobs(
            proxy.url, settings.s3_result_bucket, settings.s3_region, settings.presign_expiry_sec
        ) as blobs,
    ):
        yield proxy, blobs


async def test_an_unreadable_result_object_blocks_no_other_run_and_ends_audited(
    services, database_url, redis_prefix, caplog
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        unreadable = await claimed_run(h, receipt={})
        forward = await claimed_run(h, receipt={})
        back = await claimed_run(h, receipt=None)
        # the unreadable run is the oldest: first in every pass
        await h.pool.execute(
            "UPDATE runs SET claimed_at = now() - interval '2 hours' WHERE id = $1", unreadable
        )
        bad_path = f"/{h.settings.s3_result_bucket}/{result_key(h.tenant_id, unreadable)}"
        async with refused_results(h, services) as (proxy, blobs):
            proxy.refuse = lambda method, path: method == "HEAD" and path == bad_path
            reconciler = h.reconciler()
            reconciler.results = blobs
            await h.group.start(reconciler.serve)
            first = await reconciler.reconcile_once()
            assert (first["rolled_forward"], first["rolled_back"]) == (1, 1)
            assert first["evidence_unreadable"] == 1
            assert f"evidence:{unreadable}" in first["errors"]
            assert (await h.row(forward))["status"] == "COMPLETED"
            assert (await h.row(back))["status"] == "FAILED"
            for _ in range(EVIDENCE_READ_FAILURES_MAX - 2):
                report = await reconciler.reconcile_once()
                assert report["audit_required"] == 0
                assert (await h.row(unreadable))["status"] == "CLAIMED"
            with caplog.at_level(logging.ERROR, logger="dpp.reconciler"):
                last = await reconciler.reconcile_once()
            assert last["audit_required"] == 1
            assert len(proxy.refused) == EVIDENCE_READ_FAILURES_MAX
        row = await h.row(unreadable)
        assert row["status"] == "AUDIT_REQUIRED" and row["charged_usd_micros"] is None
        alerts = [r for r in caplog.records if getattr(r, "severity", None) == "CRITICAL"]
        assert [a.run_id for a in alerts] == [unreadable]
        assert "unreadable" in alerts[0].reason
        # the operator resolves it; the money is whole
        await h.budgets.settle(
            h.tenant_id,
            ledger.SettleRequest(
                unreadable,
                Outcome.COMPLETED,
                from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
                charged_override_usd_micros=ECHO_COST_USD_MICROS,
            ),
        )
        await h.assert_audit_ok()


async def test_a_result_that_cannot_be_deleted_holds_back_no_other(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        stuck, other = await claimed_run(h, receipt={}), await claimed_run(h, receipt={})
        assert (await (await h.start_reconciler()).reconcile_once())["rolled_forward"] == 2
        await h.pool.execute(
            "UPDATE runs SET retention_until = now() - interval '1 hour'"
            " - (CASE WHEN id = $1 THEN interval '1 day' ELSE interval '0' END)"
            " WHERE id = ANY($2::text[])",
            stuck,
            [stuck, other],
        )
        bad_path = f"/{h.settings.s3_result_bucket}/{result_key(h.tenant_id, stuck)}"
        async with refused_results(h, services) as (proxy, blobs):
            proxy.refuse = lambda method, path: method == "DELETE" and path == bad_path
            reconciler = h.reconciler()
            reconciler.results = blobs
            await h.group.start(reconciler.serve)
            report = await reconciler.reconcile_once()
        assert report["results_deleted"] == 1
        assert f"retention:{stuck}" in report["errors"]
        assert (await h.row(other))["result_deleted_at"] is not None
        assert (await h.row(stuck))["result_deleted_at"] is None
        await h.assert_audit_ok()


async def test_the_reaper_loses_to_a_heartbeat_that_renewed_after_it_looked(
    services, database_url, redis_prefix, monkeypatch
) -> None:
    """The reaper reads a lapsed lease, then the worker's heartbeat renews it before
    the reaper settles: the version the reaper observed must refuse its settlement,
    or a live worker's run is expired (and charged M) under it."""
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1})
        claimed = await h.claim_one()
        await h.age_lease(run_id)
        looked = RunStore.lapsed_leases

        async def heartbeat_lands_after_the_look(self: RunStore, limit: int) -> list[Any]:
            rows = await looked(self, limit)
            for row in rows:
                renewed = await h.pool.fetchval(
                    h.adapters.queries["renew_lease"],
                    row["id"],
                    claimed.lease_token,
                    row["version"],
                    120,
                )
                assert renewed == row["version"] + 1
            return rows

        monkeypatch.setattr(RunStore, "lapsed_leases", heartbeat_lands_after_the_look)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["expired"] == 0
        assert report["lost_races"] == 1
        row = await h.row(run_id)
        assert row["status"] == "PROCESSING" and row["charged_usd_micros"] is None
        # the live worker finishes it as usual
        await h.budgets.settle(
            h.tenant_id,
            ledger.SettleRequest(
                run_id,
                Outcome.FAILED,
                from_statuses=frozenset({RunStatus.PROCESSING}),
                lease_token=claimed.lease_token,
                expected_version=row["version"],
            ),
        )
        await h.assert_audit_ok()


async def test_a_corrupt_local_result_file_is_never_read_as_absent(
    services, database_url, redis_prefix, tmp_path, caplog
) -> None:
    """The local store's twin of the unreadable S3 object: a result file whose
    receipt line is damaged is unreadable evidence, retried each pass and then
    set aside — never rolled back as if the result did not exist."""
    async with open_harness(
        services,
        database_url,
        redis_prefix,
        DPP_RESULTS_DIR=str(tmp_path / "results"),
        DPP_RESULT_SIGNING_KEY=TEST_RESULT_SIGNING_KEY,
    ) as h:
        damaged = await claimed_run(h, receipt={})
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        path = store.root / result_key(h.tenant_id, damaged)
        path.write_bytes(b"\x00" * 64)  # a torn disk block, say
        reconciler = await h.start_reconciler()
        for _ in range(EVIDENCE_READ_FAILURES_MAX - 1):
            report = await reconciler.reconcile_once()
            assert (report["rolled_back"], report["evidence_unreadable"]) == (0, 1)
            assert (await h.row(damaged))["status"] == "CLAIMED"
        with caplog.at_level(logging.ERROR, logger="dpp.reconciler"):
            last = await reconciler.reconcile_once()
        assert last["audit_required"] == 1
        row = await h.row(damaged)
        assert row["status"] == "AUDIT_REQUIRED" and row["charged_usd_micros"] is None
        alerts = [r for r in caplog.records if getattr(r, "severity", None) == "CRITICAL"]
        assert [a.run_id for a in alerts] == [damaged]
        assert "ResultFileCorrupt" in alerts[0].reason
        # the operator resolves it; the money is whole
        await h.budgets.settle(
            h.tenant_id,
            ledger.SettleRequest(
                damaged,
                Outcome.FAILED,
                from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
                charged_override_usd_micros=MINIMUM_FEE_USD_MICROS,
            ),
        )
        await h.assert_audit_ok()
