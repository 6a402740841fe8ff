"""The deterministic simulation (dpp/sim, docs/simulation.md): its seeds run clean,
replay exactly, and its checks catch what they claim to catch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpp.sim.simulate import run_seed, simulate
from dpp.sim.world import KNOWN_HOLES, SCENARIOS, Trace, Violations

CI_SEEDS = 1_000


def test_a_seed_replays_byte_for_byte() -> None:
    first = run_seed(11, keep_trace=True)
    run_seed(12)  # whatever ran in between leaves nothing behind
    again = run_seed(11, keep_trace=True)
    assert first.digest == again.digest
    assert first.trace == again.trace
    assert first.runs > 0 and len(first.trace) > 100


def test_different_seeds_make_different_runs() -> None:
    assert len({run_seed(seed).digest for seed in range(5)}) == 5


def test_a_replay_in_another_process_with_another_hash_seed_is_the_same() -> None:
    code = "from dpp.sim.simulate import run_seed; print(run_seed(11).digest)"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for hash_seed in ("1", "2")
    }
    assert outputs == {run_seed(11).digest}


async def test_the_ledger_check_sees_a_broken_invariant() -> None:
    from dpp.sim.ledger import MemLedger

    violations = Violations(known=frozenset())
    ledger = MemLedger(Trace(), violations)
    ledger.add_tenant("ten_" + "A" * 26, 2)
    ledger.check("nothing")
    assert violations.found == []
    ledger.tenants["ten_" + "A" * 26].balance = 5  # money without a credit entry
    ledger.check("a bare write")
    assert any("invariant 1" in line for line in violations.found)


@pytest.mark.parametrize(("replayed", "hole"), [(True, "hole3"), (False, "hole4")])
async def test_the_mirror_check_sees_a_settlement_applied_twice(replayed: bool, hole: str) -> None:
    """A replay reaching the mirror is hole 3; a first application landing after
    drift repair counted it is hole 4's race."""
    from dpp.sim.mirror import MemMirror

    violations = Violations(known=frozenset())
    tenant = "ten_" + "A" * 26
    mirror = MemMirror(
        Trace(),
        violations,
        lambda tenant_id, version: {"settle:run_1"},
        replayed=lambda op: replayed,
    )
    await mirror.load(tenant, 10_000, 1_000, 1)  # Postgres had settled run_1 already
    await mirror.settle_many(tenant, [("settle:run_1", 1_000, 100)], 2)  # above the baseline
    assert len(violations.found) == 1
    assert "applied settle:run_1 twice" in violations.found[0]
    assert violations.found[0].endswith(f"[{hole}]")


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~5-8 seeds/s on a loaded 2-core machine
def test_a_thousand_seeds_keep_every_invariant() -> None:
    failures, rate = simulate(list(range(CI_SEEDS)))
    assert not failures, [(f.seed, f.violations) for f in failures]
    assert rate > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_hole_scenarios_keep_every_other_invariant() -> None:
    """With the scenarios that provoke the known holes, nothing else breaks (the
    holes themselves are tolerated until their fixes land: KNOWN_HOLES)."""
    failures, _ = simulate(list(range(10_000, 10_100)), frozenset(SCENARIOS))
    assert not failures, [(f.seed, f.violations) for f in failures]
    assert {"hole1", "hole3", "hole4"} >= KNOWN_HOLES  # a new hole is named in issue 9 first
