"""Budgets: the one door through which money moves.

Admission, the runs service, the run actors, the reconciler and the credits
route call these methods; each forwards to the tenant's budget actor (started
on demand by the registry), so one replica applies a tenant's movements in one
order and batches its reservations. Postgres decides.

``Budgets`` is what the layers below name as ``dpp.runs.admission.Reserver``
and ``dpp.runs.service.Settler``: it turns the kernel's failures (a full
mailbox, no answer in time, a crash) into the errors those ports declare.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from dpp.actors.budget import (
    BudgetActor,
    BudgetBackend,
    BudgetMessage,
    BudgetStore,
    Credit,
    MirrorStore,
    Reserve,
    Settle,
)
from dpp.actors.kernel import ActorCrashed, AskTimeout, MailboxFull
from dpp.actors.registry import ActorRegistry
from dpp.actors.supervisor import ChildSpec
from dpp.limits import BUDGET_ACTORS_MAX, BUDGET_BATCH_MAX
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.runs.admission import (
    ReservationBusy,
    ReservationOutcomeUnknown,
    ReservationTimedOut,
)

ASK_TIMEOUT_S = 15.0
BUDGET_ACTOR_IDLE_S = 60.0


class Budgets:
    """The budget actors of one replica, and the asks that reach them."""

    def __init__(
        self,
        store: BudgetStore,
        mirror: MirrorStore,
        *,
        metrics: Metrics | None = None,
        on_admitted: Callable[[Sequence[str]], None] | None = None,
        idle_timeout_s: float = BUDGET_ACTOR_IDLE_S,
        batch_max: int = BUDGET_BATCH_MAX,
    ) -> None:
        """``batch_max=1`` turns group commit off (the benchmark's baseline)."""
        assert 1 <= batch_max <= BUDGET_BATCH_MAX
        backend = (
            BudgetBackend(store, mirror)
            if on_admitted is None
            else BudgetBackend(store, mirror, on_admitted)
        )
        self.registry: ActorRegistry[str, BudgetMessage] = ActorRegistry(
            "budget",
            lambda tenant_id: BudgetActor(tenant_id, backend, batch_max=batch_max),
            idle_timeout_s=idle_timeout_s,
            max_actors=BUDGET_ACTORS_MAX,
        )
        self._store = store
        self._metrics = metrics
        if metrics is not None:
            registry = self.registry
            metrics.budget_actors.set_function(lambda: len(registry))

    def child_spec(self, id: str = "budgets") -> ChildSpec:
        """The registry, for the replica's supervisor (it hosts every budget actor)."""
        return self.registry.child_spec(id=id)

    async def reserve(self, tenant_id: str, draft: ledger.RunDraft) -> ledger.ReserveOutcome:
        """``dpp.runs.admission.Reserver``: the kernel's failures as admission's.

        The message carries the ask's deadline: once this caller stops waiting
        (and answers 503), the actor and the ledger refuse it rather than commit
        it late."""
        deadline = anyio.current_time() + ASK_TIMEOUT_S
        try:
            return await self.registry.ask(
                tenant_id,
                lambda reply: Reserve(draft, reply, deadline),
                timeout_s=ASK_TIMEOUT_S,
            )
        except MailboxFull as error:
            raise ReservationBusy(str(error)) from error
        except AskTimeout as error:
            raise ReservationTimedOut(str(error)) from error
        except ActorCrashed as error:
            raise ReservationOutcomeUnknown(str(error)) from error

    async def settle(self, tenant_id: str, request: ledger.SettleRequest) -> ledger.SettleResult:
        """``dpp.runs.service.Settler``: settle once; raises ``ledger.SettleRefused``."""
        result: ledger.SettleResult = await self.registry.ask(
            tenant_id, lambda reply: Settle(request, reply), timeout_s=ASK_TIMEOUT_S
        )
        if result.applied and self._metrics is not None:
            self._metrics.runs_settled.labels(result.settlement.outcome.value).inc()
        return result

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> ledger.CreditResult:
        """Add credit once per ``operation_id``; raises ``ledger.TenantNotFound``."""
        # fail fast on an unknown tenant, before starting an actor for it
        await self._store.budget(tenant_id)
        result: ledger.CreditResult = await self.registry.ask(
            tenant_id,
            lambda reply: Credit(amount_usd_micros, operation_id, reply),
            timeout_s=ASK_TIMEOUT_S,
        )
        return result
