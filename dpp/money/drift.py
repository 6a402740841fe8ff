"""Redis-vs-Postgres budget drift: detect and repair (run by the reconciler).

The mirror can disagree with Postgres after a crash between the two writes of
a reservation or a settlement, or after a rebuild raced another replica's
in-flight operation. A drift is repaired only when it is *stable*: seen twice,
``settle_s`` apart, with neither Postgres's ledger_version nor the mirror's
values moving in between — so an operation still in flight on some replica
is never mistaken for drift. The overwrite is compare-and-set in one script.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from dpp.adapters.postgres import Pool, Queries
from dpp.money.mirror import BudgetMirror, MirrorBudget

log = logging.getLogger("dpp.money.drift")

TENANTS_PER_PASS_MAX = 1000


@dataclass(frozen=True, slots=True)
class Observation:
    balance_usd_micros: int
    reserved_usd_micros: int
    ledger_version: int
    mirror: MirrorBudget | None

    @property
    def drifted(self) -> bool:
        return self.mirror is not None and (
            self.mirror.balance_usd_micros != self.balance_usd_micros
            or self.mirror.reserved_usd_micros != self.reserved_usd_micros
        )


async def _observe(
    pool: Pool, queries: Queries, mirror: BudgetMirror, tenant_ids: list[str]
) -> dict[str, Observation]:
    rows = await pool.fetch(queries["tenant_counters"], tenant_ids)
    observations = {}
    for row in rows:
        observations[row["id"]] = Observation(
            row["balance_usd_micros"],
            row["reserved_usd_micros"],
            row["ledger_version"],
            await mirror.read(row["id"]),
        )
    return observations


async def repair_drift(
    pool: Pool,
    queries: Queries,
    mirror: BudgetMirror,
    *,
    after_tenant_id: str = "",
    settle_s: float = 0.5,
) -> tuple[list[dict[str, object]], str]:
    """One page of tenants: returns (repairs made, cursor for the next page)."""
    tenant_ids = [
        row["id"]
        for row in await pool.fetch(
            queries["tenant_ids_page"], after_tenant_id, TENANTS_PER_PASS_MAX
        )
    ]
    cursor = tenant_ids[-1] if len(tenant_ids) == TENANTS_PER_PASS_MAX else ""
    first = await _observe(pool, queries, mirror, tenant_ids)
    suspects = [tenant for tenant, seen in first.items() if seen.drifted]
    if not suspects:
        return [], cursor
    await anyio.sleep(settle_s)
    second = await _observe(pool, queries, mirror, suspects)
    repairs = []
    for tenant in suspects:
        before, now = first[tenant], second.get(tenant)
        if now is None or not now.drifted or now != before:
            continue  # moving or healed: look again next pass
        assert now.mirror is not None
        if await mirror.repair(
            tenant,
            now.mirror,
            now.balance_usd_micros,
            now.reserved_usd_micros,
            now.ledger_version,
        ):
            repair = {
                "tenant_id": tenant,
                "redis_balance_usd_micros": now.mirror.balance_usd_micros,
                "redis_reserved_usd_micros": now.mirror.reserved_usd_micros,
                "balance_usd_micros": now.balance_usd_micros,
                "reserved_usd_micros": now.reserved_usd_micros,
            }
            log.warning("budget mirror drift repaired", extra=repair)
            repairs.append(repair)
    return repairs, cursor


class DriftRepair:
    """``repair_drift`` over one pool and mirror, a page at a time (the reconciler's)."""

    def __init__(self, pool: Pool, queries: Queries, mirror: BudgetMirror) -> None:
        self._pool = pool
        self._queries = queries
        self._mirror = mirror

    async def repair_page(
        self, after_tenant_id: str, settle_s: float
    ) -> tuple[list[dict[str, object]], str]:
        return await repair_drift(
            self._pool,
            self._queries,
            self._mirror,
            after_tenant_id=after_tenant_id,
            settle_s=settle_s,
        )
