"""MoneyService: the one door through which money moves.

Routes and actors call these methods; each forwards to the tenant's budget
actor (started on demand by the registry), so one replica applies a tenant's
movements in one order and batches its reservations. Postgres decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from dpp.actors.budget import (
    BATCH_MAX,
    BudgetActor,
    BudgetBackend,
    BudgetMessage,
    Credit,
    Reserve,
    Settle,
)
from dpp.actors.kernel import ActorCrashed, AskTimeout, MailboxFull
from dpp.actors.registry import ActorRegistry
from dpp.adapters.postgres import Queries
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.money.audit import AuditReport, run_audit
from dpp.money.mirror import BudgetMirror
from dpp.runs.admission import (
    ReservationBusy,
    ReservationOutcomeUnknown,
    ReservationTimedOut,
)

ASK_TIMEOUT_S = 15.0
BUDGET_ACTOR_IDLE_S = 60.0
BUDGET_ACTORS_MAX = 50_000


@dataclass(frozen=True, slots=True)
class MoneyService:
    pool: asyncpg.Pool
    queries: Queries
    mirror: BudgetMirror
    budgets: ActorRegistry[str, BudgetMessage]
    metrics: Metrics | None = None

    @classmethod
    def build(
        cls,
        pool: asyncpg.Pool,
        queries: Queries,
        mirror: BudgetMirror,
        *,
        on_admitted: Callable[[Sequence[str]], None] | None = None,
        idle_timeout_s: float = BUDGET_ACTOR_IDLE_S,
        batch_max: int = BATCH_MAX,
        metrics: Metrics | None = None,
    ) -> MoneyService:
        """``batch_max=1`` turns group commit off (the benchmark's baseline)."""
        store = ledger.LedgerStore(pool, queries)
        backend = BudgetBackend(store=store, mirror=mirror)
        if on_admitted is not None:
            backend = BudgetBackend(store, mirror, on_admitted)
        registry: ActorRegistry[str, BudgetMessage] = ActorRegistry(
            "budget",
            lambda tenant_id: BudgetActor(tenant_id, backend, batch_max=batch_max),
            idle_timeout_s=idle_timeout_s,
            max_actors=BUDGET_ACTORS_MAX,
        )
        if metrics is not None:
            metrics.budget_actors.set_function(lambda: len(registry))
        return cls(pool, queries, mirror, registry, metrics)

    async def reserve(self, tenant_id: str, draft: ledger.RunDraft) -> ledger.ReserveOutcome:
        """``dpp.runs.admission.Reserver``: the kernel's failures as admission's."""
        try:
            return await self.budgets.ask(
                tenant_id, lambda reply: Reserve(draft, reply), timeout_s=ASK_TIMEOUT_S
            )
        except MailboxFull as error:
            raise ReservationBusy(str(error)) from error
        except AskTimeout as error:
            raise ReservationTimedOut(str(error)) from error
        except ActorCrashed as error:
            raise ReservationOutcomeUnknown(str(error)) from error

    async def settle(self, tenant_id: str, request: ledger.SettleRequest) -> ledger.SettleResult:
        result = await self.budgets.ask(
            tenant_id, lambda reply: Settle(request, reply), timeout_s=ASK_TIMEOUT_S
        )
        if result.applied and self.metrics is not None:
            self.metrics.runs_settled.labels(result.settlement.outcome.value).inc()
        return result

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> ledger.CreditResult:
        # fail fast on an unknown tenant before starting an actor for it
        await ledger.read_budget(self.pool, self.queries, tenant_id)
        return await self.budgets.ask(
            tenant_id,
            lambda reply: Credit(amount_usd_micros, operation_id, reply),
            timeout_s=ASK_TIMEOUT_S,
        )

    async def budget(self, tenant_id: str) -> asyncpg.Record:
        return await ledger.read_budget(self.pool, self.queries, tenant_id)

    async def audit(self, tenant_id: str | None = None) -> AuditReport:
        return await run_audit(self.pool, self.queries, self.mirror, tenant_id=tenant_id)
