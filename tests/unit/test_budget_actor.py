"""The budget and settlement actors' logic on recording fakes, on asyncio and trio.

The real stores are proven in tests/integration/test_money.py; here the
actors' own decisions are pinned down: what they batch, in which order they
talk to the stores, and what each caller hears.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import pytest
from asyncpg.exceptions import UntranslatableCharacterError

from dpp.actors.budget import (
    BudgetActor,
    BudgetBackend,
    Credit,
    ReservationRejected,
    Reserve,
)
from dpp.actors.kernel import ActorCrashed, Reply
from dpp.actors.settlement import Settle, SettlementActor
from dpp.money import ledger
from dpp.money.ledger import ConcurrencyLimited, DeadlinePassed, InsufficientBudget, Reserved
from dpp.money.mirror import MirrorBudget, MirrorMissing, MirrorReserve, hold_id
from dpp.money.rules import Admission, Budget, Outcome, RunStatus, decide_batch, settle

TENANT = "ten_" + "A" * 26
# a deadline no test reaches (the deadline tests set their own)
LATER = float("inf")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass
class FakeStore:
    """Postgres, as far as the actor can tell: a budget and a call log."""

    balance: int = 10_000
    reserved: int = 0
    max_concurrent_runs: int = 100
    open_runs: int = 0
    calls: list[tuple[str, int]] = field(default_factory=list)
    fail_next_reserve: bool = False
    # the reserve call (1-based) that loses its connection, whatever it carries
    fail_reserve_call: int | None = None
    version: int = 0
    settled: dict[str, ledger.Settlement] = field(default_factory=dict)
    credited: set[str] = field(default_factory=set)
    # run ids whose data Postgres refuses (a NUL in their inputs, say)
    poison: set[str] = field(default_factory=set)
    settle_poison: set[str] = field(default_factory=set)
    # when set, a reserve call waits for it (a reservation's transaction in
    # progress), having set ``reserve_entered``
    reserve_gate: anyio.Event | None = None
    reserve_entered: anyio.Event | None = None

    def _budget(self) -> ledger.TenantBudget:
        return ledger.TenantBudget(self.balance, self.reserved, self.version)

    async def budget(self, tenant_id: str) -> ledger.StoredBudget:
        return ledger.StoredBudget(
            self.balance, self.reserved, self.version, self.max_concurrent_runs
        )

    async def reserve_batch(
        self,
        tenant_id: str,
        drafts: Sequence[ledger.RunDraft],
        deadlines: Sequence[float] | None = None,
    ):
        self.calls.append(("reserve", len(drafts)))
        if self.reserve_gate is not None:
            assert self.reserve_entered is not None
            self.reserve_entered.set()
            await self.reserve_gate.wait()
        reserve_calls = sum(kind == "reserve" for kind, _ in self.calls)
        if self.fail_next_reserve or reserve_calls == self.fail_reserve_call:
            self.fail_next_reserve = False
            raise ConnectionError("postgres went away")
        if any(d.run_id in self.poison for d in drafts):
            raise UntranslatableCharacterError("unsupported Unicode escape sequence")
        decisions, after = decide_batch(
            Budget(self.balance, self.reserved),
            [d.reserved_usd_micros for d in drafts],
            open_runs=self.open_runs,
            max_concurrent_runs=self.max_concurrent_runs,
        )
        self.open_runs += sum(d.admission is Admission.ACCEPTED for d in decisions)
        self.reserved = after.reserved_usd_micros
        self.version += 1
        return ledger.ReserveBatchResult(decisions, self._budget())

    async def settle_batch(self, requests: Sequence[ledger.SettleRequest]):
        self.calls.append(("settle", len(requests)))
        if any(r.run_id in self.settle_poison for r in requests):
            raise UntranslatableCharacterError("unsupported Unicode escape sequence")
        outcomes = []
        if any(request.run_id not in self.settled for request in requests):
            self.version += 1
        for request in requests:
            if request.run_id in self.settled:  # a replay: nothing moves
                previous = self.settled[request.run_id]
                outcomes.append(ledger.SettleResult(request.run_id, TENANT, previous, False, None))
                continue
            settlement = settle(
                request.outcome,
                reserved_usd_micros=1_000,
                minimum_fee_usd_micros=100,
                actual_cost_usd_micros=request.actual_cost_usd_micros,
            )
            self.balance -= settlement.charged_usd_micros
            self.reserved -= settlement.reserved_usd_micros
            self.settled[request.run_id] = settlement
            outcomes.append(
                ledger.SettleResult(request.run_id, TENANT, settlement, True, self._budget())
            )
        return outcomes

    async def credit(self, tenant_id: str, amount: int, operation_id: str):
        self.calls.append(("credit", 1))
        if operation_id in self.credited:
            return ledger.CreditResult(self._budget(), True)
        self.credited.add(operation_id)
        self.balance += amount
        self.version += 1
        return ledger.CreditResult(self._budget(), False)


@dataclass
class FakeMirror:
    """Redis, as far as the actor can tell."""

    budget: MirrorBudget | None = None
    holds: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    # the committed holds each reserve call reported
    reported: list[list[str]] = field(default_factory=list)

    async def reserve(
        self, tenant_id: str, items: Sequence[tuple[str, int]], resolved: Sequence[str] = ()
    ) -> MirrorReserve:
        self.calls.append("reserve")
        if self.budget is None:
            raise MirrorMissing(tenant_id)
        self.reported.append(list(resolved))
        for hold in resolved:
            del self.holds[hold]
        accepted = []
        for operation_id, amount in items:
            fits = self.budget.available_usd_micros >= amount
            if fits:
                self.holds[operation_id] = amount
                self.budget = MirrorBudget(
                    self.budget.balance_usd_micros, self.budget.reserved_usd_micros + amount, 0
                )
            accepted.append(fits)
        return MirrorReserve(accepted, self.budget.available_usd_micros)

    async def resolve_holds(
        self, tenant_id: str, kept: Sequence[str], released: Sequence[tuple[str, int]]
    ) -> None:
        self.calls.append("resolve")
        assert self.budget is not None
        for hold in kept:
            del self.holds[hold]
        given_back = sum(amount for hold, amount in released if self.holds.pop(hold, None))
        self.budget = MirrorBudget(
            self.budget.balance_usd_micros, self.budget.reserved_usd_micros - given_back, 0
        )

    async def settle_many(
        self, tenant_id: str, items: Sequence[tuple[str, int, int]], ledger_version: int
    ) -> bool:
        self.calls.append(f"settle:{len(items)}")
        return True

    async def credit(
        self, tenant_id: str, operation_id: str, amount: int, ledger_version: int
    ) -> bool:
        self.calls.append("credit")
        return True

    async def load(self, tenant_id: str, balance: int, reserved: int, version: int) -> bool:
        self.calls.append("load")
        if self.budget is not None:
            return False
        self.budget = MirrorBudget(balance, reserved, version)
        return True

    async def read(self, tenant_id: str) -> MirrorBudget | None:
        return self.budget


def draft(amount: int = 1_000) -> ledger.RunDraft:
    from dpp.ids import new_id

    return ledger.RunDraft(
        run_id=new_id("run"),
        pack_type="echo",
        inputs={},
        metadata={},
        reserved_usd_micros=amount,
        minimum_fee_usd_micros=100,
        timebox_sec=30,
        trace_id=None,
        created_at=datetime.now(UTC),
    )


async def run_actor(store: FakeStore, mirror: FakeMirror, messages: list) -> None:
    """Queue every message first, then let the actor drain them (so it may batch):
    the tenant's settlement actor for settlements, its budget actor otherwise."""
    backend = BudgetBackend(store, mirror)
    actor: BudgetActor | SettlementActor
    if messages and all(isinstance(message, Settle) for message in messages):
        actor = SettlementActor(TENANT, backend)
    else:
        assert not any(isinstance(message, Settle) for message in messages)
        actor = BudgetActor(TENANT, backend)
    for message in messages:
        actor.ref.tell_nowait(message)
    async with anyio.create_task_group() as group:
        await group.start(actor.run)
        actor.stop()


async def test_queued_reservations_commit_as_one_batch() -> None:
    store, mirror = FakeStore(), FakeMirror()
    replies = [Reply() for _ in range(5)]
    await run_actor(store, mirror, [Reserve(draft(), r, LATER) for r in replies])
    assert store.calls == [("reserve", 5)]
    assert mirror.calls == ["load", "reserve", "resolve"]  # the mirror was lost: rebuilt first
    outcomes = [await r.wait() for r in replies]
    assert all(isinstance(o, Reserved) for o in outcomes)


async def test_a_credit_keeps_its_place_between_reservation_batches() -> None:
    store, mirror = FakeStore(), FakeMirror()
    messages = [
        Reserve(draft(), Reply(), LATER),
        Reserve(draft(), Reply(), LATER),
        Credit(5_000, "credit:x", Reply()),
        Reserve(draft(), Reply(), LATER),
    ]
    await run_actor(store, mirror, messages)
    assert store.calls == [("reserve", 2), ("credit", 1), ("reserve", 1)]
    # the first batch's commit rides on the next reserve call; the last one is
    # reported when the actor stops
    assert mirror.calls == ["load", "reserve", "credit", "reserve", "resolve"]
    assert store.balance == 10_000 + 5_000
    assert store.reserved == 3 * 1_000


async def test_queued_settlements_commit_as_one_batch_mirrored_once() -> None:
    store = FakeStore(reserved=3_000)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 3_000, 0))
    runs = [draft() for _ in range(3)]
    replies = [Reply() for _ in runs]
    outcomes = [Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELED]
    await run_actor(
        store,
        mirror,
        [
            Settle(ledger.SettleRequest(run.run_id, outcome, 300), reply)
            for run, outcome, reply in zip(runs, outcomes, replies, strict=True)
        ],
    )
    assert store.calls == [("settle", 3)]
    assert mirror.calls == ["settle:3"]  # no rebuild: a missing mirror skips settlements
    results = [await reply.wait() for reply in replies]
    assert all(result.applied for result in results)
    assert store.balance == 10_000 - 300 - 100 - 0
    assert store.reserved == 0


async def test_a_settlement_never_waits_behind_its_tenants_reservation() -> None:
    """A reservation's transaction in progress holds up its budget actor only: the
    tenant's settlement actor commits and answers meanwhile (they meet only on the
    tenant row in Postgres, which orders them whichever comes first)."""
    gate, entered = anyio.Event(), anyio.Event()
    store = FakeStore(reserved=1_000, reserve_gate=gate, reserve_entered=entered)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 1_000, 0))
    backend = BudgetBackend(store, mirror)
    budget, settlement = BudgetActor(TENANT, backend), SettlementActor(TENANT, backend)
    settled = draft()
    async with anyio.create_task_group() as group:
        await group.start(budget.run)
        await group.start(settlement.run)
        reserving: Reply = Reply()
        budget.ref.tell_nowait(Reserve(draft(), reserving, LATER))
        with anyio.fail_after(5):
            await entered.wait()  # the reservation is in its transaction
            result = await settlement.ref.ask(
                lambda reply: Settle(ledger.SettleRequest(settled.run_id, Outcome.FAILED), reply),
                timeout_s=5,
            )
        assert result.applied
        assert store.calls == [("reserve", 1), ("settle", 1)]
        assert not reserving.done
        gate.set()
        with anyio.fail_after(5):
            assert isinstance(await reserving.wait(), Reserved)
        budget.stop()
        settlement.stop()
    assert store.reserved == 1_000  # one reserved, one released
    assert store.balance == 10_000 - 100


async def test_committed_holds_are_reported_with_the_next_reserve_call() -> None:
    """A commit moves no money in the mirror (the hold is already reserved), so
    its report waits for the next script call instead of costing one; holds to
    give back never wait."""
    store = FakeStore()
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    first, second = draft(), draft()
    actor = BudgetActor(TENANT, BudgetBackend(store, mirror))
    async with anyio.create_task_group() as group:
        await group.start(actor.run)
        assert isinstance(
            await actor.ref.ask(lambda r: Reserve(first, r, LATER), timeout_s=5), Reserved
        )
        assert mirror.holds == {hold_id(first.run_id): 1_000}  # still pending
        assert isinstance(
            await actor.ref.ask(lambda r: Reserve(second, r, LATER), timeout_s=5), Reserved
        )
        assert mirror.reported == [[], [hold_id(first.run_id)]]
        assert mirror.holds == {hold_id(second.run_id): 1_000}
        actor.stop()
    assert mirror.calls == ["load", "reserve", "reserve", "resolve"]
    assert mirror.holds == {}  # reported when the actor stopped
    assert mirror.budget == MirrorBudget(10_000, 2_000, 0)


async def test_what_the_mirror_refuses_never_reaches_postgres() -> None:
    store = FakeStore(balance=1_500)
    mirror = FakeMirror(budget=MirrorBudget(1_500, 0, 0))
    replies = [Reply(), Reply()]
    await run_actor(store, mirror, [Reserve(draft(1_000), r, LATER) for r in replies])
    accepted, refused = [await r.wait() for r in replies]
    assert isinstance(accepted, Reserved)
    assert refused == InsufficientBudget(available_usd_micros=500, required_usd_micros=1_000)
    assert store.calls == [("reserve", 1)]


async def test_postgres_refusal_releases_the_mirror_hold() -> None:
    # the mirror is optimistic (e.g. rebuilt while another replica reserved)
    store = FakeStore(balance=1_000, reserved=1_000)
    mirror = FakeMirror(budget=MirrorBudget(1_000, 0, 0))
    reply: Reply = Reply()
    await run_actor(store, mirror, [Reserve(draft(1_000), reply, LATER)])
    outcome = await reply.wait()
    assert outcome == InsufficientBudget(available_usd_micros=0, required_usd_micros=1_000)
    assert mirror.calls[-1] == "resolve"
    assert mirror.budget == MirrorBudget(1_000, 0, 0)


async def test_the_plan_limit_answers_concurrency_limited() -> None:
    store = FakeStore(max_concurrent_runs=1, open_runs=1)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    reply: Reply = Reply()
    await run_actor(store, mirror, [Reserve(draft(), reply, LATER)])
    assert await reply.wait() == ConcurrencyLimited(max_concurrent_runs=1)
    assert mirror.budget.reserved_usd_micros == 0  # hold released


async def test_a_failed_commit_releases_holds_tells_callers_and_crashes() -> None:
    store = FakeStore(fail_next_reserve=True)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    replies = [Reply(), Reply()]
    actor = BudgetActor(TENANT, BudgetBackend(store, mirror))
    for reply in replies:
        actor.ref.tell_nowait(Reserve(draft(), reply, LATER))
    with pytest.raises(BaseException) as raised:  # the actor crashes for its supervisor
        async with anyio.create_task_group() as group:
            await group.start(actor.run)
    assert isinstance(raised.value, ConnectionError) or raised.group_contains(ConnectionError)
    for reply in replies:
        with pytest.raises(ActorCrashed):
            await reply.wait()
    assert mirror.budget == MirrorBudget(10_000, 0, 0)  # holds given back


async def test_replayed_settlements_and_credits_never_reach_the_mirror() -> None:
    """Only what Postgres applied this time is mirrored: a replay's operation marker
    may be long gone in Redis, so sending it there would count it twice."""
    store, mirror = FakeStore(), FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    run = draft()
    cancel = ledger.SettleRequest(
        run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
    )
    first, again = Reply(), Reply()
    await run_actor(
        store, mirror, [Reserve(run, Reply(), LATER), Credit(5_000, "credit:y", Reply())]
    )
    await run_actor(store, mirror, [Settle(cancel, first)])
    await run_actor(store, mirror, [Settle(cancel, again)])
    await run_actor(store, mirror, [Credit(5_000, "credit:y", Reply())])
    assert (await first.wait()).applied and not (await again.wait()).applied
    # the reservation's commit is reported when the first actor stops
    assert mirror.calls == ["load", "reserve", "credit", "resolve", "settle:1", "load"]
    assert store.calls[-2:] == [("settle", 1), ("credit", 1)]  # Postgres did see the replays


async def test_a_reservation_queued_past_its_deadline_touches_neither_store() -> None:
    """Its caller was told to retry: committing it late could charge twice."""
    store = FakeStore()
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    late, timely = Reply(), Reply()
    past = anyio.current_time() - 1
    await run_actor(store, mirror, [Reserve(draft(), late, past), Reserve(draft(), timely, LATER)])
    with anyio.fail_after(5):  # every caller is answered
        assert await late.wait() == DeadlinePassed()
        assert isinstance(await timely.wait(), Reserved)
    assert store.calls == [("reserve", 1)]
    assert mirror.budget == MirrorBudget(10_000, 1_000, 0)  # no hold for the late one


async def test_deadlines_reach_the_store_with_their_drafts() -> None:
    seen: list[Sequence[float] | None] = []

    class Recording(FakeStore):
        async def reserve_batch(self, tenant_id, drafts, deadlines=None):
            seen.append(deadlines)
            return await super().reserve_batch(tenant_id, drafts, deadlines)

    deadline = anyio.current_time() + 60
    await run_actor(
        Recording(),
        FakeMirror(budget=MirrorBudget(10_000, 0, 0)),
        [Reserve(draft(), Reply(), deadline)],
    )
    assert seen == [[deadline]]


async def test_a_data_error_fails_its_own_draft_alone_and_the_rest_commit() -> None:
    """Postgres refusing one draft's data is that request's answer, not the batch's:
    the batch is bisected down to the culprit, whose hold is given back; the others
    commit, and the actor never crashes."""
    store = FakeStore()
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    drafts = [draft() for _ in range(5)]
    store.poison = {drafts[3].run_id}
    replies = [Reply() for _ in drafts]
    after = Reply()
    admitted: list[str] = []
    actor = BudgetActor(TENANT, BudgetBackend(store, mirror, admitted.extend))
    for d, reply in zip(drafts, replies, strict=True):
        actor.ref.tell_nowait(Reserve(d, reply, LATER))
    actor.ref.tell_nowait(Credit(1, "credit:after", after))
    async with anyio.create_task_group() as group:
        await group.start(actor.run)  # raises if the actor crashed
        actor.stop()
    outcomes = []
    for reply in replies:
        try:
            outcomes.append(await reply.wait())
        except ReservationRejected as rejected:
            outcomes.append(rejected)
    assert [type(o) for o in outcomes] == [
        Reserved,
        Reserved,
        Reserved,
        ReservationRejected,
        Reserved,
    ]
    assert admitted == [d.run_id for i, d in enumerate(drafts) if i != 3]
    # 5 -> [2, 3] -> 3 -> [1, 2] -> 2 -> [1, 1]: the culprit alone, in log2 steps
    assert store.calls[:6] == [
        ("reserve", 5),
        ("reserve", 2),
        ("reserve", 3),
        ("reserve", 1),
        ("reserve", 2),
        ("reserve", 1),
    ]
    assert store.reserved == 4 * 1_000
    assert mirror.budget == MirrorBudget(10_000, 4 * 1_000, 0)  # the culprit's hold is back
    assert isinstance(await after.wait(), ledger.CreditResult)


async def test_a_lost_connection_after_a_committed_slice_gives_back_only_the_rest() -> None:
    """A data error splits the batch; the first half commits; the second half's
    commit loses its connection. The committed half keeps its holds in the mirror
    and its callers' answers; only the unanswered half is given back and told the
    outcome is unknown (the mirror must not under-hold what Postgres reserved)."""
    store = FakeStore(fail_reserve_call=3)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 0, 0))
    drafts = [draft() for _ in range(4)]
    store.poison = {drafts[3].run_id}
    replies = [Reply() for _ in drafts]
    actor = BudgetActor(TENANT, BudgetBackend(store, mirror))
    for d, reply in zip(drafts, replies, strict=True):
        actor.ref.tell_nowait(Reserve(d, reply, LATER))
    with pytest.raises(BaseException) as raised:  # the actor crashes for its supervisor
        async with anyio.create_task_group() as group:
            await group.start(actor.run)
    assert isinstance(raised.value, ConnectionError) or raised.group_contains(ConnectionError)
    # 4 -> [2, 2]: the first half commits, the second's connection is lost
    assert store.calls == [("reserve", 4), ("reserve", 2), ("reserve", 2)]
    for reply in replies[:2]:
        assert isinstance(await reply.wait(), Reserved)
    for reply in replies[2:]:
        with pytest.raises(ActorCrashed):
            await reply.wait()
    assert store.reserved == 2 * 1_000
    assert mirror.budget == MirrorBudget(10_000, 2 * 1_000, 0)
    assert mirror.holds == {}  # the committed holds resolved as kept, the rest given back


async def test_a_data_error_in_a_settlement_fails_that_settlement_alone() -> None:
    store = FakeStore(reserved=2_000)
    mirror = FakeMirror(budget=MirrorBudget(10_000, 2_000, 0))
    good, bad = draft(), draft()
    store.settle_poison = {bad.run_id}
    replies = [Reply(), Reply()]
    messages = [
        Settle(ledger.SettleRequest(good.run_id, Outcome.FAILED), replies[0]),
        Settle(ledger.SettleRequest(bad.run_id, Outcome.FAILED), replies[1]),
    ]
    await run_actor(store, mirror, messages)
    assert isinstance(await replies[0].wait(), ledger.SettleResult)
    with pytest.raises(UntranslatableCharacterError):
        await replies[1].wait()
    assert store.calls == [("settle", 2), ("settle", 1), ("settle", 1)]
