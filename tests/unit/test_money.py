"""Pure money rules: SPEC §1's settlement table and batch admission."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpp.money.rules import (
    ALL_STATUSES,
    OPEN_STATUSES,
    TERMINAL_STATUSES,
    Admission,
    Budget,
    KeySpend,
    Outcome,
    RunStatus,
    decide_batch,
    settle,
)


@pytest.mark.parametrize(
    ("outcome", "actual", "charged"),
    [
        (Outcome.COMPLETED, 500, 500),  # within [M, R]
        (Outcome.COMPLETED, 10, 100),  # below M: clamped up
        (Outcome.COMPLETED, 5_000, 1_000),  # above R: clamped down
        (Outcome.FAILED, None, 100),
        (Outcome.EXPIRED, None, 100),
        (Outcome.CANCELED, None, 0),
    ],
)
def test_settlement_table(outcome, actual, charged) -> None:
    result = settle(
        outcome,
        reserved_usd_micros=1_000,
        minimum_fee_usd_micros=100,
        actual_cost_usd_micros=actual,
    )
    assert result.charged_usd_micros == charged
    assert result.refunded_usd_micros == 1_000 - charged


@given(
    reserved=st.integers(1, 10**12),
    minimum_percent=st.integers(0, 100),
    actual=st.integers(0, 10**13),
    outcome=st.sampled_from(list(Outcome)),
)
def test_charged_plus_refunded_is_always_the_reservation(
    reserved, minimum_percent, actual, outcome
) -> None:
    minimum = reserved * minimum_percent // 100
    result = settle(
        outcome,
        reserved_usd_micros=reserved,
        minimum_fee_usd_micros=minimum,
        actual_cost_usd_micros=actual,
    )
    assert result.charged_usd_micros + result.refunded_usd_micros == reserved
    if outcome is not Outcome.CANCELED:
        assert minimum <= result.charged_usd_micros <= reserved


def test_settlement_refuses_floats_and_a_fee_above_the_reservation() -> None:
    with pytest.raises(AssertionError):
        settle(Outcome.FAILED, reserved_usd_micros=100, minimum_fee_usd_micros=200)
    with pytest.raises(AssertionError):
        settle(
            Outcome.COMPLETED,
            reserved_usd_micros=100,
            minimum_fee_usd_micros=10,
            actual_cost_usd_micros=1.5,
        )  # type: ignore[arg-type]


def test_a_refused_item_does_not_block_a_smaller_later_one() -> None:
    decisions, after = decide_batch(
        Budget(1_000, 0), [600, 600, 300], open_runs=0, max_concurrent_runs=10
    )
    assert [d.admission for d in decisions] == [
        Admission.ACCEPTED,
        Admission.INSUFFICIENT_BUDGET,
        Admission.ACCEPTED,
    ]
    assert decisions[1].available_usd_micros == 400
    assert after == Budget(1_000, 900)


def test_the_plan_concurrency_limit_is_counted_across_the_batch() -> None:
    decisions, _ = decide_batch(Budget(10_000, 0), [1, 1, 1], open_runs=1, max_concurrent_runs=2)
    assert [d.admission for d in decisions] == [
        Admission.ACCEPTED,
        Admission.CONCURRENCY_LIMITED,
        Admission.CONCURRENCY_LIMITED,
    ]


def test_a_keys_spend_limit_is_counted_across_the_batch() -> None:
    keys = {"key_a": KeySpend(2_500, 500), "key_b": KeySpend(None, 10**9)}
    decisions, after = decide_batch(
        Budget(10_000, 0),
        [1_000, 1_000, 1_000, 500, 1_000, 3_000],
        open_runs=0,
        max_concurrent_runs=10,
        key_ids=["key_a", "key_a", "key_a", None, "key_b", "key_a"],
        keys=keys,
    )
    assert [d.admission for d in decisions] == [
        Admission.ACCEPTED,
        Admission.ACCEPTED,  # spent 2,500: exactly the limit
        Admission.KEY_SPEND_LIMIT,
        Admission.ACCEPTED,
        Admission.ACCEPTED,  # no limit of its own
        Admission.KEY_SPEND_LIMIT,
    ]
    assert decisions[2].key_spend == KeySpend(2_500, 2_500)
    assert after == Budget(10_000, 3_500)
    assert keys["key_a"] == KeySpend(2_500, 500)  # the caller's mapping is not changed


def test_when_tenant_and_key_are_both_short_the_tenant_refuses() -> None:
    decisions, _ = decide_batch(
        Budget(500, 0),
        [1_000],
        open_runs=0,
        max_concurrent_runs=10,
        key_ids=["key_a"],
        keys={"key_a": KeySpend(100, 0)},
    )
    assert decisions[0].admission is Admission.INSUFFICIENT_BUDGET


def test_a_key_above_a_lowered_limit_admits_nothing() -> None:
    spend = KeySpend(1_000, 3_000)
    assert not spend.admits(1) and spend.room_usd_micros() == 0
    assert KeySpend(None, 5).admits(10**15) and KeySpend(None, 5).room_usd_micros() is None
    assert KeySpend(10, 4).room_usd_micros() == 6


@given(
    limit=st.integers(1, 10**6),
    spent=st.integers(0, 10**6),
    amounts=st.lists(st.integers(1, 10**5), min_size=1, max_size=64),
)
def test_a_key_never_goes_above_its_limit_by_admission(limit, spent, amounts) -> None:
    decisions, _ = decide_batch(
        Budget(10**12, 0),
        amounts,
        open_runs=0,
        max_concurrent_runs=100,
        key_ids=["key_a"] * len(amounts),
        keys={"key_a": KeySpend(limit, spent)},
    )
    accepted = [
        a for a, d in zip(amounts, decisions, strict=True) if d.admission is Admission.ACCEPTED
    ]
    assert not accepted or spent + sum(accepted) <= limit
    # refused items were refused because they did not fit at their turn
    running = spent
    for amount, decision in zip(amounts, decisions, strict=True):
        if decision.admission is Admission.ACCEPTED:
            running += amount
        else:
            assert decision.admission is Admission.KEY_SPEND_LIMIT
            assert running + amount > limit


@given(
    balance=st.integers(0, 10**9),
    amounts=st.lists(st.integers(1, 10**8), min_size=1, max_size=64),
    limit=st.integers(1, 100),
)
def test_admission_never_overspends(balance, amounts, limit) -> None:
    decisions, after = decide_batch(
        Budget(balance, 0), amounts, open_runs=0, max_concurrent_runs=limit
    )
    accepted = [
        a for a, d in zip(amounts, decisions, strict=True) if d.admission is Admission.ACCEPTED
    ]
    assert sum(accepted) == after.reserved_usd_micros <= balance
    assert len(accepted) <= limit


SQL_DIRECTORY = Path(__file__).resolve().parents[2] / "sql"
STATUS_CHECK = re.compile(r"status\s+TEXT NOT NULL CHECK \(status IN \(([^)]*)\)\)", re.S)
# a quoted upper-case word compared with or listed against a status column
STATUS_LITERAL = re.compile(r"status\s*(?:=|<>|IN\s*\(|NOT IN\s*\()\s*((?:'[A-Z_]+'\s*,?\s*)+)")


def test_the_schema_allows_exactly_the_run_statuses_of_the_enum() -> None:
    """RunStatus is the one list of run states: the table's CHECK says the same."""
    schema = (SQL_DIRECTORY / "schema.sql").read_text(encoding="utf-8")
    (listed,) = STATUS_CHECK.findall(schema)
    assert re.findall(r"'([A-Z_]+)'", listed) == [status.value for status in RunStatus]


def test_every_status_the_sql_names_is_a_run_status() -> None:
    named: set[str] = set()
    for path in [SQL_DIRECTORY / "schema.sql", *sorted((SQL_DIRECTORY / "queries").glob("*.sql"))]:
        for group in STATUS_LITERAL.findall(path.read_text(encoding="utf-8")):
            named.update(re.findall(r"'([A-Z_]+)'", group))
    assert named, "the pattern found no status literal: it no longer matches the SQL"
    assert named <= {status.value for status in RunStatus}


def test_status_sets_partition_the_run_statuses() -> None:
    assert OPEN_STATUSES.isdisjoint(TERMINAL_STATUSES)
    assert {outcome.status for outcome in Outcome} == TERMINAL_STATUSES
    assert OPEN_STATUSES | TERMINAL_STATUSES | {RunStatus.AUDIT_REQUIRED} == ALL_STATUSES
