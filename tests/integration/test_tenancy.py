"""Tenancy against real Postgres and Redis: plans, tenants, keys, authentication,
the per-replica cache and revocation across replicas."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import asyncpg
import pytest
from redis.asyncio import Redis

from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.redis import create_redis, open_redis
from dpp.config import Settings, load_settings
from dpp.ids import new_id
from dpp.tenancy.keys import generate_api_key
from dpp.tenancy.principal import (
    ApiKeyNotFound,
    InvalidationNotBroadcast,
    InvalidField,
    PlanExists,
    PlanNotFound,
    Principal,
    TenancyUnavailable,
    TenantNotFound,
)
from dpp.tenancy.service import Tenancy
from tests.redis_cluster import single_and_cluster

if TYPE_CHECKING:
    from tests.services import TestServices

DEADLINE_S = 5.0
POLL_INTERVAL_S = 0.005
POLLS_MAX = 1_000


@pytest.fixture
def settings(database_url: str, redis_prefix: str, services: TestServices) -> Settings:
    return load_settings(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": services.redis_url,
            "DPP_REDIS_PREFIX": redis_prefix,
        }
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, max_size=5)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def redis(services: TestServices) -> AsyncIterator[Redis]:
    client = create_redis(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def tenancy(pool: asyncpg.Pool, redis: Redis, settings: Settings) -> Tenancy:
    return Tenancy(pool, Queries.load(), redis, settings)


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> int:
    """Poll ``condition`` until true; returns how many polls failed first."""
    with anyio.fail_after(DEADLINE_S):
        for failed in range(POLLS_MAX):
            if await condition():
                return failed
            await anyio.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"timed out waiting until {what}")


def bearer(key: str) -> str:
    return f"Bearer {key}"


# --- plans and tenants -----------------------------------------------------------------


async def test_create_plan_and_duplicate(tenancy: Tenancy) -> None:
    plan = await tenancy.create_plan("pro", 1200, 20, 90)
    assert (plan.id, plan.requests_per_minute, plan.max_concurrent_runs, plan.retention_days) == (
        "pro",
        1200,
        20,
        90,
    )
    assert (await tenancy.get_plan("pro")) == plan
    with pytest.raises(PlanExists):
        await tenancy.create_plan("pro", 10, 1, 1)
    with pytest.raises(PlanExists):
        await tenancy.create_plan("default", 10, 1, 1)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (("Pro", 1, 1, 1), "id"),
        (("", 1, 1, 1), "id"),
        (("x" * 64, 1, 1, 1), "id"),
        ((7, 1, 1, 1), "id"),
        (("p", 0, 1, 1), "requests_per_minute"),
        (("p", 1_000_001, 1, 1), "requests_per_minute"),
        (("p", True, 1, 1), "requests_per_minute"),
        (("p", 1.0, 1, 1), "requests_per_minute"),
        (("p", "5", 1, 1), "requests_per_minute"),
        (("p", 1, 0, 1), "max_concurrent_runs"),
        (("p", 1, 100_001, 1), "max_concurrent_runs"),
        (("p", 1, 1, 0), "retention_days"),
        (("p", 1, 1, 3651), "retention_days"),
        (("p", 1, 1, None), "retention_days"),
    ],
)
async def test_create_plan_validation(
    tenancy: Tenancy, arguments: tuple[object, ...], field: str
) -> None:
    with pytest.raises(InvalidField) as raised:
        await tenancy.create_plan(*arguments)
    assert raised.value.field == field


async def test_create_and_get_tenant(tenancy: Tenancy) -> None:
    tenant = await tenancy.create_tenant("Acme")
    assert tenant.id.startswith("ten_") and tenant.name == "Acme"
    assert tenant.plan_id == "default" and tenant.plan.requests_per_minute == 600
    assert (await tenancy.get_tenant(tenant.id)) == tenant
    document = tenant.document()
    assert document["plan_id"] == "default" and document["created_at"].endswith("Z")
    await tenancy.create_plan("small", 5, 1, 7)
    small = await tenancy.create_tenant("Tiny", "small")
    assert small.plan.requests_per_minute == 5


async def test_unknown_plan_and_tenant(tenancy: Tenancy) -> None:
    with pytest.raises(PlanNotFound):
        await tenancy.create_tenant("Acme", "nope")
    with pytest.raises(TenantNotFound):
        await tenancy.get_tenant(new_id("ten"))
    with pytest.raises(TenantNotFound):
        await tenancy.get_tenant("not-an-id")
    with pytest.raises(PlanNotFound):
        await tenancy.get_plan("nope")


@pytest.mark.parametrize("name", ["", " ", "x" * 201, "a\nb", "bell\x07", 5, None])
async def test_tenant_name_validation(tenancy: Tenancy, name: object) -> None:
    with pytest.raises(InvalidField) as raised:
        await tenancy.create_tenant(name)
    assert raised.value.field == "name"


# --- keys ------------------------------------------------------------------------------


async def test_issue_key_stores_only_the_hash(tenancy: Tenancy, pool: asyncpg.Pool) -> None:
    tenant = await tenancy.create_tenant("Acme")
    record, key = await tenancy.issue_key_record(tenant.id, "ci", 30)
    assert record.tenant_id == tenant.id and record.name == "ci"
    assert record.requests_per_minute == 30 and record.key_hint == key[37:41]
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE id = $1", record.id)
    assert bytes(row["key_sha256"]) == hashlib.sha256(key.encode()).digest()
    for value in dict(row).values():
        assert key not in str(value)
    key_id, second = await tenancy.issue_key(tenant.id)
    assert key_id.startswith("key_") and second != key
    assert (await tenancy.get_api_key(key_id)).name == ""


async def test_issue_key_refusals(tenancy: Tenancy) -> None:
    tenant = await tenancy.create_tenant("Acme")
    with pytest.raises(TenantNotFound):
        await tenancy.issue_key(new_id("ten"))
    with pytest.raises(TenantNotFound):
        await tenancy.issue_key("ten_short")
    for rpm in (0, -1, 1_000_001, True, 2.5, "10"):
        with pytest.raises(InvalidField) as raised:
            await tenancy.issue_key(tenant.id, requests_per_minute=rpm)
        assert raised.value.field == "requests_per_minute"
    with pytest.raises(InvalidField):
        await tenancy.issue_key(tenant.id, name="")


async def test_authenticate(tenancy: Tenancy) -> None:
    await tenancy.create_plan("pro", 1200, 20, 90)
    tenant = await tenancy.create_tenant("Acme", "pro")
    key_id, key = await tenancy.issue_key(tenant.id, "ci", 100)
    principal = await tenancy.authenticate(bearer(key))
    assert principal == Principal(
        tenant_id=tenant.id,
        key_id=key_id,
        plan_id="pro",
        requests_per_minute=1200,
        max_concurrent_runs=20,
        retention_days=90,
        key_requests_per_minute=100,
    )
    assert principal.plan_document() == {
        "id": "pro",
        "requests_per_minute": 1200,
        "max_concurrent_runs": 20,
        "retention_days": 90,
    }
    for header in (None, "", key, f"Basic {key}", f"Bearer {key}x", "Bearer"):
        assert await tenancy.authenticate(header) is None
    # the right shape and checksum, but no such key
    assert await tenancy.authenticate(bearer(generate_api_key())) is None


async def test_bad_keys_never_touch_storage(pool: asyncpg.Pool, settings: Settings) -> None:
    """A closed pool and an unreachable Redis: malformed keys still get a clean None."""
    redis = create_redis("redis://127.0.0.1:1/0")
    try:
        await pool.close()
        tenancy = Tenancy(pool, Queries.load(), redis, settings)
        key = generate_api_key()
        broken = key[:-1] + ("0" if key[-1] != "0" else "1")
        for header in (bearer(broken), bearer(key[:-9]), "Bearer junk", None, "Bearer " + "A" * 50):
            assert await tenancy.authenticate(header) is None
        assert tenancy.statistics().lookups == 0
        # a well-formed key does need storage, and says so
        with pytest.raises(TenancyUnavailable):
            await tenancy.authenticate(bearer(key))
    finally:
        await redis.aclose()


async def test_revoke(tenancy: Tenancy) -> None:
    tenant = await tenancy.create_tenant("Acme")
    key_id, key = await tenancy.issue_key(tenant.id)
    assert await tenancy.authenticate(bearer(key)) is not None
    first = await tenancy.revoke_key(key_id)
    assert first.revoked_at is not None
    assert await tenancy.authenticate(bearer(key)) is None
    again = await tenancy.revoke_key(key_id)  # idempotent
    assert again.revoked_at == first.revoked_at
    with pytest.raises(ApiKeyNotFound):
        await tenancy.revoke_key(new_id("key"))
    with pytest.raises(ApiKeyNotFound):
        await tenancy.revoke_key("key_bad")


async def test_revoke_reports_a_failed_broadcast(pool: asyncpg.Pool, settings: Settings) -> None:
    redis = create_redis("redis://127.0.0.1:1/0")
    try:
        tenancy = Tenancy(pool, Queries.load(), redis, settings)
        tenant = await tenancy.create_tenant("Acme")
        key_id, key = await tenancy.issue_key(tenant.id)
        with pytest.raises(InvalidationNotBroadcast):
            await tenancy.revoke_key(key_id)
        # stored all the same: the key is refused, and a retry is safe
        assert (await tenancy.get_api_key(key_id)).revoked_at is not None
        assert await tenancy.authenticate(bearer(key)) is None
    finally:
        await redis.aclose()


async def test_last_used_at_written_at_most_once_a_minute(
    tenancy: Tenancy, pool: asyncpg.Pool
) -> None:
    tenant = await tenancy.create_tenant("Acme")
    key_id, key = await tenancy.issue_key(tenant.id)
    assert (await tenancy.get_api_key(key_id)).last_used_at is None
    # no listener: every authenticate goes to Postgres, which is the worst case
    assert await tenancy.authenticate(bearer(key)) is not None
    first = (await tenancy.get_api_key(key_id)).last_used_at
    assert first is not None
    for _ in range(3):
        assert await tenancy.authenticate(bearer(key)) is not None
    assert (await tenancy.get_api_key(key_id)).last_used_at == first
    assert tenancy.statistics().lookups == 4
    await pool.execute(
        "UPDATE api_keys SET last_used_at = now() - interval '2 minutes' WHERE id = $1", key_id
    )
    assert await tenancy.authenticate(bearer(key)) is not None
    assert (await tenancy.get_api_key(key_id)).last_used_at > first


# --- the cache and the invalidation listener -------------------------------------------


async def test_cache_is_off_without_the_listener(tenancy: Tenancy, pool: asyncpg.Pool) -> None:
    tenant = await tenancy.create_tenant("Acme")
    key_id, key = await tenancy.issue_key(tenant.id)
    assert await tenancy.authenticate(bearer(key)) is not None
    assert not tenancy.cache_usable()
    # revoked behind Tenancy's back (no broadcast): refused at once, as nothing is cached
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    assert await tenancy.authenticate(bearer(key)) is None


async def test_cache_serves_repeated_lookups(tenancy: Tenancy) -> None:
    tenant = await tenancy.create_tenant("Acme")
    _, key = await tenancy.issue_key(tenant.id)
    unknown = generate_api_key()
    async with anyio.create_task_group() as group:
        await group.start(tenancy.run_invalidation_listener)
        await tenancy.wait_listening()
        for _ in range(5):
            assert await tenancy.authenticate(bearer(key)) is not None
            assert await tenancy.authenticate(bearer(unknown)) is None
        statistics = tenancy.statistics()
        assert statistics.lookups == 2 and statistics.cache_hits == 8
        assert statistics.cache_entries == 1 and statistics.negative_cache_entries == 1
        group.cancel_scope.cancel()
    assert not tenancy.statistics().listening


async def test_concurrent_cold_lookups_share_one_query(tenancy: Tenancy) -> None:
    tenant = await tenancy.create_tenant("Acme")
    _, key = await tenancy.issue_key(tenant.id)
    results: list[Principal | None] = []

    async def authenticate() -> None:
        results.append(await tenancy.authenticate(bearer(key)))

    async with anyio.create_task_group() as group:
        await group.start(tenancy.run_invalidation_listener)
        await tenancy.wait_listening()
        async with anyio.create_task_group() as requests:
            for _ in range(20):
                requests.start_soon(authenticate)
        group.cancel_scope.cancel()
    assert len(results) == 20 and all(result is not None for result in results)
    assert tenancy.statistics().lookups == 1


@single_and_cluster
async def test_revocation_reaches_every_replica_at_once(
    pool: asyncpg.Pool, settings: Settings, services: TestServices
) -> None:
    """Two replicas, warm caches; revoking on one refuses the key on both (on a
    cluster, PUBLISH reaches subscribers on every node)."""
    queries = Queries.load()
    redis_a = await open_redis(services.redis_url)
    redis_b = await open_redis(services.redis_url)
    replica_a = Tenancy(pool, queries, redis_a, settings)
    replica_b = Tenancy(pool, queries, redis_b, settings)
    try:
        tenant = await replica_a.create_tenant("Acme")
        key_id, key = await replica_a.issue_key(tenant.id)
        _, other_key = await replica_a.issue_key(tenant.id)
        async with anyio.create_task_group() as group:
            await group.start(replica_a.run_invalidation_listener)
            await group.start(replica_b.run_invalidation_listener)
            await replica_a.wait_listening()
            await replica_b.wait_listening()
            for replica in (replica_a, replica_b):
                for _ in range(2):
                    assert await replica.authenticate(bearer(key)) is not None
                    assert await replica.authenticate(bearer(other_key)) is not None
            lookups_b = replica_b.statistics().lookups
            assert lookups_b == 2  # warm: the second round came from the cache

            await replica_a.revoke_key(key_id)
            assert await replica_a.authenticate(bearer(key)) is None

            # B refuses as soon as the broadcast is delivered (on loopback: the
            # next event-loop turn or so); never after a cache TTL.
            async def refused_on_b() -> bool:
                return await replica_b.authenticate(bearer(key)) is None

            with anyio.fail_after(0.5):
                await wait_until(refused_on_b, "replica B refuses the revoked key")
            # only the revoked key was evicted on B
            assert await replica_b.authenticate(bearer(other_key)) is not None
            assert replica_b.statistics().lookups == lookups_b + 1
            group.cancel_scope.cancel()
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


async def test_cache_ttl_is_a_backstop(
    pool: asyncpg.Pool, redis: Redis, settings: Settings
) -> None:
    tenancy = Tenancy(pool, Queries.load(), redis, settings, cache_ttl_s=0.3)
    tenant = await tenancy.create_tenant("Acme")
    key_id, key = await tenancy.issue_key(tenant.id)
    async with anyio.create_task_group() as group:
        await group.start(tenancy.run_invalidation_listener)
        await tenancy.wait_listening()
        assert await tenancy.authenticate(bearer(key)) is not None
        # revoked with no broadcast: the cache still answers, until the TTL
        await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
        assert await tenancy.authenticate(bearer(key)) is not None
        await anyio.sleep(0.35)
        assert await tenancy.authenticate(bearer(key)) is None
        group.cancel_scope.cancel()


async def test_a_lost_subscription_empties_the_cache(
    pool: asyncpg.Pool, settings: Settings, services: TestServices, redis_prefix: str
) -> None:
    """Messages sent while the subscriber is away are lost; the cache must not
    outlive the subscription."""
    name = f"{redis_prefix}-listener"
    listener_redis = Redis.from_url(services.redis_url, client_name=name)
    admin = create_redis(services.redis_url)
    tenancy = Tenancy(pool, Queries.load(), listener_redis, settings)
    try:
        tenant = await tenancy.create_tenant("Acme")
        key_id, key = await tenancy.issue_key(tenant.id)
        async with anyio.create_task_group() as group:
            await group.start(tenancy.run_invalidation_listener)
            await tenancy.wait_listening()
            assert await tenancy.authenticate(bearer(key)) is not None
            assert tenancy.statistics().cache_entries == 1
            subscriptions = tenancy.statistics().subscriptions
            await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
            clients = await admin.client_list(_type="pubsub")
            ours = [client for client in clients if client.get("name") == name]
            assert len(ours) == 1
            await admin.client_kill_filter(_id=ours[0]["id"])

            async def resubscribed() -> bool:
                statistics = tenancy.statistics()
                return statistics.listening and statistics.subscriptions > subscriptions

            await wait_until(resubscribed, "the listener resubscribes")
            assert tenancy.statistics().cache_entries == 0
            assert await tenancy.authenticate(bearer(key)) is None
            group.cancel_scope.cancel()
    finally:
        await listener_redis.aclose()
        await admin.aclose()


async def test_listener_survives_unreachable_redis(pool: asyncpg.Pool, settings: Settings) -> None:
    redis = create_redis("redis://127.0.0.1:1/0")
    tenancy = Tenancy(pool, Queries.load(), redis, settings)
    try:
        tenant = await tenancy.create_tenant("Acme")
        _, key = await tenancy.issue_key(tenant.id)
        async with anyio.create_task_group() as group:
            await group.start(tenancy.run_invalidation_listener)
            await anyio.sleep(0.3)  # a few failed attempts
            assert not tenancy.cache_usable()
            for _ in range(2):
                assert await tenancy.authenticate(bearer(key)) is not None
            assert tenancy.statistics().lookups == 2  # nothing cached
            group.cancel_scope.cancel()
    finally:
        await redis.aclose()


async def test_plan_changes_reach_cached_principals(
    pool: asyncpg.Pool, settings: Settings, services: TestServices
) -> None:
    queries = Queries.load()
    redis_a = create_redis(services.redis_url)
    redis_b = create_redis(services.redis_url)
    replica_a = Tenancy(pool, queries, redis_a, settings)
    replica_b = Tenancy(pool, queries, redis_b, settings)
    try:
        await replica_a.create_plan("pro", 1200, 20, 90)
        tenant = await replica_a.create_tenant("Acme")
        _, key = await replica_a.issue_key(tenant.id)
        async with anyio.create_task_group() as group:
            await group.start(replica_b.run_invalidation_listener)
            await replica_b.wait_listening()
            principal = await replica_b.authenticate(bearer(key))
            assert principal is not None and principal.plan_id == "default"

            moved = await replica_a.set_tenant_plan(tenant.id, "pro")
            assert moved.plan_id == "pro"

            async def on_pro() -> bool:
                principal = await replica_b.authenticate(bearer(key))
                return principal is not None and principal.requests_per_minute == 1200

            await wait_until(on_pro, "replica B sees the new plan")

            await replica_a.update_plan("pro", 50, 2, 7)

            async def updated() -> bool:
                principal = await replica_b.authenticate(bearer(key))
                return principal is not None and principal.requests_per_minute == 50

            await wait_until(updated, "replica B sees the updated plan")
            group.cancel_scope.cancel()
        with pytest.raises(PlanNotFound):
            await replica_a.set_tenant_plan(tenant.id, "nope")
        with pytest.raises(TenantNotFound):
            await replica_a.set_tenant_plan(new_id("ten"), "pro")
        with pytest.raises(PlanNotFound):
            await replica_a.update_plan("nope", 1, 1, 1)
    finally:
        await redis_a.aclose()
        await redis_b.aclose()
