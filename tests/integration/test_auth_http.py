"""The /v1 gate over HTTP: 401s, rate-limit headers, 429, fail-closed 503,
revocation across two replicas, and no secret in the logs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from dpp.adapters.postgres import create_pool
from dpp.adapters.redis import create_redis
from dpp.app import Adapters
from dpp.context import AppContext
from dpp.http.app import create_app
from dpp.http.auth import ApiGate, principal_of
from dpp.http.bodies import json_response
from dpp.http.endpoints import routes_for
from dpp.http.front import HttpFront
from dpp.http.routes import admin_tenancy
from dpp.tenancy.keys import generate_api_key
from dpp.tenancy.ratelimit import RateLimiter
from dpp.tenancy.service import Tenancy

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

BASE_URL = "http://testserver"
PROBLEM = "application/problem+json"


def v1_routes() -> list[BaseRoute]:
    async def whoami(request: Request) -> Response:
        principal = principal_of(request)
        return json_response(
            {
                "tenant_id": principal.tenant_id,
                "key_id": principal.key_id,
                **principal.plan_document(),
            }
        )

    return [Route("/v1/whoami", whoami, methods=["GET"])]


def build_app(context: AppContext) -> Starlette:
    return create_app(
        context,
        extra_routes=[*routes_for(admin_tenancy.ENDPOINTS), *v1_routes()],
        api_gate=True,
    )


def with_tenancy(context: AppContext, **overrides: Any) -> AppContext:
    tenancy = overrides.get("tenancy") or context.tenancy
    rate_limiter = overrides.get("rate_limiter") or context.rate_limiter
    return dataclasses.replace(context, tenancy=tenancy, rate_limiter=rate_limiter)


@pytest.fixture
async def replica(context: AppContext) -> AsyncIterator[AppContext]:
    """The context with tenancy wired and its invalidation listener running."""
    wired = with_tenancy(context)
    async with anyio.create_task_group() as group:
        await group.start(wired.tenancy.run_invalidation_listener)
        await wired.tenancy.wait_listening()
        yield wired
        group.cancel_scope.cancel()


@pytest.fixture
def app(replica: AppContext) -> Starlette:
    return build_app(replica)


async def new_key(
    replica: AppContext, *, plan_rpm: int | None = None, key_rpm: int | None = None
) -> tuple[str, str]:
    tenancy: Tenancy = replica.tenancy
    plan_id = "default"
    if plan_rpm is not None:
        plan_id = f"rpm{plan_rpm}"
        await tenancy.create_plan(plan_id, plan_rpm, 5, 30)
    tenant = await tenancy.create_tenant("Acme", plan_id)
    return await tenancy.issue_key(tenant.id, "test", key_rpm)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["www-authenticate"] == "Bearer"
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers
    body = response.json()
    assert body["status"] == 401 and body["instance"] == response.request.url.path


async def test_missing_or_bad_keys_are_401_whatever_the_path(
    client: httpx.AsyncClient, replica: AppContext
) -> None:
    _, key = await new_key(replica)
    broken = key[:-1] + ("0" if key[-1] != "0" else "1")
    for path in ("/v1/whoami", "/v1/no-such-thing", "/v1", "/v1/"):
        for method in ("GET", "POST", "DELETE"):
            assert_unauthorized(await client.request(method, path))
            for value in (f"Bearer {broken}", "Bearer nonsense", f"Basic {key}", key):
                assert_unauthorized(
                    await client.request(method, path, headers={"Authorization": value})
                )
    # two Authorization headers are ambiguous: refused
    response = await client.get(
        "/v1/whoami",
        headers=[("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")],
    )
    assert_unauthorized(response)
    # paths outside /v1 are not the gate's business
    assert (await client.get("/health")).status_code == 200


async def test_valid_key_passes_with_rate_limit_fields(
    client: httpx.AsyncClient, replica: AppContext
) -> None:
    key_id, key = await new_key(replica)
    headers = {"Authorization": f"Bearer {key}"}
    response = await client.get("/v1/whoami", headers=headers)
    assert response.status_code == 200
    assert response.json()["key_id"] == key_id
    assert response.json()["requests_per_minute"] == 600
    assert response.headers["ratelimit-policy"] == '"tenant";q=600;w=60'
    assert response.headers["ratelimit"] == '"tenant";r=599;t=1'
    assert "retry-after" not in response.headers
    assert "x-request-id" in response.headers
    second = await client.get("/v1/whoami", headers=headers)
    assert second.headers["ratelimit"].startswith('"tenant";r=598;t=')


async def test_unknown_path_and_wrong_method_with_a_key(
    client: httpx.AsyncClient, replica: AppContext
) -> None:
    _, key = await new_key(replica)
    headers = {"Authorization": f"Bearer {key}"}
    missing = await client.get("/v1/no-such-thing", headers=headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    assert missing.headers["ratelimit-policy"] == '"tenant";q=600;w=60'
    wrong = await client.delete("/v1/whoami", headers=headers)
    assert wrong.status_code == 405
    assert "GET" in wrong.headers["allow"]
    assert wrong.headers["ratelimit"].startswith('"tenant";r=')


async def test_over_the_limit_is_429_with_retry_after(
    client: httpx.AsyncClient, replica: AppContext
) -> None:
    _, key = await new_key(replica, plan_rpm=2)
    headers = {"Authorization": f"Bearer {key}"}
    for remaining in (1, 0):
        response = await client.get("/v1/whoami", headers=headers)
        assert response.status_code == 200
        assert response.headers["ratelimit"].startswith(f'"tenant";r={remaining};t=')
    refused = await client.get("/v1/whoami", headers=headers)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == PROBLEM
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["ratelimit-policy"] == '"tenant";q=2;w=60'
    assert refused.headers["ratelimit"] in ('"tenant";r=0;t=60', '"tenant";r=0;t=59')
    body = refused.json()
    assert body["status"] == 429 and body["policy"] == "tenant" and body["retry_after_s"] == 30


async def test_a_keys_own_lower_limit_is_policy_key(
    client: httpx.AsyncClient, replica: AppContext
) -> None:
    _, key = await new_key(replica, key_rpm=1)
    headers = {"Authorization": f"Bearer {key}"}
    response = await client.get("/v1/whoami", headers=headers)
    assert response.status_code == 200
    assert response.headers["ratelimit-policy"] == '"key";q=1;w=60'
    assert response.headers["ratelimit"] == '"key";r=0;t=60'
    refused = await client.get("/v1/whoami", headers=headers)
    assert refused.status_code == 429
    assert refused.headers["ratelimit-policy"] == '"key";q=1;w=60'
    assert refused.headers["retry-after"] == "60"


async def test_revoked_key_is_refused_at_once(
    client: httpx.AsyncClient, replica: AppContext, admin_headers: dict[str, str]
) -> None:
    key_id, key = await new_key(replica)
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/whoami", headers=headers)).status_code == 200
    response = await client.delete(f"/admin/api-keys/{key_id}", headers=admin_headers)
    assert response.status_code == 204
    assert_unauthorized(await client.get("/v1/whoami", headers=headers))


async def test_revocation_on_one_replica_reaches_the_other(
    context: AppContext, adapters: Adapters, admin_headers: dict[str, str]
) -> None:
    """Two replicas (own Tenancy, own Redis connection, own cache) over one
    Postgres and Redis; both caches warm; revoke through A; B refuses."""
    redis_b = create_redis(context.settings.redis_url)
    replica_a = with_tenancy(context)
    replica_b = with_tenancy(
        context,
        tenancy=Tenancy(adapters.pool, adapters.queries, redis_b, context.settings),
        rate_limiter=RateLimiter(redis_b, context.settings.redis_prefix),
    )
    try:
        async with anyio.create_task_group() as group:
            for replica in (replica_a, replica_b):
                await group.start(replica.tenancy.run_invalidation_listener)
                await replica.tenancy.wait_listening()
            key_id, key = await new_key(replica_a)
            headers = {"Authorization": f"Bearer {key}"}
            transports = [httpx.ASGITransport(app=build_app(r)) for r in (replica_a, replica_b)]
            async with (
                httpx.AsyncClient(transport=transports[0], base_url=BASE_URL) as client_a,
                httpx.AsyncClient(transport=transports[1], base_url=BASE_URL) as client_b,
            ):
                for client in (client_a, client_b, client_a, client_b):
                    assert (await client.get("/v1/whoami", headers=headers)).status_code == 200
                assert replica_b.tenancy.statistics().cache_hits >= 1  # warm
                revoked = await client_a.delete(f"/admin/api-keys/{key_id}", headers=admin_headers)
                assert revoked.status_code == 204
                assert_unauthorized(await client_a.get("/v1/whoami", headers=headers))
                # delivered on the next event-loop turns; never after a cache TTL
                with anyio.fail_after(0.5):
                    for _ in range(100):
                        response = await client_b.get("/v1/whoami", headers=headers)
                        if response.status_code == 401:
                            break
                        await anyio.sleep(0.005)
                assert_unauthorized(response)
            group.cancel_scope.cancel()
    finally:
        await redis_b.aclose()


async def test_redis_down_fails_closed_with_503(context: AppContext) -> None:
    dead_redis = create_redis("redis://127.0.0.1:1/0")
    try:
        replica = with_tenancy(
            context, rate_limiter=RateLimiter(dead_redis, context.settings.redis_prefix)
        )
        _, key = await new_key(replica)
        transport = httpx.ASGITransport(app=build_app(replica))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 503
            assert response.headers["content-type"] == PROBLEM
            assert "ratelimit" not in response.headers
            # a bad key is still a plain 401: nothing needed Redis or Postgres
            assert_unauthorized(
                await client.get("/v1/whoami", headers={"Authorization": "Bearer x"})
            )
    finally:
        await dead_redis.aclose()


async def test_bad_checksum_is_401_without_storage(context: AppContext, adapters: Adapters) -> None:
    """Postgres and Redis both unreachable for this replica: a malformed key is
    still answered 401 (never 503), so its check touched neither."""
    dead_redis = create_redis("redis://127.0.0.1:1/0")
    assert context.settings.database_url is not None
    pool = await create_pool(context.settings.database_url, max_size=1)
    await pool.close()
    try:
        replica = with_tenancy(
            context,
            tenancy=Tenancy(pool, adapters.queries, dead_redis, context.settings),
            rate_limiter=RateLimiter(dead_redis, context.settings.redis_prefix),
        )
        key = generate_api_key()
        broken = key[:-8] + format((int(key[-8:], 16) + 1) % 2**32, "08x")
        transport = httpx.ASGITransport(app=build_app(replica))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            assert_unauthorized(
                await client.get("/v1/whoami", headers={"Authorization": f"Bearer {broken}"})
            )
            # the well-formed key must reach storage, which is down: 503, not 401
            response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 503
        assert replica.tenancy.statistics().lookups == 1
    finally:
        await dead_redis.aclose()


async def test_no_key_in_the_logs(
    client: httpx.AsyncClient,
    replica: AppContext,
    admin_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await client.post(
        "/admin/tenants", json={"name": "Acme", "plan_id": "default"}, headers=admin_headers
    )
    tenant_id = response.json()["id"]
    issued = await client.post(f"/admin/tenants/{tenant_id}/api-keys", headers=admin_headers)
    key, key_id = issued.json()["api_key"], issued.json()["id"]
    headers = {"Authorization": f"Bearer {key}"}
    broken = key[:-1] + ("0" if key[-1] != "0" else "1")
    await client.get("/v1/whoami", headers=headers)
    await client.get("/v1/whoami", headers={"Authorization": f"Bearer {broken}"})
    await client.delete(f"/admin/api-keys/{key_id}", headers=admin_headers)
    await client.get("/v1/whoami", headers=headers)
    assert caplog.records, "expected some log lines"
    secrets = (key, key[9:41], broken, admin_headers["Authorization"].split()[1])
    for record in caplog.records:
        text = repr(record.__dict__) + record.getMessage()
        for secret in secrets:
            assert secret not in text, record


# --- the front alone (ASGI level) -------------------------------------------------------


async def _call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def test_preflight_passes_to_cors(replica: AppContext) -> None:
    reached: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["method"])
        await PlainTextResponse("passed the gate", status_code=204)(scope, receive, send)

    gate = ApiGate(replica.tenancy, replica.rate_limiter)
    front = HttpFront(
        inner, max_body_bytes=1024, allowed_origins=["https://app.example.com"], api_gate=gate
    )
    preflight = [
        (b"origin", b"https://app.example.com"),
        (b"access-control-request-method", b"GET"),
    ]
    # CORS answers a preflight before the gate: no key needed
    assert await _call(front, "OPTIONS", "/v1/whoami", preflight) == 204
    assert reached == []
    # one CORS does not answer (two Origin headers) still needs no key
    two_origins = [(b"origin", b"https://other.example.com"), *preflight]
    assert await _call(front, "OPTIONS", "/v1/whoami", two_origins) == 204
    assert reached == ["OPTIONS"]
    # an OPTIONS that is not a preflight needs a key like anything else
    assert await _call(front, "OPTIONS", "/v1/whoami", []) == 401
    assert reached == ["OPTIONS"]
    # the gate ignores paths outside /v1 (and look-alikes such as /v10)
    assert await _call(front, "GET", "/v10/x", []) == 204
    assert not gate.guards("GET", "/admin/actors") and not gate.guards("GET", "/v10/x")
    assert gate.guards("GET", "/v1") and gate.guards("POST", "/mcp")
