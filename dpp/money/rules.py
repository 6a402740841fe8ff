"""Pure money rules: run statuses, the settlement table of SPEC §1, admission.

No I/O and no floats: every amount is an ``int`` of USD micros. The ledger
(`dpp/money/ledger.py`) writes what these functions decide; both sides assert
the same invariants.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeGuard


class RunStatus(enum.StrEnum):
    """A run's state (SPEC §2): the one list that SQL parameters, the routes'
    filters, the run object and the OpenAPI document all use. The schema's
    CHECK on ``runs.status`` lists the same values (a test compares them)."""

    QUEUED = "QUEUED"
    PROCESSING = "PROCESSING"
    CLAIMED = "CLAIMED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELED = "CANCELED"
    AUDIT_REQUIRED = "AUDIT_REQUIRED"


class Outcome(enum.StrEnum):
    """How a run ended, for settlement. Values are the terminal run statuses."""

    COMPLETED = RunStatus.COMPLETED.value
    FAILED = RunStatus.FAILED.value
    EXPIRED = RunStatus.EXPIRED.value
    CANCELED = RunStatus.CANCELED.value

    @property
    def status(self) -> RunStatus:
        return RunStatus(self.value)


# Listed in SPEC §2's order (the OpenAPI enum keeps it).
ALL_STATUSES: frozenset[RunStatus] = frozenset(RunStatus)
TERMINAL_STATUSES: frozenset[RunStatus] = frozenset(outcome.status for outcome in Outcome)
# Holding a reservation and counting toward max_concurrent_runs.
OPEN_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.QUEUED, RunStatus.PROCESSING, RunStatus.CLAIMED}
)
assert TERMINAL_STATUSES | OPEN_STATUSES | {RunStatus.AUDIT_REQUIRED} == ALL_STATUSES


@dataclass(frozen=True, slots=True)
class Settlement:
    outcome: Outcome
    reserved_usd_micros: int
    charged_usd_micros: int
    refunded_usd_micros: int

    def __post_init__(self) -> None:
        assert self.charged_usd_micros >= 0
        assert self.refunded_usd_micros >= 0
        assert self.charged_usd_micros + self.refunded_usd_micros == self.reserved_usd_micros


def is_amount(value: object) -> TypeGuard[int]:
    """A JSON integer amount (bools are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def settle(
    outcome: Outcome,
    *,
    reserved_usd_micros: int,
    minimum_fee_usd_micros: int,
    actual_cost_usd_micros: int | None = None,
) -> Settlement:
    """SPEC §1's table: what is charged and refunded for one run's outcome."""
    reserved, minimum = reserved_usd_micros, minimum_fee_usd_micros
    assert is_amount(reserved) and is_amount(minimum)
    assert 0 <= minimum <= reserved, (minimum, reserved)
    match outcome:
        case Outcome.COMPLETED:
            assert actual_cost_usd_micros is not None and is_amount(actual_cost_usd_micros)
            assert actual_cost_usd_micros >= 0
            charged = min(max(actual_cost_usd_micros, minimum), reserved)
        case Outcome.FAILED | Outcome.EXPIRED:
            charged = minimum
        case Outcome.CANCELED:
            charged = 0
    return Settlement(outcome, reserved, charged, reserved - charged)


@dataclass(frozen=True, slots=True)
class Budget:
    balance_usd_micros: int
    reserved_usd_micros: int

    @property
    def available_usd_micros(self) -> int:
        return self.balance_usd_micros - self.reserved_usd_micros

    def check(self) -> None:
        assert self.reserved_usd_micros >= 0, self
        assert self.available_usd_micros >= 0, self


@dataclass(frozen=True, slots=True)
class KeySpend:
    """An API key's limit and spent (SPEC §7): spent = R of its open runs +
    charged of its settled ones. ``spent`` may exceed the limit (a limit
    lowered below it); then nothing more is admitted through the key."""

    spend_limit_usd_micros: int | None
    spent_usd_micros: int

    def __post_init__(self) -> None:
        assert is_amount(self.spent_usd_micros) and self.spent_usd_micros >= 0, self
        assert self.spend_limit_usd_micros is None or (
            is_amount(self.spend_limit_usd_micros) and self.spend_limit_usd_micros >= 1
        ), self

    def admits(self, amount_usd_micros: int) -> bool:
        """Whether reserving ``amount`` keeps spent within the limit."""
        limit = self.spend_limit_usd_micros
        return limit is None or self.spent_usd_micros + amount_usd_micros <= limit

    def room_usd_micros(self) -> int | None:
        """What the key may still reserve (None: no limit of its own)."""
        limit = self.spend_limit_usd_micros
        return None if limit is None else max(limit - self.spent_usd_micros, 0)


class Admission(enum.Enum):
    ACCEPTED = "accepted"
    INSUFFICIENT_BUDGET = "insufficient_budget"
    CONCURRENCY_LIMITED = "concurrency_limited"
    KEY_SPEND_LIMIT = "key_spend_limit"


@dataclass(frozen=True, slots=True)
class AdmissionDecision:
    admission: Admission
    available_usd_micros: int  # what was available when this item was decided
    # the item's key as it stood when it was decided (None: no key, or no limit)
    key_spend: KeySpend | None = None


def decide_batch(
    budget: Budget,
    amounts_usd_micros: Sequence[int],
    *,
    open_runs: int,
    max_concurrent_runs: int,
    key_ids: Sequence[str | None] | None = None,
    keys: Mapping[str, KeySpend] | None = None,
) -> tuple[list[AdmissionDecision], Budget]:
    """Admit a batch of reservations in order, as if one at a time.

    Each item is accepted when it fits in what is still available, the
    tenant's open runs stay within the plan, and its key's spent (``key_ids``,
    one per item, looked up in ``keys``) stays within the key's limit; a
    refused item does not block a later, smaller one. The tenant's refusals
    come first (SPEC §7: both short is the tenant's 402). Returns the
    decisions and the budget after them.
    """
    budget.check()
    assert open_runs >= 0 and max_concurrent_runs >= 1
    assert key_ids is None or len(key_ids) == len(amounts_usd_micros)
    spends = dict(keys or {})
    decisions = []
    reserved = budget.reserved_usd_micros
    for index, amount in enumerate(amounts_usd_micros):
        assert is_amount(amount) and amount > 0
        available = budget.balance_usd_micros - reserved
        key_id = None if key_ids is None else key_ids[index]
        spend = None if key_id is None else spends[key_id]
        if open_runs >= max_concurrent_runs:
            decisions.append(AdmissionDecision(Admission.CONCURRENCY_LIMITED, available))
        elif amount > available:
            decisions.append(AdmissionDecision(Admission.INSUFFICIENT_BUDGET, available))
        elif spend is not None and not spend.admits(amount):
            decisions.append(AdmissionDecision(Admission.KEY_SPEND_LIMIT, available, spend))
        else:
            reserved += amount
            open_runs += 1
            decisions.append(AdmissionDecision(Admission.ACCEPTED, available, spend))
            if key_id is not None and spend is not None:
                spends[key_id] = KeySpend(
                    spend.spend_limit_usd_micros, spend.spent_usd_micros + amount
                )
    after = Budget(budget.balance_usd_micros, reserved)
    after.check()
    return decisions, after
