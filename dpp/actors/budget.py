"""Budget actors: one per active tenant per replica, admitting its runs.

A budget actor drains its mailbox and commits consecutive reservations as one
batch: one Redis round trip (hold what fits in the mirror) and one Postgres
transaction (the truth), answering each caller individually. Credits go
through the same actor, in their place between reservation batches. A
tenant's settlements have an actor of their own (``dpp.actors.settlement``),
so admission never waits behind a settle batch; why their order against the
reservations does not matter is said there.

Write order for a reservation (docs/money.md has the crash table):
  1. Redis hold (script, keyed by ``reserve:<run_id>``, recorded pending)
                                                              crash → mirror over-holds
  2. Postgres: run rows + reserve entries + tenant counter    crash → rolled back
  3. Redis: resolve the holds: refused ones are given back at once (a call of
     its own); committed ones stop being pending with this actor's next
     script call (the next batch's hold, or a resolve when a batch has holds
     to give back or the actor stops)                         crash → drift repair
  4. reply 202                                                crash → idempotent retry
A pending hold is never taken for drift, however long its commit takes; one
leaked by a crash between 1 and 3 (or whose commit was not reported before a
crash) is settled by drift repair (the reconciler): dropped once abandoned,
forgotten once found committed. Reporting a commit moves no money in the
mirror (the hold is already in ``reserved``), which is why it may wait for
the next call; a refusal gives money back, so it never waits.

Every Reserve carries its caller's deadline (when the ask times out and the
caller is told to retry). A message still queued past it -- behind a slow
batch, or across a restart of this actor -- is answered ``DeadlinePassed``
without touching either store, and the ledger bounds the transaction by the
time left, so a reservation never commits long after its caller gave up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never

import anyio

from dpp import tracing
from dpp.actors.kernel import Actor, ActorCrashed, Reply
from dpp.adapters.postgres import POSTGRES_DATA_ERRORS
from dpp.faults import crash_point
from dpp.limits import BUDGET_BATCH_MAX, BUDGET_MAILBOX_SIZE
from dpp.logs import bind_only
from dpp.money import ledger
from dpp.money.ledger import (
    ConcurrencyLimited,
    DeadlinePassed,
    InsufficientBudget,
    KeySpendLimited,
    Reserved,
    ReserveOutcome,
)
from dpp.money.mirror import MirrorBudget, MirrorMissing, MirrorReserve, hold_id
from dpp.money.rules import Admission, AdmissionDecision

log = logging.getLogger("dpp.budget")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Reserve:
    draft: ledger.RunDraft
    reply: Reply[ReserveOutcome]
    # anyio.current_time() at which the caller stops waiting: past it, refused
    deadline: float
    # the sender's span, taken where the message is made (in the asking task):
    # the batch that serves it links to it (dpp.tracing; None when tracing is off)
    span: tracing.SpanContext | None = field(default_factory=tracing.current_span_context)


@dataclass(frozen=True, slots=True)
class Credit:
    amount_usd_micros: int
    operation_id: str
    reply: Reply[ledger.CreditResult]


BudgetMessage = Reserve | Credit


class ReservationRejected(Exception):
    """Postgres refused this reservation's data (its inputs or metadata); nothing
    was written for it. The request's fault: retrying it fails the same way."""


@dataclass(slots=True)
class _CommitProgress:
    """One reservation batch on its way to Postgres, perhaps in slices."""

    admitted: list[str] = field(default_factory=list)
    # messages whose hold is committed or already given back (by identity)
    _accounted: set[int] = field(default_factory=set)

    def account_for(self, messages: list[Reserve]) -> None:
        self._accounted.update(id(message) for message in messages)

    def accounted_for(self, message: Reserve) -> bool:
        return id(message) in self._accounted


class BudgetStore(Protocol):
    """The durable truth (Postgres: ``dpp.money.ledger.LedgerStore``); the budget
    actor reserves and credits, the settlement actor settles."""

    async def budget(self, tenant_id: str) -> ledger.StoredBudget: ...

    async def reserve_batch(
        self,
        tenant_id: str,
        drafts: Sequence[ledger.RunDraft],
        deadlines: Sequence[float] | None = None,
    ) -> ledger.ReserveBatchResult: ...

    async def settle_batch(
        self, requests: Sequence[ledger.SettleRequest]
    ) -> list[ledger.SettleOutcome]: ...

    async def credit(
        self, tenant_id: str, amount_usd_micros: int, operation_id: str
    ) -> ledger.CreditResult: ...


class MirrorStore(Protocol):
    """The fast path (Redis: ``dpp.money.mirror.BudgetMirror``); ``settle_many`` is
    the settlement actor's."""

    async def reserve(
        self, tenant_id: str, items: Sequence[tuple[str, int]], resolved: Sequence[str] = ()
    ) -> MirrorReserve: ...

    async def resolve_holds(
        self, tenant_id: str, kept: Sequence[str], released: Sequence[tuple[str, int]]
    ) -> None: ...

    async def settle_many(
        self, tenant_id: str, items: Sequence[tuple[str, int, int]], ledger_version: int
    ) -> bool: ...

    async def credit(
        self, tenant_id: str, operation_id: str, amount_usd_micros: int, ledger_version: int
    ) -> bool: ...

    async def load(self, tenant_id: str, balance: int, reserved: int, version: int) -> bool: ...

    async def read(self, tenant_id: str) -> MirrorBudget | None: ...


@dataclass(frozen=True, slots=True)
class BudgetBackend:
    """What a tenant's budget and settlement actors touch, as two small ports:
    their logic runs unchanged on recording fakes (tests/unit, asyncio and trio)
    and on the real stores."""

    store: BudgetStore
    mirror: MirrorStore
    # told after a commit which runs were admitted (wakes the dispatcher)
    on_admitted: Callable[[Sequence[str]], None] = lambda run_ids: None
    # told the size of each group commit: ("reservation" | "settlement", size)
    on_batch: Callable[[str, int], None] = lambda kind, size: None


class BudgetActor(Actor[BudgetMessage]):
    kind = "budget"

    def __init__(
        self, tenant_id: str, backend: BudgetBackend, *, batch_max: int = BUDGET_BATCH_MAX
    ) -> None:
        super().__init__(
            name=f"budget:{tenant_id}", mailbox_size=BUDGET_MAILBOX_SIZE, batch_max=batch_max
        )
        self.tenant_id = tenant_id
        self.backend = backend
        # hold ids Postgres committed whose mirror entry is still pending: reported
        # with the next reserve script call (or a resolve), not a call of their own
        self._unreported: list[str] = []

    async def run(self, **kwargs: Any) -> None:
        # started on demand from some request's task: drop that request's ids
        with bind_only(tenant_id=self.tenant_id):
            await super().run(**kwargs)

    async def on_start(self) -> None:
        await self.ensure_mirror()

    async def on_stop(self) -> None:
        # committed holds not reported yet stop being pending now (drift repair
        # would forget them anyway, once it finds them committed)
        await self._resolve_holds_quietly([], [], flush=True)

    async def ensure_mirror(self) -> None:
        """Rebuild the Redis counters from Postgres if Redis lost them."""
        stored = await self.backend.store.budget(self.tenant_id)
        loaded = await self.backend.mirror.load(
            self.tenant_id,
            stored.balance_usd_micros,
            stored.reserved_usd_micros,
            stored.ledger_version,
        )
        if loaded:
            log.info("budget mirror rebuilt from postgres", extra={"tenant_id": self.tenant_id})

    async def handle(self, message: BudgetMessage) -> None:
        await self.handle_batch([message])

    async def handle_batch(self, messages: list[BudgetMessage]) -> None:
        """Commit each run of consecutive reservations as one batch; a credit
        keeps its place between them (it splits the drain)."""
        reserves: list[Reserve] = []
        for message in messages:
            if isinstance(message, Reserve):
                reserves.append(message)
            else:
                await self._flush(reserves)
                reserves = []
                await self._handle_one(message)
        await self._flush(reserves)

    async def _flush(self, reserves: list[Reserve]) -> None:
        if not reserves:
            return
        self.backend.on_batch("reservation", len(reserves))
        with tracing.batch_span("dpp.budget.reserve_batch", [m.span for m in reserves]):
            await self._reserve_batch(reserves)

    async def _handle_one(self, message: Credit) -> None:
        match message:
            case Credit(amount_usd_micros=amount, operation_id=operation_id, reply=reply):
                await self._credit(amount, operation_id, reply)
            case _:
                assert_never(message)

    # ------------------------------------------------------------ reserve

    async def _mirror_reserve(self, items: list[tuple[str, int]]) -> MirrorReserve:
        """Hold ``items``, reporting the committed holds not reported yet in the
        same script call."""
        resolved = list(self._unreported)
        try:
            held = await self.backend.mirror.reserve(self.tenant_id, items, resolved)
        except MirrorMissing:
            # the rebuild starts with no pending holds: nothing left to report
            await self.ensure_mirror()
            held = await self.backend.mirror.reserve(self.tenant_id, items, resolved)
        del self._unreported[: len(resolved)]
        return held

    async def _reserve_batch(self, messages: list[Reserve]) -> None:
        now = anyio.current_time()
        for message in messages:
            if now >= message.deadline:
                # its caller was told to retry: committing it now could charge twice
                message.reply.set(DeadlinePassed())
        messages = [message for message in messages if now < message.deadline]
        if not messages:
            return
        items = [(hold_id(m.draft.run_id), m.draft.reserved_usd_micros) for m in messages]
        try:
            held = await self._mirror_reserve(items)
        except Exception as error:
            for message in messages:
                message.reply.fail(error)
            return
        pending: list[Reserve] = []
        # what the mirror had left after this batch, from the same script call
        available = max(held.available_usd_micros, 0)
        for message, accepted in zip(messages, held.accepted, strict=True):
            if accepted:
                pending.append(message)
            else:
                # The mirror never under-states what is reserved except briefly
                # after a rebuild; Postgres would refuse an overspend anyway.
                message.reply.set(InsufficientBudget(available, message.draft.reserved_usd_micros))
        if not pending:
            return
        await crash_point("reserve.after_redis_hold")
        batch = _CommitProgress()
        try:
            await self._commit(pending, batch)
        except BaseException as error:
            # Most likely nothing of the failed slice was committed (a failed
            # commit can still have landed, which Postgres then holds and drift
            # repair reconciles in the mirror); slices not reached were not: give
            # their holds back, tell the callers the outcome is unknown, and crash
            # so the supervisor restarts us clean.
            unaccounted = [m for m in pending if not batch.accounted_for(m)]
            await self._release_quietly(unaccounted)
            if isinstance(error, Exception):
                for message in unaccounted:
                    crashed = ActorCrashed(f"{self.name} failed while reserving; outcome unknown")
                    crashed.__cause__ = error
                    message.reply.fail(crashed)
            raise
        finally:
            if batch.admitted:
                self.backend.on_admitted(batch.admitted)

    async def _commit(self, pending: list[Reserve], batch: _CommitProgress) -> None:
        """Commit ``pending`` (holds taken) as one transaction and answer each caller.

        A data error (Postgres refuses a value of some draft) is the input's
        fault, not the batch's: the batch is split in halves and each retried,
        down to the one draft at fault, whose caller alone hears
        ``ReservationRejected``; the rest commit. Anything else (the connection,
        a bug) propagates: the outcome of every draft not answered is unknown.
        """
        try:
            result = await self.backend.store.reserve_batch(
                self.tenant_id, [m.draft for m in pending], [m.deadline for m in pending]
            )
        except POSTGRES_DATA_ERRORS as error:
            # The transaction rolled back: nothing of this slice was written.
            if len(pending) > 1:
                middle = len(pending) // 2
                await self._commit(pending[:middle], batch)
                await self._commit(pending[middle:], batch)
                return
            (message,) = pending
            await self._release_quietly(pending)
            batch.account_for(pending)
            log.warning(
                "postgres refused a reservation's data; answered to its request alone",
                extra={
                    "tenant_id": self.tenant_id,
                    "run_id": message.draft.run_id,
                    "error": type(error).__name__,
                },
            )
            message.reply.fail(ReservationRejected(type(error).__name__))
            return
        kept: list[Reserve] = []
        refused: list[Reserve] = []
        for message, ok in zip(pending, result.accepted(), strict=True):
            # withdrawn drafts (key not held, deadline passed) are refused too
            (kept if ok else refused).append(message)
        # committed (kept) or refused (given back): no hold of this slice is left open
        batch.account_for(pending)
        await self._resolve_holds_quietly(kept, refused)
        await crash_point("reserve.after_commit")
        for message, decision in zip(pending, result.decisions, strict=True):
            if not isinstance(decision, AdmissionDecision):
                message.reply.set(decision)  # withdrawn: nothing reserved
                continue
            match decision.admission:
                case Admission.ACCEPTED:
                    assert result.budget is not None, "a commit reads the budget"
                    batch.admitted.append(message.draft.run_id)
                    message.reply.set(Reserved(message.draft.run_id, result.budget))
                case Admission.INSUFFICIENT_BUDGET:
                    message.reply.set(
                        InsufficientBudget(
                            decision.available_usd_micros, message.draft.reserved_usd_micros
                        )
                    )
                case Admission.KEY_SPEND_LIMIT:
                    spend = decision.key_spend
                    assert spend is not None and spend.spend_limit_usd_micros is not None
                    message.reply.set(
                        KeySpendLimited(
                            spend.spend_limit_usd_micros,
                            spend.spent_usd_micros,
                            message.draft.reserved_usd_micros,
                        )
                    )
                case Admission.CONCURRENCY_LIMITED:
                    stored = await self.backend.store.budget(self.tenant_id)
                    message.reply.set(ConcurrencyLimited(stored.max_concurrent_runs))
                case _:
                    assert_never(decision.admission)

    async def _release_quietly(self, messages: list[Reserve]) -> None:
        await self._resolve_holds_quietly([], messages)

    async def _resolve_holds_quietly(
        self, kept: list[Reserve], released: list[Reserve], *, flush: bool = False
    ) -> None:
        """Report a commit back to the mirror: released holds are given back at
        once (with the kept ones not reported yet); kept holds alone wait for
        the next script call (they move no money), unless ``flush``."""
        self._unreported.extend(hold_id(m.draft.run_id) for m in kept)
        if not released and not (flush and self._unreported):
            return
        reported = list(self._unreported)
        del self._unreported[: len(reported)]
        try:
            await self.backend.mirror.resolve_holds(
                self.tenant_id,
                reported,
                [(hold_id(m.draft.run_id), m.draft.reserved_usd_micros) for m in released],
            )
        except Exception:
            # Pending holds stay pending: the mirror over-holds (conservative)
            # until drift repair finds them committed or abandoned.
            log.warning(
                "could not resolve redis holds", extra={"tenant_id": self.tenant_id}, exc_info=True
            )

    # ------------------------------------------------------------- credit

    async def _credit(
        self, amount: int, operation_id: str, reply: Reply[ledger.CreditResult]
    ) -> None:
        try:
            result = await self.backend.store.credit(self.tenant_id, amount, operation_id)
        except Exception as error:
            reply.fail(error)
            return
        if result.replayed:
            # Postgres added nothing this time: neither does the mirror (its
            # marker for the first application may be long gone).
            reply.set(result)
            return
        try:
            await self.backend.mirror.credit(
                self.tenant_id, operation_id, amount, result.budget.ledger_version
            )
        except Exception:
            log.warning(
                "could not mirror a credit; drift repair will",
                extra={"tenant_id": self.tenant_id},
                exc_info=True,
            )
        reply.set(result)
