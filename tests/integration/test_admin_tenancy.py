"""Admin API and CLI for plans, tenants and keys: statuses, strict bodies, one
storage path."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dpp.cli import tenancy as cli_tenancy
from dpp.context import AppContext
from dpp.http.app import create_app
from dpp.http.auth import principal_of
from dpp.http.bodies import json_response
from dpp.http.endpoints import routes_for
from dpp.http.routes import admin_tenancy
from dpp.ids import new_id

if TYPE_CHECKING:
    from tests.services import TestServices

PROBLEM = "application/problem+json"
PLAN = {"id": "pro", "requests_per_minute": 1200, "max_concurrent_runs": 20, "retention_days": 90}


@pytest.fixture
async def replica(context: AppContext) -> AsyncIterator[AppContext]:
    wired = context
    async with anyio.create_task_group() as group:
        await group.start(wired.tenancy.run_invalidation_listener)
        await wired.tenancy.wait_listening()
        yield wired
        group.cancel_scope.cancel()


@pytest.fixture
def app(replica: AppContext) -> Starlette:
    async def whoami(request: Request) -> Response:
        principal = principal_of(request)
        return json_response({"tenant_id": principal.tenant_id, "key_id": principal.key_id})

    return create_app(
        replica,
        extra_routes=[*routes_for(admin_tenancy.ENDPOINTS), Route("/v1/whoami", whoami)],
        api_gate=True,
    )


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["instance"] == response.request.url.path
    if field is not None:
        assert body["field"] == field, body
        assert field in body["detail"]


# --- plans -----------------------------------------------------------------------------


async def test_create_plan(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    response = await client.post("/admin/plans", json=PLAN, headers=admin_headers)
    assert response.status_code == 201
    body = response.json()
    assert {key: body[key] for key in PLAN} == PLAN
    assert body["created_at"].endswith("Z")
    duplicate = await client.post("/admin/plans", json=PLAN, headers=admin_headers)
    assert_problem(duplicate, 409)
    default = await client.post(
        "/admin/plans", json={**PLAN, "id": "default"}, headers=admin_headers
    )
    assert_problem(default, 409)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"requests_per_minute": True}, "requests_per_minute"),
        ({"requests_per_minute": 1.5}, "requests_per_minute"),
        ({"requests_per_minute": "600"}, "requests_per_minute"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": 1_000_001}, "requests_per_minute"),
        ({"max_concurrent_runs": None}, "max_concurrent_runs"),
        ({"max_concurrent_runs": 100_001}, "max_concurrent_runs"),
        ({"retention_days": 0}, "retention_days"),
        ({"retention_days": False}, "retention_days"),
        ({"id": "Pro"}, "id"),
        ({"id": ""}, "id"),
        ({"id": 5}, "id"),
        ({"colour": "blue"}, "colour"),
    ],
)
async def test_create_plan_invalid(
    client: httpx.AsyncClient, admin_headers: dict[str, str], change: dict[str, Any], field: str
) -> None:
    response = await client.post("/admin/plans", json={**PLAN, **change}, headers=admin_headers)
    assert_problem(response, 422, field)


async def test_create_plan_missing_member_and_bad_bodies(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = {key: value for key, value in PLAN.items() if key != "retention_days"}
    assert_problem(
        await client.post("/admin/plans", json=body, headers=admin_headers), 422, "retention_days"
    )
    assert_problem(await client.post("/admin/plans", json=[PLAN], headers=admin_headers), 422)
    malformed = await client.post(
        "/admin/plans",
        content=b'{"id": "pro",',
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_problem(malformed, 400)
    wrong_type = await client.post(
        "/admin/plans",
        content=orjson.dumps(PLAN),
        headers={**admin_headers, "Content-Type": "text/plain"},
    )
    assert_problem(wrong_type, 415)


async def test_admin_token_required(client: httpx.AsyncClient) -> None:
    for method, path in (
        ("POST", "/admin/plans"),
        ("POST", "/admin/tenants"),
        ("GET", f"/admin/tenants/{new_id('ten')}"),
        ("POST", f"/admin/tenants/{new_id('ten')}/api-keys"),
        ("DELETE", f"/admin/api-keys/{new_id('key')}"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxx"}):
            response = await client.request(method, path, headers=headers, json={})
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"


# --- tenants ---------------------------------------------------------------------------


async def test_create_and_get_tenant(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post("/admin/tenants", json={"name": "Acme"}, headers=admin_headers)
    assert response.status_code == 201
    tenant = response.json()
    assert tenant["id"].startswith("ten_") and tenant["name"] == "Acme"
    assert tenant["plan_id"] == "default" and tenant["created_at"].endswith("Z")
    assert tenant["plan"]["requests_per_minute"] == 600
    assert response.headers["location"] == f"/admin/tenants/{tenant['id']}"
    fetched = await client.get(f"/admin/tenants/{tenant['id']}", headers=admin_headers)
    assert fetched.status_code == 200 and fetched.json() == tenant

    await client.post("/admin/plans", json=PLAN, headers=admin_headers)
    on_pro = await client.post(
        "/admin/tenants", json={"name": "Big", "plan_id": "pro"}, headers=admin_headers
    )
    assert on_pro.status_code == 201 and on_pro.json()["plan"]["max_concurrent_runs"] == 20
    explicit_null = await client.post(
        "/admin/tenants", json={"name": "Nil", "plan_id": None}, headers=admin_headers
    )
    assert explicit_null.status_code == 201 and explicit_null.json()["plan_id"] == "default"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Acme", "plan_id": "nope"}, "plan_id"),
        ({"name": "Acme", "plan_id": 3}, "plan_id"),
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": 42}, "name"),
        ({"name": "Acme", "balance_usd_micros": 5}, "balance_usd_micros"),
    ],
)
async def test_create_tenant_invalid(
    client: httpx.AsyncClient, admin_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    response = await client.post("/admin/tenants", json=body, headers=admin_headers)
    assert_problem(response, 422, field)


async def test_unknown_tenant_is_404(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for tenant_id in (new_id("ten"), "ten_short", "anything"):
        assert_problem(await client.get(f"/admin/tenants/{tenant_id}", headers=admin_headers), 404)
        response = await client.post(
            f"/admin/tenants/{tenant_id}/api-keys", json={}, headers=admin_headers
        )
        assert_problem(response, 404)


# --- keys ------------------------------------------------------------------------------


async def _tenant(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> str:
    response = await client.post("/admin/tenants", json={"name": "Acme"}, headers=admin_headers)
    assert response.status_code == 201
    return str(response.json()["id"])


async def test_issue_use_and_revoke_a_key(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant_id = await _tenant(client, admin_headers)
    response = await client.post(
        f"/admin/tenants/{tenant_id}/api-keys",
        json={"name": "ci", "requests_per_minute": 100},
        headers=admin_headers,
    )
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    issued = response.json()
    assert issued["id"].startswith("key_") and issued["api_key"].startswith("dpp_live_")
    assert issued["name"] == "ci" and issued["tenant_id"] == tenant_id
    assert issued["requests_per_minute"] == 100 and issued["created_at"].endswith("Z")
    assert issued["revoked_at"] is None

    headers = {"Authorization": f"Bearer {issued['api_key']}"}
    whoami = await client.get("/v1/whoami", headers=headers)
    assert whoami.status_code == 200
    assert whoami.json() == {"tenant_id": tenant_id, "key_id": issued["id"]}
    assert whoami.headers["ratelimit-policy"] == '"key";q=100;w=60'

    revoked = await client.delete(f"/admin/api-keys/{issued['id']}", headers=admin_headers)
    assert revoked.status_code == 204 and revoked.content == b""
    assert_problem(await client.get("/v1/whoami", headers=headers), 401)
    again = await client.delete(f"/admin/api-keys/{issued['id']}", headers=admin_headers)
    assert again.status_code == 204
    for key_id in (new_id("key"), "key_x"):
        assert_problem(await client.delete(f"/admin/api-keys/{key_id}", headers=admin_headers), 404)


async def test_issue_a_key_with_no_body(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant_id = await _tenant(client, admin_headers)
    response = await client.post(f"/admin/tenants/{tenant_id}/api-keys", headers=admin_headers)
    assert response.status_code == 201
    assert response.json()["name"] == "" and response.json()["requests_per_minute"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": True}, "requests_per_minute"),
        ({"requests_per_minute": 1_000_001}, "requests_per_minute"),
        ({"name": ""}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"scopes": ["all"]}, "scopes"),
    ],
)
async def test_issue_key_invalid(
    client: httpx.AsyncClient, admin_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    tenant_id = await _tenant(client, admin_headers)
    response = await client.post(
        f"/admin/tenants/{tenant_id}/api-keys", json=body, headers=admin_headers
    )
    assert_problem(response, 422, field)


# --- the CLI: same checks, same storage ------------------------------------------------


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, redis_prefix: str, services: TestServices
) -> None:
    for name in ("S3_ENDPOINT_URL", "DPP_QUEUE", "SQS_QUEUE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("DPP_REDIS_PREFIX", redis_prefix)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    parser = argparse.ArgumentParser(prog="dpp")
    cli_tenancy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status = args.handler(args)
    out, err = capsys.readouterr()
    return status, (orjson.loads(out) if out else None), err


def test_cli_round_trip(cli_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    status, plan, _ = run_cli(
        capsys, "plan", "create", "--id", "pro", "--rpm", "5", "--max-concurrent", "2",
        "--retention-days", "7",
    )  # fmt: skip
    assert status == 0 and plan["id"] == "pro" and plan["requests_per_minute"] == 5
    status, tenant, _ = run_cli(capsys, "tenant", "create", "--name", "Acme", "--plan", "pro")
    assert status == 0 and tenant["plan_id"] == "pro"
    status, shown, _ = run_cli(capsys, "tenant", "show", tenant["id"])
    assert status == 0 and shown == tenant
    status, key, _ = run_cli(
        capsys, "key", "issue", "--tenant", tenant["id"], "--name", "ci", "--rpm", "3"
    )
    assert status == 0 and key["api_key"].startswith("dpp_live_")
    assert key["requests_per_minute"] == 3 and key["tenant_id"] == tenant["id"]
    status, revoked, _ = run_cli(capsys, "key", "revoke", key["id"])
    assert status == 0 and revoked["revoked_at"] is not None and "api_key" not in revoked


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("plan", "create", "--id", "default", "--rpm", "5", "--max-concurrent", "2",
          "--retention-days", "7"), "exists"),
        (("plan", "create", "--id", "x", "--rpm", "0", "--max-concurrent", "2",
          "--retention-days", "7"), "requests_per_minute"),
        (("plan", "create", "--id", "x", "--rpm", "5x", "--max-concurrent", "2",
          "--retention-days", "7"), "requests_per_minute"),
        (("tenant", "create", "--name", "Acme", "--plan", "nope"), "nope"),
        (("tenant", "create", "--name", ""), "name"),
        (("key", "issue", "--tenant", "ten_nope"), "tenant"),
        (("key", "revoke", "key_nope"), "key"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(
    cli_env: None, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], fragment: str
) -> None:
    status, document, err = run_cli(capsys, *argv)
    assert status != 0 and document is None
    assert err.count("\n") == 1 and err.startswith("dpp: ") and fragment in err


def test_cli_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    status, document, err = run_cli(capsys, "tenant", "create", "--name", "Acme")
    assert status == 2 and document is None
    assert err.count("\n") == 1 and "DATABASE_URL" in err
