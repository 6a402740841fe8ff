"""Settlement actors: one per active tenant per replica, beside its budget actor.

A settlement actor drains its mailbox and commits the queued settlements as
one batch: one Postgres transaction (``ledger.settle_batch``), then one Redis
call mirroring what that transaction applied, answering each caller
individually. It is not the budget actor so that admission never waits
behind settlement: a reservation queued behind a settle batch waited for its
whole transaction, and under load with runs finishing that was most of a
submit's latency.

Why the order between a tenant's reservations and its settlements does not
matter, now that two actors send them:

- **Postgres.** They meet only on the tenant row. A settlement locks its runs
  (in id order, ``dpp_lock_runs``), then the tenant row (the entries' foreign
  key and the ledger trigger's counter update), then its runs' API keys (the
  trigger's refund); a reservation locks the tenant row first and only then
  its idempotency keys and API keys, and otherwise touches only the runs it
  inserts, which no settlement can name yet. Each waits on the tenant row
  holding nothing the other wants, so the row lock serializes them in
  whichever order they come and neither can deadlock the other. Replicas
  already ran a tenant's reservations and settlements concurrently.
- **A run's own order.** A settlement follows its run's answered reservation
  (the run actor, the reconciler and a cancel all find the run in Postgres
  first), so it never overtakes it.
- **The Redis mirror.** Settlements are mirrored after their commit, carrying
  its ``ledger_version``: at or below the mirror's baseline (a rebuild or a
  repair that read Postgres after the commit) they are skipped, above it they
  are applied once under their operation marker. Reservation holds and
  settlements are increments of their own amounts, so the two actors' script
  calls commute; only a lost write leaves the mirror over-holding
  (conservative) until drift repair. A missing mirror skips the settlement:
  the budget actor's rebuild reads Postgres, which already holds it.

Write order (docs/money.md has the crash table):
  1. Postgres: settle the batch              crash → rolled back, retried
  2. Redis: mirror what 1 applied            crash → mirror over-holds; drift repair
  3. reply
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dpp import tracing
from dpp.actors.budget import BudgetBackend
from dpp.actors.kernel import Actor, Reply
from dpp.adapters.postgres import POSTGRES_DATA_ERRORS
from dpp.faults import crash_point
from dpp.limits import BUDGET_BATCH_MAX, BUDGET_MAILBOX_SIZE
from dpp.logs import bind_only
from dpp.money import ledger

log = logging.getLogger("dpp.budget")


@dataclass(frozen=True, slots=True)
class Settle:
    request: ledger.SettleRequest
    reply: Reply[ledger.SettleResult]
    # the sender's span, taken where the message is made (in the asking task):
    # the batch that serves it links to it (dpp.tracing; None when tracing is off)
    span: tracing.SpanContext | None = field(default_factory=tracing.current_span_context)


SettlementMessage = Settle


class SettlementActor(Actor[SettlementMessage]):
    kind = "settlement"

    def __init__(
        self, tenant_id: str, backend: BudgetBackend, *, batch_max: int = BUDGET_BATCH_MAX
    ) -> None:
        super().__init__(
            name=f"settlement:{tenant_id}", mailbox_size=BUDGET_MAILBOX_SIZE, batch_max=batch_max
        )
        self.tenant_id = tenant_id
        self.backend = backend

    async def run(self, **kwargs: Any) -> None:
        # started on demand from some request's task: drop that request's ids
        with bind_only(tenant_id=self.tenant_id):
            await super().run(**kwargs)

    async def handle(self, message: SettlementMessage) -> None:
        await self.handle_batch([message])

    async def handle_batch(self, messages: list[SettlementMessage]) -> None:
        """Commit every queued settlement as one batch. Each caller has one
        settlement in flight at a time (an ask), so no message drained here
        waits on another one drained here: any order is one they could have
        arrived in."""
        self.backend.on_batch("settlement", len(messages))
        with tracing.batch_span("dpp.budget.settle_batch", [m.span for m in messages]):
            await self._settle_batch(messages)

    async def _settle_batch(self, messages: list[Settle]) -> None:
        try:
            outcomes = await self.backend.store.settle_batch(
                [message.request for message in messages]
            )
        except POSTGRES_DATA_ERRORS as error:
            # One request's data (its error document, say) fails it alone.
            if len(messages) > 1:
                middle = len(messages) // 2
                await self._settle_batch(messages[:middle])
                await self._settle_batch(messages[middle:])
            else:
                messages[0].reply.fail(error)
            return
        except Exception as error:
            for message in messages:
                message.reply.fail(error)
            return
        await crash_point("settle.after_commit")
        results = [o for o in outcomes if isinstance(o, ledger.SettleResult)]
        assert all(r.tenant_id == self.tenant_id for r in results), "settled another tenant"
        if results:
            await self._mirror_settle(results)
        for message, outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, Exception):
                message.reply.fail(outcome)
            else:
                message.reply.set(outcome)

    async def _mirror_settle(self, results: list[ledger.SettleResult]) -> None:
        """Mirror what Postgres applied *this time*, never a replay: a replay moved
        nothing in Postgres, and its operation marker may be gone (expired, flushed,
        evicted), so re-applying it would count it twice. A settlement whose mirror
        write is lost (a crash between the two writes) leaves the mirror over-holding
        — conservative — until drift repair."""
        applied = [result for result in results if result.applied]
        if not applied:
            return
        versions = {result.budget.ledger_version for result in applied if result.budget}
        assert len(versions) == 1 and all(r.budget for r in applied), "one commit, one version"
        try:
            await self.backend.mirror.settle_many(
                self.tenant_id,
                [
                    (
                        f"settle:{result.run_id}",
                        result.settlement.reserved_usd_micros,
                        result.settlement.charged_usd_micros,
                    )
                    for result in applied
                ],
                versions.pop(),
            )
        except Exception:
            log.warning(
                "could not mirror settlements; drift repair will",
                extra={"tenant_id": self.tenant_id},
                exc_info=True,
            )
