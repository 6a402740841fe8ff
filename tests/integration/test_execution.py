"""Execution end to end against real Postgres, Redis and moto (S3 + SQS).

Dispatcher → run actor (lease, heartbeat, pack, two-phase finalize) → budget
actor, and what happens when a worker loses its lease or the replica shuts
down. Every money-moving test ends with the SPEC §1 audit.

The harness here (``open_harness``) is also used by the reconciler, SQS and
chaos tests: it builds a replica's execution side without the HTTP layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import asyncpg
import orjson
import pytest
from aiobotocore.session import get_session
from anyio.abc import TaskGroup

from dpp import ids
from dpp.actors.budgets import Budgets
from dpp.actors.dispatcher import Dispatcher
from dpp.actors.reconciler import Reconciler
from dpp.actors.run import RunActor, RunEnding, RunServices, result_key
from dpp.actors.supervisor import Supervisor, SupervisorSpec
from dpp.adapters.blobs import RECEIPT_COST, RECEIPT_RUN, RECEIPT_SHA256
from dpp.adapters.queue import QueuedRun, RunQueue
from dpp.app import (
    Adapters,
    build_budgets,
    build_context,
    build_reconciler,
    build_run_services,
    open_adapters,
)
from dpp.config import Settings, load_settings
from dpp.context import AppContext
from dpp.money import ledger
from dpp.money.ledger import Reserved
from dpp.money.rules import Outcome, RunStatus
from dpp.runs.service import RunNotCancelable
from tests.moneykit import create_tenant
from tests.services import create_sqs_queues, store_env

if TYPE_CHECKING:
    from tests.services import TestServices

CREDIT_USD_MICROS = 10_000_000
RESERVED_USD_MICROS = 5_000
MINIMUM_FEE_USD_MICROS = 100
ECHO_COST_USD_MICROS = 1_000  # the echo pack's fixed price
WAIT_S = 15.0


# ------------------------------------------------------------------ harness


@dataclass
class Harness:
    """One replica's execution side over the test's own database and bucket."""

    settings: Settings
    adapters: Adapters
    context: AppContext
    budgets: Budgets
    queue: RunQueue
    run_services: RunServices
    tenant_id: str
    group: TaskGroup
    sqs: Any | None = None  # a raw SQS client, for the SQS tests
    dead_letter_url: str | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        return self.adapters.pool

    async def submit(
        self,
        inputs: dict[str, Any],
        *,
        reserved_usd_micros: int = RESERVED_USD_MICROS,
        minimum_fee_usd_micros: int = MINIMUM_FEE_USD_MICROS,
        timebox_sec: int = 30,
        announce: bool = True,
    ) -> str:
        """Reserve a run as the runs API does, then announce it on the queue."""
        run_id = ids.new_id("run")
        draft = ledger.RunDraft(
            run_id=run_id,
            pack_type="echo",
            inputs=inputs,
            metadata={},
            reserved_usd_micros=reserved_usd_micros,
            minimum_fee_usd_micros=minimum_fee_usd_micros,
            timebox_sec=timebox_sec,
            trace_id=secrets.token_hex(16),
            created_at=datetime.now(UTC),
        )
        outcome = await self.budgets.reserve(self.tenant_id, draft)
        assert isinstance(outcome, Reserved), outcome
        if announce:
            await self.queue.enqueue(
                [QueuedRun(run_id, self.tenant_id, "echo", draft.trace_id, draft.created_at)]
            )
        return run_id

    async def row(self, run_id: str) -> asyncpg.Record:
        row = await self.pool.fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
        assert row is not None
        return row

    async def wait_status(
        self, run_id: str, *statuses: str, timeout_s: float = WAIT_S
    ) -> asyncpg.Record:
        with anyio.fail_after(timeout_s):
            while True:
                row = await self.row(run_id)
                if row["status"] in statuses:
                    return row
                await anyio.sleep(0.05)

    async def age_lease(self, run_id: str) -> None:
        """As if the lease ran out: time passing, without the test waiting for it."""
        moved = await self.pool.fetchval(
            "UPDATE runs SET lease_expires_at = now() - interval '1 second'"
            " WHERE id = $1 AND status = 'PROCESSING' RETURNING id",
            run_id,
        )
        assert moved == run_id

    async def age_claim(self, run_id: str) -> None:
        moved = await self.pool.fetchval(
            "UPDATE runs SET claimed_at = now() - interval '1 hour'"
            " WHERE id = $1 AND status = 'CLAIMED' RETURNING id",
            run_id,
        )
        assert moved == run_id

    async def claim_twice(self, run_id: str) -> tuple[Any, Any]:
        """The run claimed, its lease taken from that first holder (a partition, a
        bug: QUEUED again), then claimed by a second worker with a new token."""
        first = await self.claim_one()
        released = await self.pool.fetchval(
            self.adapters.queries["release_run"], run_id, first.lease_token
        )
        assert released is not None
        second = await self.claim_one()
        assert second.run_id == run_id and second.lease_token != first.lease_token
        return first, second

    async def sqs_counts(self) -> dict[str, int]:
        """The run queue's visible and in-flight (received, not deleted) messages."""
        assert self.sqs is not None
        attributes = (
            await self.sqs.get_queue_attributes(
                QueueUrl=self.settings.sqs_queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        )["Attributes"]
        return {
            "visible": int(attributes["ApproximateNumberOfMessages"]),
            "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        }

    async def entries(self, run_id: str) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT kind, amount_usd_micros FROM ledger_entries WHERE run_id = $1", run_id
        )
        kinds = [row["kind"] for row in rows]
        assert len(kinds) == len(set(kinds)), f"a movement repeated: {kinds}"
        return {row["kind"]: row["amount_usd_micros"] for row in rows}

    async def assert_audit_ok(self) -> None:
        report = await self.context.accounts.audit()
        assert report.ok, (report.violations, report.audit_required_runs)

    async def start_dispatcher(self, **overrides: Any) -> Dispatcher:
        options: dict[str, Any] = {
            "concurrency": self.settings.worker_concurrency,
            "shutdown_grace_s": self.settings.shutdown_grace_sec,
            "poll_interval_s": 0.5,
        }
        options.update(overrides)
        dispatcher = Dispatcher(self.run_services, **options)
        await self.group.start(dispatcher.serve)
        return dispatcher

    def reconciler(self, **overrides: Any) -> Reconciler:
        # its timers idle unless a test asks; drift seen twice 0.2 s apart
        timing: dict[str, Any] = {
            "reaper_interval_s": 3600.0,
            "reconcile_interval_s": 3600.0,
            "drift_settle_s": 0.2,
        }
        return build_reconciler(self.adapters, self.budgets, **(timing | overrides))

    async def start_reconciler(self, **overrides: Any) -> Reconciler:
        reconciler = self.reconciler(**overrides)
        await self.group.start(reconciler.serve)
        return reconciler

    async def claim_one(self) -> Any:
        with anyio.fail_after(WAIT_S):
            while True:
                claimed = await self.queue.claim_batch(1)
                if claimed:
                    return claimed[0]


@contextlib.asynccontextmanager
async def open_harness(
    services: TestServices,
    database_url: str,
    redis_prefix: str,
    *,
    queue_backend: str = "postgres",
    **environment: str,
) -> AsyncIterator[Harness]:
    env = {
        **store_env(services, database_url, redis_prefix),
        "DPP_LEASE_SEC": "3",
        "DPP_HEARTBEAT_SEC": "1",
        "DPP_RECONCILE_THRESHOLD_SEC": "1",
        "DPP_SHUTDOWN_GRACE_SEC": "1",
        "DPP_WORKER_CONCURRENCY": "4",
        "DPP_QUEUE": queue_backend,
    }
    dead_letter_url = None
    if queue_backend == "sqs":
        env["SQS_QUEUE_URL"], dead_letter_url = await create_sqs_queues(services.object_store_url)
        env["SQS_ENDPOINT_URL"] = services.object_store_url
    env.update(environment)
    settings = load_settings(env)
    async with contextlib.AsyncExitStack() as stack:
        adapters = await stack.enter_async_context(open_adapters(settings, environment=env))
        budgets = build_budgets(adapters)
        context = build_context(adapters, budgets)
        sqs = None
        if queue_backend == "sqs":
            sqs = await stack.enter_async_context(
                get_session().create_client(
                    "sqs", endpoint_url=services.object_store_url, region_name="us-east-1"
                )
            )
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)
        await group.start(budgets.run)
        tenant_id = await create_tenant(adapters.pool)
        await budgets.credit(tenant_id, CREDIT_USD_MICROS, "credit:seed")
        yield Harness(
            settings=settings,
            adapters=adapters,
            context=context,
            budgets=budgets,
            queue=adapters.queue,
            run_services=build_run_services(adapters, budgets),
            tenant_id=tenant_id,
            group=group,
            sqs=sqs,
            dead_letter_url=dead_letter_url,
        )


async def run_actor(
    harness: Harness, claimed: Any, services: RunServices | None = None
) -> tuple[RunActor, Callable[[], RunEnding | None], anyio.Event]:
    """Start one run actor by hand (no dispatcher); returns it, its ending, and done."""
    actor = RunActor(claimed, services or harness.run_services)
    done = anyio.Event()
    ending: list[RunEnding] = []

    async def host() -> None:
        try:
            ending.append(await actor.serve())
        finally:
            done.set()

    harness.group.start_soon(host)
    return actor, (lambda: ending[0] if ending else None), done


async def eventually(predicate: Callable[[], bool], *, timeout_s: float = WAIT_S) -> None:
    """Poll a condition with a bounded deadline (no fixed sleeps in tests)."""
    with anyio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)


BACKENDS = ["postgres", "sqs"]


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
async def test_echo_run_completes_charging_the_pack_cost_with_its_receipt_in_s3(
    services, database_url, redis_prefix, backend
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend=backend) as h:
        run_id = await h.submit({"payload": {"answer": 42}, "delay_ms": 300})
        assert (await h.row(run_id))["status"] == "QUEUED"
        await h.start_dispatcher()
        working = await h.wait_status(run_id, "PROCESSING", "CLAIMED", "COMPLETED")
        assert working["status"] == "PROCESSING", "a 300 ms pack is seen working"
        assert working["lease_token"] is not None and working["attempts"] == 1
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")

        assert row["status"] == "COMPLETED"
        # only finalize phase 1 (PROCESSING -> CLAIMED) sets claimed_at
        assert row["started_at"] <= row["claimed_at"] <= row["finished_at"]
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS
        assert row["refunded_usd_micros"] == RESERVED_USD_MICROS - ECHO_COST_USD_MICROS
        assert row["lease_token"] is None and row["error"] is None
        key = result_key(h.tenant_id, run_id)
        assert row["result_key"] == key
        body = await h.adapters.blobs.get(key)
        assert orjson.loads(body) == {"payload": {"answer": 42}}
        stored = await h.adapters.blobs.head(key)
        assert stored is not None
        assert stored.content_type == "application/json"
        assert stored.metadata[RECEIPT_COST] == str(ECHO_COST_USD_MICROS)
        assert stored.metadata[RECEIPT_RUN] == run_id
        assert stored.metadata[RECEIPT_SHA256] == hashlib.sha256(body).hexdigest()
        assert row["result_sha256"] == stored.metadata[RECEIPT_SHA256]
        assert row["result_bytes"] == len(body)
        assert await h.entries(run_id) == {
            "reserve": RESERVED_USD_MICROS,
            "charge": ECHO_COST_USD_MICROS,
            "refund": RESERVED_USD_MICROS - ECHO_COST_USD_MICROS,
        }
        if backend == "sqs":
            assert await h.sqs_counts() == {"visible": 0, "in_flight": 0}, "acked"
        await h.assert_audit_ok()


async def test_pack_error_settles_failed_with_the_minimum_fee(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "fail": True})
        await h.start_dispatcher()
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "FAILED"
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        assert row["refunded_usd_micros"] == RESERVED_USD_MICROS - MINIMUM_FEE_USD_MICROS
        error = row["error"]
        assert error["type"] == "https://dpp.dev/problems/pack-error"
        assert {"type", "title", "status", "detail"} <= error.keys()
        assert row["result_key"] is None and row["claimed_at"] is None
        await h.assert_audit_ok()


async def test_timebox_overrun_settles_failed_counted_from_the_claim(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 60_000}, timebox_sec=1)
        await h.start_dispatcher()
        with anyio.fail_after(5):
            row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "FAILED"
        assert row["error"]["type"] == "https://dpp.dev/problems/timebox-exceeded"
        assert row["error"]["status"] == 504
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        elapsed = row["finished_at"] - row["started_at"]
        assert 1.0 <= elapsed.total_seconds() < 3.0
        await h.assert_audit_ok()


async def test_dispatcher_never_runs_more_than_its_concurrency(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_ids = [await h.submit({"payload": n, "delay_ms": 400}) for n in range(7)]
        dispatcher = await h.start_dispatcher(concurrency=3)
        seen_max = 0
        with anyio.fail_after(WAIT_S):
            while True:
                in_flight = len(dispatcher.in_flight())
                working = await h.pool.fetchval(
                    "SELECT count(*) FROM runs WHERE status IN ('PROCESSING', 'CLAIMED')"
                )
                assert in_flight <= 3 and working <= 3, (in_flight, working)
                seen_max = max(seen_max, working)
                done = await h.pool.fetchval("SELECT count(*) FROM runs WHERE status = 'COMPLETED'")
                if done == len(run_ids):
                    break
                await anyio.sleep(0.02)
        assert seen_max == 3
        # the last settlement commits a moment before its actor records the ending
        await eventually(lambda: dispatcher.endings[RunEnding.COMPLETED] == len(run_ids))
        assert sum(dispatcher.endings.values()) == len(run_ids)
        await h.assert_audit_ok()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_heartbeat_keeps_a_long_run_alive_past_its_lease(
    services, database_url, redis_prefix, backend
) -> None:
    async with open_harness(
        services, database_url, redis_prefix, queue_backend=backend, DPP_LEASE_SEC="2"
    ) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 3_500})
        await h.start_dispatcher()
        first = await h.wait_status(run_id, "PROCESSING")
        reconciler = await h.start_reconciler()
        await anyio.sleep(2.5)  # past the first lease: only heartbeats keep it
        if backend == "sqs":
            # the beats also kept the message hidden: had it reappeared, every
            # redelivery would count towards the dead-letter queue's limit
            assert await h.sqs_counts() == {"visible": 0, "in_flight": 1}
        report = await reconciler.reconcile_once()
        assert report["expired"] == 0
        renewed = await h.row(run_id)
        assert renewed["status"] == "PROCESSING"
        assert renewed["version"] > first["version"]
        assert renewed["lease_expires_at"] > first["lease_expires_at"]
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED"
        await h.assert_audit_ok()


async def test_worker_paused_past_its_lease_is_reaped_and_cannot_settle(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 1_000})
        claimed = await h.claim_one()
        paused = dataclasses.replace(h.run_services, heartbeat_sec=3600.0)  # never renews
        _, ending, done = await run_actor(h, claimed, paused)
        await h.age_lease(run_id)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["expired"] == 1
        with anyio.fail_after(5):
            await done.wait()
        assert ending() is RunEnding.LEASE_LOST
        row = await h.row(run_id)
        assert row["status"] == "EXPIRED"
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        assert await h.adapters.blobs.head(result_key(h.tenant_id, run_id)) is None
        # the stale worker's own settlement is refused outright
        with pytest.raises(ledger.SettleRefused):
            await h.budgets.settle(
                h.tenant_id,
                ledger.SettleRequest(
                    run_id,
                    Outcome.FAILED,
                    from_statuses=frozenset({RunStatus.PROCESSING}),
                    lease_token=claimed.lease_token,
                ),
            )
        await h.assert_audit_ok()


async def test_heartbeat_that_loses_its_lease_stops_the_work(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 60_000})
        dispatcher = await h.start_dispatcher()
        await h.wait_status(run_id, "PROCESSING")
        await h.age_lease(run_id)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["expired"] == 1
        # the next beat (1 s) loses, long before the pack would end
        await eventually(lambda: not dispatcher.in_flight(), timeout_s=3)
        assert dispatcher.endings[RunEnding.LEASE_LOST] == 1
        row = await h.row(run_id)
        assert row["status"] == "EXPIRED"
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        await h.assert_audit_ok()


async def test_a_run_claimed_again_elsewhere_is_settled_once_by_its_new_holder(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 500})
        first, second = await h.claim_twice(run_id)
        paused = dataclasses.replace(h.run_services, heartbeat_sec=3600.0)
        _, first_ending, first_done = await run_actor(h, first, paused)
        _, second_ending, second_done = await run_actor(h, second)
        with anyio.fail_after(WAIT_S):
            await first_done.wait()
            await second_done.wait()
        assert first_ending() is RunEnding.LEASE_LOST
        assert second_ending() is RunEnding.COMPLETED
        row = await h.row(run_id)
        assert row["status"] == "COMPLETED" and row["attempts"] == 2
        assert row["charged_usd_micros"] == ECHO_COST_USD_MICROS
        assert set(await h.entries(run_id)) == {"reserve", "charge", "refund"}
        await h.assert_audit_ok()


async def test_a_stale_holders_failure_cannot_settle_the_run_of_its_new_holder(
    services, database_url, redis_prefix
) -> None:
    """The FAILED twin of the test above: the first holder's pack fails while a
    second worker holds the run. Its FAILED settlement carries its own (stale)
    lease token and version, is refused, and the run is settled once, by the
    holder that owns it."""
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 300, "fail": True})
        first, second = await h.claim_twice(run_id)
        paused = dataclasses.replace(h.run_services, heartbeat_sec=3600.0)
        _, first_ending, first_done = await run_actor(h, first, paused)
        with anyio.fail_after(WAIT_S):
            await first_done.wait()
        # the stale holder failed first, and was refused: the run is still the second's
        assert first_ending() is RunEnding.LEASE_LOST
        row = await h.row(run_id)
        assert row["status"] == "PROCESSING" and str(row["lease_token"]) == second.lease_token
        assert set(await h.entries(run_id)) == {"reserve"}
        _, second_ending, second_done = await run_actor(h, second)
        with anyio.fail_after(WAIT_S):
            await second_done.wait()
        assert second_ending() is RunEnding.FAILED
        row = await h.row(run_id)
        assert row["status"] == "FAILED" and row["attempts"] == 2
        assert row["charged_usd_micros"] == MINIMUM_FEE_USD_MICROS
        assert sorted(await h.entries(run_id)) == ["charge", "refund", "reserve"]
        await h.assert_audit_ok()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_shutdown_finishes_what_it_can_and_releases_the_rest_uncharged(
    services, database_url, redis_prefix, backend
) -> None:
    async with open_harness(
        services, database_url, redis_prefix, queue_backend=backend, DPP_SHUTDOWN_GRACE_SEC="2"
    ) as h:
        quick = await h.submit({"payload": "quick", "delay_ms": 300})
        slow = await h.submit({"payload": "slow", "delay_ms": 60_000})
        dispatcher = Dispatcher(
            h.run_services, concurrency=4, shutdown_grace_s=2.0, poll_interval_s=0.5
        )
        supervisor = Supervisor("test", SupervisorSpec(), [dispatcher.child_spec()])
        await h.group.start(supervisor.run)
        await h.wait_status(slow, "PROCESSING")
        await h.wait_status(quick, "PROCESSING", "CLAIMED", "COMPLETED")
        with anyio.fail_after(10):
            await supervisor.shutdown()

        assert (await h.row(quick))["status"] == "COMPLETED"
        row = await h.row(slow)
        assert row["status"] == "QUEUED"
        assert row["lease_token"] is None and row["lease_expires_at"] is None
        assert row["started_at"] is None and row["charged_usd_micros"] is None
        assert row["attempts"] == 1
        assert await h.entries(slow) == {"reserve": RESERVED_USD_MICROS}
        assert dispatcher.endings[RunEnding.RELEASED] == 1
        assert dispatcher.endings[RunEnding.COMPLETED] == 1
        if backend == "sqs":
            # announced again by a fresh message
            assert row["enqueued_at"] is not None
        await h.assert_audit_ok()

        # the released run is picked up again by the next replica and settled once
        await h.pool.execute(
            "UPDATE runs SET inputs = jsonb_set(inputs, '{delay_ms}', '10') WHERE id = $1", slow
        )
        await h.start_dispatcher()
        done = await h.wait_status(slow, "COMPLETED", "FAILED", "EXPIRED")
        assert done["status"] == "COMPLETED" and done["attempts"] == 2
        await h.assert_audit_ok()


async def test_a_crashed_dispatcher_is_restarted_on_its_mailbox_and_claims_again(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        claim_batch = h.queue.claim_batch
        calls: list[int] = []

        async def broken_once(n: int) -> Any:
            calls.append(n)
            if len(calls) == 1:
                raise AssertionError("injected bug")
            return await claim_batch(n)

        h.queue.claim_batch = broken_once  # type: ignore[method-assign]
        dispatcher = Dispatcher(
            h.run_services, concurrency=2, shutdown_grace_s=1.0, poll_interval_s=0.2
        )
        crashes: list[str] = []
        supervisor = Supervisor(
            "test",
            SupervisorSpec(),
            [dispatcher.child_spec()],
            on_child_crash=lambda supervisor, child, error: crashes.append(child),
        )
        await h.group.start(supervisor.run)
        run_id = await h.submit({"payload": 1})
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED"
        assert crashes == ["dispatcher"] and dispatcher.restarts == 1
        dispatcher.wake()  # the handle still reaches the new incarnation
        await supervisor.shutdown()
        await h.assert_audit_ok()


class GatedBlobs:
    """Object storage whose put waits at a gate: a worker paused mid-finalize."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.entered = anyio.Event()
        self.release = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put(self, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        await self.release.wait()
        await self._inner.put(*args, **kwargs)


async def test_a_result_uploaded_after_a_roll_back_is_deleted_not_orphaned(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1})
        claimed = await h.claim_one()
        gated = GatedBlobs(h.adapters.blobs)
        slow = dataclasses.replace(h.run_services, results=gated, heartbeat_sec=3600.0)
        _, ending, done = await run_actor(h, claimed, slow)
        with anyio.fail_after(WAIT_S):
            await gated.entered.wait()  # CLAIMED, about to upload
        await h.age_claim(run_id)
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["rolled_back"] == 1  # no object yet: FAILED, minimum fee
        gated.release.set()
        with anyio.fail_after(WAIT_S):
            await done.wait()
        assert ending() is RunEnding.LEASE_LOST
        row = await h.row(run_id)
        assert row["status"] == "FAILED" and row["result_key"] is None
        assert await h.adapters.blobs.head(result_key(h.tenant_id, run_id)) is None
        await h.assert_audit_ok()


async def test_cancel_racing_claim_gives_each_run_to_exactly_one_of_them(
    services, database_url, redis_prefix
) -> None:
    """A client cancels every run while a worker claims them: each run ends
    either CANCELED (never claimed, nothing charged) or claimed (the cancel
    answered 409), never both, and the money follows."""
    async with open_harness(services, database_url, redis_prefix) as h:
        run_ids = [await h.submit({"payload": 1}, announce=False) for _ in range(6)]
        canceled: set[str] = set()
        refused: dict[str, str] = {}
        claimed: dict[str, Any] = {}

        async def cancel_all() -> None:
            for run_id in reversed(run_ids):  # meet the claimer, who starts at the oldest
                try:
                    row = await h.context.runs.cancel(h.tenant_id, run_id)
                except RunNotCancelable as error:
                    refused[run_id] = str(error)
                else:
                    assert row["status"] == "CANCELED"
                    canceled.add(run_id)

        async def claim_all() -> None:
            while len(claimed) + len(canceled) < len(run_ids):
                for run in await h.queue.claim_batch(2):
                    claimed[run.run_id] = run
                await anyio.lowlevel.checkpoint()

        with anyio.fail_after(WAIT_S):
            async with anyio.create_task_group() as group:
                group.start_soon(claim_all)
                group.start_soon(cancel_all)
        assert canceled.isdisjoint(claimed)
        assert canceled | set(claimed) == set(run_ids)
        assert set(refused) == set(claimed)
        for run_id in run_ids:
            row = await h.row(run_id)
            if run_id in canceled:
                assert (row["status"], row["charged_usd_micros"]) == ("CANCELED", 0)
                assert row["attempts"] == 0
            else:
                assert row["status"] == "PROCESSING"
        for run in claimed.values():  # the worker fails them: M each, nothing else
            await h.budgets.settle(
                h.tenant_id,
                ledger.SettleRequest(
                    run.run_id,
                    Outcome.FAILED,
                    from_statuses=frozenset({RunStatus.PROCESSING}),
                    lease_token=run.lease_token,
                ),
            )
        await h.assert_audit_ok()


async def test_a_stale_holders_release_cannot_take_the_run_from_its_new_holder(
    services, database_url, redis_prefix
) -> None:
    """The shutdown release is guarded by the lease token alone (a cut-short
    heartbeat may have moved the version): the first holder, whose run was
    claimed again elsewhere, releasing it at shutdown must be refused for its
    stale token, or the new holder's run goes back to the queue and runs twice."""
    async with open_harness(services, database_url, redis_prefix) as h:
        run_id = await h.submit({"payload": 1})
        first = await h.claim_one()
        assert await h.queue.release(first)  # its shutdown gave it back once
        second = await h.claim_one()
        assert second.run_id == run_id and second.lease_token != first.lease_token
        # the first holder's release, again (a retried shutdown step)
        assert not await h.queue.release(first)
        row = await h.row(run_id)
        assert row["status"] == "PROCESSING" and str(row["lease_token"]) == second.lease_token
        _, ending, done = await run_actor(h, second)
        with anyio.fail_after(WAIT_S):
            await done.wait()
        assert ending() is RunEnding.COMPLETED
        await h.assert_audit_ok()
