"""The simulated world's shared parts: the seeded fault plan, the trace, the clock.

Everything random in a simulation draws from one ``random.Random`` seeded by
the seed, in an order fixed by trio's seeded scheduler, so one seed gives one
run, byte for byte. The trace is what proves it: every port call appends a
line, and the run's SHA-256 over those lines is printed per seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio

# Rows carry datetimes: the simulated clock's zero is this instant.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def now_s() -> float:
    """Simulated seconds since the run began (trio's MockClock)."""
    return anyio.current_time()


def now_dt() -> datetime:
    return EPOCH + timedelta(seconds=now_s())


class SimOutage(ConnectionError):
    """A simulated store failure: refused before it applied, or applied and the
    answer lost (the caller cannot tell which)."""


# Scenarios that provoke holes known on main (issue 9). Off by default so that
# CI stays green until their fixes land; `dpp simulate --scenario NAME` turns
# one on (docs/simulation.md).
SCENARIOS = {
    # a reservation's commit stalls past the Idempotency-Key lock (60 s), so a
    # client retry takes the key over: hole 1
    "stalls": "reservation commits that stall past the idempotency lock (hole 1)",
    # the Redis markers of applied operations vanish (eviction, flush) while
    # settlements are replayed: hole 3
    "marker_loss": "Redis op markers evicted or flushed under replayed settlements (hole 3)",
}


@dataclass(slots=True)
class Faults:
    """The seeded fault plan: every decision any fault makes comes from ``rng``."""

    rng: random.Random
    scenarios: frozenset[str] = frozenset()
    # False once the workload ends: the world then heals and must converge.
    active: bool = True
    # per-call probabilities (tuned so one seed sees a handful of each)
    p_fail_before: float = 0.02
    p_fail_after: float = 0.02
    p_slow: float = 0.05
    slow_max_s: float = 20.0
    p_crash: float = 0.02
    crashes: int = 0

    def chance(self, p: float) -> bool:
        return self.active and self.rng.random() < p

    def crash(self, name: str) -> bool:
        """The crash-point oracle (``dpp.faults.injecting``)."""
        if self.chance(self.p_crash):
            self.crashes += 1
            return True
        return False

    async def before(self, what: str, trace: Trace) -> None:
        """A store call begins: maybe slow, maybe refused (nothing applied)."""
        if self.chance(self.p_slow):
            delay = self.rng.uniform(0.0, self.slow_max_s)
            if "stalls" in self.scenarios and what == "reserve" and self.rng.random() < 0.3:
                delay = self.rng.uniform(60.0, 90.0)
            trace.add(f"slow {what} {delay:.3f}")
            await anyio.sleep(delay)
        else:
            await anyio.sleep(self.rng.choice((0.0, 0.001, 0.01)))
        if self.chance(self.p_fail_before):
            trace.add(f"refused {what}")
            raise SimOutage(f"simulated outage before {what}")

    def after(self, what: str, trace: Trace) -> None:
        """A store call applied: maybe its answer is lost."""
        if self.chance(self.p_fail_after):
            trace.add(f"lost-reply {what}")
            raise SimOutage(f"simulated lost reply after {what}")


@dataclass(slots=True)
class Trace:
    """Every observable step of one run, in order; hashed for the determinism check."""

    lines: list[str] = field(default_factory=list)
    keep: bool = False
    _hash: Any = field(default_factory=hashlib.sha256)

    def add(self, line: str) -> None:
        stamped = f"{now_s():.6f} {line}"
        self._hash.update(stamped.encode())
        self._hash.update(b"\n")
        if self.keep:
            self.lines.append(stamped)

    def digest(self) -> str:
        return str(self._hash.hexdigest())


# Holes issue 9 found on main, by the tag of the violation that shows each.
# Until its fix merges, a known hole's violations are counted and printed but
# do not fail a seed; remove its tag here when the fix lands (docs/simulation.md).
# None tolerated now: holes 3 and 4 were fixed on main by 6a0b7d2 (mirror only
# what Postgres applied; pending holds and a version baseline for drift repair),
# hole 1 by the owner tokens and reservation deadlines that followed.
KNOWN_HOLES: frozenset[str] = frozenset()
HOLES = {
    "hole1": "one Idempotency-Key created two runs, or answered two outcomes",
    "hole3": "the Redis mirror applied a replayed settlement or credit again",
    "hole4": "drift repair counted a settlement or credit still in flight to Redis,"
    " which then applied again",
}


@dataclass(slots=True)
class Violations:
    """What broke. The first violation that is not a known hole stops the run."""

    known: frozenset[str] = KNOWN_HOLES
    found: list[str] = field(default_factory=list)
    known_found: list[str] = field(default_factory=list)
    on_first: Callable[[], None] = lambda: None

    def add(self, message: str, hole: str | None = None) -> None:
        line = f"t={now_s():.3f} {message}" + (f" [{hole}]" if hole else "")
        if hole is not None and hole in self.known:
            self.known_found.append(line)
            return
        self.found.append(line)
        if len(self.found) == 1:
            self.on_first()
