"""Run actors: one per run in flight, from its claim to its settlement.

A run actor owns one leased run. Three tasks share its life: the pack's
execution (inside the timebox, counted from the claim), a heartbeat timer, and
the actor's mailbox loop. Every write to the run row goes through the mailbox
(``Beat``, ``PackSucceeded``, ``PackFailed``), so the lease renewal and the
finalize can never race each other over the row's version.

Finalize is two-phase (SPEC §2): (1) CLAIM, PROCESSING -> CLAIMED guarded by
lease token and version; (2) put the result with its receipt in the object's
metadata; (3) settle COMPLETED through the tenant's settlement actor. A pack error
or an overrun timebox settles FAILED (minimum fee) straight from PROCESSING.
Crash points, in order: ``run.after_claim``, ``run.after_finalize_claim``,
``run.after_result_put``, then the settlement's own (docs/crash-points.md says
what recovers each).

What this actor never does: settle a run whose lease it lost (the heartbeat
that loses its guard cancels the pack and the actor ends), or guess. When an
outcome is unknown (a store failed mid-finalize) it leaves the run CLAIMED for
the reconciler, which decides from evidence. On cancellation (shutdown past
the grace period) an unfinished run is released back to QUEUED, charged
nothing, in a shielded and time-bounded ``finally``.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, assert_never

import anyio
from anyio.abc import TaskStatus

from dpp import tracing
from dpp.actors.kernel import Actor, ActorRef, ActorStopped, MailboxFull
from dpp.adapters.blobs import RECEIPT_COST, RECEIPT_RUN, RECEIPT_SHA256, ResultStore
from dpp.adapters.queue.base import ClaimedRun, LeaseStore, RunQueue
from dpp.faults import crash_point
from dpp.limits import RUN_MAILBOX_SIZE
from dpp.logs import bind
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.money.rules import Outcome, RunStatus
from dpp.packs import PackContext, PackError, PackOutput, PackRegistry
from dpp.runs.failures import RunFailure
from dpp.runs.service import Settler

log = logging.getLogger("dpp.run")

T = TypeVar("T")

# Finalize and release run shielded from cancellation, so each needs its own bound.
FINALIZE_DEADLINE_S = 60.0
RELEASE_DEADLINE_S = 10.0
RESULT_KEY_PREFIX = "results"

# Terminal states that never carry a result object: an upload that lost the race
# to one of them is an orphan.
ORPHANING_STATUSES = frozenset({RunStatus.FAILED, RunStatus.EXPIRED, RunStatus.CANCELED})


def result_key(tenant_id: str, run_id: str) -> str:
    """Where a run's result lives: per tenant, so a prefix lists one tenant's data."""
    return f"{RESULT_KEY_PREFIX}/{tenant_id}/{run_id}"


async def mailbox_then_cancel(
    run_mailbox: Callable[..., Awaitable[None]],
    companions: anyio.CancelScope,
    *,
    task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run an actor's mailbox loop (`Actor.run`); when it ends, however it ends,
    cancel the tasks that live beside it (timers, the pack, pumps)."""
    try:
        await run_mailbox(task_status=task_status)
    finally:
        companions.cancel()


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Beat:
    """The heartbeat timer fired: renew the lease."""


@dataclass(frozen=True, slots=True)
class PackSucceeded:
    output: PackOutput


@dataclass(frozen=True, slots=True)
class PackFailed:
    """A pack error, a pack fault, or the timebox: settle FAILED for ``failure``."""

    failure: RunFailure


RunMessage = Beat | PackSucceeded | PackFailed


class RunPhase(enum.Enum):
    WORKING = "working"  # holds the lease, pack running, heartbeats renew
    FINALIZING = "finalizing"  # claim / put / settle in progress
    DONE = "done"  # nothing more to do for this run here


class RunEnding(enum.StrEnum):
    """How a run actor ended, as seen by this replica."""

    COMPLETED = "completed"  # settled COMPLETED here (or found so settled)
    FAILED = "failed"  # settled FAILED here: pack error, fault, or timebox
    LEASE_LOST = "lease_lost"  # the run is someone else's now; nothing settled here
    RELEASED = "released"  # shutdown gave it back to QUEUED, charged nothing
    UNKNOWN = "unknown"  # finalize did not finish; the reconciler decides
    CRASHED = "crashed"  # the actor raised; the reaper or reconciler recovers


@dataclass(frozen=True, slots=True)
class RunServices:
    """The ports run actors touch, built once per replica by the composition root."""

    leases: LeaseStore
    queue: RunQueue
    results: ResultStore
    settler: Settler  # the budget handle: every settlement goes through it
    packs: PackRegistry
    lease_sec: int
    heartbeat_sec: float
    # run durations (dpp_run_duration_seconds); None where nothing is scraped
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        assert self.lease_sec >= 1
        # Settings make heartbeat_sec < lease_sec; tests may break that on purpose
        # (a worker that stops renewing) so it is not asserted here.
        assert self.heartbeat_sec > 0, self.heartbeat_sec


class RunActor(Actor[RunMessage]):
    kind = "run"

    def __init__(self, claimed: ClaimedRun, services: RunServices) -> None:
        super().__init__(name=claimed.run_id, mailbox_size=RUN_MAILBOX_SIZE)
        self.claimed = claimed
        self.services = services
        self.phase = RunPhase.WORKING
        # the row's version as this actor last wrote it: every guard uses it
        self.version = claimed.version
        self.ending: RunEnding | None = None
        # the run's status when our settlement was refused, if it was
        self.refused_status: str | None = None
        self.deadline = claimed.claimed_at_monotonic + claimed.timebox_sec

    # ------------------------------------------------------------ life

    async def serve(
        self, *, task_status: TaskStatus[ActorRef[RunMessage]] = anyio.TASK_STATUS_IGNORED
    ) -> RunEnding:
        """Run to the end: settled, lost, released, or left for the reconciler."""
        claimed = self.claimed
        with (
            bind(run_id=claimed.run_id, tenant_id=claimed.tenant_id, trace_id=claimed.trace_id),
            tracing.continue_run(claimed.trace_id, claimed.run_id),
        ):
            crashed = False
            try:
                await crash_point("run.after_claim")
                async with anyio.create_task_group() as tasks:
                    # the pack and the heartbeat end with the actor's mailbox
                    ref = await tasks.start(mailbox_then_cancel, self.run, tasks.cancel_scope)
                    tasks.start_soon(self._execute)
                    tasks.start_soon(self._heartbeat_timer)
                    task_status.started(ref)
            except BaseException as error:
                crashed = not isinstance(error, anyio.get_cancelled_exc_class())
                raise
            finally:
                # Cancelled while still working (shutdown past the grace period):
                # give the run back. Not after a crash: a crashed worker is a dead
                # worker, and the reaper settles its run (docs/crash-points.md).
                if self.phase is RunPhase.WORKING and not crashed:
                    await self._release()
            assert self.phase is RunPhase.DONE and self.ending is not None
            return self.ending

    async def _execute(self) -> None:
        message = await self._run_pack()
        with contextlib.suppress(ActorStopped):  # the lease was lost meanwhile
            await self.ref.tell(message)

    async def _run_pack(self) -> RunMessage:
        claimed = self.claimed
        pack = self.services.packs.get(claimed.pack_type)
        if pack is None:
            log.error(
                "run names a pack this replica does not offer",
                extra={"pack_type": claimed.pack_type},
            )
            return PackFailed(
                RunFailure.pack_fault("Pack unavailable", "The pack type is not offered any more.")
            )
        context = PackContext(
            run_id=claimed.run_id,
            tenant_id=claimed.tenant_id,
            trace_id=claimed.trace_id,
            timebox_sec=claimed.timebox_sec,
            reserved_usd_micros=claimed.reserved_usd_micros,
            minimum_fee_usd_micros=claimed.minimum_fee_usd_micros,
        )
        with anyio.move_on_at(self.deadline):
            try:
                # object: a third-party pack may break its contract (checked below)
                with tracing.span("dpp.run.execute", {"dpp.pack.type": pack.pack_type}):
                    output: object = await pack.execute(claimed.inputs, context)
            except PackError as error:
                return PackFailed(RunFailure.pack_error(error))
            except Exception:
                log.exception(
                    "pack raised outside its contract", extra={"pack_type": pack.pack_type}
                )
                return PackFailed(
                    RunFailure.pack_fault("Pack failed", "The pack failed unexpectedly.")
                )
            if not isinstance(output, PackOutput):
                log.error(
                    "pack returned something other than a PackOutput",
                    extra={"pack_type": pack.pack_type},
                )
                return PackFailed(
                    RunFailure.pack_fault("Pack failed", "The pack failed unexpectedly.")
                )
            return PackSucceeded(output)
        return PackFailed(RunFailure.timebox_exceeded(claimed.timebox_sec))

    async def _heartbeat_timer(self) -> None:
        while True:
            await anyio.sleep(self.services.heartbeat_sec)
            try:
                self.ref.tell_nowait(Beat())
            except MailboxFull:
                continue  # beats are waiting already; one is as good as many
            except ActorStopped:
                return

    # --------------------------------------------------------- handlers

    async def handle(self, message: RunMessage) -> None:
        match message:
            case Beat():
                await self._renew()
            case PackSucceeded(output=output):
                await self._finalize(self._complete, output)
            case PackFailed(failure=failure):
                await self._finalize(self._fail, failure)
            case _:
                assert_never(message)

    async def _renew(self) -> None:
        if self.phase is not RunPhase.WORKING:
            return  # finalizing or done: the lease no longer needs renewing
        services = self.services
        try:
            version = await services.leases.renew(self.claimed, self.version, services.lease_sec)
        except AssertionError:
            raise  # a broken invariant is a bug, not an operating error
        except Exception:
            # The next beat tries again; if the lease lapses meanwhile, the reaper
            # takes the run and that beat loses its guard.
            log.warning("heartbeat could not reach the database", exc_info=True)
            return
        if version is None:
            log.warning("heartbeat lost the lease; stopping the work")
            self._end(RunEnding.LEASE_LOST)
            await self._ack()
            return
        self.version = version
        if self.claimed.receipt_handle is not None:
            try:
                await services.queue.extend_visibility(self.claimed, services.lease_sec)
            except Exception:
                log.warning("could not extend the message's visibility", exc_info=True)

    async def _finalize(self, step: Callable[[T], Awaitable[RunEnding]], argument: T) -> None:
        """Run one finalize path shielded: a shutdown must not cut it in half."""
        if self.phase is not RunPhase.WORKING:
            return  # the lease was lost before the pack's result arrived
        self.phase = RunPhase.FINALIZING
        ending = RunEnding.UNKNOWN
        with anyio.move_on_after(FINALIZE_DEADLINE_S, shield=True) as deadline:
            ending = await step(argument)
        if deadline.cancelled_caught:
            log.error("finalize ran out of time; the reconciler will decide the run")
        self._end(ending)
        await self._ack()

    async def _complete(self, output: PackOutput) -> RunEnding:
        claimed, services = self.claimed, self.services
        try:
            version = await services.leases.claim_for_finalize(claimed, self.version)
        except AssertionError:
            raise  # a broken invariant is a bug, not an operating error
        except Exception:
            # Whether it committed is unknown: PROCESSING is reaped, CLAIMED reconciled.
            log.error("finalize claim failed", exc_info=True)
            return RunEnding.UNKNOWN
        if version is None:
            log.warning("finalize claim lost: the run is no longer ours")
            return RunEnding.LEASE_LOST
        self.version = version
        await crash_point("run.after_finalize_claim")
        key = result_key(claimed.tenant_id, claimed.run_id)
        sha256 = hashlib.sha256(output.body).hexdigest()
        receipt = {
            RECEIPT_COST: str(output.actual_cost_usd_micros),
            RECEIPT_RUN: claimed.run_id,
            RECEIPT_SHA256: sha256,
        }
        try:
            with tracing.span("dpp.run.upload", {"dpp.result.bytes": len(output.body)}):
                await services.results.put(key, output.body, output.content_type, receipt)
        except AssertionError:
            raise  # a broken invariant is a bug, not an operating error
        except Exception:
            log.error("result upload failed; the reconciler will decide the run", exc_info=True)
            return RunEnding.UNKNOWN
        await crash_point("run.after_result_put")
        request = ledger.SettleRequest(
            claimed.run_id,
            Outcome.COMPLETED,
            actual_cost_usd_micros=output.actual_cost_usd_micros,
            from_statuses=frozenset({RunStatus.CLAIMED}),
            lease_token=claimed.lease_token,
            result=ledger.ResultReceipt(key, sha256, len(output.body), output.content_type),
            expected_version=version,
        )
        ending = await self._settle(request, RunEnding.COMPLETED)
        if self.refused_status in ORPHANING_STATUSES:
            await self._discard_result(key)
        return ending

    async def _discard_result(self, key: str) -> None:
        """The run ended without a result while we uploaded one (the reconciler
        rolled it back, or the reaper expired it): nothing will ever point at the
        object, so take it away. Never for COMPLETED (the key holds whichever
        attempt's result settled) nor AUDIT_REQUIRED (the object is evidence)."""
        try:
            with anyio.move_on_after(RELEASE_DEADLINE_S, shield=True):
                await self.services.results.delete(key)
                log.info("deleted the result of a run that ended without it")
        except Exception:
            log.warning("could not delete an orphaned result object", exc_info=True)

    async def _fail(self, failure: RunFailure) -> RunEnding:
        claimed = self.claimed
        log.info("run failed", extra={"problem_type": failure.kind.type_uri})
        request = ledger.SettleRequest(
            claimed.run_id,
            Outcome.FAILED,
            from_statuses=frozenset({RunStatus.PROCESSING}),
            lease_token=claimed.lease_token,
            error=failure.document(),
            expected_version=self.version,
        )
        return await self._settle(request, RunEnding.FAILED)

    async def _settle(self, request: ledger.SettleRequest, settled: RunEnding) -> RunEnding:
        try:
            with tracing.span("dpp.run.settle", {"dpp.run.outcome": request.outcome.value}):
                result = await self.services.settler.settle(self.claimed.tenant_id, request)
        except ledger.SettleRefused as refused:
            # Reaped, reconciled or released first: its settlement stands, ours never happens.
            self.refused_status = refused.status
            log.warning(
                "settlement refused", extra={"status": refused.status, "reason": refused.reason}
            )
            return RunEnding.LEASE_LOST
        except AssertionError:
            raise  # a broken invariant is a bug, not an operating error
        except Exception:
            log.error("settlement outcome unknown; the reconciler will decide", exc_info=True)
            return RunEnding.UNKNOWN
        assert result.run_id == request.run_id
        assert result.settlement.outcome is request.outcome, result
        log.info(
            "run settled",
            extra={
                "outcome": request.outcome.value,
                "charged_usd_micros": result.settlement.charged_usd_micros,
                "refunded_usd_micros": result.settlement.refunded_usd_micros,
                "replayed": not result.applied,
            },
        )
        if result.applied and self.services.metrics is not None:
            self.services.metrics.run_duration.labels(
                self.claimed.pack_type, request.outcome.value
            ).observe(anyio.current_time() - self.claimed.claimed_at_monotonic)
        return settled

    # ---------------------------------------------------------- endings

    def _end(self, ending: RunEnding) -> None:
        assert self.phase is not RunPhase.DONE, "a run actor ends once"
        self.phase = RunPhase.DONE
        self.ending = ending
        self.stop()  # the mailbox drains (late beats are ignored), then the tasks end

    async def _ack(self) -> None:
        if self.claimed.receipt_handle is None:
            return
        try:
            with anyio.move_on_after(RELEASE_DEADLINE_S, shield=True):
                await self.services.queue.ack(self.claimed)
        except Exception:
            # It reappears later and is deleted then: the run is no longer QUEUED.
            log.warning("could not delete the run's message", exc_info=True)

    async def _release(self) -> None:
        """Shutdown: QUEUED again, nothing charged (SPEC §6). Shielded and bounded."""
        assert self.phase is RunPhase.WORKING
        self.phase = RunPhase.DONE
        self.ending = RunEnding.LEASE_LOST
        with anyio.move_on_after(RELEASE_DEADLINE_S, shield=True) as deadline:
            try:
                if await self.services.queue.release(self.claimed):
                    self.ending = RunEnding.RELEASED
                    log.info("run released back to the queue")
            except Exception:
                # Still PROCESSING under our lease: the reaper expires it.
                log.error("could not release the run", exc_info=True)
        if deadline.cancelled_caught:
            log.error("release ran out of time; the reaper will expire the run")
