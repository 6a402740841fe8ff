"""Redis-vs-Postgres budget drift: detect and repair (run by the reconciler).

The mirror can disagree with Postgres after a crash between the two writes of
a reservation or a settlement, or after a rebuild raced another replica's
in-flight operation. Two kinds of in-flight operation are never taken for
drift:

- a **reservation hold** placed in Redis whose Postgres commit has not been
  reported back: the mirror records it *pending* (``budget.lua``), and what
  the mirror should hold is Postgres's ``reserved`` plus the pending holds
  Postgres has not committed, however long that commit takes. A pending hold
  whose run Postgres holds is committed (forgotten); one older than
  ``PENDING_HOLD_ABANDONED_S`` and still uncommitted is abandoned (its actor
  crashed between the writes) and dropped.
- a **settlement or credit** committed in Postgres whose mirror write has not
  landed yet: the repair records the ledger_version it copied (the mirror's
  baseline), and the late write, carrying an older or equal version, is
  skipped instead of counted twice.

A drift is repaired only when it is *stable*: seen twice, ``settle_s`` apart,
with neither Postgres's ledger_version nor the mirror (values and pending
holds) moving in between. The overwrite is compare-and-set in one script.
A tenant whose mirror cannot be read or repaired is logged and skipped: one
bad tenant never stops the others.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from dpp.adapters.postgres import Pool, Queries
from dpp.limits import PENDING_HOLD_ABANDONED_S
from dpp.money.mirror import MirrorBudget, MirrorObservation, run_id_of_hold

log = logging.getLogger("dpp.money.drift")

TENANTS_PER_PASS_MAX = 1000


@dataclass(frozen=True, slots=True)
class Observation:
    balance_usd_micros: int
    reserved_usd_micros: int
    ledger_version: int
    mirror: MirrorObservation | None
    # pending holds Postgres has committed, and those judged abandoned
    committed_holds: frozenset[str] = frozenset()

    @property
    def in_flight_usd_micros(self) -> int:
        """Holds placed in Redis, not (yet) in Postgres, and not abandoned."""
        assert self.mirror is not None
        return sum(
            hold.amount_usd_micros
            for hold in self.mirror.pending
            if hold.hold_id not in self.committed_holds and hold.age_s < PENDING_HOLD_ABANDONED_S
        )

    @property
    def dropped_holds(self) -> list[str]:
        """Pending entries to forget: committed, or abandoned."""
        assert self.mirror is not None
        return [
            hold.hold_id
            for hold in self.mirror.pending
            if hold.hold_id in self.committed_holds or hold.age_s >= PENDING_HOLD_ABANDONED_S
        ]

    @property
    def expected_reserved_usd_micros(self) -> int:
        return self.reserved_usd_micros + self.in_flight_usd_micros

    @property
    def drifted(self) -> bool:
        return self.mirror is not None and (
            self.mirror.budget.balance_usd_micros != self.balance_usd_micros
            or self.mirror.budget.reserved_usd_micros != self.expected_reserved_usd_micros
        )

    @property
    def needs_repair(self) -> bool:
        return self.mirror is not None and (self.drifted or bool(self.dropped_holds))

    def same_state(self, other: Observation) -> bool:
        """Nothing moved between two looks (hold ages aside)."""

        def frozen(seen: Observation) -> tuple[object, ...]:
            mirror = seen.mirror
            holds = (
                None
                if mirror is None
                else (mirror.budget, [(h.hold_id, h.amount_usd_micros) for h in mirror.pending])
            )
            return (
                seen.balance_usd_micros,
                seen.reserved_usd_micros,
                seen.ledger_version,
                holds,
                seen.committed_holds,
            )

        return frozen(self) == frozen(other)


@dataclass(frozen=True, slots=True)
class TenantCounters:
    tenant_id: str
    balance_usd_micros: int
    reserved_usd_micros: int
    ledger_version: int


class CountersStore(Protocol):
    """What drift repair reads of the truth (Postgres: ``PostgresCounters``; the
    simulator's in-memory ledger in ``dpp.sim``)."""

    async def tenant_ids_page(self, after_tenant_id: str, limit: int) -> list[str]: ...

    async def tenant_counters(self, tenant_ids: Sequence[str]) -> list[TenantCounters]: ...

    async def reserved_run_ids(self, run_ids: Sequence[str]) -> Collection[str]: ...


class MirrorRepairs(Protocol):
    """What drift repair reads and overwrites of the mirror (``BudgetMirror``)."""

    async def observe(self, tenant_id: str) -> MirrorObservation | None: ...

    async def repair(
        self,
        tenant_id: str,
        observed: MirrorBudget,
        balance: int,
        reserved: int,
        version: int,
        *,
        dropped_holds: Sequence[str] = (),
    ) -> bool: ...


@dataclass(frozen=True, slots=True)
class PostgresCounters:
    """``CountersStore`` over one pool."""

    pool: Pool
    queries: Queries

    async def tenant_ids_page(self, after_tenant_id: str, limit: int) -> list[str]:
        rows = await self.pool.fetch(self.queries["tenant_ids_page"], after_tenant_id, limit)
        return [row["id"] for row in rows]

    async def tenant_counters(self, tenant_ids: Sequence[str]) -> list[TenantCounters]:
        rows = await self.pool.fetch(self.queries["tenant_counters"], list(tenant_ids))
        return [
            TenantCounters(
                row["id"],
                row["balance_usd_micros"],
                row["reserved_usd_micros"],
                row["ledger_version"],
            )
            for row in rows
        ]

    async def reserved_run_ids(self, run_ids: Sequence[str]) -> Collection[str]:
        rows = await self.pool.fetch(self.queries["reserved_run_ids"], list(run_ids))
        return {row["run_id"] for row in rows}


async def _observe(
    counters: CountersStore, mirror: MirrorRepairs, tenant_ids: list[str]
) -> dict[str, Observation]:
    """Postgres's counters, then each mirror, then which pending holds Postgres
    committed. The reads are not one snapshot; a commit landing between them can
    make one look wrong, but never two looks alike (the ledger_version moved),
    and only a drift seen twice is repaired."""
    rows = await counters.tenant_counters(tenant_ids)
    mirrors: dict[str, MirrorObservation | None] = {}
    for row in rows:
        try:
            mirrors[row.tenant_id] = await mirror.observe(row.tenant_id)
        except Exception:
            log.warning(
                "could not read a tenant's budget mirror; skipped this pass",
                extra={"tenant_id": row.tenant_id},
                exc_info=True,
            )
    holds_by_run = {
        run_id: hold.hold_id
        for seen in mirrors.values()
        if seen is not None
        for hold in seen.pending
        if (run_id := run_id_of_hold(hold.hold_id)) is not None
    }
    committed: frozenset[str] = frozenset()
    if holds_by_run:
        found = await counters.reserved_run_ids(list(holds_by_run))
        committed = frozenset(holds_by_run[run_id] for run_id in found)
    observations = {}
    for row in rows:
        if row.tenant_id not in mirrors:
            continue
        seen = mirrors[row.tenant_id]
        mine = frozenset(
            h.hold_id for h in (seen.pending if seen else ()) if h.hold_id in committed
        )
        observations[row.tenant_id] = Observation(
            row.balance_usd_micros,
            row.reserved_usd_micros,
            row.ledger_version,
            seen,
            mine,
        )
    return observations


async def repair_drift(
    pool: Pool,
    queries: Queries,
    mirror: MirrorRepairs,
    *,
    after_tenant_id: str = "",
    settle_s: float = 0.5,
) -> tuple[list[dict[str, object]], str]:
    """One page of tenants over one pool (see ``repair_page``)."""
    return await repair_page(
        PostgresCounters(pool, queries), mirror, after_tenant_id=after_tenant_id, settle_s=settle_s
    )


async def repair_page(
    counters: CountersStore,
    mirror: MirrorRepairs,
    *,
    after_tenant_id: str = "",
    settle_s: float = 0.5,
) -> tuple[list[dict[str, object]], str]:
    """One page of tenants: returns (repairs made, cursor for the next page)."""
    tenant_ids = await counters.tenant_ids_page(after_tenant_id, TENANTS_PER_PASS_MAX)
    cursor = tenant_ids[-1] if len(tenant_ids) == TENANTS_PER_PASS_MAX else ""
    first = await _observe(counters, mirror, tenant_ids)
    suspects = [tenant for tenant, seen in first.items() if seen.needs_repair]
    if not suspects:
        return [], cursor
    await anyio.sleep(settle_s)
    second = await _observe(counters, mirror, suspects)
    repairs = []
    for tenant in suspects:
        before, now = first[tenant], second.get(tenant)
        if now is None or not now.needs_repair or not now.same_state(before):
            continue  # moving or healed: look again next pass
        assert now.mirror is not None
        observed = now.mirror.budget
        try:
            repaired = await mirror.repair(
                tenant,
                observed,
                now.balance_usd_micros,
                now.expected_reserved_usd_micros,
                now.ledger_version,
                dropped_holds=now.dropped_holds,
            )
        except Exception:
            log.warning(
                "could not repair a tenant's budget mirror; the next pass retries",
                extra={"tenant_id": tenant},
                exc_info=True,
            )
            continue
        if repaired and now.drifted:
            repair = {
                "tenant_id": tenant,
                "redis_balance_usd_micros": observed.balance_usd_micros,
                "redis_reserved_usd_micros": observed.reserved_usd_micros,
                "balance_usd_micros": now.balance_usd_micros,
                "reserved_usd_micros": now.reserved_usd_micros,
                "in_flight_holds_usd_micros": now.in_flight_usd_micros,
                "dropped_holds": len(now.dropped_holds),
            }
            log.warning("budget mirror drift repaired", extra=repair)
            repairs.append(repair)
    return repairs, cursor


class DriftRepair:
    """``repair_page`` over one truth and one mirror, a page at a time (the
    reconciler's; the simulator builds one over its in-memory stores)."""

    def __init__(self, counters: CountersStore, mirror: MirrorRepairs) -> None:
        self._counters = counters
        self._mirror = mirror

    async def repair_page(
        self, after_tenant_id: str, settle_s: float
    ) -> tuple[list[dict[str, object]], str]:
        return await repair_page(
            self._counters, self._mirror, after_tenant_id=after_tenant_id, settle_s=settle_s
        )
