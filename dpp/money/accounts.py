"""What the API reads about money: a tenant's budget, both stores, the audit.

Reads only; money moves through the budget and settlement actors
(``dpp.actors.budgets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpp.adapters.postgres import Pool, Queries, Record
from dpp.money import ledger
from dpp.money.audit import AuditReport, run_audit
from dpp.money.mirror import BudgetMirror, MirrorBudget
from dpp.money.rules import KeySpend
from dpp.schemas import USD_MICROS, Schema, all_required, id_pattern

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


KEY_BUDGET = Schema(
    "KeyBudget",
    all_required(
        {
            "id": id_pattern("key"),
            "spend_limit_usd_micros": {
                **USD_MICROS,
                "type": ["integer", "null"],
                "description": "The key's spend limit; null: none beyond the tenant's budget.",
            },
            "spent_usd_micros": {
                **USD_MICROS,
                "description": "R of the key's open runs + charged of its settled runs.",
            },
            "available_usd_micros": {
                **USD_MICROS,
                "description": "min(tenant available, max(limit - spent, 0)), or the tenant's"
                " available when the key has no limit.",
            },
        },
        description="The calling API key's spend (SPEC §7).",
    ),
)


def key_budget(key_id: str, spend: KeySpend, tenant_available_usd_micros: int) -> dict[str, Any]:
    """The ``key`` member of ``GET /v1/budget`` (SPEC §7)."""
    room = spend.room_usd_micros()
    available = (
        tenant_available_usd_micros if room is None else min(tenant_available_usd_micros, room)
    )
    document = {
        "id": key_id,
        "spend_limit_usd_micros": spend.spend_limit_usd_micros,
        "spent_usd_micros": spend.spent_usd_micros,
        "available_usd_micros": available,
    }
    assert document.keys() == KEY_BUDGET.members and available >= 0
    return document


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

    async def key_budget(self, tenant_id: str, key_id: str) -> tuple[Record, KeySpend]:
        """The tenant's budget and plan (as ``budget``) and the key's limit and
        spent, read in one statement (one snapshot); raises
        ``ledger.TenantNotFound`` when the tenant is gone or the key is not one
        of its (it authenticated the request: it is)."""
        row = await self._pool.fetchrow(self._queries["key_budget"], tenant_id, key_id)
        if row is None or row["key_id"] is None:
            raise ledger.TenantNotFound(tenant_id)
        ledger.tenant_budget(row)  # its counters are checked as every read's are
        return row, KeySpend(row["spend_limit_usd_micros"], row["spent_usd_micros"])

    async def both_stores(self, tenant_id: str) -> BothStores:
        """Raises ``ledger.TenantNotFound``."""
        row = await ledger.read_budget(self._pool, self._queries, tenant_id)
        return BothStores(ledger.tenant_budget(row), await self.mirror.read(tenant_id))

    async def audit(
        self, tenant_id: str | None = None, *, include_mirror: bool = True
    ) -> AuditReport:
        """SPEC §1's invariants proven from storage (all tenants, or one).
        ``include_mirror=False`` leaves out invariant 5 (Redis equals Postgres),
        which only holds once in-flight work is done: the periodic audit's choice."""
        mirror = self.mirror if include_mirror else None
        return await run_audit(self._pool, self._queries, mirror, tenant_id=tenant_id)
