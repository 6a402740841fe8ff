"""A dependency down answers 503 with Retry-After, in process, for every tenant read
and for submissions; after it is back the same replica answers 200 again.

The replica (``runtime``) reaches Postgres and Redis through a ``TcpProxy``;
``outage()`` resets every connection and refuses new ones. The slow, served
version of this under load is tests/chaos/test_dependency_faults.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import pytest

from dpp.adapters.postgres import POOL_ACQUIRE_TIMEOUT_S
from dpp.app import Runtime
from tests import services as test_services
from tests.tcp_proxy import TcpProxy

RECOVERY_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Proxies:
    postgres: TcpProxy
    redis: TcpProxy


def _through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)
    netloc = proxy.address if len(credentials) == 1 else f"{credentials[0]}@{proxy.address}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def proxies(
    services: test_services.TestServices, database_url: str
) -> AsyncIterator[Proxies]:
    postgres_url, redis_url = urlsplit(database_url), urlsplit(services.redis_url)
    assert postgres_url.hostname and postgres_url.port and redis_url.hostname and redis_url.port
    found = Proxies(
        TcpProxy(postgres_url.hostname, postgres_url.port),
        TcpProxy(redis_url.hostname, redis_url.port),
    )
    await found.postgres.start()
    await found.redis.start()
    try:
        yield found
    finally:
        await found.postgres.close()
        await found.redis.close()


@pytest.fixture
def settings_env(settings_env: dict[str, str], proxies: Proxies) -> dict[str, str]:
    return {
        **settings_env,
        "DATABASE_URL": _through(settings_env["DATABASE_URL"], proxies.postgres),
        "REDIS_URL": _through(settings_env["REDIS_URL"], proxies.redis),
    }


async def _tenant(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> dict[str, str]:
    tenant = await http.post("/admin/tenants", json={"name": "outage"}, headers=admin_headers)
    assert tenant.status_code == 201, tenant.text
    tenant_id = tenant.json()["id"]
    key = await http.post(f"/admin/tenants/{tenant_id}/api-keys", json={}, headers=admin_headers)
    assert key.status_code == 201, key.text
    credited = await http.post(
        f"/admin/tenants/{tenant_id}/credits",
        json={"amount_usd_micros": 1_000_000},
        headers={**admin_headers, "Idempotency-Key": "seed"},
    )
    assert credited.status_code == 201, credited.text
    return {"Authorization": f"Bearer {key.json()['api_key']}"}


SUBMISSION = {"pack_type": "echo", "inputs": {"payload": "x"}}


async def _requests(http: httpx.AsyncClient, bearer: dict[str, str], run_id: str) -> dict:
    return {
        "list": await http.get("/v1/runs", headers=bearer),
        "get": await http.get(f"/v1/runs/{run_id}", headers=bearer),
        "budget": await http.get("/v1/budget", headers=bearer),
        "submit": await http.post("/v1/runs", json=SUBMISSION, headers=bearer),
    }


async def _wait_back(http: httpx.AsyncClient, bearer: dict[str, str]) -> None:
    with anyio.fail_after(RECOVERY_TIMEOUT_S):
        for path, headers in (("/v1/budget", bearer), ("/readyz", {})):
            while True:
                if (await http.get(path, headers=headers)).status_code == 200:
                    break
                await anyio.sleep(0.2)


@pytest.mark.parametrize("dependency", ["postgres", "redis"])
async def test_a_dependency_down_answers_503_with_retry_after_then_recovers(
    http: httpx.AsyncClient, admin_headers: dict[str, str], proxies: Proxies, dependency: str
) -> None:
    bearer = await _tenant(http, admin_headers)
    accepted = await http.post("/v1/runs", json=SUBMISSION, headers=bearer)
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["id"]
    assert (await http.get("/v1/budget", headers=bearer)).status_code == 200

    async with getattr(proxies, dependency).outage():
        answers = await _requests(http, bearer, run_id)
        ready = await http.get("/readyz")
    for name, response in answers.items():
        assert response.status_code == 503, (name, response.status_code, response.text)
        assert int(response.headers["retry-after"]) >= 1, name
        assert response.headers["content-type"] == "application/problem+json"
    assert ready.status_code == 503 and dependency in ready.text

    await _wait_back(http, bearer)
    answers = await _requests(http, bearer, run_id)
    submitted = answers.pop("submit")
    assert [response.status_code for response in answers.values()] == [200, 200, 200]
    # The budget actor crashed on the outage; that is no crash loop of the
    # tenant's, so nothing cools it down: the first submit after it is admitted.
    assert submitted.status_code == 202, submitted.text


async def test_an_exhausted_pool_answers_503_after_the_acquire_timeout(
    runtime: Runtime, http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    bearer = await _tenant(http, admin_headers)
    assert (await http.get("/v1/budget", headers=bearer)).status_code == 200
    pool = runtime.adapters.pool
    held = []
    try:
        while pool.get_size() < pool.get_max_size() or pool.get_idle_size() > 0:
            held.append(await pool.acquire())
        # every connection is taken: the next query waits POOL_ACQUIRE_TIMEOUT_S, then 503
        with anyio.fail_after(POOL_ACQUIRE_TIMEOUT_S + RECOVERY_TIMEOUT_S):
            response = await http.get("/v1/budget", headers=bearer)
    finally:
        for connection in held:
            await pool.release(connection)
    assert response.status_code == 503, response.text
    assert response.json()["dependency"] == "postgres"
    assert int(response.headers["retry-after"]) >= 1
    # a failure's answer, not the route's: no quota fields, though the gate admitted it
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers
    assert (await http.get("/v1/budget", headers=bearer)).status_code == 200
