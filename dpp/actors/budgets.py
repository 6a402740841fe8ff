"""Budgets: the one door through which money moves.

Admission, the runs service, the run actors, the reconciler and the credits
route call these methods. Reservations and credits go to the tenant's budget
actor, settlements to its settlement actor (each started on demand by its own
registry), so one replica batches a tenant's reservations and, apart from
them, its settlements, and a submit never queues behind a settle batch.
Postgres decides (``dpp.actors.settlement`` says why the two actors need no
common order).

``Budgets`` is what the layers below name as ``dpp.runs.admission.Reserver``
and ``dpp.runs.service.Settler``: it turns the kernel's failures (a full
mailbox, no answer in time, a crash) into the errors those ports declare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import anyio
from anyio.abc import TaskStatus

from dpp.actors.budget import (
    BudgetActor,
    BudgetBackend,
    BudgetMessage,
    BudgetStore,
    Credit,
    MirrorStore,
    ReservationRejected,
    Reserve,
)
from dpp.actors.kernel import Actor, ActorCrashed, ActorStopped, AskTimeout, MailboxFull
from dpp.actors.registry import ActorRegistry, KeyCoolingDown, RegistryFull
from dpp.actors.settlement import Settle, SettlementActor, SettlementMessage
from dpp.actors.supervisor import ChildSpec
from dpp.limits import BUDGET_ACTORS_MAX, BUDGET_BATCH_MAX
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.money.mirror import MirrorMissing
from dpp.runs.admission import (
    ReservationBusy,
    ReservationInvalid,
    ReservationOutcomeUnknown,
    ReservationSuspended,
    ReservationTimedOut,
)
from dpp.runs.service import SettlementUnavailable

# a registry's message type
M = TypeVar("M")

ASK_TIMEOUT_S = 15.0
BUDGET_ACTOR_IDLE_S = 60.0
# A tenant whose budget (or settlement) actor crashes more than this often
# within the period (its input, or a bug its data trips) is stopped for the
# cooldown: the requests that actor serves answer 503 with Retry-After; no
# other tenant, and not the tenant's other actor, notices.
BUDGET_ACTOR_CRASHES_MAX = 5
BUDGET_ACTOR_CRASH_PERIOD_S = 10.0
BUDGET_ACTOR_COOLDOWN_S = 30.0
# Retry-After for back-pressure that clears by itself (a full mailbox, no slot).
BUSY_RETRY_AFTER_S = 1

# The kernel's failures that mean "not now": nothing, or nothing known, happened.
_UNAVAILABLE = (MailboxFull, AskTimeout, ActorCrashed, ActorStopped, RegistryFull, KeyCoolingDown)


def retry_after_s(error: Exception) -> int:
    """Whole seconds a client should wait after ``error`` (Retry-After)."""
    if isinstance(error, KeyCoolingDown):
        return max(1, math.ceil(error.retry_after_s))
    return BUSY_RETRY_AFTER_S


class CreditUnavailable(Exception):
    """The tenant's budget actor could not take or answer the credit now (503).

    Whether it applied is unknown only after a crash or timeout; the credit's
    idempotency id makes the retry safe either way."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class Budgets:
    """The budget and settlement actors of one replica, and the asks that reach them."""

    def __init__(
        self,
        store: BudgetStore,
        mirror: MirrorStore,
        *,
        metrics: Metrics | None = None,
        on_admitted: Callable[[Sequence[str]], None] | None = None,
        idle_timeout_s: float = BUDGET_ACTOR_IDLE_S,
        batch_max: int = BUDGET_BATCH_MAX,
        cooldown_s: float = BUDGET_ACTOR_COOLDOWN_S,
        is_outage: Callable[[BaseException], bool] = lambda error: False,
    ) -> None:
        """``batch_max=1`` turns group commit off (the benchmark's baseline).
        ``is_outage`` tells a dependency's outage from a tenant's own crash loop:
        the composition root wires the adapters' classifier."""
        assert 1 <= batch_max <= BUDGET_BATCH_MAX
        backend = BudgetBackend(store, mirror)
        if on_admitted is not None:
            backend = replace(backend, on_admitted=on_admitted)
        if metrics is not None:
            observers = {
                "reservation": metrics.batch_observer("reservation"),
                "settlement": metrics.batch_observer("settlement"),
            }
            backend = replace(backend, on_batch=lambda kind, size: observers[kind](size))

        def tenant_registry(kind: str, actor: Callable[[str], Actor[M]]) -> ActorRegistry[str, M]:
            # The same limits for both kinds: a tenant's settlements cool down
            # apart from its reservations, and the other way round.
            return ActorRegistry(
                kind,
                actor,
                idle_timeout_s=idle_timeout_s,
                max_actors=BUDGET_ACTORS_MAX,
                intensity=BUDGET_ACTOR_CRASHES_MAX,
                period_s=BUDGET_ACTOR_CRASH_PERIOD_S,
                cooldown_s=cooldown_s,
                on_crash=lambda tenant_id, error: self._count_crash(kind),
                on_cooldown=lambda tenant_id, error: self._count_cooldown(kind),
                is_outage=is_outage,
            )

        self.registry: ActorRegistry[str, BudgetMessage] = tenant_registry(
            "budget", lambda tenant_id: BudgetActor(tenant_id, backend, batch_max=batch_max)
        )
        self.settlements: ActorRegistry[str, SettlementMessage] = tenant_registry(
            "settlement",
            lambda tenant_id: SettlementActor(tenant_id, backend, batch_max=batch_max),
        )
        self._store = store
        self._metrics = metrics
        if metrics is not None:
            registry, settlements = self.registry, self.settlements
            metrics.budget_actors.set_function(lambda: len(registry))
            metrics.settlement_actors.set_function(lambda: len(settlements))

    def _count_crash(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.actor_crashes.labels(kind).inc()

    def _count_cooldown(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.actor_cooldowns.labels(kind).inc()

    def child_specs(self) -> list[ChildSpec]:
        """The two registries, for the replica's supervisor (they host every
        budget and settlement actor)."""
        return [
            self.registry.child_spec(id="budgets"),
            self.settlements.child_spec(id="settlements"),
        ]

    async def run(self, *, task_status: TaskStatus[Budgets] = anyio.TASK_STATUS_IGNORED) -> None:
        """Host both registries without a supervisor (a CLI command, a test, the
        benchmark), until cancelled."""
        async with anyio.create_task_group() as group:
            await group.start(self.registry.run)
            await group.start(self.settlements.run)
            task_status.started(self)
            await anyio.sleep_forever()

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
        except (MailboxFull, RegistryFull, ActorStopped) as error:
            # nothing was sent (or it was never handled): back-pressure
            raise ReservationBusy(str(error)) from error
        except KeyCoolingDown as error:
            raise ReservationSuspended(str(error), retry_after_s(error)) from error
        except AskTimeout as error:
            raise ReservationTimedOut(str(error)) from error
        except ActorCrashed as error:
            raise ReservationOutcomeUnknown(str(error)) from error
        except ReservationRejected as error:
            raise ReservationInvalid(str(error)) from error
        except MirrorMissing as error:
            # Redis lost the counters again while the actor rebuilt them (a flush
            # racing the rebuild): no hold was placed, so nothing was reserved.
            raise ReservationBusy(str(error)) from error

    async def settle(self, tenant_id: str, request: ledger.SettleRequest) -> ledger.SettleResult:
        """``dpp.runs.service.Settler``: settle once, through the tenant's
        settlement actor; raises ``ledger.SettleRefused``, or
        ``SettlementUnavailable`` when the actor cannot take or answer it now."""
        try:
            result: ledger.SettleResult = await self.settlements.ask(
                tenant_id, lambda reply: Settle(request, reply), timeout_s=ASK_TIMEOUT_S
            )
        except _UNAVAILABLE as error:
            raise SettlementUnavailable(str(error), retry_after_s(error)) from error
        if result.applied and self._metrics is not None:
            settlement = result.settlement
            self._metrics.observe_settlement(
                settlement.outcome.value,
                settlement.charged_usd_micros,
                settlement.refunded_usd_micros,
            )
        return result

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> ledger.CreditResult:
        """Add credit once per ``operation_id``; raises ``ledger.TenantNotFound``,
        or ``CreditUnavailable`` when the actor cannot take or answer it now."""
        # fail fast on an unknown tenant, before starting an actor for it
        await self._store.budget(tenant_id)
        try:
            result: ledger.CreditResult = await self.registry.ask(
                tenant_id,
                lambda reply: Credit(amount_usd_micros, operation_id, reply),
                timeout_s=ASK_TIMEOUT_S,
            )
        except _UNAVAILABLE as error:
            raise CreditUnavailable(str(error), retry_after_s(error)) from error
        return result
