"""Idempotency keys have owners: a late holder can neither reserve nor store, and a
request that did not commit releases its key at once (issue 9 hole 1, issue 12).

Against real Postgres and Redis. A reservation is delayed the way production
delays one -- a tenant row lock held by another transaction, a statement
waiting on another's uncommitted row -- by a second connection the test holds.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from dpp.actors import budgets as budgets_module
from dpp.actors.budgets import Budgets
from dpp.adapters.postgres import Pool, create_pool
from dpp.app import Adapters
from dpp.faults import armed, disarm_all
from dpp.metrics import Metrics
from dpp.money import ledger
from dpp.money.ledger import (
    ConcurrencyLimited,
    DeadlinePassed,
    KeyNotHeld,
    Reserved,
    ReserveOutcome,
    RunDraft,
)
from dpp.money.rules import Admission as Decision
from dpp.money.rules import AdmissionDecision
from dpp.runs.admission import (
    Admission,
    BudgetShort,
    ConcurrencyLimit,
    KeyTakenOver,
    ReservationBusy,
    ReservationExpired,
    ReservationOutcomeUnknown,
    ReservationTimedOut,
)
from dpp.runs.idempotency import (
    Held,
    IdempotencyKeys,
    InFlight,
    Proceed,
    Replay,
    Scope,
    request_fingerprint,
)
from dpp.runs.submission import SubmitRequest, parse_submit
from tests.integration.test_runs_api import ECHO, _tenant
from tests.moneykit import create_tenant, draft, open_replica

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _disarmed() -> Any:
    yield
    disarm_all()


async def _until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll an async condition with a bounded deadline (no fixed sleeps)."""
    with anyio.fail_after(WAIT_S):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.02)


async def _lock_waiters(pool: Pool) -> int:
    """Statements of this test's database waiting for a lock."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return count


@contextlib.asynccontextmanager
async def _holding(url: str, *statements: tuple[str, Any]) -> AsyncIterator[Callable[[], Any]]:
    """Run ``statements`` in a transaction another connection keeps open (its row
    locks held) until the yielded ``end`` is awaited or the block exits."""
    connection = await asyncpg.connect(url)
    transaction = connection.transaction()
    await transaction.start()
    ended = False

    async def end() -> None:
        nonlocal ended
        if not ended:
            ended = True
            await transaction.rollback()

    try:
        for statement, *args in statements:
            await connection.execute(statement, *args)
        yield end
    finally:
        await end()
        await connection.close()


def _tenant_lock(tenant_id: str) -> tuple[str, Any]:
    return ("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)


async def _runs_of(pool: Pool, tenant_id: str) -> list[str]:
    rows = await pool.fetch("SELECT id FROM runs WHERE tenant_id = $1", tenant_id)
    return [row["id"] for row in rows]


async def _age_key(pool: Pool, tenant_id: str) -> None:
    """The holder's 60 s lock runs out (as it would while its reservation waits)."""
    await pool.execute(
        "UPDATE idempotency_keys SET locked_until = now() - interval '1 second'"
        " WHERE tenant_id = $1",
        tenant_id,
    )


async def _owner(pool: Pool, tenant_id: str) -> uuid.UUID | None:
    owner: uuid.UUID | None = await pool.fetchval(
        "SELECT owner_token FROM idempotency_keys WHERE tenant_id = $1", tenant_id
    )
    return owner


# ------------------------------------------------ hole 1: one key, two runs


async def test_a_reservation_delayed_past_a_takeover_is_refused_and_only_the_retry_is_charged(
    adapters: Adapters, database_url: str
) -> None:
    """Where hole 1 can still open: a request that holds its key through
    ``begin`` (its key had a record, so its reservation could not claim it)
    waits for the tenant row past the key's lock, and a retry takes the key
    over. The late reservation locks the key, finds it no longer its own, and
    reserves nothing; the retry's reserves once."""
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    keys = IdempotencyKeys(pool, queries)
    scope = Scope(tenant_id, "POST", "/v1/runs", "slow-1")
    first = await keys.begin(scope, b"f" * 32)
    assert isinstance(first, Proceed)

    def keyed(owner: uuid.UUID, body: bytes) -> RunDraft:
        completion = ledger.IdempotencyCompletion(
            "POST", "/v1/runs", "slow-1", owner, 202, {"Content-Type": "x"}, body
        )
        return replace(draft(1_000), idempotency=completion)

    late = keyed(first.held.owner, b"first")
    results: dict[str, Any] = {}

    async def reserve() -> None:
        results["late"] = await ledger.reserve_batch(pool, queries, tenant_id, [late])

    async with (
        _holding(database_url, _tenant_lock(tenant_id)) as unlock,
        anyio.create_task_group() as group,
    ):
        group.start_soon(reserve)
        # the first request's reservation waits for the tenant row...
        await _until(lambda: _lock_waiters_at_least(pool, 1))
        # ...past its key's lock, and the client's retry takes the key over
        await _age_key(pool, tenant_id)
        retry = await keys.begin(scope, b"f" * 32)
        assert isinstance(retry, Proceed) and retry.held.owner != first.held.owner
        await unlock()  # the first reservation goes on: it must not commit
    assert results["late"].decisions == [KeyNotHeld()]
    retried = keyed(retry.held.owner, b"retry")
    assert (await ledger.reserve_batch(pool, queries, tenant_id, [retried])).accepted() == [True]
    assert await _runs_of(pool, tenant_id) == [retried.run_id]
    reserves = await pool.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE tenant_id = $1 AND kind = 'reserve'", tenant_id
    )
    assert reserves == 1
    replay = await keys.begin(scope, b"f" * 32)
    assert isinstance(replay, Replay) and replay.body == b"retry"


async def test_a_retry_sent_while_the_first_reservation_waits_answers_the_first_run(
    http: httpx.AsyncClient, runtime: Any, admin_headers: dict[str, str], database_url: str
) -> None:
    """The same race over HTTP, as it plays now that a first submit's key is
    recorded by its reservation (migration 0008): no record exists while the
    reservation waits, so no retry can take it over; the retry's reservation
    comes after, finds the key recorded, and replays the first run."""
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    pool = runtime.adapters.pool
    headers = {**key, "Idempotency-Key": "slow-2"}
    answers: dict[str, httpx.Response] = {}

    async def submit(name: str) -> None:
        answers[name] = await http.post("/v1/runs", json=ECHO, headers=headers)

    async with (
        _holding(database_url, _tenant_lock(tenant_id)) as unlock,
        anyio.create_task_group() as group,
    ):
        group.start_soon(submit, "first")
        await _until(lambda: _lock_waiters_at_least(pool, 1))
        assert await _owner(pool, tenant_id) is None  # not recorded before its commit
        group.start_soon(submit, "retry")
        await anyio.sleep(0.05)  # the retry's reservation queues behind the first's
        await unlock()
    first, retry = answers["first"], answers["retry"]
    assert first.status_code == 202, first.text
    assert retry.status_code == 202, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    assert await _runs_of(pool, tenant_id) == [first.json()["id"]]
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == first.json()["reserved_usd_micros"]


async def _lock_waiters_at_least(pool: Pool, count: int) -> bool:
    return await _lock_waiters(pool) >= count


async def test_only_the_owner_completes_or_releases_a_key(adapters: Adapters) -> None:
    """The 402 variant: a holder whose key was taken over stores nothing."""
    keys = IdempotencyKeys(adapters.pool, adapters.queries)
    scope = Scope("ten_owners", "POST", "/v1/runs", "k")
    first = await keys.begin(scope, b"f" * 32)
    assert isinstance(first, Proceed)
    assert isinstance(await keys.begin(scope, b"f" * 32), InFlight)
    await _age_key(adapters.pool, "ten_owners")
    retry = await keys.begin(scope, b"f" * 32)
    assert isinstance(retry, Proceed) and retry.held.owner != first.held.owner
    # the late holder can neither store its 402 nor release the retry's record
    assert not await keys.complete(first.held, 402, {"Content-Type": "x"}, b"late")
    assert not await keys.release(first.held)
    assert await _owner(adapters.pool, "ten_owners") == retry.held.owner
    assert await keys.complete(retry.held, 402, {"Content-Type": "x"}, b"mine")
    stored = await adapters.pool.fetchrow(
        "SELECT state, response_body FROM idempotency_keys WHERE key = 'k'"
    )
    assert (stored["state"], stored["response_body"]) == ("done", b"mine")
    # a completed record is never released, not even by its owner
    assert not await keys.release(retry.held)


async def test_a_402_for_a_key_taken_over_answers_409_and_stores_nothing(
    adapters: Adapters,
) -> None:
    keys = IdempotencyKeys(adapters.pool, adapters.queries)
    admission = _admission(adapters, _Answering(ConcurrencyLimited(1)))
    scope = Scope("ten_late402", "POST", "/v1/runs", "k")
    first = await keys.begin(scope, b"f" * 32)
    assert isinstance(first, Proceed)
    await _age_key(adapters.pool, "ten_late402")
    retry = await keys.begin(scope, b"f" * 32)
    assert isinstance(retry, Proceed)
    refusal = BudgetShort(0, 1_000, first.held)
    remembered = await admission.remember_refusal(refusal, "application/problem+json", b"402")
    assert remembered == KeyTakenOver()
    row = await adapters.pool.fetchrow("SELECT state, owner_token FROM idempotency_keys")
    assert (row["state"], row["owner_token"]) == ("in_flight", retry.held.owner)
    # the owner's 402 is stored
    mine = BudgetShort(0, 1_000, retry.held)
    assert await admission.remember_refusal(mine, "application/problem+json", b"402") == mine


async def test_a_takeover_tried_while_the_reservation_holds_the_key_sees_its_outcome(
    adapters: Adapters, database_url: str
) -> None:
    """The reservation locks the key row: a takeover waits for its commit, then
    finds the key done (409, then a replay), and never gets to reserve again."""
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    other = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    keys = IdempotencyKeys(pool, queries)
    scope = Scope(tenant_id, "POST", "/v1/runs", "held")
    begun = await keys.begin(scope, b"f" * 32)
    assert isinstance(begun, Proceed)
    await _age_key(pool, tenant_id)  # expired, but its reservation is under way
    completion = ledger.IdempotencyCompletion(
        "POST", "/v1/runs", "held", begun.held.owner, 202, {"Content-Type": "x"}, b"run"
    )
    run = replace(draft(1_000), idempotency=completion)
    blocker = (
        "INSERT INTO ledger_entries (tenant_id, kind, amount_usd_micros, operation_id)"
        " VALUES ($1, 'credit', 1, $2)",
        other,
        f"reserve:{run.run_id}",
    )
    results: dict[str, Any] = {}

    async def reserve() -> None:
        results["reserve"] = await ledger.reserve_batch(pool, queries, tenant_id, [run])

    async def take_over() -> None:
        results["take_over"] = await keys.begin(scope, b"f" * 32)

    async with _holding(database_url, blocker) as unblock, anyio.create_task_group() as group:
        group.start_soon(reserve)
        await _until(lambda: _lock_waiters_at_least(pool, 1))  # keys locked, writes stalled
        group.start_soon(take_over)
        await _until(lambda: _lock_waiters_at_least(pool, 2))  # the takeover waits
        await unblock()
    assert results["reserve"].accepted() == [True]
    assert results["take_over"] == InFlight()
    replay = await keys.begin(scope, b"f" * 32)
    assert isinstance(replay, Replay) and replay.body == b"run"
    assert await _runs_of(pool, tenant_id) == [run.run_id]


async def test_a_completed_key_admits_nothing_more_even_for_its_owner(adapters: Adapters) -> None:
    """A second delivery of the same request's reservation reserves nothing."""
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    begun = await IdempotencyKeys(pool, queries).begin(
        Scope(tenant_id, "POST", "/v1/runs", "once"), b"f" * 32
    )
    assert isinstance(begun, Proceed)
    completion = ledger.IdempotencyCompletion(
        "POST", "/v1/runs", "once", begun.held.owner, 202, {"Content-Type": "x"}, b"run"
    )
    first = replace(draft(1_000), idempotency=completion)
    again = replace(draft(1_000), idempotency=completion)
    assert (await ledger.reserve_batch(pool, queries, tenant_id, [first])).accepted() == [True]
    result = await ledger.reserve_batch(pool, queries, tenant_id, [again])
    assert result.decisions == [KeyNotHeld()]
    assert await _runs_of(pool, tenant_id) == [first.run_id]


async def test_a_402_whose_key_another_request_recorded_meanwhile_answers_409_over_http(
    http: httpx.AsyncClient,
    runtime: Any,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis refuses the reservation before Postgres recorded its claimed key;
    before the 402 is stored, another request with the key records it. The
    402 is not stored: this request answers 409 (the key is the other's)."""
    tenant_id, key = await _tenant(http, admin_headers, 0)  # Redis refuses: 402
    pool = runtime.adapters.pool
    headers = {**key, "Idempotency-Key": "poor-and-slow"}
    submit = Admission.submit
    others: list[Held] = []

    async def then_recorded(self: Admission, *args: Any, **kwargs: Any) -> Any:
        outcome = await submit(self, *args, **kwargs)
        assert isinstance(outcome, BudgetShort) and outcome.unrecorded is not None
        scope = Scope(tenant_id, "POST", "/v1/runs", "poor-and-slow")
        keys = IdempotencyKeys(pool, runtime.adapters.queries)
        other = await keys.begin(scope, request_fingerprint(ECHO))
        assert isinstance(other, Proceed)
        others.append(other.held)
        return outcome

    with monkeypatch.context() as patch:
        patch.setattr(Admission, "submit", then_recorded)
        late = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert late.status_code == 409, late.text
    assert late.json()["type"].endswith("/idempotency-key-in-use")
    row = await pool.fetchrow(
        "SELECT state, owner_token FROM idempotency_keys WHERE tenant_id = $1", tenant_id
    )
    # nothing stored: the key is the other request's
    assert (row["state"], row["owner_token"]) == ("in_flight", others[0].owner)


# ----------------------------------------- deadlines: nothing commits late


async def test_a_reservation_waiting_for_the_tenant_lock_gives_up_at_its_deadline(
    adapters: Adapters, database_url: str
) -> None:
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    late = draft(1_000)
    async with _holding(database_url, _tenant_lock(tenant_id)):
        with anyio.fail_after(WAIT_S):  # the lock is held throughout
            result = await ledger.reserve_batch(
                pool, queries, tenant_id, [late], [anyio.current_time() + 0.3]
            )
    assert result.decisions == [DeadlinePassed()]
    assert await _runs_of(pool, tenant_id) == []


async def test_a_draft_past_its_deadline_once_the_locks_are_held_is_withdrawn(
    adapters: Adapters, database_url: str
) -> None:
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    late, timely = draft(1_000), draft(1_000)
    results: list[ledger.ReserveBatchResult] = []

    async def reserve(deadlines: list[float]) -> None:
        results.append(
            await ledger.reserve_batch(pool, queries, tenant_id, [late, timely], deadlines)
        )

    async with _holding(database_url, _tenant_lock(tenant_id)) as unlock:
        now = anyio.current_time()
        async with anyio.create_task_group() as group:
            group.start_soon(reserve, [now + 0.3, now + WAIT_S])
            await _until(lambda: _lock_waiters_at_least(pool, 1))
            await anyio.sleep(0.4)  # the first draft's caller stops waiting
            await unlock()
    (result,) = results
    assert result.decisions[0] == DeadlinePassed()
    assert result.decisions[1] == AdmissionDecision(Decision.ACCEPTED, 10_000)
    assert await _runs_of(pool, tenant_id) == [timely.run_id]


async def test_the_writes_are_bounded_by_the_earliest_admitted_deadline(
    adapters: Adapters, database_url: str
) -> None:
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    other = await create_tenant(pool)
    await ledger.credit(pool, queries, tenant_id, 10_000, "credit:seed")
    first, second = draft(1_000), draft(1_000)
    # another transaction's uncommitted row with the first run's reserve id:
    # the reservation's insert waits for it (a write stalled after the locks)
    blocker = (
        "INSERT INTO ledger_entries (tenant_id, kind, amount_usd_micros, operation_id)"
        " VALUES ($1, 'credit', 1, $2)",
        other,
        f"reserve:{first.run_id}",
    )
    async with _holding(database_url, blocker):
        now = anyio.current_time()
        with anyio.fail_after(WAIT_S):
            result = await ledger.reserve_batch(
                pool, queries, tenant_id, [first, second], [now + 0.3, now + 60]
            )
    assert result.decisions == [DeadlinePassed(), DeadlinePassed()]
    assert await _runs_of(pool, tenant_id) == []
    budget = await ledger.read_budget(pool, queries, tenant_id)
    assert budget["reserved_usd_micros"] == 0


async def test_a_reservation_waiting_for_a_pooled_connection_gives_up_at_its_deadline(
    adapters: Adapters, database_url: str
) -> None:
    pool = await create_pool(database_url, max_size=1)
    try:
        tenant_id = await create_tenant(pool)
        async with pool.acquire():  # the only connection is busy throughout
            with anyio.fail_after(WAIT_S):
                result = await ledger.reserve_batch(
                    pool, adapters.queries, tenant_id, [draft()], [anyio.current_time() + 0.3]
                )
        assert result.decisions == [DeadlinePassed()]
        assert await _runs_of(pool, tenant_id) == []
    finally:
        await pool.close()


async def test_a_reservation_whose_caller_timed_out_never_commits_later(
    database_url: str, services: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget handle gives every Reserve its ask's deadline."""
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        tenant_id = await create_tenant(replica.pool)
        await replica.budgets.credit(tenant_id, 10_000, "credit:seed")
        abandoned = draft(1_000)
        async with _holding(database_url, _tenant_lock(tenant_id)) as unlock:
            with monkeypatch.context() as patch:
                patch.setattr(budgets_module, "ASK_TIMEOUT_S", 0.3)
                try:
                    outcome: object = await replica.budgets.reserve(tenant_id, abandoned)
                except ReservationTimedOut as timed_out:
                    outcome = timed_out
            assert isinstance(outcome, ReservationTimedOut | DeadlinePassed), outcome
            await unlock()
        # the actor handles its mailbox in order: once this one is answered, the
        # abandoned one was handled too
        later = await replica.budgets.reserve(tenant_id, draft(1_000))
        assert isinstance(later, Reserved)
        assert await _runs_of(replica.pool, tenant_id) == [later.run_id]


# --------------------------- release at once: a retry after a 503 proceeds


@pytest.mark.parametrize("point", ["reserve.before_commit", "reserve.after_commit"])
async def test_a_retry_after_a_budget_actor_crash_gets_the_outcome_at_once(
    http: httpx.AsyncClient, runtime: Any, admin_headers: dict[str, str], point: str
) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    headers = {**key, "Idempotency-Key": f"crash-{point}"}
    with armed(point):
        crashed = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert crashed.status_code == 503, crashed.text
    assert "same Idempotency-Key" in crashed.json()["detail"]
    retry = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert retry.status_code == 202, retry.text  # not 409 for the rest of a minute
    runs = await _runs_of(runtime.adapters.pool, tenant_id)
    assert runs == [retry.json()["id"]]
    if point == "reserve.after_commit":
        # it had committed: the record was done, the release did nothing
        assert retry.headers["idempotent-replayed"] == "true"
    else:
        assert "idempotent-replayed" not in retry.headers


@pytest.mark.parametrize(
    "error",
    [
        ReservationBusy("mailbox full"),
        ReservationTimedOut("no answer"),
        ReservationOutcomeUnknown("actor crashed"),
        ConnectionError("redis refused the hold"),
        RuntimeError("anything else"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_failed_reservation_releases_its_key(adapters: Adapters, error: Exception) -> None:
    admission = _admission(adapters, _Raising(error))
    with pytest.raises(type(error)):
        await _submit(admission, adapters, "k")
    assert await _key_count(adapters.pool) == 0
    # the retry proceeds (and this one succeeds)
    admission = _admission(adapters, _Answering(None))
    assert isinstance(await _submit(admission, adapters, "k"), ConcurrencyLimit)


async def test_a_refusal_past_the_deadline_releases_its_key_and_says_nothing_was_reserved(
    adapters: Adapters,
) -> None:
    admission = _admission(adapters, _Answering(DeadlinePassed()))
    with pytest.raises(ReservationExpired):
        await _submit(admission, adapters, "k")
    assert await _key_count(adapters.pool) == 0


async def test_a_concurrency_refusal_releases_its_key(adapters: Adapters) -> None:
    admission = _admission(adapters, _Answering(ConcurrencyLimited(1)))
    assert isinstance(await _submit(admission, adapters, "k"), ConcurrencyLimit)
    assert await _key_count(adapters.pool) == 0


async def test_a_cancelled_request_releases_its_key(adapters: Adapters) -> None:
    admission = _admission(adapters, _Stalling())
    with anyio.move_on_after(0.2) as scope:
        await _submit(admission, adapters, "k")
    assert scope.cancelled_caught
    assert await _key_count(adapters.pool) == 0


async def test_a_402_that_cannot_be_stored_releases_its_key(adapters: Adapters) -> None:
    class Unstorable(IdempotencyKeys):
        async def complete(self, held: Held, status: int, headers: Any, body: bytes) -> bool:
            raise ConnectionError("postgres went away")

    keys = Unstorable(adapters.pool, adapters.queries)
    admission = Admission(
        keys=keys,
        reserver=_Answering(None),
        announcer=None,
        metrics=Metrics.create(CollectorRegistry()),
    )
    begun = await keys.begin(Scope("ten_x", "POST", "/v1/runs", "k"), b"f" * 32)
    assert isinstance(begun, Proceed)
    with pytest.raises(ConnectionError):
        await admission.remember_refusal(BudgetShort(0, 1, begun.held), "x", b"402")
    assert await _key_count(adapters.pool) == 0


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("error", [ReservationTimedOut, ReservationOutcomeUnknown])
async def test_an_unknown_outcome_tells_only_a_client_with_a_key_to_retry_with_it(
    http: httpx.AsyncClient,
    runtime: Any,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    keyed: bool,
    error: type[Exception],
) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    headers = {**key, "Idempotency-Key": "unknown"} if keyed else key

    async def unanswered(self: Budgets, tenant_id: str, draft: RunDraft) -> ReserveOutcome:
        raise error("no answer")

    with monkeypatch.context() as patch:
        patch.setattr(Budgets, "reserve", unanswered)
        answer = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert answer.status_code == 503 and answer.headers["retry-after"]
    detail = answer.json()["detail"]
    if keyed:
        assert "retry with the same Idempotency-Key" in detail
        retry = await http.post("/v1/runs", json=ECHO, headers=headers)
        assert retry.status_code == 202, retry.text
    else:
        assert "same" not in detail
        assert "list your runs before retrying" in detail
    assert len(await _runs_of(runtime.adapters.pool, tenant_id)) == int(keyed)


# ------------------------------------------- credits: a replay's body (12.5)


async def test_a_credit_replay_answers_the_original_body_not_the_budget_now(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant_id, _ = await _tenant(http, admin_headers, 0)
    url = f"/admin/tenants/{tenant_id}/credits"
    first = await http.post(
        url, json={"amount_usd_micros": 5_000}, headers={**admin_headers, "Idempotency-Key": "a"}
    )
    assert first.status_code == 201
    later = await http.post(
        url, json={"amount_usd_micros": 3_000}, headers={**admin_headers, "Idempotency-Key": "b"}
    )
    assert later.status_code == 201 and later.json()["balance_usd_micros"] == 8_000
    replay = await http.post(
        url, json={"amount_usd_micros": 5_000}, headers={**admin_headers, "Idempotency-Key": "a"}
    )
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert replay.json()["balance_usd_micros"] == 5_000


async def test_a_credit_replay_in_the_ledger_answers_the_original_budget(
    adapters: Adapters,
) -> None:
    pool, queries = adapters.pool, adapters.queries
    tenant_id = await create_tenant(pool)
    first = await ledger.credit(pool, queries, tenant_id, 7_000, "credit:k1")
    await ledger.credit(pool, queries, tenant_id, 1_000, "credit:k2")
    await ledger.reserve_batch(pool, queries, tenant_id, [draft(2_000)])
    again = await ledger.credit(pool, queries, tenant_id, 7_000, "credit:k1")
    assert again == ledger.CreditResult(first.budget, replayed=True)
    budget = await ledger.read_budget(pool, queries, tenant_id)
    assert (budget["balance_usd_micros"], budget["reserved_usd_micros"]) == (8_000, 2_000)


# ---------------------------------------------------------------- helpers


class _Raising:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def reserve(self, tenant_id: str, draft: RunDraft) -> ReserveOutcome:
        raise self.error


class _Answering:
    """Answers ``outcome`` (None: the plan's concurrency limit)."""

    def __init__(self, outcome: ReserveOutcome | None) -> None:
        self.outcome = outcome

    async def reserve(self, tenant_id: str, draft: RunDraft) -> ReserveOutcome:
        return ConcurrencyLimited(1) if self.outcome is None else self.outcome


class _Stalling:
    async def reserve(self, tenant_id: str, draft: RunDraft) -> ReserveOutcome:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


def _admission(adapters: Adapters, reserver: Any) -> Admission:
    return Admission(
        keys=IdempotencyKeys(adapters.pool, adapters.queries),
        reserver=reserver,
        announcer=None,
        metrics=Metrics.create(CollectorRegistry()),
    )


async def _submit(admission: Admission, adapters: Adapters, key: str) -> Any:
    request = parse_submit(ECHO, adapters.packs)
    assert isinstance(request, SubmitRequest)
    return await admission.submit(
        "ten_releases", request, body=ECHO, idempotency_key=key, trace_id=None
    )


async def _key_count(pool: Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM idempotency_keys")
    return count
