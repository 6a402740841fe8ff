"""The GCRA rate limiter against real Redis: quotas, policies, headers, failure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from redis.crc import key_slot

from dpp.adapters.redis import Redis, create_redis
from dpp.app import open_runtime
from dpp.ids import new_id
from dpp.tenancy import ratelimit
from dpp.tenancy.principal import Principal
from dpp.tenancy.ratelimit import RateLimitDecision, RateLimiter, RateLimitUnavailable
from tests.integration.conftest import BASE_URL
from tests.redis_cluster import single_and_cluster

if TYPE_CHECKING:
    pass


def principal(
    tenant_rpm: int,
    key_rpm: int | None = None,
    *,
    tenant_id: str | None = None,
    key_id: str | None = None,
) -> Principal:
    return Principal(
        tenant_id=tenant_id or new_id("ten"),
        key_id=key_id or new_id("key"),
        plan_id="default",
        requests_per_minute=tenant_rpm,
        max_concurrent_runs=10,
        retention_days=30,
        key_requests_per_minute=key_rpm,
    )


async def test_first_request_from_idle(limiter: RateLimiter) -> None:
    decision = await limiter.check(principal(600))
    assert decision == RateLimitDecision(
        allowed=True,
        policy="tenant",
        quota=600,
        window_s=60,
        remaining=599,
        reset_s=1,  # one request's worth (0.1 s) to refill, rounded up
        retry_after_s=None,
    )
    assert decision.headers() == [
        ("RateLimit-Policy", '"tenant";q=600;w=60'),
        ("RateLimit", '"tenant";r=599;t=1'),
    ]


@single_and_cluster
async def test_quota_then_refusal_with_retry_after(limiter: RateLimiter) -> None:
    who = principal(5)  # one request per 12 s, bursts of 5
    remaining = [(await limiter.check(who)).remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    refused = await limiter.check(who)
    assert not refused.allowed and refused.policy == "tenant"
    assert refused.remaining == 0 and refused.quota == 5
    assert refused.retry_after_s == 12  # the next slot frees up in 12 s (rounded up)
    assert 59 <= refused.reset_s <= 60  # the full quota is back in a minute
    headers = dict(refused.headers())
    assert headers["Retry-After"] == "12"
    assert headers["RateLimit"] == f'"tenant";r=0;t={refused.reset_s}'
    assert headers["RateLimit-Policy"] == '"tenant";q=5;w=60'


async def test_refusals_cost_nothing(limiter: RateLimiter, redis: Redis) -> None:
    who = principal(2)
    for _ in range(2):
        assert (await limiter.check(who)).allowed
    tenant_key, _ = limiter.keys(who)
    state = await redis.get(tenant_key)
    for _ in range(10):
        assert not (await limiter.check(who)).allowed
    assert await redis.get(tenant_key) == state
    ttl_ms = await redis.pttl(tenant_key)
    assert 0 < ttl_ms <= 60_000


@single_and_cluster
async def test_a_lower_key_limit_is_its_own_policy(limiter: RateLimiter) -> None:
    tenant_id = new_id("ten")
    limited = principal(5, 3, tenant_id=tenant_id)
    unlimited = principal(5, None, tenant_id=tenant_id)
    decisions = [await limiter.check(limited) for _ in range(3)]
    assert [(d.policy, d.quota, d.remaining) for d in decisions] == [
        ("key", 3, 2),
        ("key", 3, 1),
        ("key", 3, 0),
    ]
    refused = await limiter.check(limited)
    assert not refused.allowed and refused.policy == "key" and refused.quota == 3
    assert refused.retry_after_s == 20  # 60 s / 3
    assert dict(refused.headers())["RateLimit-Policy"] == '"key";q=3;w=60'
    # another key of the same tenant: only the tenant's 2 left
    second = await limiter.check(unlimited)
    assert (second.allowed, second.policy, second.remaining) == (True, "tenant", 1)
    assert (await limiter.check(unlimited)).remaining == 0
    refused = await limiter.check(unlimited)
    assert not refused.allowed and refused.policy == "tenant"


async def test_tenant_policy_named_when_tighter_than_the_key(limiter: RateLimiter) -> None:
    tenant_id = new_id("ten")
    other = principal(4, None, tenant_id=tenant_id)
    limited = principal(4, 3, tenant_id=tenant_id)
    for _ in range(3):
        assert (await limiter.check(other)).allowed
    # key policy has 2 left after this; the tenant's 0: the tenant is the tightest
    decision = await limiter.check(limited)
    assert (decision.allowed, decision.policy, decision.remaining) == (True, "tenant", 0)
    refused = await limiter.check(limited)
    assert not refused.allowed and refused.policy == "tenant"


async def test_a_key_limit_at_or_above_the_tenants_is_ignored(limiter: RateLimiter) -> None:
    decision = await limiter.check(principal(5, 5))
    assert decision.policy == "tenant" and decision.quota == 5
    decision = await limiter.check(principal(5, 500))
    assert decision.policy == "tenant" and decision.quota == 5


@single_and_cluster
async def test_concurrent_checks_never_over_admit(limiter: RateLimiter) -> None:
    who = principal(20)
    outcomes: list[bool] = []

    async def one() -> None:
        outcomes.append((await limiter.check(who)).allowed)

    async with anyio.create_task_group() as group:
        for _ in range(60):
            group.start_soon(one)
    assert outcomes.count(True) == 20


async def test_state_keys_share_the_tenant_hash_slot(limiter: RateLimiter) -> None:
    who = principal(5, 3)
    tenant_key, key_key = limiter.keys(who)
    assert f"{{{who.tenant_id}}}" in tenant_key and f"{{{who.tenant_id}}}" in key_key
    assert key_slot(tenant_key.encode()) == key_slot(key_key.encode())


@single_and_cluster
async def test_script_missing_from_the_cache_falls_back_to_eval(
    limiter: RateLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SHA1 Redis has never seen stands for a flushed script cache (without
    # flushing the shared server's cache under other tests).
    monkeypatch.setattr(ratelimit, "SCRIPT_SHA1", "0" * 40)
    decision = await limiter.check(principal(10))
    assert decision.allowed and decision.remaining == 9


async def test_unreachable_redis_fails_closed() -> None:
    client = create_redis("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(RateLimitUnavailable):
            await RateLimiter(client, "dpptest").check(principal(10))
    finally:
        await client.aclose()


def test_decision_rendering() -> None:
    decision = RateLimitDecision(
        allowed=False,
        policy="key",
        quota=3,
        window_s=60,
        remaining=0,
        reset_s=42,
        retry_after_s=7,
    )
    assert decision.headers() == [
        ("RateLimit-Policy", '"key";q=3;w=60'),
        ("RateLimit", '"key";r=0;t=42'),
        ("Retry-After", "7"),
    ]


@single_and_cluster
async def test_a_tenant_quota_holds_across_two_replicas(
    settings, settings_env, admin_headers
) -> None:
    """Two whole replicas (own pools, Redis clients, limiters) over one Redis: the
    tenant's 5 requests a minute are 5 in total, not 5 per replica."""
    async with (
        open_runtime(settings, environment=settings_env, dispatch=False) as one,
        open_runtime(settings, environment=settings_env, dispatch=False) as two,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=one.app), base_url=BASE_URL) as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=two.app), base_url=BASE_URL) as b,
    ):
        plan = {"id": "five", "requests_per_minute": 5, "max_concurrent_runs": 10,
                "retention_days": 30}  # fmt: skip
        assert (await a.post("/admin/plans", json=plan, headers=admin_headers)).status_code == 201
        tenant = await a.post(
            "/admin/tenants", json={"name": "t", "plan_id": "five"}, headers=admin_headers
        )
        issued = await a.post(
            f"/admin/tenants/{tenant.json()['id']}/api-keys", json={}, headers=admin_headers
        )
        headers = {"Authorization": f"Bearer {issued.json()['api_key']}"}
        statuses = [
            (await client.get("/v1/budget", headers=headers)).status_code for client in (a, b) * 5
        ]
        assert statuses == [200] * 5 + [429] * 5, statuses
