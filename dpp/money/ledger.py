"""The durable money ledger in Postgres: credits, reservations, settlements.

Postgres is the truth. Every function here runs one transaction whose writes
are conditional statements with checked row counts. Money moves only as ledger
entries: the ledger's insert trigger moves the tenant counters from them, and
the database's rules (``sql/migrations/0004_database_rules.sql``) refuse
whatever slips past — a tenant's available can never go negative, a counter
never moves without an entry, a run moves only along SPEC §2's table and a
terminal run's charged + refunded always equals its reservation. The code
still decides first, under the same row locks, so a refusal from the database
means a bug here, never a normal answer.
Redis mirrors what these functions commit (`dpp/money/mirror.py`), never the
other way round.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from dpp.adapters.postgres import (
    LOCK_WAIT_TIMED_OUT,
    STATEMENT_CANCELED,
    Connection,
    Pool,
    Queries,
    Record,
)
from dpp.faults import crash_point
from dpp.limits import LEDGER_BATCH_MAX, TIMEBOX_SEC_MAX, TIMEBOX_SEC_MIN
from dpp.money import rules
from dpp.money.rules import (
    Admission,
    AdmissionDecision,
    Budget,
    KeySpend,
    Outcome,
    RunStatus,
    Settlement,
)


class TenantNotFound(Exception):
    pass


class RunNotFound(Exception):
    pass


class CreditConflict(Exception):
    """The credit's idempotency id was used before for another tenant or amount."""


class SettleRefused(Exception):
    """The run is not in a state this settlement may move it from (or the lease is stale)."""

    def __init__(self, run_id: str, status: str, reason: str) -> None:
        super().__init__(f"run {run_id} is {status}: {reason}")
        self.run_id = run_id
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TenantBudget:
    balance_usd_micros: int
    reserved_usd_micros: int
    ledger_version: int

    @property
    def available_usd_micros(self) -> int:
        return self.balance_usd_micros - self.reserved_usd_micros

    def as_budget(self) -> Budget:
        return Budget(self.balance_usd_micros, self.reserved_usd_micros)


async def _counters_after_entries(
    connection: Connection, queries: Queries, tenant_ids: Sequence[str]
) -> dict[str, TenantBudget]:
    """The counters the ledger trigger wrote for these tenants in this transaction."""
    rows = await connection.fetch(queries["tenant_counters_of"], list(tenant_ids))
    budgets = {row["id"]: tenant_budget(row) for row in rows}
    assert len(budgets) == len(set(tenant_ids)), "a tenant row vanished under its lock"
    return budgets


def tenant_budget(row: Record) -> TenantBudget:
    """A tenant row's counters, asserted (the read-side twin of the schema's CHECK)."""
    return checked_budget(
        row["balance_usd_micros"], row["reserved_usd_micros"], row["ledger_version"]
    )


def checked_budget(balance_usd_micros: int, reserved_usd_micros: int, version: int) -> TenantBudget:
    """Counters read back from Postgres, asserted like ``tenant_budget``'s."""
    budget = TenantBudget(balance_usd_micros, reserved_usd_micros, version)
    budget.as_budget().check()  # read-side twin of the schema's CHECK
    return budget


# ---------------------------------------------------------------- credits


@dataclass(frozen=True, slots=True)
class CreditResult:
    # the budget right after this credit; a replay answers the original's
    budget: TenantBudget
    replayed: bool


async def credit(
    pool: Pool, queries: Queries, tenant_id: str, amount_usd_micros: int, operation_id: str
) -> CreditResult:
    """Add credit once per ``operation_id``; a replay adds nothing and answers the
    budget the original credit answered (its receipt, written in its transaction)."""
    assert rules.is_amount(amount_usd_micros) and amount_usd_micros > 0
    async with pool.acquire() as connection, connection.transaction():
        locked = await connection.fetchrow(queries["lock_tenant_budget"], tenant_id)
        if locked is None:
            raise TenantNotFound(tenant_id)
        inserted = await connection.fetchval(
            queries["insert_credit_entry"], tenant_id, amount_usd_micros, operation_id
        )
        if inserted is None:
            previous = await connection.fetchrow(queries["credit_entry_by_operation"], operation_id)
            if (
                previous is None
                or previous["tenant_id"] != tenant_id
                or previous["amount_usd_micros"] != amount_usd_micros
            ):
                raise CreditConflict(operation_id)
            if previous["balance_usd_micros"] is not None:
                return CreditResult(tenant_budget(previous), replayed=True)
            # credited before receipts were kept (migration 0003): the budget now
            row = await connection.fetchrow(queries["tenant_budget"], tenant_id)
            assert row is not None, "tenant row vanished under its lock"
            return CreditResult(tenant_budget(row), replayed=True)
        # the entry's trigger added it to the balance
        budget = (await _counters_after_entries(connection, queries, [tenant_id]))[tenant_id]
        await connection.execute(
            queries["insert_credit_receipt"],
            operation_id,
            budget.balance_usd_micros,
            budget.reserved_usd_micros,
            budget.ledger_version,
        )
        return CreditResult(budget, replayed=False)


async def read_budget(pool: Pool, queries: Queries, tenant_id: str) -> Record:
    row = await pool.fetchrow(queries["tenant_budget"], tenant_id)
    if row is None:
        raise TenantNotFound(tenant_id)
    tenant_budget(row)
    return row


# ----------------------------------------------------------- reservations


@dataclass(frozen=True, slots=True)
class KeyClaim:
    """A key the reservation itself inserts, in flight and owned by ``owner``,
    when no record of it exists (migration 0008): the record of a first submit
    commits with its reservation instead of in a transaction of its own. A
    record that exists wins, and the draft is withdrawn (``KeyNotHeld``)."""

    request_sha256: bytes
    lock_s: float

    def __post_init__(self) -> None:
        assert len(self.request_sha256) == 32 and self.lock_s > 0


@dataclass(frozen=True, slots=True)
class IdempotencyCompletion:
    """The stored response of an idempotent submit, written with the reservation."""

    method: str
    path: str
    key: str
    # the token of the request that holds the key (dpp.runs.idempotency.Held),
    # or that claims it (``claim``)
    owner: uuid.UUID
    status: int
    headers: dict[str, str]
    body: bytes
    claim: KeyClaim | None = None


@dataclass(frozen=True, slots=True)
class RunDraft:
    """Everything a QUEUED run row holds, decided before admission."""

    run_id: str
    pack_type: str
    inputs: Any
    metadata: dict[str, Any]
    reserved_usd_micros: int
    minimum_fee_usd_micros: int
    timebox_sec: int
    trace_id: str | None
    created_at: datetime
    idempotency: IdempotencyCompletion | None = None
    # the API key it is submitted with: its spend limit applies (SPEC §7)
    api_key_id: str | None = None

    def __post_init__(self) -> None:
        assert rules.is_amount(self.reserved_usd_micros) and self.reserved_usd_micros > 0
        assert self.api_key_id is None or self.api_key_id.startswith("key_")
        assert 0 <= self.minimum_fee_usd_micros <= self.reserved_usd_micros
        assert TIMEBOX_SEC_MIN <= self.timebox_sec <= TIMEBOX_SEC_MAX


@dataclass(frozen=True, slots=True)
class KeyNotHeld:
    """Not reserved: the draft's request no longer owns its idempotency key (its
    lock expired and a retry took it over, or the record was released). The
    retry's outcome is the key's; this request's is nothing."""


@dataclass(frozen=True, slots=True)
class DeadlinePassed:
    """Not reserved: its caller's deadline passed before the reservation could
    commit (the caller stopped waiting and was told to retry)."""


# Withdrawn before admission was decided; nothing of it was written.
Withdrawn = KeyNotHeld | DeadlinePassed


@dataclass(frozen=True, slots=True)
class ReserveBatchResult:
    # one per draft, in order: the admission decided, or why it was withdrawn
    decisions: list[AdmissionDecision | Withdrawn]
    # the tenant's counters after the batch (None when it was not read: all late)
    budget: TenantBudget | None

    def accepted(self) -> list[bool]:
        return [
            isinstance(d, AdmissionDecision) and d.admission is Admission.ACCEPTED
            for d in self.decisions
        ]


# What one reservation ended as (the budget actor answers each caller with one).


@dataclass(frozen=True, slots=True)
class Reserved:
    run_id: str
    budget: TenantBudget


@dataclass(frozen=True, slots=True)
class InsufficientBudget:
    available_usd_micros: int
    required_usd_micros: int


@dataclass(frozen=True, slots=True)
class ConcurrencyLimited:
    max_concurrent_runs: int


@dataclass(frozen=True, slots=True)
class KeySpendLimited:
    """The key's spend limit does not cover this run (SPEC §7): nothing reserved."""

    spend_limit_usd_micros: int
    spent_usd_micros: int
    required_usd_micros: int


ReserveOutcome = (
    Reserved
    | InsufficientBudget
    | ConcurrencyLimited
    | KeySpendLimited
    | KeyNotHeld
    | DeadlinePassed
)


async def reserve_batch(
    pool: Pool,
    queries: Queries,
    tenant_id: str,
    drafts: Sequence[RunDraft],
    deadlines: Sequence[float] | None = None,
) -> ReserveBatchResult:
    """Admit a batch in one statement, its own transaction (group commit): run
    rows, reserve entries, the tenant's reserved counter and any idempotency
    records, all or nothing (``dpp_reserve``, migration 0010).

    The tenant row lock serializes admission across replicas; the runs'
    insert writes their reserve entries, whose trigger moves ``reserved``, and
    the schema's CHECK refuses the
    batch if available would go negative, so overspend is impossible even if
    the decision above them were wrong.

    Under the tenant lock the drafts' idempotency keys are locked too, and a
    draft whose request no longer owns its key is withdrawn (``KeyNotHeld``):
    a reservation delayed past its key's lock cannot commit after a retry took
    the key over. ``deadlines`` (``anyio.current_time()`` values, one per
    draft) are when each caller stops waiting: the lock waits end with the
    latest of them, and a draft past its own once the locks are held is
    withdrawn (``DeadlinePassed``), so nothing commits long after its caller
    was told to retry.
    """
    assert 1 <= len(drafts) <= LEDGER_BATCH_MAX
    assert deadlines is None or len(deadlines) == len(drafts)
    timeout_s = None if deadlines is None else max(deadlines) - anyio.current_time()
    if timeout_s is not None and timeout_s <= 0:
        return _all_late(drafts)
    try:
        connection = await pool.acquire(timeout=timeout_s)
    except TimeoutError:
        return _all_late(drafts)
    try:
        # the statement commits itself: a crash before it is sent leaves nothing
        await crash_point("reserve.before_commit")
        row = await _reserve(connection, queries, tenant_id, drafts, deadlines)
    except (STATEMENT_CANCELED, LOCK_WAIT_TIMED_OUT):
        # refused by Postgres, so certainly rolled back (a timeout of the
        # driver's own is not: its outcome is unknown, and it propagates)
        if deadlines is None:
            raise
        return _all_late(drafts)
    finally:
        await pool.release(connection)
    return _checked_result(row, tenant_id, drafts)


async def _reserve(
    connection: Connection,
    queries: Queries,
    tenant_id: str,
    drafts: Sequence[RunDraft],
    deadlines: Sequence[float] | None,
) -> Record:
    """``dpp_reserve``: every array one value per draft (NULL where a draft has
    no idempotency key, or claims none)."""
    keys = [d.idempotency for d in drafts]
    claims = [None if c is None else c.claim for c in keys]
    row = await connection.fetchrow(
        queries["reserve"],
        tenant_id,
        [d.run_id for d in drafts],
        [d.pack_type for d in drafts],
        [d.inputs for d in drafts],
        [d.metadata for d in drafts],
        [d.reserved_usd_micros for d in drafts],
        [d.minimum_fee_usd_micros for d in drafts],
        [d.timebox_sec for d in drafts],
        [d.trace_id for d in drafts],
        [d.created_at for d in drafts],
        [d.api_key_id for d in drafts],
        *_time_left(deadlines),
        [None if c is None else c.method for c in keys],
        [None if c is None else c.path for c in keys],
        [None if c is None else c.key for c in keys],
        [None if c is None else c.owner for c in keys],
        [None if claim is None else claim.request_sha256 for claim in claims],
        [None if claim is None else claim.lock_s for claim in claims],
        [None if c is None else c.status for c in keys],
        [None if c is None else c.headers for c in keys],
        [None if c is None else c.body for c in keys],
    )
    assert row is not None
    return row


def _checked_result(row: Record, tenant_id: str, drafts: Sequence[RunDraft]) -> ReserveBatchResult:
    """The batch's outcome, once the decisions ``dpp_reserve`` made are the ones
    ``rules.decide_batch`` makes on the state it locked (the rule is Python's;
    the statement applies it without a round trip in between)."""
    if not row["tenant_found"]:
        raise TenantNotFound(tenant_id)
    outcomes: list[str] = row["outcomes"]
    assert len(outcomes) == len(drafts), outcomes
    held = _held_keys(row)
    decisions: list[AdmissionDecision | Withdrawn | None] = []
    for draft, outcome in zip(drafts, outcomes, strict=True):
        completion = draft.idempotency
        owned = completion is None or (
            held.get((completion.method, completion.path, completion.key)) == completion.owner
        )
        # the key's ownership is read from the locked rows, so it is checked too
        assert (outcome == "key_not_held") == (not owned), (draft.run_id, outcome)
        if outcome == "key_not_held":
            decisions.append(KeyNotHeld())
        elif outcome == "deadline_passed":
            decisions.append(DeadlinePassed())
        else:
            decisions.append(None)
    eligible = [draft for draft, d in zip(drafts, decisions, strict=True) if d is None]
    decided, after = rules.decide_batch(
        Budget(row["locked_balance_usd_micros"], row["locked_reserved_usd_micros"]),
        [draft.reserved_usd_micros for draft in eligible],
        open_runs=int(row["open_runs"]),
        max_concurrent_runs=row["max_concurrent_runs"],
        key_ids=[draft.api_key_id for draft in eligible],
        keys=_key_spend(row, drafts),
    )
    remaining = iter(decided)
    results: list[AdmissionDecision | Withdrawn] = []
    for index, why in enumerate(decisions):
        if why is not None:
            results.append(why)
            continue
        decision = next(remaining)
        assert decision.admission.value == outcomes[index], (decision, outcomes[index])
        assert decision.available_usd_micros == row["available"][index], (decision, row)
        results.append(decision)
    accepted = [
        draft
        for draft, decision in zip(drafts, results, strict=True)
        if isinstance(decision, AdmissionDecision) and decision.admission is Admission.ACCEPTED
    ]
    # the keys are locked and were checked owned: each admitted one completes
    assert row["completed"] == sum(d.idempotency is not None for d in accepted), row
    budget = tenant_budget(row)
    # the runs' insert wrote their reserve entries, whose trigger moved `reserved`
    # (the CHECK judged it)
    assert budget.reserved_usd_micros == after.reserved_usd_micros
    return ReserveBatchResult(results, budget)


def _all_late(drafts: Sequence[RunDraft]) -> ReserveBatchResult:
    return ReserveBatchResult([DeadlinePassed() for _ in drafts], None)


def _time_left(deadlines: Sequence[float] | None) -> tuple[list[float] | None, float | None]:
    """How long each caller still waits, in milliseconds, and when that was
    measured (Unix seconds: ``dpp_waited_ms`` counts from it too, so the time
    before the statement arrives -- a first use's prepare -- is not missed)."""
    if deadlines is None:
        return None, None
    now, measured_at = anyio.current_time(), time.time()
    return [(deadline - now) * 1000 for deadline in deadlines], measured_at


def _held_keys(locked: Record) -> dict[tuple[str, str, str], uuid.UUID]:
    """The drafts' idempotency keys in flight, and who holds each, as locked."""
    return {
        (method, path, key): owner
        for method, path, key, state, owner in zip(
            locked["key_methods"] or (),
            locked["key_paths"] or (),
            locked["key_keys"] or (),
            locked["key_states"] or (),
            locked["key_owners"] or (),
            strict=True,
        )
        if state == "in_flight"
    }


def _key_spend(locked: Record, drafts: Sequence[RunDraft]) -> dict[str, KeySpend]:
    """The spend of the drafts' API keys, read under their locks: the same
    transaction that reserves judges every key's limit, so concurrent submits
    through one key on any replica serialize there."""
    keys = {
        key_id: KeySpend(limit, spent)
        for key_id, limit, spent in zip(
            locked["spend_key_ids"] or (),
            locked["spend_limits"] or (),
            locked["spend_spent"] or (),
            strict=True,
        )
    }
    # a key authenticated each request; keys are never deleted, only revoked
    wanted = {d.api_key_id for d in drafts if d.api_key_id is not None}
    assert keys.keys() == wanted, "a run's key is not one of its tenant's keys"
    return keys


# ------------------------------------------------------------ settlement


@dataclass(frozen=True, slots=True)
class ResultReceipt:
    key: str
    sha256: str
    bytes: int
    content_type: str


@dataclass(frozen=True, slots=True)
class SettleRequest:
    run_id: str
    outcome: Outcome
    actual_cost_usd_micros: int | None = None
    # statuses this settlement may move the run from
    from_statuses: frozenset[RunStatus] = frozenset({RunStatus.CLAIMED})
    # the worker's lease token: a stale worker's settlement is refused
    lease_token: str | None = None
    # why the run failed or expired: its stored ``error`` problem (dpp.runs.failures)
    error: Mapping[str, object] | None = None
    result: ResultReceipt | None = None
    # operator resolution of AUDIT_REQUIRED: charge exactly this
    charged_override_usd_micros: int | None = None
    # the run version the caller observed (the reaper's guard against a
    # heartbeat that renewed the lease after it looked)
    expected_version: int | None = None

    def __post_init__(self) -> None:
        assert self.from_statuses <= (rules.OPEN_STATUSES | {RunStatus.AUDIT_REQUIRED})
        if self.outcome is Outcome.COMPLETED and self.charged_override_usd_micros is None:
            assert self.actual_cost_usd_micros is not None


@dataclass(frozen=True, slots=True)
class SettleResult:
    run_id: str
    tenant_id: str
    settlement: Settlement
    # False when the run was already settled identically (a replay): nothing moved
    applied: bool
    budget: TenantBudget | None
    finished_at: datetime | None = None


SettleOutcome = SettleResult | SettleRefused | RunNotFound


def _decide_settlement(
    request: SettleRequest, run: Mapping[str, Any] | None, has_reserve: bool
) -> Settlement | SettleResult | SettleRefused | RunNotFound:
    """What one request does to its run, judged under the run's row lock (pure)."""
    if run is None:
        return RunNotFound(request.run_id)
    status = run["status"]
    if status in rules.TERMINAL_STATUSES:
        if status != request.outcome.value:
            return SettleRefused(run["id"], status, "already settled")
        previous = Settlement(
            Outcome(status),
            run["reserved_usd_micros"],
            run["charged_usd_micros"],
            run["refunded_usd_micros"],
        )
        return SettleResult(run["id"], run["tenant_id"], previous, False, None)
    if status not in request.from_statuses:
        return SettleRefused(run["id"], status, "not settleable from this state")
    if request.lease_token is not None and str(run["lease_token"]) != request.lease_token:
        return SettleRefused(run["id"], status, "lease token is stale")
    if request.expected_version is not None and run["version"] != request.expected_version:
        return SettleRefused(run["id"], status, "run changed since it was observed")
    if status == RunStatus.AUDIT_REQUIRED and not has_reserve:
        # Nothing is held for it: settling would release money never reserved.
        return SettleRefused(run["id"], status, "the ledger holds no reservation for it")
    if request.charged_override_usd_micros is not None:
        charged = request.charged_override_usd_micros
        assert 0 <= charged <= run["reserved_usd_micros"]
        return Settlement(
            request.outcome,
            run["reserved_usd_micros"],
            charged,
            run["reserved_usd_micros"] - charged,
        )
    return rules.settle(
        request.outcome,
        reserved_usd_micros=run["reserved_usd_micros"],
        minimum_fee_usd_micros=run["minimum_fee_usd_micros"],
        actual_cost_usd_micros=request.actual_cost_usd_micros,
    )


async def settle_batch(
    pool: Pool, queries: Queries, requests: Sequence[SettleRequest]
) -> list[SettleOutcome]:
    """Apply SPEC §1's table to each run exactly once, in one statement that is
    its own transaction (``dpp_settle``, migration 0011).

    Guarded three ways per run: its row lock and version (concurrent settlers
    serialize; the later one sees a terminal run), its status (only from
    ``from_statuses``) and, when given, its lease token and observed version
    (a stale worker or reaper is refused). The ledger's unique operation ids
    make a replayed settlement impossible to double-apply even if those guards
    were bypassed. A refused request is answered with its reason and does not
    hold back the others. Group commit: a settlement actor settles what queued
    up while the previous statement ran.

    The statement decides each request under the row locks; the decision is
    checked here against ``_decide_settlement`` on the locked state it returns
    (the rule is Python's; the statement applies it without a round trip in
    between, so the tenants' rows are held from the ledger insert to the
    commit and no longer).
    """
    assert 1 <= len(requests) <= LEDGER_BATCH_MAX
    async with pool.acquire() as connection:
        # the statement commits itself: a crash before it is sent leaves nothing
        await crash_point("settle.before_commit")
        row = await _settle(connection, queries, requests)
    return _checked_settlements(row, requests)


async def _settle(
    connection: Connection, queries: Queries, requests: Sequence[SettleRequest]
) -> Record:
    """``dpp_settle``: every array one value per request (NULL where a request
    brings no such guard, result or override)."""
    results = [request.result for request in requests]
    row = await connection.fetchrow(
        queries["settle"],
        [request.run_id for request in requests],
        [request.outcome.value for request in requests],
        [request.actual_cost_usd_micros for request in requests],
        [",".join(sorted(request.from_statuses)) for request in requests],
        [request.lease_token for request in requests],
        [request.expected_version for request in requests],
        [request.charged_override_usd_micros for request in requests],
        [request.error for request in requests],
        [result.key if result else None for result in results],
        [result.sha256 if result else None for result in results],
        [result.bytes if result else None for result in results],
        [result.content_type if result else None for result in results],
    )
    assert row is not None
    return row


# what dpp_settle answers for each kind of outcome _decide_settlement reaches
_VERDICTS: dict[type, str] = {
    Settlement: "settled",
    SettleResult: "replayed",
    SettleRefused: "refused",
    RunNotFound: "not_found",
}


def _checked_settlements(row: Record, requests: Sequence[SettleRequest]) -> list[SettleOutcome]:
    """Each request's outcome, once the decisions ``dpp_settle`` made are the
    ones ``_decide_settlement`` makes on the state it locked."""
    verdicts: list[str] = row["verdicts"]
    assert len(verdicts) == len(requests), verdicts
    finished = dict(zip(row["settled_ids"] or (), row["finished_at"] or (), strict=True))
    budgets = {
        tenant_id: checked_budget(balance, reserved, version)
        for tenant_id, balance, reserved, version in zip(
            row["tenant_ids"] or (),
            row["balances_usd_micros"] or (),
            row["reserved_usd_micros"] or (),
            row["ledger_versions"] or (),
            strict=True,
        )
    }
    outcomes: list[SettleOutcome] = []
    decided: dict[str, Settlement] = {}  # two requests for one run in one batch
    for index, request in enumerate(requests):
        run = _locked_run(row, index, request.run_id)
        earlier = decided.get(request.run_id)
        decision: Settlement | SettleOutcome
        if earlier is not None:
            assert run is not None, "a decided run was locked"
            decision = (
                SettleResult(request.run_id, run["tenant_id"], earlier, False, None)
                if earlier.outcome is request.outcome
                else SettleRefused(request.run_id, earlier.outcome.value, "already settled")
            )
        else:
            decision = _decide_settlement(request, run, bool(row["run_has_reserve"][index]))
        verdict = verdicts[index]
        assert _VERDICTS[type(decision)] == verdict, (request, decision, verdict)
        match decision:
            case Settlement():
                assert run is not None, "only a locked run is settled"
                assert (decision.charged_usd_micros, decision.refunded_usd_micros) == (
                    row["charged"][index],
                    row["refunded"][index],
                ), (request, decision, row)
                decided[request.run_id] = decision
                # written, or the statement would have failed: the row count is checked
                assert request.run_id in finished, "a run changed under its row lock"
                outcomes.append(
                    SettleResult(
                        request.run_id,
                        run["tenant_id"],
                        decision,
                        True,
                        budgets[run["tenant_id"]],
                        finished[request.run_id],
                    )
                )
            case SettleResult():
                settlement = decision.settlement
                assert (settlement.charged_usd_micros, settlement.refunded_usd_micros) == (
                    row["charged"][index],
                    row["refunded"][index],
                ), (request, decision, row)
                outcomes.append(decision)
            case SettleRefused():
                assert decision.reason == row["reasons"][index], (decision, row)
                outcomes.append(decision)
            case RunNotFound():
                outcomes.append(decision)
    assert len(finished) == len(decided), "every settled run was written once"
    # each tenant's counters, read after its entries (a tenant row vanished?)
    assert budgets.keys() == {
        outcome.tenant_id
        for outcome in outcomes
        if isinstance(outcome, SettleResult) and outcome.applied
    }
    return outcomes


def _locked_run(row: Record, index: int, run_id: str) -> dict[str, Any] | None:
    """The request's run as ``dpp_settle`` locked it, in ``_decide_settlement``'s terms."""
    status = row["run_statuses"][index]
    if status is None:
        return None
    return {
        "id": run_id,
        "tenant_id": row["run_tenant_ids"][index],
        "status": status,
        "version": row["run_versions"][index],
        "lease_token": row["run_lease_tokens"][index],
        "reserved_usd_micros": row["run_reserved"][index],
        "minimum_fee_usd_micros": row["run_minimum"][index],
        "charged_usd_micros": row["run_charged"][index],
        "refunded_usd_micros": row["run_refunded"][index],
    }


async def settle(pool: Pool, queries: Queries, request: SettleRequest) -> SettleResult:
    """One settlement (see ``settle_batch``); raises its refusal."""
    (outcome,) = await settle_batch(pool, queries, [request])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def mark_audit_required(
    pool: Pool, queries: Queries, run_id: str, version: int, error: Mapping[str, object]
) -> bool:
    """Set a run aside for an operator, recording ``error`` (why, as the run's
    stored problem); its reservation stays held. True if it moved."""
    moved = await pool.fetchval(queries["mark_audit_required"], run_id, error, version)
    return moved is not None


@dataclass(frozen=True, slots=True)
class StoredBudget:
    """A tenant's counters and the plan limit its budget actor needs."""

    balance_usd_micros: int
    reserved_usd_micros: int
    ledger_version: int
    max_concurrent_runs: int


@dataclass(frozen=True, slots=True)
class LedgerStore:
    """The ledger over one pool: the Postgres side of a tenant's budget and
    settlement actors (``dpp.actors.budget.BudgetStore``), and the reconciler's
    audit mark."""

    pool: Pool
    queries: Queries

    async def budget(self, tenant_id: str) -> StoredBudget:
        row = await read_budget(self.pool, self.queries, tenant_id)
        return StoredBudget(
            row["balance_usd_micros"],
            row["reserved_usd_micros"],
            row["ledger_version"],
            row["max_concurrent_runs"],
        )

    async def reserve_batch(
        self,
        tenant_id: str,
        drafts: Sequence[RunDraft],
        deadlines: Sequence[float] | None = None,
    ) -> ReserveBatchResult:
        return await reserve_batch(self.pool, self.queries, tenant_id, drafts, deadlines)

    async def settle_batch(self, requests: Sequence[SettleRequest]) -> list[SettleOutcome]:
        return await settle_batch(self.pool, self.queries, requests)

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> CreditResult:
        return await credit(self.pool, self.queries, tenant_id, amount_usd_micros, operation_id)

    async def mark_audit_required(
        self, run_id: str, version: int, error: Mapping[str, object]
    ) -> bool:
        return await mark_audit_required(self.pool, self.queries, run_id, version, error)
