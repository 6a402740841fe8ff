"""Per-key spend limits (SPEC §7) over HTTP, in the database and in the audit.

A key's spent is R of its open runs + charged of its settled ones. The admin
API sets the limit, `/v1/runs` answers `402 .../key-spend-limit` when a run
would take spent above it, `GET /v1/budget` shows the calling key's share, and
Postgres itself refuses a reservation past the limit (migration 0005).
"""

from __future__ import annotations

import argparse
from typing import Any

import anyio
import asyncpg
import httpx
import orjson
import pytest

from dpp.app import open_runtime
from dpp.cli import tenancy as cli_tenancy
from dpp.config import Settings
from dpp.money import ledger
from dpp.money.audit import run_audit
from dpp.money.rules import Outcome, RunStatus
from tests.moneykit import claim_for_test, create_plan, create_tenant, draft

BASE_URL = "http://testserver"
PROBLEM = "application/problem+json"
ECHO = {"pack_type": "echo", "inputs": {"payload": 1}}  # R = 1,000 (the default), M = 100
R = 1_000
FIELD = "spend_limit_usd_micros"
WIDE_PLAN = {
    "id": "wide",
    "requests_per_minute": 100_000,
    "max_concurrent_runs": 10_000,
    "retention_days": 30,
}


async def _tenant(
    http: httpx.AsyncClient,
    admin: dict[str, str],
    *,
    credit: int,
    spend_limit: int | None,
    plan_id: str | None = None,
) -> tuple[str, str, dict[str, str]]:
    """A tenant with ``credit`` and one key limited to ``spend_limit``."""
    body: dict[str, Any] = {"name": "acme"}
    if plan_id is not None:
        body["plan_id"] = plan_id
    created = await http.post("/admin/tenants", json=body, headers=admin)
    assert created.status_code == 201, created.text
    tenant_id = created.json()["id"]
    issued = await http.post(
        f"/admin/tenants/{tenant_id}/api-keys",
        json={"name": "agent", FIELD: spend_limit},
        headers=admin,
    )
    assert issued.status_code == 201, issued.text
    document = issued.json()
    assert document[FIELD] == spend_limit and document["spent_usd_micros"] == 0
    if credit:
        credited = await http.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": credit},
            headers={**admin, "Idempotency-Key": f"seed-{tenant_id}"},
        )
        assert credited.status_code == 201, credited.text
    return tenant_id, document["id"], {"Authorization": f"Bearer {document['api_key']}"}


def _assert_problem(answer: httpx.Response, status: int, field: str | None = None) -> Any:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM
    body = answer.json()
    assert body["status"] == status
    if field is not None:
        assert body["field"] == field and field in body["detail"], body
    return body


async def _key_view(http: httpx.AsyncClient, admin: dict[str, str], key_id: str) -> Any:
    answer = await http.get(f"/admin/api-keys/{key_id}", headers=admin)
    assert answer.status_code == 200, answer.text
    return answer.json()


# --- the admin API -----------------------------------------------------------------------


async def test_key_view_get_and_patch(http: httpx.AsyncClient, admin_headers) -> None:
    tenant_id, key_id, _ = await _tenant(http, admin_headers, credit=0, spend_limit=5_000)
    view = await _key_view(http, admin_headers, key_id)
    assert {
        "id",
        "tenant_id",
        "name",
        FIELD,
        "spent_usd_micros",
        "requests_per_minute",
        "created_at",
        "revoked_at",
    } <= view.keys()
    assert "api_key" not in view and "key_sha256" not in view
    assert (view["id"], view["tenant_id"], view[FIELD], view["spent_usd_micros"]) == (
        key_id,
        tenant_id,
        5_000,
        0,
    )
    patched = await http.patch(
        f"/admin/api-keys/{key_id}", json={FIELD: 10**13}, headers=admin_headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()[FIELD] == 10**13
    removed = await http.patch(
        f"/admin/api-keys/{key_id}", json={FIELD: None}, headers=admin_headers
    )
    assert removed.status_code == 200 and removed.json()[FIELD] is None
    assert (await _key_view(http, admin_headers, key_id))[FIELD] is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "100", 10**13 + 1, True, [1], {"v": 1}])
async def test_bad_spend_limits_are_422_naming_the_field(
    http: httpx.AsyncClient, admin_headers, bad: object
) -> None:
    tenant_id, key_id, _ = await _tenant(http, admin_headers, credit=0, spend_limit=None)
    created = await http.post(
        f"/admin/tenants/{tenant_id}/api-keys", json={FIELD: bad}, headers=admin_headers
    )
    _assert_problem(created, 422, FIELD)
    patched = await http.patch(
        f"/admin/api-keys/{key_id}", json={FIELD: bad}, headers=admin_headers
    )
    _assert_problem(patched, 422, FIELD)
    assert (await _key_view(http, admin_headers, key_id))[FIELD] is None


async def test_patch_of_an_unknown_or_revoked_key_is_404(
    http: httpx.AsyncClient, admin_headers
) -> None:
    _, key_id, _ = await _tenant(http, admin_headers, credit=0, spend_limit=None)
    for unknown in ("key_00000000000000000000000000", "nonsense"):
        answer = await http.patch(
            f"/admin/api-keys/{unknown}", json={FIELD: 5}, headers=admin_headers
        )
        _assert_problem(answer, 404)
        _assert_problem(await http.get(f"/admin/api-keys/{unknown}", headers=admin_headers), 404)
    assert (
        await http.delete(f"/admin/api-keys/{key_id}", headers=admin_headers)
    ).status_code == 204
    _assert_problem(
        await http.patch(f"/admin/api-keys/{key_id}", json={FIELD: 5}, headers=admin_headers), 404
    )
    # a revoked key can still be looked at
    assert (await _key_view(http, admin_headers, key_id))["revoked_at"] is not None
    # the body's shape: the member is required, and nothing else is allowed
    _, live, _ = await _tenant(http, admin_headers, credit=0, spend_limit=None)
    _assert_problem(
        await http.patch(f"/admin/api-keys/{live}", json={}, headers=admin_headers), 422
    )
    _assert_problem(
        await http.patch(
            f"/admin/api-keys/{live}", json={FIELD: 5, "name": "x"}, headers=admin_headers
        ),
        422,
    )


# --- admission ---------------------------------------------------------------------------


async def test_limit_refuses_with_key_spend_limit_and_refunds_free_it(
    http: httpx.AsyncClient, admin_headers
) -> None:
    _, key_id, key = await _tenant(http, admin_headers, credit=1_000_000, spend_limit=2_500)
    first = await http.post("/v1/runs", json=ECHO, headers=key)
    second = await http.post("/v1/runs", json=ECHO, headers=key)
    assert (first.status_code, second.status_code) == (202, 202)
    refused = await http.post("/v1/runs", json=ECHO, headers={**key, "Idempotency-Key": "k1"})
    body = _assert_problem(refused, 402)
    assert body["type"].endswith("/key-spend-limit")
    assert (body[FIELD], body["spent_usd_micros"], body["required_usd_micros"]) == (2_500, 2_000, R)
    # a stored 402, replayed for its key
    replay = await http.post("/v1/runs", json=ECHO, headers={**key, "Idempotency-Key": "k1"})
    assert replay.status_code == 402 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.content == refused.content
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 2_000
    assert budget["key"] == {
        "id": key_id,
        FIELD: 2_500,
        "spent_usd_micros": 2_000,
        "available_usd_micros": 500,
    }
    # a refund frees the limit again, once
    run_id = first.json()["id"]
    for _ in range(2):
        assert (await http.post(f"/v1/runs/{run_id}/cancel", headers=key)).status_code == 200
    assert (await _key_view(http, admin_headers, key_id))["spent_usd_micros"] == 1_000
    assert (await http.post("/v1/runs", json=ECHO, headers=key)).status_code == 202
    # a smaller run still fits under the limit
    small = {**ECHO, "max_cost_usd_micros": 500}
    assert (await http.post("/v1/runs", json=small, headers=key)).status_code == 202
    assert (await _key_view(http, admin_headers, key_id))["spent_usd_micros"] == 2_500
    _assert_problem(await http.post("/v1/runs", json=small, headers=key), 402)


async def test_a_limit_lowered_below_spent_only_stops_further_submits(
    http: httpx.AsyncClient, admin_headers
) -> None:
    _, key_id, key = await _tenant(http, admin_headers, credit=1_000_000, spend_limit=None)
    runs = [(await http.post("/v1/runs", json=ECHO, headers=key)).json()["id"] for _ in range(3)]
    lowered = await http.patch(
        f"/admin/api-keys/{key_id}", json={FIELD: 1_500}, headers=admin_headers
    )
    assert lowered.status_code == 200
    assert (lowered.json()[FIELD], lowered.json()["spent_usd_micros"]) == (1_500, 3_000)
    body = _assert_problem(await http.post("/v1/runs", json=ECHO, headers=key), 402)
    assert body["type"].endswith("/key-spend-limit") and body["spent_usd_micros"] == 3_000
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["key"]["available_usd_micros"] == 0
    audit = (await http.get("/admin/audit", headers=admin_headers)).json()
    assert audit["ok"], audit  # a lowered limit is not a violation
    # refunds make room: two cancels take spent to 1,000, so one more run fits
    for run_id in runs[:2]:
        assert (await http.post(f"/v1/runs/{run_id}/cancel", headers=key)).status_code == 200
    assert (
        await http.post("/v1/runs", json={**ECHO, "max_cost_usd_micros": 500}, headers=key)
    ).status_code == 202
    # no limit: only the tenant's budget binds
    await http.patch(f"/admin/api-keys/{key_id}", json={FIELD: None}, headers=admin_headers)
    assert (await http.post("/v1/runs", json=ECHO, headers=key)).status_code == 202
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["key"][FIELD] is None
    assert budget["key"]["available_usd_micros"] == budget["available_usd_micros"]


async def test_when_both_are_short_the_tenants_402_answers(
    http: httpx.AsyncClient, admin_headers
) -> None:
    _, _, key = await _tenant(http, admin_headers, credit=500, spend_limit=200)
    body = _assert_problem(await http.post("/v1/runs", json=ECHO, headers=key), 402)
    assert body["type"].endswith("/insufficient-budget"), body
    assert body["available_usd_micros"] == 500
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["key"]["available_usd_micros"] == 200  # min(tenant 500, room 200)


async def test_keys_of_one_tenant_have_their_own_limits(
    http: httpx.AsyncClient, admin_headers
) -> None:
    tenant_id, _, limited = await _tenant(http, admin_headers, credit=1_000_000, spend_limit=R)
    issued = await http.post(
        f"/admin/tenants/{tenant_id}/api-keys", json={"name": "human"}, headers=admin_headers
    )
    free = {"Authorization": f"Bearer {issued.json()['api_key']}"}
    assert (await http.post("/v1/runs", json=ECHO, headers=limited)).status_code == 202
    _assert_problem(await http.post("/v1/runs", json=ECHO, headers=limited), 402)
    for _ in range(3):
        assert (await http.post("/v1/runs", json=ECHO, headers=free)).status_code == 202
    assert (await http.get("/v1/budget", headers=free)).json()["key"]["spent_usd_micros"] == 3 * R


async def test_two_replicas_admit_exactly_what_one_keys_limit_covers(
    settings: Settings, settings_env: dict[str, str], admin_headers
) -> None:
    async with (
        open_runtime(settings, environment=settings_env, dispatch=False) as first,
        open_runtime(settings, environment=settings_env, dispatch=False) as second,
    ):
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url=BASE_URL)
            for rt in (first, second)
        ]
        try:
            created = await clients[0].post("/admin/plans", json=WIDE_PLAN, headers=admin_headers)
            assert created.status_code == 201
            _, key_id, key = await _tenant(
                clients[1], admin_headers, credit=1_000_000, spend_limit=10 * R, plan_id="wide"
            )
            answers: list[httpx.Response] = []

            async def submit(index: int) -> None:
                answers.append(await clients[index % 2].post("/v1/runs", json=ECHO, headers=key))

            async with anyio.create_task_group() as group:
                for index in range(100):
                    group.start_soon(submit, index)
            statuses = [answer.status_code for answer in answers]
            assert statuses.count(202) == 10 and statuses.count(402) == 90, statuses
            assert all(
                a.json()["type"].endswith("/key-spend-limit")
                for a in answers
                if a.status_code == 402
            )
            view = await _key_view(clients[0], admin_headers, key_id)
            assert view["spent_usd_micros"] == 10 * R
            for client in clients:
                budget = (await client.get("/v1/budget", headers=key)).json()
                assert budget["reserved_usd_micros"] == 10 * R
                assert budget["key"]["available_usd_micros"] == 0
            audit = (await clients[0].get("/admin/audit", headers=admin_headers)).json()
            assert audit["ok"], audit
        finally:
            for client in clients:
                await client.aclose()


# --- the database's own guards -------------------------------------------------------------


async def _key(pool: asyncpg.Pool, tenant_id: str, limit: int | None) -> str:
    key_id = f"key_{tenant_id[4:30]}"
    await pool.execute(
        "INSERT INTO api_keys (id, tenant_id, key_sha256, key_hint, spend_limit_usd_micros)"
        " VALUES ($1, $2, sha256(convert_to($1::text, 'UTF8')), 'abcd', $3)",
        key_id,
        tenant_id,
        limit,
    )
    return key_id


async def _spent(pool: asyncpg.Pool, key_id: str) -> int:
    return int(await pool.fetchval("SELECT spent_usd_micros FROM api_keys WHERE id = $1", key_id))


async def test_postgres_refuses_a_reservation_past_the_key_limit(
    database_url: str, adapters
) -> None:
    pool, queries = adapters.pool, adapters.queries
    await create_plan(pool, "wide", max_concurrent_runs=1000)
    tenant = await create_tenant(pool, plan_id="wide")
    await ledger.credit(pool, queries, tenant, 1_000_000, "credit:seed")
    key_id = await _key(pool, tenant, 2 * R)
    inside = draft(R, api_key_id=key_id)
    result = await ledger.reserve_batch(pool, queries, tenant, [inside])
    assert result.accepted() == [True] and await _spent(pool, key_id) == R
    # the raw insert a bug would run: the trigger refuses it, whatever the code decided
    insert = (
        "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
        " minimum_fee_usd_micros, timebox_sec, api_key_id)"
        " VALUES ('run_' || substr(md5(random()::text), 1, 26), $1, 'echo', 'QUEUED', '{}',"
        " $2, 0, 60, $3)"
    )
    # another tenant's key cannot carry a run of this tenant
    other = await create_tenant(pool, plan_id="wide")
    await ledger.credit(pool, queries, other, 1_000_000, "credit:other")
    with pytest.raises(asyncpg.PostgresError, match="runs_api_key_of_tenant"):
        await pool.execute(insert, other, R, key_id)
    with pytest.raises(asyncpg.PostgresError, match="key_spend_limit"):
        await pool.execute(insert, tenant, 2 * R, key_id)
    await pool.execute(insert, tenant, R, key_id)  # exactly fits
    assert await _spent(pool, key_id) == 2 * R
    # spent moves only with the ledger; a run keeps its key; the derived column is derived
    with pytest.raises(asyncpg.PostgresError, match="key_spent_from_ledger"):
        await pool.execute("UPDATE api_keys SET spent_usd_micros = 0 WHERE id = $1", key_id)
    with pytest.raises(asyncpg.PostgresError, match="key_spent_from_ledger"):
        await pool.execute(
            "INSERT INTO api_keys (id, tenant_id, key_sha256, key_hint, spent_usd_micros)"
            " VALUES ('key_zzzzzzzzzzzzzzzzzzzzzzzzzz', $1, sha256('x'::bytea), 'abcd', 5)",
            tenant,
        )
    with pytest.raises(asyncpg.PostgresError, match="run_key_fixed"):
        await pool.execute("UPDATE runs SET api_key_id = NULL WHERE id = $1", inside.run_id)
    await pool.execute(
        "UPDATE api_keys SET spent_when_limit_set_usd_micros = 0 WHERE id = $1", key_id
    )
    assert (
        await pool.fetchval(
            "SELECT spent_when_limit_set_usd_micros FROM api_keys WHERE id = $1", key_id
        )
        == 0
    )  # set when the limit was set, at 0; a hand edit changes nothing
    # lowering the limit below spent is allowed, and remembered
    await pool.execute("UPDATE api_keys SET spend_limit_usd_micros = 1 WHERE id = $1", key_id)
    assert (
        await pool.fetchval(
            "SELECT spent_when_limit_set_usd_micros FROM api_keys WHERE id = $1", key_id
        )
        == 2 * R
    )
    # a settlement refunds the key exactly once (a replay moves nothing)
    cancel = ledger.SettleRequest(
        inside.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
    )
    await ledger.settle(pool, queries, cancel)
    await ledger.settle(pool, queries, cancel)
    assert await _spent(pool, key_id) == R
    report = await run_audit(pool, queries, None)
    assert report.ok, report.violations
    # tidy: the other run is still open; cancel it too
    (other_run,) = [
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM runs WHERE status = 'QUEUED' AND tenant_id = $1", tenant
        )
    ]
    await ledger.settle(
        pool,
        queries,
        ledger.SettleRequest(
            other_run, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        ),
    )
    assert await _spent(pool, key_id) == 0
    # a completed run stays spent at what it was charged (its refund comes back)
    await pool.execute("UPDATE api_keys SET spend_limit_usd_micros = NULL WHERE id = $1", key_id)
    done = draft(R, api_key_id=key_id)
    await ledger.reserve_batch(pool, queries, tenant, [done])
    token = await claim_for_test(pool, done.run_id)
    await ledger.settle(
        pool,
        queries,
        ledger.SettleRequest(
            done.run_id, Outcome.COMPLETED, actual_cost_usd_micros=700, lease_token=token
        ),
    )
    assert await _spent(pool, key_id) == 700


@pytest.mark.audit_exempt
async def test_the_audit_finds_a_key_above_its_limit_or_out_of_step(
    database_url: str, adapters
) -> None:
    pool, queries = adapters.pool, adapters.queries
    await create_plan(pool, "wide", max_concurrent_runs=1000)
    tenant = await create_tenant(pool, plan_id="wide")
    await ledger.credit(pool, queries, tenant, 1_000_000, "credit:seed")
    key_id = await _key(pool, tenant, R)
    await ledger.reserve_batch(pool, queries, tenant, [draft(R, api_key_id=key_id)])
    assert (await run_audit(pool, queries, None)).ok
    # what only a superuser can do: a reservation past the limit, with the guard off
    await pool.execute("ALTER TABLE api_keys DISABLE TRIGGER api_keys_spend_within_limit")
    try:
        await pool.execute(
            "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
            " minimum_fee_usd_micros, timebox_sec, api_key_id)"
            " VALUES ('run_abcdefghijklmnopqrstuvwxyz', $1, 'echo', 'QUEUED', '{}', $2, 0, 60, $3)",
            tenant,
            R,
            key_id,
        )
    finally:
        await pool.execute("ALTER TABLE api_keys ENABLE TRIGGER api_keys_spend_within_limit")
    report = await run_audit(pool, queries, None)
    (violation,) = [v for v in report.violations if v["invariant"] == 6]
    assert violation["key_id"] == key_id and violation["spent_usd_micros"] == 2 * R
    # and a counter out of step with the runs
    async with pool.acquire() as connection:
        await connection.execute("SET session_replication_role = replica")
        await connection.execute(
            "UPDATE api_keys SET spend_limit_usd_micros = NULL, spent_usd_micros = 7 WHERE id = $1",
            key_id,
        )
        await connection.execute("SET session_replication_role = origin")
    report = await run_audit(pool, queries, None)
    (violation,) = [v for v in report.violations if v["invariant"] == 6]
    assert (violation["spent_usd_micros"], violation["runs_usd_micros"]) == (7, 2 * R)


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, services, database_url: str, redis_prefix: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("DPP_REDIS_PREFIX", redis_prefix)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    parser = argparse.ArgumentParser()
    cli_tenancy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status = args.handler(args)
    out, err = capsys.readouterr()
    return status, orjson.loads(out) if out.strip() else None, err


def test_cli_issue_with_a_spend_limit_and_change_it(
    cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, tenant, _ = _cli(capsys, "tenant", "create", "--name", "Acme")
    assert status == 0
    status, key, _ = _cli(
        capsys, "key", "issue", "--tenant", tenant["id"], "--spend-limit", "5000000"
    )
    assert status == 0 and key[FIELD] == 5_000_000 and key["spent_usd_micros"] == 0
    status, limited, _ = _cli(capsys, "key", "limit", key["id"], "--spend-limit", "7")
    assert status == 0 and limited[FIELD] == 7
    status, shown, _ = _cli(capsys, "key", "show", key["id"])
    assert status == 0 and shown[FIELD] == 7
    status, removed, _ = _cli(capsys, "key", "limit", key["id"], "--spend-limit", "none")
    assert status == 0 and removed[FIELD] is None
    for bad in ("0", "-5", "1.5", "ten", str(10**13 + 1)):
        status, document, err = _cli(capsys, "key", "limit", key["id"], "--spend-limit", bad)
        assert status == 1 and document is None and FIELD in err, (bad, err)
    status, _, err = _cli(capsys, "key", "issue", "--tenant", tenant["id"], "--spend-limit", "0")
    assert status == 1 and FIELD in err
    _cli(capsys, "key", "revoke", key["id"])
    status, _, err = _cli(capsys, "key", "limit", key["id"], "--spend-limit", "9")
    assert status == 1 and "no such API key" in err
