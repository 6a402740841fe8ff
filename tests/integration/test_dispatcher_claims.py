"""When the dispatcher claims, against the real Postgres queue.

A run ending refills its slot only when the last claim may have left runs
behind; otherwise that claim would find nothing (the queue was drained, and new
runs wake the dispatcher by NOTIFY). Each test here fails without one part of
that rule: a short claim is not repeated when a run ends, a full claim is, a
run announced while every slot is busy is claimed when one frees, and so is a
run whose wake was lost to a full mailbox while a claim was out. The poll
(the backstop) is an hour in every test, so only those rules can bring a run
to a worker.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import anyio

from dpp.actors.dispatcher import Dispatcher, RunEnded
from dpp.actors.run import RunEnding
from dpp.adapters.queue import PostgresQueue, QueuedRun
from tests.integration.test_execution import WAIT_S, GatedBlobs, Harness, eventually, open_harness

NO_POLL_S = 3600.0


class CountedClaims:
    """Wraps the queue's ``claim_batch``: what each claim asked for and got, in order."""

    def __init__(self, harness: Harness) -> None:
        self._claim_batch = harness.queue.claim_batch
        self.claims: list[tuple[int, int]] = []  # (asked, got)
        harness.queue.claim_batch = self._claim  # type: ignore[method-assign]

    async def _claim(self, n: int) -> Any:
        claimed = await self._claim_batch(n)
        self.claims.append((n, len(claimed)))
        return claimed


async def _announce(h: Harness, run_ids: list[str]) -> None:
    """One enqueue (one NOTIFY) for runs reserved with ``announce=False``."""
    now = datetime.now(UTC)
    await h.queue.enqueue([QueuedRun(run_id, h.tenant_id, "echo", None, now) for run_id in run_ids])


async def test_a_run_ending_after_a_short_claim_claims_nothing(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        counted = CountedClaims(h)
        dispatcher = await h.start_dispatcher(concurrency=4, poll_interval_s=NO_POLL_S)
        run_id = await h.submit({"payload": 1})
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED"
        await eventually(lambda: dispatcher.endings[RunEnding.COMPLETED] == 1)
        # Its RunEnded is queued or handled. Quiet once every message was handled:
        # every Wake claims (a free slot, not draining), and one RunEnded.
        await eventually(
            lambda: (
                dispatcher.ref.mailbox_depth() == 0
                and dispatcher.ref.messages_handled() == len(counted.claims) + 1
            )
        )
        # start-up claims found nothing; the NOTIFY's claim found the run (1 of
        # 4 asked: the queue drained); the run's end claimed nothing more
        found = [index for index, (_, got) in enumerate(counted.claims) if got]
        assert found and counted.claims[found[0]] == (4, 1), counted.claims
        assert counted.claims[found[0] + 1 :] == [], counted.claims
        await h.assert_audit_ok()


async def test_a_run_ending_after_a_full_claim_claims_what_it_left_behind(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        counted = CountedClaims(h)
        dispatcher = await h.start_dispatcher(concurrency=2, poll_interval_s=NO_POLL_S)
        await eventually(lambda: len(counted.claims) >= 1)  # the start-up claim
        run_ids = [await h.submit({"payload": n}, announce=False) for n in range(3)]
        await _announce(h, run_ids)  # one NOTIFY: one claim, full (2 of 2)
        for run_id in run_ids:
            row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
            assert row["status"] == "COMPLETED"
        await eventually(lambda: dispatcher.endings[RunEnding.COMPLETED] == 3)
        assert (2, 2) in counted.claims, counted.claims
        await h.assert_audit_ok()


async def test_a_run_announced_while_every_slot_is_busy_is_claimed_when_one_frees(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        gated = GatedBlobs(h.run_services.results)
        h.run_services = dataclasses.replace(h.run_services, results=gated)
        dispatcher = await h.start_dispatcher(concurrency=1, poll_interval_s=NO_POLL_S)
        first = await h.submit({"payload": 1})
        with anyio.fail_after(WAIT_S):
            await gated.entered.wait()  # the only slot is busy finalizing
        handled = dispatcher.ref.messages_handled()
        second = await h.submit({"payload": 2})  # its NOTIFY finds no free slot
        await eventually(lambda: dispatcher.ref.messages_handled() > handled)
        assert (await h.row(second))["status"] == "QUEUED"
        gated.release.set()
        for run_id in (first, second):
            row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
            assert row["status"] == "COMPLETED"
        await eventually(lambda: dispatcher.endings[RunEnding.COMPLETED] == 2)
        await h.assert_audit_ok()


async def test_a_run_released_by_another_replica_wakes_an_idle_one(
    services, database_url, redis_prefix
) -> None:
    """A drain gives runs back to QUEUED with a NOTIFY of its own: an idle
    replica (its last claim short, so no run ending would claim) takes them."""
    async with open_harness(services, database_url, redis_prefix) as h:
        # another replica's dispatcher: its own queue (its own LISTEN connection)
        queue = PostgresQueue(
            h.pool, h.adapters.queries, dsn=database_url, lease_sec=h.settings.lease_sec
        )
        draining = Dispatcher(
            dataclasses.replace(h.run_services, queue=queue),
            concurrency=1,
            shutdown_grace_s=0.0,
            poll_interval_s=NO_POLL_S,
            name="other",
        )
        await h.group.start(draining.serve)
        run_id = await h.submit({"payload": 1, "delay_ms": 20_000}, announce=False)
        await queue.enqueue([QueuedRun(run_id, h.tenant_id, "echo", None, datetime.now(UTC))])
        await eventually(lambda: draining.in_flight() == [run_id])
        idle = await h.start_dispatcher(
            concurrency=2, poll_interval_s=NO_POLL_S, shutdown_grace_s=0.0
        )
        await eventually(lambda: idle.ref.messages_handled() >= 1)  # found nothing
        assert idle.in_flight() == []
        draining.stop()  # no grace: released at once, charged nothing
        await eventually(lambda: idle.in_flight() == [run_id])
        idle.stop()
        await h.wait_status(run_id, "QUEUED")
        row = await h.row(run_id)
        assert row["attempts"] == 2 and row["charged_usd_micros"] is None
        await h.assert_audit_ok()


async def test_a_wake_lost_to_a_full_mailbox_is_claimed_by_the_next_run_ending(
    services, database_url, redis_prefix
) -> None:
    """The NOTIFY of a run arrives while a claim is on the wire and the mailbox
    is full: the claim comes back short, yet the next run ending claims."""
    async with open_harness(services, database_url, redis_prefix) as h:
        claim_batch = h.queue.claim_batch
        on_the_wire, gate = anyio.Event(), anyio.Event()

        async def gated(n: int) -> Any:
            claimed = await claim_batch(n)  # finds nothing: the run is not in yet
            on_the_wire.set()
            await gate.wait()
            return claimed

        dispatcher = await h.start_dispatcher(concurrency=1, poll_interval_s=NO_POLL_S)
        h.queue.claim_batch = gated  # type: ignore[method-assign]
        dispatcher.wake()
        with anyio.fail_after(WAIT_S):
            await on_the_wire.wait()
        # endings of runs hosted elsewhere, as far as this test cares: a full mailbox
        while dispatcher.ref.mailbox_depth() < dispatcher.ref.mailbox_capacity():
            dispatcher.ref.tell_nowait(RunEnded("run_elsewhere", RunEnding.COMPLETED))
        assert not dispatcher.backlog_possible  # cleared as the claim went out
        run_id = await h.submit({"payload": 1})  # its wake finds the mailbox full
        await eventually(lambda: dispatcher.backlog_possible)
        h.queue.claim_batch = claim_batch  # type: ignore[method-assign]
        gate.set()  # the claim comes back short (0 of 1)
        row = await h.wait_status(run_id, "COMPLETED", "FAILED", "EXPIRED")
        assert row["status"] == "COMPLETED"
        await h.assert_audit_ok()
