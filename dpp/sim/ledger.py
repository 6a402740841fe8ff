"""The in-memory Postgres: tenants, runs, ledger entries, idempotency keys.

Each method is one transaction of the real code (``dpp/money/ledger.py``,
``sql/queries/*.sql``, ``dpp/runs/idempotency.py``), applied atomically after
its simulated latency, with the same guards: the same admission rule
(``rules.decide_batch``), the same settlement decision (the ledger's own pure
``_decide_settlement``), the same conditional UPDATEs. The differential test
(tests/integration/test_sim_differential.py) runs one operation sequence
through this and through the real SQL and compares every state.

Invariants 1-4 of SPEC §1 are checked after every transaction (``check``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from dpp.adapters.queue.base import ClaimedRun
from dpp.faults import crash_point
from dpp.limits import IDEMPOTENCY_LOCK_S, IDEMPOTENCY_RETENTION_HOURS, LEDGER_BATCH_MAX
from dpp.money import ledger, rules
from dpp.money.ledger import _decide_settlement
from dpp.money.rules import Admission, Budget, RunStatus
from dpp.runs.idempotency import Begin, Held, InFlight, Mismatch, Proceed, Replay, Scope
from dpp.sim.world import Faults, Trace, Violations, now_dt, now_s

Row = dict[str, Any]
RETENTION_DAYS = 7
OPEN = rules.OPEN_STATUSES
HELD = OPEN | {RunStatus.AUDIT_REQUIRED}  # statuses whose reservation is still held


@dataclass(slots=True)
class Tenant:
    balance: int = 0
    reserved: int = 0
    version: int = 0
    max_concurrent_runs: int = 10


@dataclass(slots=True)
class Entry:
    tenant_id: str
    run_id: str | None
    kind: str  # credit | reserve | charge | refund
    amount: int
    operation_id: str
    # a credit's receipt: the budget it answered (a replay answers it again)
    receipt: ledger.TenantBudget | None = None


@dataclass(slots=True)
class KeyRecord:
    fingerprint: bytes
    owner: uuid.UUID
    state: str  # in_flight | done
    locked_until: float
    created_at: float
    status: int | None = None
    headers: dict[str, str] | None = None
    body: bytes | None = None


@dataclass(slots=True)
class MemLedger:
    """Postgres, in memory. ``faults=None`` (the differential test) injects nothing."""

    trace: Trace
    violations: Violations
    faults: Faults | None = None
    tenants: dict[str, Tenant] = field(default_factory=dict)
    runs: dict[str, Row] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    operation_ids: set[str] = field(default_factory=set)
    keys: dict[tuple[str, str, str, str], KeyRecord] = field(default_factory=dict)
    tokens: int = 0
    reported: set[tuple[str, str]] = field(default_factory=set)
    # settlements and credits answered as replays (applied=False): a mirror that
    # applies one of these twice shows hole 3, not a drift-repair race
    replayed: set[str] = field(default_factory=set)
    # settlements and credits ("settle:<run>", "credit:<op>") -> the tenant and
    # the ledger_version their commit produced: a mirror loaded from version v
    # includes exactly those committed at or below v
    committed_at: dict[str, tuple[str, int]] = field(default_factory=dict)

    # ------------------------------------------------------------ helpers

    async def _begin(self, what: str) -> None:
        if self.faults is not None:
            await self.faults.before(what, self.trace)

    def _end(self, what: str) -> None:
        self.check(what)
        if self.faults is not None:
            self.faults.after(what, self.trace)

    def add_tenant(self, tenant_id: str, max_concurrent_runs: int) -> None:
        self.tenants[tenant_id] = Tenant(max_concurrent_runs=max_concurrent_runs)

    def _budget(self, tenant: Tenant) -> ledger.TenantBudget:
        return ledger.TenantBudget(tenant.balance, tenant.reserved, tenant.version)

    def _entry(self, entry: Entry) -> None:
        assert entry.operation_id not in self.operation_ids, entry  # the unique index
        self.operation_ids.add(entry.operation_id)
        self.entries.append(entry)

    # ------------------------------------------------------ invariants 1-4

    def check(self, after: str) -> None:
        """SPEC §1 invariants 1-4, from the entries and the runs (the audit's sums)."""
        credits: dict[str, int] = {}
        charges: dict[str, int] = {}
        for entry in self.entries:
            if entry.kind == "credit":
                credits[entry.tenant_id] = credits.get(entry.tenant_id, 0) + entry.amount
            elif entry.kind == "charge":
                charges[entry.tenant_id] = charges.get(entry.tenant_id, 0) + entry.amount
        held: dict[str, int] = {}
        for run in self.runs.values():
            if run["status"] in HELD:
                held[run["tenant_id"]] = held.get(run["tenant_id"], 0) + run["reserved_usd_micros"]
        for tenant_id, tenant in self.tenants.items():
            implied = credits.get(tenant_id, 0) - charges.get(tenant_id, 0)
            if tenant.balance != implied:
                self.violations.add(
                    f"invariant 1 after {after}: {tenant_id} balance {tenant.balance} != {implied}"
                )
            if tenant.reserved != held.get(tenant_id, 0):
                self.violations.add(
                    f"invariant 2 after {after}: {tenant_id} reserved {tenant.reserved}"
                    f" != {held.get(tenant_id, 0)}"
                )
            if tenant.balance - tenant.reserved < 0:
                self.violations.add(f"invariant 3 after {after}: {tenant_id} available < 0")
        settlements: dict[str, list[Entry]] = {}
        for entry in self.entries:
            if entry.kind in ("charge", "refund") and entry.run_id is not None:
                settlements.setdefault(entry.run_id, []).append(entry)
        for run_id, run in self.runs.items():
            if run["status"] not in rules.TERMINAL_STATUSES:
                if run_id in settlements:
                    self.violations.add(f"invariant 4 after {after}: open {run_id} has entries")
                continue
            found = settlements.get(run_id, [])
            kinds = sorted(entry.kind for entry in found)
            charged = sum(e.amount for e in found if e.kind == "charge")
            refunded = sum(e.amount for e in found if e.kind == "refund")
            reserved, minimum = run["reserved_usd_micros"], run["minimum_fee_usd_micros"]
            expected = {
                RunStatus.FAILED: minimum,
                RunStatus.EXPIRED: minimum,
                RunStatus.CANCELED: 0,
            }.get(run["status"], charged)
            if (
                kinds != ["charge", "refund"]
                or charged + refunded != reserved
                or charged != run["charged_usd_micros"]
                or charged != expected
                or (not minimum <= charged <= reserved and run["status"] == RunStatus.COMPLETED)
            ):
                self.violations.add(
                    f"invariant 4 after {after}: {run_id} {run['status']} settled {kinds}"
                    f" charged {charged} refunded {refunded} of {reserved}"
                )

    # ------------------------------------------------------------ money

    async def budget(self, tenant_id: str) -> ledger.StoredBudget:
        await self._begin("budget")
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            raise ledger.TenantNotFound(tenant_id)
        return ledger.StoredBudget(
            tenant.balance, tenant.reserved, tenant.version, tenant.max_concurrent_runs
        )

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> ledger.CreditResult:
        assert rules.is_amount(amount_usd_micros) and amount_usd_micros > 0
        await self._begin("credit")
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            raise ledger.TenantNotFound(tenant_id)
        if operation_id in self.operation_ids:
            previous = [e for e in self.entries if e.operation_id == operation_id]
            if (
                not previous
                or previous[0].kind != "credit"
                or previous[0].tenant_id != tenant_id
                or previous[0].amount != amount_usd_micros
            ):
                raise ledger.CreditConflict(operation_id)
            self.trace.add(f"pg credit {tenant_id} {operation_id} replayed")
            self.replayed.add(f"credit:{operation_id}")
            receipt = previous[0].receipt
            assert receipt is not None
            return ledger.CreditResult(receipt, replayed=True)
        tenant.balance += amount_usd_micros
        tenant.version += 1
        self.committed_at[f"credit:{operation_id}"] = (tenant_id, tenant.version)
        self._entry(
            Entry(tenant_id, None, "credit", amount_usd_micros, operation_id, self._budget(tenant))
        )
        self.trace.add(f"pg credit {tenant_id} {operation_id} {amount_usd_micros}")
        result = ledger.CreditResult(self._budget(tenant), replayed=False)
        self._end("credit")
        return result

    async def reserve_batch(
        self,
        tenant_id: str,
        drafts: Sequence[ledger.RunDraft],
        deadlines: Sequence[float] | None = None,
    ) -> ledger.ReserveBatchResult:
        """ledger.reserve_batch: the drafts' keys checked owned under the tenant
        lock (``KeyNotHeld``), drafts past their caller's deadline withdrawn
        (``DeadlinePassed``), the whole transaction bounded by the latest deadline."""
        assert 1 <= len(drafts) <= LEDGER_BATCH_MAX
        assert deadlines is None or len(deadlines) == len(drafts)
        late = ledger.ReserveBatchResult([ledger.DeadlinePassed() for _ in drafts], None)
        if deadlines is not None:
            if max(deadlines) <= now_s():
                return late  # no time left to even acquire a connection
            with anyio.move_on_at(max(deadlines)) as bound:
                await self._begin("reserve")
            if bound.cancelled_caught:
                self.trace.add(f"pg reserve {tenant_id} statement timeout")
                return late
        else:
            await self._begin("reserve")
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            raise ledger.TenantNotFound(tenant_id)
        now = now_s()
        # dpp_lock_reservation's claims: inserted where no record exists (an
        # earlier claim of the batch wins), kept only if the transaction commits
        claimed: dict[tuple[str, str, str, str], KeyRecord] = {}
        for draft in drafts:
            completion = draft.idempotency
            if completion is None or completion.claim is None:
                continue
            at = (tenant_id, completion.method, completion.path, completion.key)
            if at not in self.keys and at not in claimed:
                claim = completion.claim
                claimed[at] = KeyRecord(
                    claim.request_sha256, completion.owner, "in_flight", now + claim.lock_s, now
                )
        withdrawn: list[ledger.Withdrawn | None] = []
        for index, draft in enumerate(drafts):
            completion = draft.idempotency
            record = None
            if completion is not None:
                key_at = (tenant_id, completion.method, completion.path, completion.key)
                record = self.keys.get(key_at, claimed.get(key_at))
            if completion is not None and (
                record is None or record.state != "in_flight" or record.owner != completion.owner
            ):
                withdrawn.append(ledger.KeyNotHeld())
            elif deadlines is not None and now >= deadlines[index]:
                withdrawn.append(ledger.DeadlinePassed())
            else:
                withdrawn.append(None)
        eligible = [d for d, why in zip(drafts, withdrawn, strict=True) if why is None]
        open_runs = sum(
            1 for r in self.runs.values() if r["tenant_id"] == tenant_id and r["status"] in OPEN
        )
        decided, after = rules.decide_batch(
            Budget(tenant.balance, tenant.reserved),
            [draft.reserved_usd_micros for draft in eligible],
            open_runs=open_runs,
            max_concurrent_runs=tenant.max_concurrent_runs,
        )
        remaining = iter(decided)
        decisions: list[rules.AdmissionDecision | ledger.Withdrawn] = [
            next(remaining) if why is None else why for why in withdrawn
        ]
        accepted = [
            d
            for d, decision in zip(eligible, decided, strict=True)
            if decision.admission is Admission.ACCEPTED
        ]
        if not accepted:
            self._commit_claims(claimed)
            self.trace.add(f"pg reserve {tenant_id} none accepted")
            return ledger.ReserveBatchResult(decisions, self._budget(tenant))
        total = sum(d.reserved_usd_micros for d in accepted)
        # reserve_on_tenant's guard
        assert tenant.balance - tenant.reserved >= total, "admission decided what the guard refuses"
        await crash_point("reserve.before_commit")  # rolled back: nothing below applies
        self._commit_claims(claimed)
        tenant.reserved += total
        tenant.version += 1
        assert tenant.reserved == after.reserved_usd_micros
        for draft in accepted:
            assert draft.run_id not in self.runs, "duplicate run id"  # the primary key
            completion = draft.idempotency
            self.runs[draft.run_id] = {
                "id": draft.run_id,
                "tenant_id": tenant_id,
                "pack_type": draft.pack_type,
                "status": RunStatus.QUEUED.value,
                "inputs": draft.inputs,
                "reserved_usd_micros": draft.reserved_usd_micros,
                "minimum_fee_usd_micros": draft.minimum_fee_usd_micros,
                "timebox_sec": draft.timebox_sec,
                "trace_id": draft.trace_id,
                "created_at": now_s(),
                "version": 0,
                "lease_token": None,
                "lease_expires_at": None,
                "claimed_at": None,
                "attempts": 0,
                "enqueued_at": None,
                "charged_usd_micros": None,
                "refunded_usd_micros": None,
                "retention_days": RETENTION_DAYS,
                "error": None,
                "result_key": None,
                "idempotency_key": completion.key if completion is not None else None,
            }
            self._entry(
                Entry(
                    tenant_id,
                    draft.run_id,
                    "reserve",
                    draft.reserved_usd_micros,
                    f"reserve:{draft.run_id}",
                )
            )
            if completion is not None:
                # complete_idempotency_batch: the key is locked and was checked owned
                record = self.keys[(tenant_id, completion.method, completion.path, completion.key)]
                assert record.state == "in_flight" and record.owner == completion.owner
                record.state = "done"
                record.status = completion.status
                record.headers = dict(completion.headers)
                record.body = completion.body
        self.trace.add(f"pg reserve {tenant_id} {[d.run_id for d in accepted]} total {total}")
        self._check_keys()
        result = ledger.ReserveBatchResult(decisions, self._budget(tenant))
        self._end("reserve")
        return result

    def _commit_claims(self, claimed: dict[tuple[str, str, str, str], KeyRecord]) -> None:
        for at, record in claimed.items():
            assert at not in self.keys, "a claim wins only where no record exists"
            self.keys[at] = record
            self.trace.add(f"pg key {at[3]} claimed")

    def _check_keys(self) -> None:
        """One Idempotency-Key never holds two runs (issue 9, hole 1)."""
        seen: dict[tuple[str, str], str] = {}
        for run in self.runs.values():
            key = run["idempotency_key"]
            if key is None:
                continue
            other = seen.setdefault((run["tenant_id"], key), run["id"])
            if other != run["id"] and (other, run["id"]) not in self.reported:
                self.reported.add((other, run["id"]))
                self.violations.add(
                    f"one Idempotency-Key {key!r} created runs {other} and {run['id']}",
                    hole="hole1",
                )

    async def settle_batch(
        self, requests: Sequence[ledger.SettleRequest]
    ) -> list[ledger.SettleOutcome]:
        assert 1 <= len(requests) <= LEDGER_BATCH_MAX
        await self._begin("settle")
        outcomes: list[ledger.SettleOutcome | None] = [None] * len(requests)
        writes: list[tuple[int, ledger.SettleRequest, Row, rules.Settlement]] = []
        decided: dict[str, rules.Settlement] = {}
        for index, request in enumerate(requests):
            run = self.runs.get(request.run_id)
            earlier = decided.get(request.run_id)
            if earlier is not None:
                assert run is not None
                outcomes[index] = (
                    ledger.SettleResult(request.run_id, run["tenant_id"], earlier, False, None)
                    if earlier.outcome is request.outcome
                    else ledger.SettleRefused(
                        request.run_id, earlier.outcome.value, "already settled"
                    )
                )
                continue
            has_reserve = (
                run is not None
                and run["status"] == RunStatus.AUDIT_REQUIRED
                and f"reserve:{run['id']}" in self.operation_ids
            )
            decision = _decide_settlement(request, run, has_reserve)
            if isinstance(decision, rules.Settlement):
                assert run is not None
                decided[request.run_id] = decision
                writes.append((index, request, run, decision))
            else:
                outcomes[index] = decision
        if writes:
            totals: dict[str, tuple[int, int]] = {}
            for _, _, run, settlement in writes:
                charged, reserved = totals.get(run["tenant_id"], (0, 0))
                totals[run["tenant_id"]] = (
                    charged + settlement.charged_usd_micros,
                    reserved + settlement.reserved_usd_micros,
                )
            for tenant_id, (charged, reserved) in totals.items():
                tenant = self.tenants[tenant_id]
                # settle_on_tenant's guard
                assert tenant.reserved >= reserved and tenant.balance >= charged, (
                    "tenant counters disagree with the runs' reservations"
                )
            await crash_point("settle.before_commit")  # rolled back
            finished = now_dt()
            for _, request, run, settlement in writes:
                run["status"] = settlement.outcome.value
                run["charged_usd_micros"] = settlement.charged_usd_micros
                run["refunded_usd_micros"] = settlement.refunded_usd_micros
                run["lease_token"] = None
                run["lease_expires_at"] = None
                run["error"] = dict(request.error) if request.error is not None else None
                if request.result is not None:
                    run["result_key"] = request.result.key
                run["version"] += 1
                for kind, amount in (
                    ("charge", settlement.charged_usd_micros),
                    ("refund", settlement.refunded_usd_micros),
                ):
                    self._entry(
                        Entry(run["tenant_id"], run["id"], kind, amount, f"{kind}:{run['id']}")
                    )
            budgets = {}
            for tenant_id, (charged, reserved) in sorted(totals.items()):
                tenant = self.tenants[tenant_id]
                tenant.balance -= charged
                tenant.reserved -= reserved
                tenant.version += 1
                budgets[tenant_id] = self._budget(tenant)
            for index, _, run, settlement in writes:
                self.committed_at[f"settle:{run['id']}"] = (
                    run["tenant_id"],
                    budgets[run["tenant_id"]].ledger_version,
                )
                outcomes[index] = ledger.SettleResult(
                    run["id"],
                    run["tenant_id"],
                    settlement,
                    True,
                    budgets[run["tenant_id"]],
                    finished,
                )
            self.trace.add(
                "pg settle "
                + " ".join(
                    f"{run['id']}={s.outcome.value}/{s.charged_usd_micros}"
                    for _, _, run, s in writes
                )
            )
        assert all(outcome is not None for outcome in outcomes)
        for outcome in outcomes:
            if isinstance(outcome, ledger.SettleResult) and not outcome.applied:
                self.replayed.add(f"settle:{outcome.run_id}")
        self._end("settle")
        return outcomes  # type: ignore[return-value]

    async def mark_audit_required(
        self, run_id: str, version: int, error: Mapping[str, object]
    ) -> bool:
        await self._begin("mark_audit")
        run = self.runs.get(run_id)
        if run is None or run["version"] != version or run["status"] not in OPEN:
            return False
        run["status"] = RunStatus.AUDIT_REQUIRED.value
        run["lease_token"] = None
        run["lease_expires_at"] = None
        run["error"] = dict(error)
        run["version"] += 1
        self.trace.add(f"pg audit_required {run_id}")
        self._end("mark_audit")
        return True

    # ------------------------------------------------ the reconciler's reads

    async def lapsed_leases(self, limit: int) -> list[Row]:
        await self._begin("lapsed_leases")
        now = now_s()
        rows = sorted(
            (
                r
                for r in self.runs.values()
                if r["status"] == RunStatus.PROCESSING and r["lease_expires_at"] < now
            ),
            key=lambda r: (r["lease_expires_at"], r["id"]),
        )
        return [self._candidate(r) for r in rows[:limit]]

    async def stuck_claimed(self, older_than_sec: int, limit: int) -> list[Row]:
        await self._begin("stuck_claimed")
        now = now_s()
        rows = sorted(
            (
                r
                for r in self.runs.values()
                if r["status"] == RunStatus.CLAIMED and r["claimed_at"] < now - older_than_sec
            ),
            key=lambda r: (r["claimed_at"], r["id"]),
        )
        return [self._candidate(r) for r in rows[:limit]]

    def _candidate(self, run: Row) -> Row:
        return {
            "id": run["id"],
            "tenant_id": run["tenant_id"],
            "version": run["version"],
            "has_reserve": f"reserve:{run['id']}" in self.operation_ids,
        }

    async def by_id(self, run_id: str) -> Row | None:
        await self._begin("run_by_id")
        run = self.runs.get(run_id)
        return dict(run) if run is not None else None

    async def owned(self, tenant_id: str, run_id: str) -> Row | None:
        await self._begin("get_run")
        run = self.runs.get(run_id)
        if run is None or run["tenant_id"] != tenant_id:
            return None
        return dict(run)

    async def past_retention(self, limit: int) -> list[Row]:
        return []  # retention is not simulated (docs/simulation.md)

    async def mark_result_deleted(self, run_id: str, result_key: str) -> bool:
        return False

    async def reserved_run_ids(self, run_ids: Sequence[str]) -> list[str]:
        """reserved_run_ids: which of these runs Postgres holds a reservation for."""
        await self._begin("reserved_run_ids")
        return [r for r in run_ids if f"reserve:{r}" in self.operation_ids]

    def committed_operations(self, tenant_id: str, version: int | None = None) -> set[str]:
        """The settlements and credits Postgres holds for a tenant: all of them
        now, or those committed at or below ledger_version ``version`` (what a
        mirror loaded from counters read at that version includes)."""
        return {
            operation_id
            for operation_id, (tenant, committed) in self.committed_at.items()
            if tenant == tenant_id and (version is None or committed <= version)
        }

    # --------------------------------------------------------- leases

    def _token(self) -> str:
        self.tokens += 1
        return f"00000000-0000-4000-8000-{self.tokens:012d}"

    async def claim_run_by_id(self, run_id: str, lease_sec: int) -> Row | None:
        """claim_run_by_id: only a QUEUED run is claimed."""
        await self._begin("claim")
        run = self.runs.get(run_id)
        if run is None or run["status"] != RunStatus.QUEUED:
            return None
        run["status"] = RunStatus.PROCESSING.value
        run["lease_token"] = self._token()
        run["lease_expires_at"] = now_s() + lease_sec
        run["attempts"] += 1
        run["version"] += 1
        self.trace.add(f"pg claim {run_id} v{run['version']}")
        self._end("claim")
        return dict(run)

    def _held(self, run: ClaimedRun, version: int) -> Row | None:
        """The run's row if this worker still holds it: renew_lease's and
        claim_for_finalize's WHERE (lease token, PROCESSING, version)."""
        row = self.runs.get(run.run_id)
        if (
            row is None
            or row["lease_token"] != run.lease_token
            or row["status"] != RunStatus.PROCESSING
            or row["version"] != version
        ):
            return None
        return row

    async def renew(self, run: ClaimedRun, version: int, lease_sec: int) -> int | None:
        await self._begin("renew")
        row = self._held(run, version)
        if row is None:
            self.trace.add(f"pg renew {run.run_id} lost")
            return None
        row["lease_expires_at"] = now_s() + lease_sec
        row["version"] += 1
        self.trace.add(f"pg renew {run.run_id} v{row['version']}")
        self._end("renew")
        return int(row["version"])

    async def claim_for_finalize(self, run: ClaimedRun, version: int) -> int | None:
        await self._begin("claim_for_finalize")
        row = self._held(run, version)
        if row is None:
            self.trace.add(f"pg claim_for_finalize {run.run_id} lost")
            return None
        row["status"] = RunStatus.CLAIMED.value
        row["claimed_at"] = now_s()
        row["version"] += 1
        self.trace.add(f"pg claim_for_finalize {run.run_id} v{row['version']}")
        self._end("claim_for_finalize")
        return int(row["version"])

    async def release_run(self, run_id: str, lease_token: str) -> int | None:
        await self._begin("release")
        row = self.runs.get(run_id)
        if (
            row is None
            or row["lease_token"] != lease_token
            or row["status"] != RunStatus.PROCESSING
        ):
            return None
        row.update(
            status=RunStatus.QUEUED.value, lease_token=None, lease_expires_at=None, enqueued_at=None
        )
        row["version"] += 1
        self.trace.add(f"pg release {run_id}")
        self._end("release")
        return int(row["version"])

    async def mark_enqueued(self, run_ids: Sequence[str]) -> None:
        await self._begin("mark_enqueued")
        for run_id in run_ids:
            row = self.runs.get(run_id)
            if row is not None and row["status"] == RunStatus.QUEUED:
                row["enqueued_at"] = now_s()
        self._end("mark_enqueued")

    async def queued_unsent(
        self, older_than_sec: int, limit: int, lost_after_sec: int
    ) -> list[Row]:
        """queued_runs_unsent: never announced, or announced so long ago that its
        message may be lost."""
        await self._begin("queued_unsent")
        now = now_s()
        rows = sorted(
            (
                r
                for r in self.runs.values()
                if r["status"] == RunStatus.QUEUED
                and (
                    (r["enqueued_at"] is None and r["created_at"] < now - older_than_sec)
                    or (r["enqueued_at"] is not None and r["enqueued_at"] < now - lost_after_sec)
                )
            ),
            key=lambda r: (r["created_at"], r["id"]),
        )
        return [dict(r) for r in rows[:limit]]

    # --------------------------------------------------- idempotency keys

    def _owner(self) -> uuid.UUID:
        self.tokens += 1
        return uuid.UUID(int=self.tokens)

    def new_holder(self, scope: Scope) -> Held:
        """dpp.runs.idempotency.IdempotencyKeys.new_holder (a deterministic token)."""
        return Held(scope, self._owner())

    async def begin(self, scope: Scope, fingerprint: bytes) -> Begin:
        """dpp.runs.idempotency.IdempotencyKeys.begin, statement by statement."""
        at = (scope.tenant_id, scope.method, scope.path, scope.key)
        held = Held(scope, self._owner())
        await self._begin("idempotency_insert")
        if at not in self.keys:
            self.keys[at] = KeyRecord(
                fingerprint, held.owner, "in_flight", now_s() + IDEMPOTENCY_LOCK_S, now_s()
            )
            self.trace.add(f"pg key {scope.key} begun")
            return Proceed(held)
        await self._begin("idempotency_get")
        record = self.keys.get(at)
        if record is None:
            if at not in self.keys:
                self.keys[at] = KeyRecord(
                    fingerprint, held.owner, "in_flight", now_s() + IDEMPOTENCY_LOCK_S, now_s()
                )
                return Proceed(held)
            return InFlight()
        if record.fingerprint != fingerprint:
            return Mismatch()
        if record.state == "done":
            assert record.status is not None and record.headers is not None
            assert record.body is not None
            return Replay(record.status, dict(record.headers), record.body)
        if record.locked_until < now_s():
            await self._begin("idempotency_take_over")
            record = self.keys.get(at)
            if record is not None and record.state == "in_flight" and record.locked_until < now_s():
                record.locked_until = now_s() + IDEMPOTENCY_LOCK_S
                record.created_at = now_s()
                record.owner = held.owner
                self.trace.add(f"pg key {scope.key} taken over")
                return Proceed(held)
        return InFlight()

    async def complete(self, held: Held, status: int, headers: dict[str, str], body: bytes) -> bool:
        scope = held.scope
        await self._begin("idempotency_complete")
        record = self.keys.get((scope.tenant_id, scope.method, scope.path, scope.key))
        stored = False
        if record is not None and record.state == "in_flight" and record.owner == held.owner:
            record.state = "done"
            record.status, record.headers, record.body = status, dict(headers), body
            self.trace.add(f"pg key {scope.key} completed {status}")
            stored = True
        if self.faults is not None:
            self.faults.after("idempotency_complete", self.trace)
        return stored

    async def release(self, held: Held) -> bool:
        scope = held.scope
        await self._begin("idempotency_release")
        at = (scope.tenant_id, scope.method, scope.path, scope.key)
        record = self.keys.get(at)
        if record is not None and record.state == "in_flight" and record.owner == held.owner:
            del self.keys[at]
            self.trace.add(f"pg key {scope.key} released")
            return True
        return False

    async def sweep(self, *, batch: int = 1000) -> int:
        await self._begin("idempotency_sweep")
        now = now_s()
        gone = [
            at
            for at, r in self.keys.items()
            if r.created_at < now - IDEMPOTENCY_RETENTION_HOURS * 3600
            and (r.state == "done" or r.locked_until < now)
        ][:batch]
        for at in gone:
            del self.keys[at]
        return len(gone)
