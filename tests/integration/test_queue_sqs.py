"""The SQS backend over real HTTP (moto's server mode): messages are hints,
Postgres decides, and the redrive policy ends in a FAILED settlement."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import orjson
import pytest

from dpp.actors.run import RunEnding
from dpp.adapters.queue import SqsQueue
from dpp.adapters.queue.base import QueuedRun
from dpp.limits import QUEUED_MESSAGE_LOST_AFTER_SEC
from dpp.money.rules import Outcome
from tests.integration.test_execution import (
    RESERVED_USD_MICROS,
    Harness,
    open_harness,
    run_actor,
)
from tests.integration.test_operator_metrics import scrape, value


async def counts(h: Harness, queue_url: str | None = None) -> tuple[int, int]:
    """(visible, in flight) messages of the work queue (or another)."""
    assert h.sqs is not None
    attributes = (
        await h.sqs.get_queue_attributes(
            QueueUrl=queue_url or h.settings.sqs_queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def sqs_queue(h: Harness) -> SqsQueue:
    assert isinstance(h.queue, SqsQueue)
    return h.queue


async def test_the_dead_letter_queue_is_found_from_the_redrive_policy(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert sqs_queue(h).dead_letter_url == h.dead_letter_url
        await h.queue.ping()


async def test_a_dead_lettered_run_is_set_aside_for_an_operator_charging_nothing(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert h.sqs is not None
        run_id = await h.submit({"payload": 1})
        # A consumer that keeps dying after receiving (maxReceiveCount is 2).
        for _ in range(2):
            received = await h.sqs.receive_message(
                QueueUrl=h.settings.sqs_queue_url, VisibilityTimeout=0, WaitTimeSeconds=1
            )
            assert len(received["Messages"]) == 1
        # The next receive moves it to the dead-letter queue instead.
        assert await h.queue.claim_batch(1) == []
        assert (await h.row(run_id))["status"] == "QUEUED"
        assert await counts(h, h.dead_letter_url) == (1, 0)

        # It never started: no automatic settlement (SPEC §2 has none for a
        # QUEUED run but cancel); the operator decides, its reservation held.
        report = await (await h.start_reconciler()).reconcile_once()
        assert (report["dead_lettered"], report["audit_required"]) == (1, 1)
        samples = await scrape(h.context)  # what an operator's alerts see
        for action in ("dead_lettered", "audit_required"):
            assert value(samples, "dpp_reconciler_actions_total", action=action) == 1, action
        row = await h.row(run_id)
        assert row["status"] == "AUDIT_REQUIRED"
        assert row["charged_usd_micros"] is None and row["refunded_usd_micros"] is None
        assert row["error"]["type"] == "https://dpp.dev/problems/audit-required"
        assert "dead-lettered" in row["error"]["detail"]
        assert await counts(h, h.dead_letter_url) == (0, 0)
        audit = await h.context.accounts.audit()
        assert audit.violations == []  # consistent; not ok until an operator resolves it
        assert [r["run_id"] for r in audit.audit_required_runs] == [run_id]
        # A second pass finds nothing more to do for it.
        again = await (await h.start_reconciler()).reconcile_once()
        assert (again["dead_lettered"], again["audit_required"]) == (0, 0)
        # The operator resolves it charging nothing: the whole R comes back.
        settlement = await h.context.runs.resolve(run_id, Outcome.FAILED, 0)
        assert (settlement.charged_usd_micros, settlement.refunded_usd_micros) == (
            0,
            RESERVED_USD_MICROS,
        )
        await h.assert_audit_ok()


async def test_duplicate_and_stray_messages_are_deleted_without_work(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert h.sqs is not None
        run_id = await h.submit({"payload": 1})
        row = await h.row(run_id)
        # the same run announced twice (the backstop raced the runs API)
        await h.queue.enqueue(
            [QueuedRun(run_id, h.tenant_id, "echo", row["trace_id"], row["created_at"])]
        )
        # a run that does not exist, and a body that is not ours
        stray = {
            "run_id": "run_" + "x" * 26,
            "tenant_id": h.tenant_id,
            "pack_type": "echo",
            "enqueued_at": "2026-01-01T00:00:00+00:00",
            "schema_version": 1,
            "trace_id": None,
        }
        await h.sqs.send_message(
            QueueUrl=h.settings.sqs_queue_url, MessageBody=orjson.dumps(stray).decode()
        )
        await h.sqs.send_message(QueueUrl=h.settings.sqs_queue_url, MessageBody="not json")
        claimed = []
        with anyio.fail_after(10):
            while await counts(h) != (0, len(claimed)):
                claimed += await h.queue.claim_batch(10)
        assert [run.run_id for run in claimed] == [run_id]
        assert claimed[0].receipt_handle is not None
        # the claimed run's message stays in flight until the run is done
        assert await counts(h) == (0, 1)
        await h.queue.ack(claimed[0])
        assert await counts(h) == (0, 0)
        assert (await h.row(run_id))["status"] == "PROCESSING"
        assert (await h.row(run_id))["attempts"] == 1
        await h.age_lease(run_id)
        assert (await (await h.start_reconciler()).reconcile_once())["expired"] == 1
        await h.assert_audit_ok()


async def test_a_run_committed_but_never_announced_is_announced_by_the_backstop(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        # the runs API crashed between the reservation's commit and the send
        run_id = await h.submit({"payload": "late"}, announce=False)
        assert (await h.row(run_id))["enqueued_at"] is None
        assert await counts(h) == (0, 0)
        reconciler = await h.start_reconciler(unsent_after_sec=0)
        report = await reconciler.reconcile_once()
        assert report["requeued"] == 1
        samples = await scrape(h.context)
        assert value(samples, "dpp_reconciler_actions_total", action="requeued") == 1
        assert (await h.row(run_id))["enqueued_at"] is not None
        assert (await reconciler.reconcile_once())["requeued"] == 0
        await h.start_dispatcher()
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED"
        await h.assert_audit_ok()


async def test_heartbeat_extends_the_message_visibility_with_the_lease(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(
        services, database_url, redis_prefix, queue_backend="sqs", DPP_LEASE_SEC="2"
    ) as h:
        run_id = await h.submit({"payload": 1, "delay_ms": 3_500})
        claimed = (await h.queue.claim_batch(1))[0]
        assert claimed.run_id == run_id
        _, ending, done = await run_actor(h, claimed)
        # Received with a 2 s visibility: past it, only the heartbeat keeps it hidden.
        await anyio.sleep(3.0)
        assert await counts(h) == (0, 1)
        with anyio.fail_after(5):
            await done.wait()
        assert ending() is RunEnding.COMPLETED
        assert await counts(h) == (0, 0)
        await h.assert_audit_ok()


@pytest.mark.parametrize("message", ["purged", "only_slow"])
async def test_a_queued_run_whose_message_may_be_lost_is_announced_again(
    services, database_url, redis_prefix, message
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert h.sqs is not None
        run_id = await h.submit({"payload": "lost"})
        if message == "purged":  # retention, a purge, an expired dead-letter queue
            await h.sqs.purge_queue(QueueUrl=h.settings.sqs_queue_url)
            assert await counts(h) == (0, 0)
        reconciler = await h.start_reconciler()
        assert (await reconciler.reconcile_once())["requeued"] == 0  # sent just now
        # long after the send, still QUEUED: nothing claimed it
        await h.pool.execute(
            "UPDATE runs SET enqueued_at = now() - make_interval(secs => $2) WHERE id = $1",
            run_id,
            QUEUED_MESSAGE_LOST_AFTER_SEC + 60,
        )
        assert (await reconciler.reconcile_once())["requeued"] == 1
        assert (await reconciler.reconcile_once())["requeued"] == 0  # stamped again
        # with the original still there, two messages name the run: one claim wins
        await h.start_dispatcher()
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED" and row["attempts"] == 1
        with anyio.fail_after(10):
            while True:  # the spare message is deleted unworked
                if await counts(h) == (0, 0):
                    break
                await anyio.sleep(0.1)
        assert (await h.row(run_id))["attempts"] == 1
        await h.assert_audit_ok()


async def test_a_shutdown_inside_claim_batch_abandons_no_claimed_run(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert h.sqs is not None
        run_id = await h.submit({"payload": 1})
        for _ in range(2):  # more messages after the run's, each needing an await
            await h.sqs.send_message(QueueUrl=h.settings.sqs_queue_url, MessageBody="not ours")
        blocker = await asyncpg.connect(h.settings.database_url)
        claimed: list[Any] = []
        try:
            transaction = blocker.transaction()
            await transaction.start()
            # the claim of the run waits on its row, as behind a slow statement
            await blocker.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", run_id)
            async with anyio.create_task_group() as group:
                scope = anyio.CancelScope()

                async def claim() -> None:
                    with scope:
                        claimed.extend(await h.queue.claim_batch(10))

                group.start_soon(claim)
                with anyio.fail_after(10):
                    while True:
                        if await blocker.fetchval(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted"
                        ):
                            break
                        await anyio.sleep(0.02)
                scope.cancel()  # the replica shuts down mid-batch
                await anyio.sleep(0.1)
                await transaction.rollback()
        finally:
            await blocker.close()
        status = (await h.row(run_id))["status"]
        # Claimed means handed over to the caller; else it was never claimed.
        assert [run.run_id for run in claimed] == ([run_id] if status == "PROCESSING" else [])
        for run in claimed:  # the caller, draining, gives it back
            assert await h.queue.release(run)
        assert (await h.row(run_id))["status"] == "QUEUED"
        await h.assert_audit_ok()
