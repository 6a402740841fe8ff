"""A first submit's Idempotency-Key is recorded by its reservation (migration
0008): one transaction writes the key, the run and its stored 202, and a key
that has a record already is decided by ``begin`` as before.

Against real Postgres (and Redis, over HTTP). The ledger-level tests call
``reserve_batch`` the way the budget actor does; the HTTP ones go through a
whole replica.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from dpp.app import Adapters
from dpp.faults import InjectedCrash, armed, disarm_all
from dpp.money import ledger
from dpp.money.ledger import KeyClaim, KeyNotHeld, RunDraft
from dpp.money.rules import Admission as Decision
from dpp.money.rules import AdmissionDecision
from dpp.runs.idempotency import IdempotencyKeys, InFlight, Proceed, Replay, Scope
from tests.integration.test_runs_api import ECHO, _tenant
from tests.moneykit import create_plan, create_tenant, draft

SHA = b"s" * 32
LOCK_S = 60.0


@pytest.fixture(autouse=True)
def _disarmed() -> Any:
    yield
    disarm_all()


def claiming(key: str, owner: uuid.UUID, body: bytes = b"run", reserved: int = 1_000) -> RunDraft:
    completion = ledger.IdempotencyCompletion(
        "POST",
        "/v1/runs",
        key,
        owner,
        202,
        {"Content-Type": "application/json"},
        body,
        claim=KeyClaim(SHA, LOCK_S),
    )
    return replace(draft(reserved), idempotency=completion)


async def _key_row(adapters: Adapters, tenant_id: str, key: str) -> Any:
    return await adapters.pool.fetchrow(
        "SELECT state, owner_token, request_sha256, response_status, response_body,"
        " locked_until > now() AS locked FROM idempotency_keys"
        " WHERE tenant_id = $1 AND key = $2",
        tenant_id,
        key,
    )


async def _run_ids(adapters: Adapters, tenant_id: str) -> list[str]:
    rows = await adapters.pool.fetch("SELECT id FROM runs WHERE tenant_id = $1", tenant_id)
    return [row["id"] for row in rows]


async def _funded(adapters: Adapters, amount: int = 10_000) -> str:
    tenant_id = await create_tenant(adapters.pool)
    await ledger.credit(adapters.pool, adapters.queries, tenant_id, amount, f"seed:{tenant_id}")
    return tenant_id


# ------------------------------------------------------------------ the ledger


async def test_a_claim_records_the_key_with_its_run_and_stored_202(adapters: Adapters) -> None:
    tenant_id = await _funded(adapters)
    owner = uuid.uuid4()
    run = claiming("first", owner, b"the 202")
    result = await ledger.reserve_batch(adapters.pool, adapters.queries, tenant_id, [run])
    assert result.accepted() == [True]
    row = await _key_row(adapters, tenant_id, "first")
    assert row is not None, "the reservation wrote the key's record"
    assert (row["state"], row["owner_token"], bytes(row["request_sha256"])) == (
        "done",
        owner,
        SHA,
    )
    assert (row["response_status"], row["response_body"]) == (202, b"the 202")
    assert await _run_ids(adapters, tenant_id) == [run.run_id]
    # a retry's begin replays it
    keys = IdempotencyKeys(adapters.pool, adapters.queries)
    replay = await keys.begin(Scope(tenant_id, "POST", "/v1/runs", "first"), SHA)
    assert isinstance(replay, Replay) and replay.body == b"the 202"


@pytest.mark.parametrize("state", ["in_flight", "done"])
async def test_a_claim_of_a_recorded_key_is_withdrawn_and_leaves_the_record(
    adapters: Adapters, state: str
) -> None:
    tenant_id = await _funded(adapters)
    keys = IdempotencyKeys(adapters.pool, adapters.queries)
    scope = Scope(tenant_id, "POST", "/v1/runs", "taken")
    begun = await keys.begin(scope, SHA)
    assert isinstance(begun, Proceed)
    if state == "done":
        assert await keys.complete(begun.held, 202, {"Content-Type": "x"}, b"theirs")
    result = await ledger.reserve_batch(
        adapters.pool, adapters.queries, tenant_id, [claiming("taken", uuid.uuid4())]
    )
    assert result.decisions == [KeyNotHeld()]
    assert await _run_ids(adapters, tenant_id) == []
    row = await _key_row(adapters, tenant_id, "taken")
    assert (row["state"], row["owner_token"]) == (state, begun.held.owner)
    budget = await ledger.read_budget(adapters.pool, adapters.queries, tenant_id)
    assert budget["reserved_usd_micros"] == 0


async def test_two_claims_of_one_key_in_one_batch_admit_the_first_only(
    adapters: Adapters,
) -> None:
    tenant_id = await _funded(adapters)
    first, second = claiming("twin", uuid.uuid4()), claiming("twin", uuid.uuid4())
    result = await ledger.reserve_batch(adapters.pool, adapters.queries, tenant_id, [first, second])
    assert result.accepted() == [True, False]
    assert result.decisions[1] == KeyNotHeld()
    assert await _run_ids(adapters, tenant_id) == [first.run_id]
    row = await _key_row(adapters, tenant_id, "twin")
    assert first.idempotency is not None
    assert (row["state"], row["owner_token"]) == ("done", first.idempotency.owner)


async def test_a_claim_refused_by_the_budget_keeps_its_key_for_the_402(
    adapters: Adapters,
) -> None:
    """Postgres refuses the run, but the claim commits: the request holds its
    key, in flight, and stores its 402 there (``remember_refusal``)."""
    tenant_id = await _funded(adapters, 500)
    owner = uuid.uuid4()
    result = await ledger.reserve_batch(
        adapters.pool, adapters.queries, tenant_id, [claiming("poor", owner)]
    )
    decision = result.decisions[0]
    assert isinstance(decision, AdmissionDecision)
    assert decision.admission is Decision.INSUFFICIENT_BUDGET
    row = await _key_row(adapters, tenant_id, "poor")
    assert (row["state"], row["owner_token"], row["locked"]) == ("in_flight", owner, True)
    assert await _run_ids(adapters, tenant_id) == []


async def test_a_claim_refused_by_the_concurrency_limit_keeps_its_key_to_release(
    adapters: Adapters,
) -> None:
    await create_plan(adapters.pool, "one-at-a-time", max_concurrent_runs=1)
    tenant_id = await create_tenant(adapters.pool, plan_id="one-at-a-time")
    await ledger.credit(adapters.pool, adapters.queries, tenant_id, 10_000, "seed")
    owner = uuid.uuid4()
    result = await ledger.reserve_batch(
        adapters.pool,
        adapters.queries,
        tenant_id,
        [claiming("a", uuid.uuid4()), claiming("b", owner)],
    )
    assert result.accepted() == [True, False]
    decision = result.decisions[1]
    assert isinstance(decision, AdmissionDecision)
    assert decision.admission is Decision.CONCURRENCY_LIMITED
    row = await _key_row(adapters, tenant_id, "b")
    assert (row["state"], row["owner_token"]) == ("in_flight", owner)


async def test_a_claim_rolled_back_leaves_no_record(adapters: Adapters) -> None:
    """A crash before the commit: no run, no reservation, and no in-flight
    record for a retry to wait out (the old path left one to release)."""
    tenant_id = await _funded(adapters)
    with armed("reserve.before_commit"), pytest.raises(InjectedCrash):
        await ledger.reserve_batch(
            adapters.pool, adapters.queries, tenant_id, [claiming("crash", uuid.uuid4())]
        )
    assert await _key_row(adapters, tenant_id, "crash") is None
    assert await _run_ids(adapters, tenant_id) == []
    # the retry proceeds at once
    keys = IdempotencyKeys(adapters.pool, adapters.queries)
    assert isinstance(await keys.begin(Scope(tenant_id, "POST", "/v1/runs", "crash"), SHA), Proceed)


async def test_a_begin_racing_an_uncommitted_claim_waits_and_sees_it(
    adapters: Adapters, database_url: str
) -> None:
    """``begin`` of a retry on another replica meets the claim's uncommitted
    row: its insert waits for the reservation's end, then sees the record."""
    tenant_id = await _funded(adapters)
    owner = uuid.uuid4()
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            locked = await connection.fetchrow(
                adapters.queries["lock_reservation"],
                tenant_id,
                ["POST"],
                ["/v1/runs"],
                ["racing"],
                [],
                None,
                [SHA],
                [owner],
                [LOCK_S],
            )
            assert list(locked["key_owners"]) == [owner]
            keys = IdempotencyKeys(adapters.pool, adapters.queries)
            scope = Scope(tenant_id, "POST", "/v1/runs", "racing")
            with anyio.move_on_after(0.3) as waited:
                await keys.begin(scope, SHA)
            assert waited.cancelled_caught, "begin did not wait for the uncommitted claim"
        # committed (no run: the claim alone): the retry finds it in flight
        assert await keys.begin(scope, SHA) == InFlight()
    finally:
        await connection.close()


# ------------------------------------------------------------------ over HTTP


async def test_a_retry_of_an_admitted_submit_replays_it_when_the_budget_is_gone(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The retry's reservation is refused by Redis (the first run took the
    budget) before Postgres sees its key: the key's 202 still answers."""
    _, key = await _tenant(http, admin_headers, 1_000)
    headers = {**key, "Idempotency-Key": "spent"}
    body = {**ECHO, "max_cost_usd_micros": 1_000}
    first = await http.post("/v1/runs", json=body, headers=headers)
    assert first.status_code == 202, first.text
    retry = await http.post("/v1/runs", json=body, headers=headers)
    assert retry.status_code == 202, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["id"] == first.json()["id"]
    reused = await http.post("/v1/runs", json={**body, "metadata": {"x": 1}}, headers=headers)
    assert reused.status_code == 422, reused.text
    assert reused.json()["type"].endswith("/idempotency-key-reused")
    listed = (await http.get("/v1/runs", headers=key)).json()
    assert [run["id"] for run in listed["data"]] == [first.json()["id"]]


async def test_a_402_refused_before_postgres_is_stored_for_its_key(
    http: httpx.AsyncClient, runtime: Any, admin_headers: dict[str, str]
) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 0)
    headers = {**key, "Idempotency-Key": "broke"}
    first = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert first.status_code == 402, first.text
    row = await runtime.adapters.pool.fetchrow(
        "SELECT state, response_status FROM idempotency_keys WHERE tenant_id = $1", tenant_id
    )
    assert (row["state"], row["response_status"]) == ("done", 402)
    again = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert again.status_code == 402 and again.headers["idempotent-replayed"] == "true"
    reused = await http.post("/v1/runs", json={**ECHO, "metadata": {"x": 1}}, headers=headers)
    assert reused.status_code == 422, reused.text
