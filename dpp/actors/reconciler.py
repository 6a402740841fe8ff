"""The reconciler: finishes what crashed workers left, from evidence only.

One per replica, under the supervisor. Every write it makes is guarded (the
version it observed, the status it expects), so two replicas reconciling the
same runs at once settle each exactly once: the loser's guard fails and it
counts a lost race, never a second movement of money.

Each pass, in order (one failing step does not stop the others, and within a
step one failing item — a run, an object, a letter, a tenant — does not stop
the items after it; the next pass retries it):

- **reaper** (also every ``reaper_interval_s`` on its own): PROCESSING runs
  whose lease passed → EXPIRED, minimum fee. The settlement carries the
  version the reaper observed, so a heartbeat that renewed in between wins.
- **stuck CLAIMED** runs (older than the threshold): the result object is
  the evidence. A valid receipt rolls forward to COMPLETED charging the
  receipt's cost (clamped by the settlement); no object rolls back to FAILED
  (minimum fee); an object without a valid receipt, or a run whose reserve
  entry is missing, is never guessed: AUDIT_REQUIRED plus a critical alert.
  An object that cannot be read (any error but "not there") is retried each
  pass; after ``EVIDENCE_READ_FAILURES_MAX`` consecutive failed passes the
  evidence counts as missing: AUDIT_REQUIRED plus a critical alert.
- **queue repairs** (SQS): re-announce committed QUEUED runs whose message was
  never sent; settle dead-lettered runs FAILED (minimum fee).
- **Redis drift repair**, paging through tenants with drift's cursor.
- **retention**: delete result objects past ``retention_until``, then mark
  the row (guarded), in that order so a crash only repeats the delete.
- **idempotency sweep** of expired keys.

``reconcile_once()`` asks the actor for one full pass (``POST
/admin/reconcile``); ``trigger()`` is the supervisor's crash hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, assert_never

import anyio
from anyio.abc import TaskStatus

from dpp import tracing
from dpp.actors.kernel import (
    Actor,
    ActorCrashed,
    ActorRef,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    Reply,
)
from dpp.actors.run import mailbox_then_cancel, result_key
from dpp.actors.supervisor import ChildSpec, Restart, actor_child
from dpp.adapters.blobs import (
    RECEIPT_COST,
    RECEIPT_RUN,
    RECEIPT_SHA256,
    ResultStore,
    StoredObject,
)
from dpp.adapters.queue.base import DeadLetter, RunQueue
from dpp.limits import EVIDENCE_READ_FAILURES_MAX, RECONCILER_MAILBOX_SIZE, USD_MICROS_MAX
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.money.drift import DriftRepair
from dpp.money.ledger import LedgerStore
from dpp.money.rules import Outcome, RunStatus
from dpp.runs.failures import RunFailure
from dpp.runs.idempotency import IdempotencyKeys
from dpp.runs.service import Settler
from dpp.runs.store import RunStore
from dpp.schemas import COUNT, Schema, all_required

log = logging.getLogger("dpp.reconciler")
# The reconciler's work on one run, a span of the run's own trace (dpp.tracing).
RECONCILE_SPAN = "dpp.run.reconcile"

# Per pass limits: a backlog is worked off over several passes, never in one
# unbounded sweep.
REAP_BATCH_MAX = 500
CLAIMED_BATCH_MAX = 200
RETENTION_BATCH_MAX = 500
DEAD_LETTERS_MAX = 100
DRIFT_PAGES_MAX = 10
# A QUEUED run not announced within this long after its commit is announced
# again (the runs API enqueues right after the commit).
UNSENT_AFTER_SEC_DEFAULT = 30
DRIFT_SETTLE_S_DEFAULT = 0.5
RECONCILE_ASK_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _in_run_trace(row: Any, action: str) -> Iterator[None]:
    """A repair of the run ``row`` names (reaped, rolled forward or back, set
    aside), as a span under the run's enqueue span: its trace shows how it ended
    even when no worker settled it."""
    with tracing.run_step(
        row.get("trace_id"), row["id"], RECONCILE_SPAN, {"dpp.reconciler.action": action}
    ):
        yield


SHUTDOWN_S = 5.0

COST_PATTERN = re.compile(r"^[0-9]{1,19}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class ReconcilerUnavailable(Exception):
    """No pass could be run or answered right now (stopped, busy, or too slow)."""


# ------------------------------------------------------------ verdicts


@dataclass(frozen=True, slots=True)
class RollForward:
    actual_cost_usd_micros: int
    receipt: ledger.ResultReceipt


@dataclass(frozen=True, slots=True)
class RollBack:
    pass


@dataclass(frozen=True, slots=True)
class NeedsAudit:
    reason: str


Verdict = RollForward | RollBack | NeedsAudit


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The result object could not be read (any error but "not there")."""

    failures: int  # consecutive passes, this one included
    error: str


def judge_claimed(run_id: str, key: str, stored: StoredObject | None) -> Verdict:
    """What a stuck CLAIMED run's result object proves (pure)."""
    if stored is None:
        return RollBack()
    metadata = stored.metadata
    if metadata.get(RECEIPT_RUN) != run_id:
        return NeedsAudit(f"result object names run {metadata.get(RECEIPT_RUN)!r}")
    cost = metadata.get(RECEIPT_COST, "")
    if not COST_PATTERN.fullmatch(cost) or int(cost) > USD_MICROS_MAX:
        return NeedsAudit(f"result object's cost {cost[:40]!r} is not a non-negative integer")
    sha256 = metadata.get(RECEIPT_SHA256, "")
    if not SHA256_PATTERN.fullmatch(sha256):
        return NeedsAudit("result object's sha256 is missing or malformed")
    if stored.bytes < 0:
        return NeedsAudit("result object reports a negative size")
    return RollForward(
        int(cost), ledger.ResultReceipt(key, sha256, stored.bytes, stored.content_type)
    )


# ------------------------------------------------------------- report


@dataclass(slots=True)
class ReconcileReport:
    """What one pass did; ``as_json`` is the body of POST /admin/reconcile."""

    expired: int = 0
    rolled_forward: int = 0
    rolled_back: int = 0
    audit_required: int = 0
    drift_repairs: int = 0
    results_deleted: int = 0
    idempotency_keys_swept: int = 0
    requeued: int = 0
    dead_lettered: int = 0
    # stuck CLAIMED runs whose result object could not be read this pass
    evidence_unreadable: int = 0
    # another settler (a heartbeat, a worker, another replica) got there first
    lost_races: int = 0
    errors: list[str] = field(default_factory=list)
    duration_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def schema() -> Schema:
        """The report's JSON shape, read off the dataclass itself: a new counter is
        documented the moment it exists."""
        properties: dict[str, Any] = {}
        for report_field in dataclasses.fields(ReconcileReport):
            if report_field.name == "errors":
                properties["errors"] = {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Steps (or settle:<run_id>) that failed; the next pass retries.",
                }
            else:
                assert report_field.type in (int, "int"), report_field
                properties[report_field.name] = COUNT
        return Schema(
            "ReconcileReport",
            all_required(properties, description="What one reconciliation pass did, by kind."),
        )

    def moved_anything(self) -> bool:
        return any(
            (
                self.expired,
                self.rolled_forward,
                self.rolled_back,
                self.audit_required,
                self.drift_repairs,
                self.results_deleted,
                self.requeued,
                self.dead_lettered,
                self.evidence_unreadable,
                self.errors,
            )
        )


# ----------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Reap:
    """The reaper's timer: expire lapsed leases."""


@dataclass(frozen=True, slots=True)
class Reconcile:
    """One full pass; ``reply`` gets the report (None: timer or trigger)."""

    reply: Reply[dict[str, Any]] | None = None


ReconcilerMessage = Reap | Reconcile


class Reconciler:
    """The reconciler's handle: its configuration, the pass logic, and state that
    survives restarts. Each start runs a fresh `ReconcilerActor` on one mailbox."""

    kind = "reconciler"

    def __init__(
        self,
        *,
        runs: RunStore,
        ledger: LedgerStore,
        keys: IdempotencyKeys,
        drift: DriftRepair,
        results: ResultStore,
        settler: Settler,
        queue: RunQueue,
        reaper_interval_s: float,
        reconcile_interval_s: float,
        claimed_threshold_sec: int,
        unsent_after_sec: int = UNSENT_AFTER_SEC_DEFAULT,
        drift_settle_s: float = DRIFT_SETTLE_S_DEFAULT,
        name: str = "reconciler",
        metrics: Metrics | None = None,
    ) -> None:
        assert reaper_interval_s > 0 and reconcile_interval_s > 0
        assert claimed_threshold_sec >= 1 and unsent_after_sec >= 0
        self.name = name
        self.runs = runs
        self.ledger = ledger
        self.keys = keys
        self.drift = drift
        self.results = results
        self.settler = settler
        self.queue = queue
        self.reaper_interval_s = reaper_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.claimed_threshold_sec = claimed_threshold_sec
        self.unsent_after_sec = unsent_after_sec
        self.drift_settle_s = drift_settle_s
        self.metrics = metrics
        self.passes = 0
        self.last_report: dict[str, Any] | None = None
        self.incarnations = 0
        self._drift_cursor = ""
        # stuck CLAIMED run id -> consecutive passes its evidence could not be
        # read; pruned to the runs still stuck, so never larger than a batch
        self._evidence_failures: dict[str, int] = {}
        # A Reconcile (without reply) or a Reap is queued: the mailbox survives
        # incarnations, so these flags live here too.
        self.reconcile_pending = False
        self.reap_pending = False
        self._actor: ReconcilerActor | None = None
        spec, self.ref = actor_child(
            self._new_incarnation, id=name, restart=Restart.PERMANENT, shutdown_s=SHUTDOWN_S
        )
        self._spec = dataclasses.replace(spec, statistics=self.tree_node)

    # ----------------------------------------------------------- handles

    def trigger(self) -> None:
        """Run a full pass soon (sync, coalesced): the supervisor's crash hook."""
        if self.reconcile_pending:
            return
        try:
            self.ref.tell_nowait(Reconcile())
        except (MailboxFull, ActorStopped):
            return  # a pass is queued already, or we are stopping
        self.reconcile_pending = True

    async def reconcile_once(self) -> dict[str, Any]:
        """One full pass, serialized with the periodic ones; its JSON report."""
        try:
            return await self.ref.ask(Reconcile, timeout_s=RECONCILE_ASK_TIMEOUT_S)
        except (ActorStopped, MailboxFull, AskTimeout, ActorCrashed) as error:
            raise ReconcilerUnavailable(str(error)) from error

    def _new_incarnation(self) -> ReconcilerActor:
        self.incarnations += 1
        # A restart may find its queued pass discarded with a closed mailbox;
        # one extra pass is harmless, a flag stuck on would stop the timers.
        self.reconcile_pending = self.reap_pending = False
        self._actor = ReconcilerActor(self)
        return self._actor

    @property
    def restarts(self) -> int:
        return self.incarnations - 1

    def child_spec(self) -> ChildSpec:
        return self._spec

    def stop(self) -> None:
        """Graceful stop: what is queued is still handled, then the actor exits."""
        assert self._spec.stop is not None
        self._spec.stop()

    async def serve(
        self,
        *,
        task_status: TaskStatus[ActorRef[ReconcilerMessage]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """One incarnation, start to end (what the supervisor starts)."""
        await self._spec.start(task_status=task_status)

    def tree_node(self) -> dict[str, Any]:
        assert self._actor is not None
        statistics = self._actor.statistics()
        return {
            "mailbox_depth": statistics.mailbox_depth,
            "actor_state": statistics.state,
            "passes": self.passes,
            "last_report": self.last_report,
            "children": [],
        }

    def tick_reap(self) -> None:
        """The reaper's timer (sync, coalesced)."""
        if self.reap_pending:
            return
        try:
            self.ref.tell_nowait(Reap())
        except (MailboxFull, ActorStopped):
            return
        self.reap_pending = True

    # ------------------------------------------------------------ passes

    async def reconcile_pass(self) -> ReconcileReport:
        """One full pass, not serialized: call ``reconcile_once`` instead, except
        from the actor's own handler."""
        started = time.monotonic()
        report = ReconcileReport()
        await self.guarded_step(report, "reap", self.reap)
        await self.guarded_step(report, "claimed", self._resolve_claimed)
        await self.guarded_step(report, "requeue", self._requeue_unsent)
        await self.guarded_step(report, "dead_letters", self._settle_dead_letters)
        await self.guarded_step(report, "drift", self._repair_drift)
        await self.guarded_step(report, "retention", self._delete_expired_results)
        await self.guarded_step(report, "idempotency", self._sweep_idempotency)
        report.duration_ms = int((time.monotonic() - started) * 1000)
        self.count_actions(report)
        self.passes += 1
        self.last_report = report.as_json()
        if report.moved_anything():
            log.info("reconcile pass", extra=self.last_report)
        return report

    def count_actions(self, report: ReconcileReport) -> None:
        """``dpp_reconciler_actions_total``: what one pass (or reaper pass) repaired."""
        if self.metrics is None:
            return
        self.metrics.count_reconciler_actions(
            {
                "reaped": report.expired,
                "rolled_forward": report.rolled_forward,
                "rolled_back": report.rolled_back,
                "audit_required": report.audit_required,
                "drift_repaired": report.drift_repairs,
                "requeued": report.requeued,
                "dead_lettered": report.dead_lettered,
            }
        )

    async def guarded_step(
        self,
        report: ReconcileReport,
        name: str,
        step: Callable[[ReconcileReport], Awaitable[None]],
    ) -> None:
        try:
            await step(report)
        except AssertionError:
            raise  # a broken invariant is a bug: crash, be restarted, be seen
        except Exception:
            log.warning(
                "reconcile step failed; the next pass retries", extra={"step": name}, exc_info=True
            )
            report.errors.append(name)

    async def isolated(
        self, report: ReconcileReport, item: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        """One item of a step: its failure is logged and counted, and the step goes
        on with the next item (one bad run, object or letter never blocks the rest)."""
        try:
            await work()
        except AssertionError:
            raise
        except Exception:
            log.warning(
                "reconcile item failed; the next pass retries", extra={"item": item}, exc_info=True
            )
            report.errors.append(item)

    async def _settle(
        self, report: ReconcileReport, tenant_id: str, request: ledger.SettleRequest
    ) -> bool:
        """Settle once; True when this call moved the money."""
        try:
            result = await self.settler.settle(tenant_id, request)
        except ledger.SettleRefused as refused:
            log.info(
                "settlement lost a race", extra={"run_id": request.run_id, "reason": refused.reason}
            )
            report.lost_races += 1
            return False
        except AssertionError:
            raise
        except Exception:
            log.warning(
                "settlement failed; the next pass retries",
                extra={"run_id": request.run_id},
                exc_info=True,
            )
            report.errors.append(f"settle:{request.run_id}")
            return False
        assert result.settlement.outcome is request.outcome
        if not result.applied:
            report.lost_races += 1  # settled the same way by someone else first
        return result.applied

    async def _audit(self, report: ReconcileReport, row: Any, reason: str) -> None:
        """Set the run ``row`` names aside for an operator, and raise the alarm
        (SPEC §1, §6); a span of the run's trace, like the other repairs."""
        run_id, tenant_id = row["id"], row["tenant_id"]
        failure = RunFailure.audit_required(reason)
        with _in_run_trace(row, "audit_required"):
            marked = await self.ledger.mark_audit_required(
                run_id, row["version"], failure.document()
            )
        if not marked:
            report.lost_races += 1
            return
        report.audit_required += 1
        log.error(
            "run needs an audit: its outcome cannot be established from evidence",
            extra={
                "severity": "CRITICAL",
                "alert_channel": "money",
                "run_id": run_id,
                "tenant_id": tenant_id,
                "reason": reason,
            },
        )

    async def reap(self, report: ReconcileReport) -> None:
        for row in await self.runs.lapsed_leases(REAP_BATCH_MAX):
            await self.isolated(report, f"reap:{row['id']}", partial(self._reap_one, report, row))

    async def _reap_one(self, report: ReconcileReport, row: Any) -> None:
        if not row["has_reserve"]:
            await self._audit(report, row, "reserve entry missing")
            return
        request = ledger.SettleRequest(
            row["id"],
            Outcome.EXPIRED,
            from_statuses=frozenset({RunStatus.PROCESSING}),
            error=RunFailure.lease_expired().document(),
            expected_version=row["version"],
        )
        with _in_run_trace(row, "reaped"):
            if await self._settle(report, row["tenant_id"], request):
                report.expired += 1

    async def _resolve_claimed(self, report: ReconcileReport) -> None:
        rows = await self.runs.stuck_claimed(self.claimed_threshold_sec, CLAIMED_BATCH_MAX)
        stuck = {row["id"] for row in rows}
        for run_id in [r for r in self._evidence_failures if r not in stuck]:
            del self._evidence_failures[run_id]  # resolved elsewhere, or by an operator
        for row in rows:
            await self.isolated(
                report, f"claimed:{row['id']}", partial(self._resolve_one, report, row)
            )

    async def _read_evidence(
        self, report: ReconcileReport, run_id: str, key: str
    ) -> StoredObject | Unreadable | None:
        """The run's result object, or ``Unreadable`` (counted per run across passes)."""
        try:
            stored = await self.results.head(key)
        except AssertionError:
            raise
        except Exception as error:
            failures = self._evidence_failures.get(run_id, 0) + 1
            self._evidence_failures[run_id] = failures
            report.evidence_unreadable += 1
            report.errors.append(f"evidence:{run_id}")
            log.warning(
                "could not read a stuck run's result object",
                extra={"run_id": run_id, "failures": failures},
                exc_info=True,
            )
            return Unreadable(failures, type(error).__name__)
        self._evidence_failures.pop(run_id, None)
        return stored

    async def _resolve_one(self, report: ReconcileReport, row: Any) -> None:
        run_id, tenant_id, version = row["id"], row["tenant_id"], row["version"]
        if not row["has_reserve"]:
            await self._audit(report, row, "reserve entry missing")
            return
        key = result_key(tenant_id, run_id)
        evidence = await self._read_evidence(report, run_id, key)
        if isinstance(evidence, Unreadable):
            if evidence.failures >= EVIDENCE_READ_FAILURES_MAX:
                # Missing evidence is never guessed (SPEC §1): set aside for an operator.
                await self._audit(
                    report,
                    row,
                    f"result object unreadable in {evidence.failures} consecutive passes"
                    f" ({evidence.error})",
                )
                self._evidence_failures.pop(run_id, None)
            return
        verdict = judge_claimed(run_id, key, evidence)
        match verdict:
            case RollForward(actual_cost_usd_micros=cost, receipt=receipt):
                request = ledger.SettleRequest(
                    run_id,
                    Outcome.COMPLETED,
                    actual_cost_usd_micros=cost,
                    from_statuses=frozenset({RunStatus.CLAIMED}),
                    result=receipt,
                    expected_version=version,
                )
                with _in_run_trace(row, "rolled_forward"):
                    if await self._settle(report, tenant_id, request):
                        report.rolled_forward += 1
            case RollBack():
                request = ledger.SettleRequest(
                    run_id,
                    Outcome.FAILED,
                    from_statuses=frozenset({RunStatus.CLAIMED}),
                    error=RunFailure.result_missing().document(),
                    expected_version=version,
                )
                with _in_run_trace(row, "rolled_back"):
                    if await self._settle(report, tenant_id, request):
                        report.rolled_back += 1
            case NeedsAudit(reason=reason):
                await self._audit(report, row, reason)
            case _:
                assert_never(verdict)

    async def _requeue_unsent(self, report: ReconcileReport) -> None:
        report.requeued += await self.queue.requeue_unsent(self.unsent_after_sec)

    async def _settle_dead_letters(self, report: ReconcileReport) -> None:
        for letter in await self.queue.receive_dead_letters(DEAD_LETTERS_MAX):
            await self.isolated(
                report,
                f"dead_letter:{letter.run_id}",
                partial(self._settle_dead_letter, report, letter),
            )

    async def _settle_dead_letter(self, report: ReconcileReport, letter: DeadLetter) -> None:
        if letter.run_id is None:
            log.error("dead letter names no run; deleting it")
            await self.queue.delete_dead_letter(letter)
            return
        # The row, not the message, says whose run it is and where it stands.
        # A QUEUED run whose message kept failing delivery never started: SPEC §2
        # has no automatic settlement for it (FAILED charges M, for work that was
        # done), so it is set aside for an operator, its reservation still held,
        # with the critical alert; the operator resolves it (charging 0 .. R).
        row = await self.runs.by_id(letter.run_id)
        if row is not None and row["status"] == "QUEUED":
            before = report.audit_required
            await self._audit(
                report,
                row,
                "its queue message failed delivery repeatedly (dead-lettered); it never started",
            )
            if report.audit_required > before:
                report.dead_lettered += 1
        await self.queue.delete_dead_letter(letter)

    async def _repair_drift(self, report: ReconcileReport) -> None:
        cursor = self._drift_cursor
        for _ in range(DRIFT_PAGES_MAX):
            repairs, cursor = await self.drift.repair_page(cursor, self.drift_settle_s)
            report.drift_repairs += len(repairs)
            if not cursor:
                break
        self._drift_cursor = cursor  # resume here next pass if the pages ran out

    async def _delete_expired_results(self, report: ReconcileReport) -> None:
        for row in await self.runs.past_retention(RETENTION_BATCH_MAX):
            await self.isolated(
                report, f"retention:{row['id']}", partial(self._delete_result, report, row)
            )

    async def _delete_result(self, report: ReconcileReport, row: Any) -> None:
        await self.results.delete(row["result_key"])
        if await self.runs.mark_result_deleted(row["id"], row["result_key"]):
            report.results_deleted += 1

    async def _sweep_idempotency(self, report: ReconcileReport) -> None:
        report.idempotency_keys_swept += await self.keys.sweep()


class ReconcilerActor(Actor[ReconcilerMessage]):
    """One incarnation: the mailbox that serializes passes, and the two timers."""

    kind = "reconciler"

    def __init__(self, reconciler: Reconciler) -> None:
        super().__init__(name=reconciler.name, mailbox_size=RECONCILER_MAILBOX_SIZE)
        self.reconciler = reconciler

    async def run(
        self,
        *,
        task_status: TaskStatus[ActorRef[ReconcilerMessage]] = anyio.TASK_STATUS_IGNORED,
        idle_timeout_s: float | None = None,
    ) -> None:
        """The kernel's mailbox loop plus two timers (first tick one interval in)."""
        assert idle_timeout_s is None, "the reconciler never idles out"
        reconciler = self.reconciler
        async with anyio.create_task_group() as timers:
            ref = await timers.start(mailbox_then_cancel, super().run, timers.cancel_scope)
            timers.start_soon(_every, reconciler.reaper_interval_s, reconciler.tick_reap)
            timers.start_soon(_every, reconciler.reconcile_interval_s, reconciler.trigger)
            task_status.started(ref)

    async def handle(self, message: ReconcilerMessage) -> None:
        reconciler = self.reconciler
        match message:
            case Reap():
                reconciler.reap_pending = False
                report = ReconcileReport()
                await reconciler.guarded_step(report, "reap", reconciler.reap)
                reconciler.count_actions(report)
                if report.moved_anything():
                    log.info("reaper pass", extra=report.as_json())
            case Reconcile(reply=reply):
                if reply is None:
                    reconciler.reconcile_pending = False
                report = await reconciler.reconcile_pass()
                if reply is not None:
                    reply.set(report.as_json())
            case _:
                assert_never(message)


async def _every(interval_s: float, tick: Callable[[], None]) -> None:
    while True:
        await anyio.sleep(interval_s)
        tick()
