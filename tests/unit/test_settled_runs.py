"""The settled-runs cache's own rules (``dpp.runs.settled``), on plain rows:
only settled runs are kept, per tenant, bounded, and never past retention.
The reads through a replica are in tests/integration/test_settled_reads.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dpp.money.rules import OPEN_STATUSES, TERMINAL_STATUSES, RunStatus
from dpp.runs.settled import ROW_BYTES, SettledRuns, row_weight

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def row(
    run_id: str, status: str, *, tenant: str = "ten_a", days: int = 30, inputs: Any = None
) -> dict[str, Any]:
    return {
        "id": run_id,
        "tenant_id": tenant,
        "status": status,
        "retention_until": NOW + timedelta(days=days),
        "inputs": {"payload": 1} if inputs is None else inputs,
        "metadata": {},
        "error": None,
    }


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_a_settled_run_is_kept_and_answered(status: str) -> None:
    hits: list[None] = []
    cache = SettledRuns(now=Clock(), on_hit=lambda: hits.append(None))
    kept = row("run_1", status)
    cache.keep(kept)  # type: ignore[arg-type]
    assert cache.get("ten_a", "run_1") is kept
    assert len(hits) == 1


@pytest.mark.parametrize("status", sorted({*OPEN_STATUSES, RunStatus.AUDIT_REQUIRED}))
def test_a_run_that_may_still_change_is_never_kept(status: str) -> None:
    cache = SettledRuns(now=Clock())
    cache.keep(row("run_1", status))  # type: ignore[arg-type]
    assert cache.get("ten_a", "run_1") is None
    assert len(cache) == 0


def test_another_tenant_never_gets_a_kept_run() -> None:
    cache = SettledRuns(now=Clock())
    cache.keep(row("run_1", "COMPLETED", tenant="ten_a"))  # type: ignore[arg-type]
    assert cache.get("ten_b", "run_1") is None
    assert cache.get("ten_a", "run_1") is not None


def test_a_run_past_its_retention_is_dropped_and_read_again() -> None:
    clock = Clock()
    cache = SettledRuns(now=clock)
    cache.keep(row("run_1", "COMPLETED", days=1))  # type: ignore[arg-type]
    clock.now = NOW + timedelta(days=1) - timedelta(seconds=1)
    assert cache.get("ten_a", "run_1") is not None
    clock.now = NOW + timedelta(days=1)  # the retention's own instant: Postgres says 410
    assert cache.get("ten_a", "run_1") is None
    assert len(cache) == 0


def test_the_least_recently_read_goes_first_and_the_bound_holds() -> None:
    one = row_weight(row("run_0", "FAILED"))  # type: ignore[arg-type]
    cache = SettledRuns(3 * one, row_bytes_max=one, now=Clock())
    for index in range(3):
        cache.keep(row(f"run_{index}", "FAILED"))  # type: ignore[arg-type]
    assert cache.get("ten_a", "run_0") is not None  # read: now the most recent
    cache.keep(row("run_3", "FAILED"))  # type: ignore[arg-type]
    assert len(cache) == 3 and cache.weight == 3 * one
    assert cache.get("ten_a", "run_1") is None  # the least recently read went
    assert [cache.get("ten_a", f"run_{i}") is not None for i in (0, 2, 3)] == [True] * 3


def test_a_heavy_run_is_not_kept_and_weight_is_what_bounds() -> None:
    cache = SettledRuns(8 * ROW_BYTES, row_bytes_max=2 * ROW_BYTES, now=Clock())
    heavy = row("run_big", "COMPLETED", inputs={"text": "x" * 2 * ROW_BYTES})
    cache.keep(heavy)  # type: ignore[arg-type]
    assert cache.get("ten_a", "run_big") is None and cache.weight == 0
    for index in range(20):  # lighter rows: as many as the weight allows
        cache.keep(row(f"run_{index}", "COMPLETED"))  # type: ignore[arg-type]
    assert 0 < cache.weight <= 8 * ROW_BYTES
    assert len(cache) == cache.weight // row_weight(row("run_0", "COMPLETED"))  # type: ignore[arg-type]
    # keeping a row again replaces it, it is not counted twice
    before = cache.weight
    cache.keep(row("run_19", "COMPLETED"))  # type: ignore[arg-type]
    assert cache.weight == before
