"""The metrics an operator alerts and scales on, each made to move by the real thing
(a run executed, a reconciler repair, a broken invariant) and read from /metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dpp.actors.reconciler import ReconcilerUnavailable
from dpp.adapters.blobs import RECEIPT_RUN
from dpp.app import Runtime
from dpp.context import AppContext, ReadinessCheck
from dpp.http.app import create_app
from dpp.metrics import RECONCILER_ACTIONS
from dpp.money import ledger
from dpp.money.rules import Outcome, RunStatus
from dpp.runs.gauges import OperatorGauges
from tests.integration.test_execution import (
    ECHO_COST_USD_MICROS,
    MINIMUM_FEE_USD_MICROS,
    RESERVED_USD_MICROS,
    Harness,
    eventually,
    open_harness,
)
from tests.integration.test_reconciler import claimed_run, expired_run

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(context: AppContext) -> Samples:
    """Every sample of ``GET /metrics``, keyed by name and labels."""
    transport = httpx.ASGITransport(app=create_app(context))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape_until(
    context: AppContext, predicate: Callable[[Samples], bool], *, timeout_s: float = 10.0
) -> Samples:
    """Scrape until ``predicate`` holds (bounded; no fixed sleeps)."""
    with anyio.fail_after(timeout_s):
        while True:
            samples = await scrape(context)
            if predicate(samples):
                return samples
            await anyio.sleep(0.05)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def gauges(h: Harness) -> OperatorGauges:
    assert h.context.gauges is not None
    return h.context.gauges


def fresh(h: Harness) -> OperatorGauges:
    """Every scrape reads Postgres again (the default caches for a few seconds)."""
    operator_gauges = gauges(h)
    operator_gauges.queue_ttl_s = 0.0
    return operator_gauges


async def age_submission(h: Harness, run_id: str, seconds: int) -> None:
    """As if the run had been submitted ``seconds`` ago (time passing, not waited for)."""
    moved = await h.pool.fetchval(
        "UPDATE runs SET created_at = now() - make_interval(secs => $2)"
        " WHERE id = $1 AND status = 'QUEUED' RETURNING id",
        run_id,
        seconds,
    )
    assert moved == run_id


async def test_queue_depth_and_oldest_age_by_pack_follow_the_queue(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        fresh(h)
        empty = await scrape(h.context)
        for pack_type in ("echo", "decision"):  # every registered pack, at 0
            assert value(empty, "dpp_queue_depth", pack_type=pack_type) == 0
            assert value(empty, "dpp_queue_oldest_age_seconds", pack_type=pack_type) == 0
        oldest = await h.submit({"payload": 1})
        await h.submit({"payload": 2})
        await age_submission(h, oldest, 120)
        queued = await scrape(h.context)
        assert value(queued, "dpp_queue_depth", pack_type="echo") == 2
        assert 120 <= value(queued, "dpp_queue_oldest_age_seconds", pack_type="echo") < 180
        assert value(queued, "dpp_queue_depth", pack_type="decision") == 0

        await h.start_dispatcher()
        await h.wait_status(oldest, "COMPLETED")

        after = await scrape_until(
            h.context, lambda samples: value(samples, "dpp_queue_depth", pack_type="echo") == 0
        )
        assert value(after, "dpp_queue_oldest_age_seconds", pack_type="echo") == 0


async def test_the_queue_query_runs_once_per_interval_however_many_scrapes(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        operator_gauges = gauges(h)
        assert operator_gauges.queue_ttl_s == 5.0
        first = await scrape(h.context)
        await h.submit({"payload": 1})
        async with anyio.create_task_group() as group:  # concurrent scrapes share it
            for _ in range(5):
                group.start_soon(scrape, h.context)
        cached = await scrape(h.context)
        assert operator_gauges.queue_queries == 1 and operator_gauges.audits == 1
        # within the interval: the number the first scrape read
        assert value(cached, "dpp_queue_depth", pack_type="echo") == 0
        assert value(first, "dpp_queue_depth", pack_type="echo") == 0
        operator_gauges.queue_ttl_s = 0.0
        assert value(await scrape(h.context), "dpp_queue_depth", pack_type="echo") == 1
        assert operator_gauges.queue_queries == 2
        assert operator_gauges.audits == 1  # the audit keeps its own, longer interval


async def test_a_run_moves_in_flight_duration_and_the_money_settled(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        idle = await scrape(h.context)
        assert value(idle, "dpp_runs_in_flight") == 0
        await h.start_dispatcher()
        assert value(await scrape(h.context), "dpp_worker_slots") == 4  # DPP_WORKER_CONCURRENCY
        run_id = await h.submit({"payload": {"answer": 42}, "delay_ms": 400})
        await h.wait_status(run_id, "PROCESSING")
        assert value(await scrape(h.context), "dpp_runs_in_flight") == 1
        row = await h.wait_status(run_id, "COMPLETED")
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS

        # the run row is final a moment before the worker's bookkeeping is
        counted = ("dpp_runs_settled_total", frozenset({("outcome", "COMPLETED")}))
        await scrape_until(h.context, lambda samples: samples.get(counted) == 1)
        samples = await scrape_until(h.context, lambda s: value(s, "dpp_runs_in_flight") == 0)
        assert value(samples, "dpp_runs_in_flight") == 0
        completed = {"pack_type": "echo", "outcome": "COMPLETED"}
        assert value(samples, "dpp_run_duration_seconds_count", **completed) == 1
        assert value(samples, "dpp_run_duration_seconds_sum", **completed) >= 0.4
        assert value(samples, "dpp_run_duration_seconds_bucket", le="0.25", **completed) == 0
        assert value(samples, "dpp_run_duration_seconds_bucket", le="+Inf", **completed) == 1
        assert (
            value(samples, "dpp_settled_charged_usd_micros_total", outcome="COMPLETED")
            == ECHO_COST_USD_MICROS
        )
        assert (
            value(samples, "dpp_settled_refunded_usd_micros_total", outcome="COMPLETED")
            == RESERVED_USD_MICROS - ECHO_COST_USD_MICROS
        )
        # the run's reservation and its settlement, each served by a group commit
        assert value(samples, "dpp_batch_size_sum", kind="reservation") == 1
        assert value(samples, "dpp_batch_size_sum", kind="settlement") == 1
        # a replayed settlement moves no money and counts nothing
        replay = await h.budgets.settle(
            h.tenant_id,
            ledger.SettleRequest(
                run_id,
                Outcome.COMPLETED,
                actual_cost_usd_micros=ECHO_COST_USD_MICROS,
                from_statuses=frozenset({RunStatus.CLAIMED}),
            ),
        )
        assert not replay.applied
        again = await scrape(h.context)
        assert (
            value(again, "dpp_settled_charged_usd_micros_total", outcome="COMPLETED")
            == ECHO_COST_USD_MICROS
        )


async def test_every_reconciler_action_is_counted_by_kind(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        reconciler = await h.start_reconciler()
        before = await scrape(h.context)
        for action in RECONCILER_ACTIONS:  # every kind exported from the start, at 0
            assert value(before, "dpp_reconciler_actions_total", action=action) == 0
        await expired_run(h)
        await claimed_run(h, receipt={})  # a valid receipt: rolls forward
        await claimed_run(h, receipt=None)  # no result: rolls back
        await h.adapters.redis.hset(h.adapters.mirror.key(h.tenant_id), "reserved", 777)
        report = await reconciler.reconcile_once()
        assert report["expired"] == report["rolled_forward"] == report["rolled_back"] == 1
        assert report["drift_repairs"] == 1
        samples = await scrape(h.context)
        for action in ("reaped", "rolled_forward", "rolled_back", "drift_repaired"):
            assert value(samples, "dpp_reconciler_actions_total", action=action) == 1, action
        assert value(samples, "dpp_reconciler_actions_total", action="audit_required") == 0
        # what those settlements moved, by outcome
        assert (
            value(samples, "dpp_settled_charged_usd_micros_total", outcome="EXPIRED")
            == MINIMUM_FEE_USD_MICROS
        )
        assert (
            value(samples, "dpp_settled_charged_usd_micros_total", outcome="COMPLETED")
            == ECHO_COST_USD_MICROS
        )
        assert (
            value(samples, "dpp_settled_refunded_usd_micros_total", outcome="FAILED")
            == RESERVED_USD_MICROS - MINIMUM_FEE_USD_MICROS
        )
        # a pass that repairs nothing counts nothing
        await reconciler.reconcile_once()
        again = await scrape(h.context)
        assert value(again, "dpp_reconciler_actions_total", action="reaped") == 1
        await h.assert_audit_ok()


async def test_audit_required_runs_are_counted_until_resolved(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        fresh(h)
        assert value(await scrape(h.context), "dpp_audit_required_runs", pack_type="echo") == 0
        run_id = await claimed_run(h, receipt={RECEIPT_RUN: "run_" + "z" * 26})
        reconciler = await h.start_reconciler()
        assert (await reconciler.reconcile_once())["audit_required"] == 1
        samples = await scrape(h.context)
        assert value(samples, "dpp_audit_required_runs", pack_type="echo") == 1
        assert value(samples, "dpp_reconciler_actions_total", action="audit_required") == 1
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
        assert value(await scrape(h.context), "dpp_audit_required_runs", pack_type="echo") == 0
        await h.assert_audit_ok()


async def test_the_periodic_audit_reports_violations_by_invariant(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        operator_gauges = gauges(h)
        clean = await scrape(h.context)
        assert all(
            value(clean, "dpp_audit_violations", invariant=invariant) == 0
            for invariant in ("1", "2", "3", "4", "6")
        )
        assert value(clean, "dpp_audit_last_completed_timestamp_seconds") > 0
        # A balance that no ledger explains (a restore gone wrong; the database's
        # own rules would refuse it, so the triggers are off as in a restore).
        async with h.pool.acquire() as connection, connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(
                "UPDATE tenants SET balance_usd_micros = balance_usd_micros + 1 WHERE id = $1",
                h.tenant_id,
            )
        try:
            # within the audit's interval the last verdict stands
            assert value(await scrape(h.context), "dpp_audit_violations", invariant="1") == 0
            operator_gauges.audit_interval_s = 1e-6
            broken = await scrape(h.context)
            assert value(broken, "dpp_audit_violations", invariant="1") == 1
            assert value(broken, "dpp_audit_violations", invariant="2") == 0
        finally:
            async with h.pool.acquire() as connection, connection.transaction():
                await connection.execute("SET LOCAL session_replication_role = replica")
                await connection.execute(
                    "UPDATE tenants SET balance_usd_micros = balance_usd_micros - 1 WHERE id = $1",
                    h.tenant_id,
                )
        assert value(await scrape(h.context), "dpp_audit_violations", invariant="1") == 0


async def test_a_failing_refresh_keeps_metrics_answering(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        operator_gauges = fresh(h)
        await h.submit({"payload": 1})
        assert value(await scrape(h.context), "dpp_queue_depth", pack_type="echo") == 1

        async def down() -> list[Any]:
            raise OSError("connection refused")

        operator_gauges.store = _StoreDown(down)  # type: ignore[assignment]
        samples = await scrape(h.context)  # still 200, the last numbers kept
        assert value(samples, "dpp_queue_depth", pack_type="echo") == 1


@dataclasses.dataclass
class _StoreDown:
    waiting_by_pack: Any


async def test_dependency_up_follows_each_readiness_check(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        samples = await scrape(h.context)
        for dependency in ("postgres", "redis", "object_storage"):
            assert value(samples, "dpp_dependency_up", dependency=dependency) == 1

        async def refused() -> None:
            raise ConnectionRefusedError

        broken = [
            check if check.name != "redis" else ReadinessCheck("redis", refused)
            for check in h.context.readiness
        ]
        context = dataclasses.replace(h.context, readiness=tuple(broken))
        samples = await scrape(context)
        assert value(samples, "dpp_dependency_up", dependency="redis") == 0
        assert value(samples, "dpp_dependency_up", dependency="postgres") == 1


async def test_a_crashed_child_counts_a_supervisor_restart(runtime: Runtime) -> None:
    reconciler = runtime.context.reconciler
    assert reconciler is not None
    restarts = ("dpp_supervisor_restarts_total", frozenset({("child", "reconciler")}))
    assert restarts not in await scrape(runtime.context)
    working = reconciler.reconcile_pass

    async def broken() -> Any:
        raise AssertionError("injected bug")

    reconciler.reconcile_pass = broken  # type: ignore[method-assign]
    with pytest.raises(ReconcilerUnavailable):
        await reconciler.reconcile_once()
    reconciler.reconcile_pass = working  # type: ignore[method-assign]
    await eventually(lambda: reconciler.restarts == 1, timeout_s=5)
    assert (await scrape(runtime.context))[restarts] == 1


def _label_values(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {label_value for _, labels in samples for _, label_value in labels}


async def test_no_label_carries_a_tenant_key_or_run_id(
    services: Any, database_url: str, redis_prefix: str
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        fresh(h)
        await h.start_dispatcher()
        run_id = await h.submit({"payload": 1})
        await h.wait_status(run_id, "COMPLETED")
        await (await h.start_reconciler()).reconcile_once()
        values = _label_values(await scrape(h.context))
        assert values  # something was labelled
        assert not [v for v in values if v.startswith(("ten_", "key_", "run_"))]
        assert h.tenant_id not in values and run_id not in values
