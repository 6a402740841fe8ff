"""What the API reads about money: a tenant's budget, both stores, the audit.

Reads only; money moves through the budget actors (``dpp.actors.budgets``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpp.adapters.postgres import Pool, Queries, Record
from dpp.money import ledger
from dpp.money.audit import AuditReport, run_audit
from dpp.money.mirror import BudgetMirror, MirrorBudget
from dpp.schemas import USD_MICROS, Schema, all_required

BUDGET_VIEW = Schema(
    "BudgetView",
    all_required(
        {
            "balance_usd_micros": {**USD_MICROS, "description": "Credits minus charges."},
            "reserved_usd_micros": {**USD_MICROS, "description": "Held by open runs."},
            "available_usd_micros": {**USD_MICROS, "description": "balance - reserved."},
        }
    ),
)


def budget_view(balance_usd_micros: int, reserved_usd_micros: int) -> dict[str, int]:
    """A tenant's counters as every budget document shows them (SPEC §6).

    Shown as given: the ledger asserts SPEC §1's invariants on every row it
    reads (``ledger.tenant_budget``), and a drifted Redis mirror is exactly what
    an operator asks ``GET /admin/tenants/{id}/budget`` to see."""
    return {
        "balance_usd_micros": balance_usd_micros,
        "reserved_usd_micros": reserved_usd_micros,
        "available_usd_micros": balance_usd_micros - reserved_usd_micros,
    }


@dataclass(frozen=True, slots=True)
class BothStores:
    """A tenant's counters in Postgres (the truth) and in the Redis mirror."""

    postgres: ledger.TenantBudget
    # None while the tenant is not mirrored: rebuilt from Postgres before first use
    redis: MirrorBudget | None

    @property
    def consistent(self) -> bool:
        return self.redis is None or (
            self.redis.balance_usd_micros == self.postgres.balance_usd_micros
            and self.redis.reserved_usd_micros == self.postgres.reserved_usd_micros
        )


class Accounts:
    def __init__(self, pool: Pool, queries: Queries, mirror: BudgetMirror) -> None:
        self._pool = pool
        self._queries = queries
        self.mirror = mirror

    async def budget(self, tenant_id: str) -> Record:
        """Balance, reserved and the plan's limits; raises ``ledger.TenantNotFound``."""
        return await ledger.read_budget(self._pool, self._queries, tenant_id)

    async def both_stores(self, tenant_id: str) -> BothStores:
        """Raises ``ledger.TenantNotFound``."""
        row = await ledger.read_budget(self._pool, self._queries, tenant_id)
        return BothStores(ledger.tenant_budget(row), await self.mirror.read(tenant_id))

    async def audit(self, tenant_id: str | None = None) -> AuditReport:
        """SPEC §1's invariants proven from storage (all tenants, or one)."""
        return await run_audit(self._pool, self._queries, self.mirror, tenant_id=tenant_id)
