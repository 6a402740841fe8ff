"""Tenancy: plans, tenants and API keys in Postgres, and authenticating a key.

Storage is Postgres (``sql/queries/tenancy.sql``). ``authenticate`` runs on
every ``/v1`` request; its answers are cached per replica by
``dpp.tenancy.auth_cache.AuthCache``, which says why that is safe. Revocations
and plan changes are written to Postgres first, then broadcast to every
replica's cache (``run_invalidation_listener`` must run for the cache to be
used).

Expected failures are typed exceptions (``dpp.tenancy.principal``'s
``TenancyError`` subclasses) that the HTTP layer maps to problems and the CLI
to one line on stderr.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio
from anyio.abc import TaskStatus

from dpp.adapters.postgres import POSTGRES_ERRORS, Pool, Queries, Record
from dpp.adapters.redis import REDIS_ERRORS, Redis
from dpp.config import Settings
from dpp.ids import is_id, new_id
from dpp.limits import MAX_CONCURRENT_RUNS_MAX, RETENTION_DAYS_MAX
from dpp.tenancy.auth_cache import MISS, TTL_S, AuthCache
from dpp.tenancy.keys import generate_api_key, key_hint, key_sha256, parse_api_key, parse_bearer
from dpp.tenancy.principal import (
    DEFAULT_PLAN_ID,
    PLAN_ID_PATTERN,
    ApiKey,
    ApiKeyNotFound,
    InvalidationNotBroadcast,
    Plan,
    PlanExists,
    PlanNotFound,
    Principal,
    TenancyUnavailable,
    Tenant,
    TenantNotFound,
    check_name,
    check_plan_id,
    check_requests_per_minute,
    check_spend_limit,
    check_whole_number,
)

log = logging.getLogger("dpp.tenancy")

LAST_USED_INTERVAL_S: Final = 60.0
POOL_ACQUIRE_TIMEOUT_S: Final = 5.0
LOOKUP_TIMEOUT_S: Final = 5.0  # a request waits no longer for its key (then 503)


@dataclass(frozen=True, slots=True)
class TenancyStatistics:
    listening: bool
    subscriptions: int  # how many times the invalidation channel was (re)subscribed
    cache_entries: int
    negative_cache_entries: int
    cache_hits: int
    lookups: int  # authentication lookups that went to Postgres


def _plan(row: Record, prefix: str = "") -> Plan:
    return Plan(
        id=row["plan_id" if prefix else "id"],
        requests_per_minute=row["requests_per_minute"],
        max_concurrent_runs=row["max_concurrent_runs"],
        retention_days=row["retention_days"],
        created_at=row[f"{prefix}created_at"],
        updated_at=row[f"{prefix}updated_at"],
    )


def _tenant(row: Record) -> Tenant:
    return Tenant(
        id=row["id"], name=row["name"], plan=_plan(row, "plan_"), created_at=row["created_at"]
    )


def _api_key(row: Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        key_hint=row["key_hint"],
        requests_per_minute=row["requests_per_minute"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        spend_limit_usd_micros=row["spend_limit_usd_micros"],
        spent_usd_micros=row["spent_usd_micros"],
    )


# --- the service -----------------------------------------------------------------------


class _Flight:
    """One Postgres lookup that concurrent requests with the same key share."""

    __slots__ = ("done", "epoch", "ok", "result")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.done = anyio.Event()
        self.ok = False
        self.result: Principal | None = None


class Tenancy:
    """Plans, tenants and keys in Postgres; authentication with a per-replica cache.

    ``run_invalidation_listener`` must run (under the supervisor) for the cache
    to be used at all; without it every authentication reads Postgres.
    """

    def __init__(
        self,
        pool: Pool,
        queries: Queries,
        redis: Redis,
        settings: Settings,
        *,
        cache_ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._queries = queries
        self.cache = AuthCache(
            redis, f"{settings.redis_prefix}:auth:revoked", ttl_s=cache_ttl_s, clock=clock
        )
        self._flights: dict[bytes, _Flight] = {}
        self._lookups = 0

    # --- plans -------------------------------------------------------------------------

    async def create_plan(
        self,
        plan_id: object,
        requests_per_minute: object,
        max_concurrent_runs: object,
        retention_days: object,
    ) -> Plan:
        """A new plan; ``PlanExists`` when the id is taken."""
        plan_id = check_plan_id(plan_id)
        rpm = check_requests_per_minute(requests_per_minute)
        concurrent = check_whole_number(
            max_concurrent_runs, "max_concurrent_runs", 1, MAX_CONCURRENT_RUNS_MAX
        )
        retention = check_whole_number(retention_days, "retention_days", 1, RETENTION_DAYS_MAX)
        row = await self._pool.fetchrow(
            self._queries["plan_insert"], plan_id, rpm, concurrent, retention
        )
        if row is None:
            raise PlanExists(f"plan {plan_id!r} exists already")
        return _plan(row)

    async def get_plan(self, plan_id: str) -> Plan:
        if not isinstance(plan_id, str) or PLAN_ID_PATTERN.fullmatch(plan_id) is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        row = await self._pool.fetchrow(self._queries["plan_by_id"], plan_id)
        if row is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        return _plan(row)

    async def update_plan(
        self,
        plan_id: str,
        requests_per_minute: object,
        max_concurrent_runs: object,
        retention_days: object,
    ) -> Plan:
        """Change a plan's limits; every replica forgets its cached principals."""
        rpm = check_requests_per_minute(requests_per_minute)
        concurrent = check_whole_number(
            max_concurrent_runs, "max_concurrent_runs", 1, MAX_CONCURRENT_RUNS_MAX
        )
        retention = check_whole_number(retention_days, "retention_days", 1, RETENTION_DAYS_MAX)
        if not isinstance(plan_id, str) or PLAN_ID_PATTERN.fullmatch(plan_id) is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        row = await self._pool.fetchrow(
            self._queries["plan_update"], plan_id, rpm, concurrent, retention
        )
        if row is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        await self._broadcast(self.cache.publish_flush(), f"plan {plan_id} updated")
        return _plan(row)

    # --- tenants -----------------------------------------------------------------------

    async def create_tenant(self, name: object, plan_id: object = DEFAULT_PLAN_ID) -> Tenant:
        """A new tenant on ``plan_id``; ``PlanNotFound`` when there is no such plan."""
        name = check_name(name)
        plan_id = check_plan_id(plan_id, "plan_id")
        row = await self._pool.fetchrow(
            self._queries["tenant_insert"], new_id("ten"), name, plan_id
        )
        if row is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        tenant = _tenant(row)
        assert tenant.plan_id == plan_id and tenant.name == name
        return tenant

    async def get_tenant(self, tenant_id: str) -> Tenant:
        """The tenant and its plan; a malformed id is simply not found."""
        if not isinstance(tenant_id, str) or not is_id(tenant_id, "ten"):
            raise TenantNotFound("no such tenant")
        row = await self._pool.fetchrow(self._queries["tenant_with_plan"], tenant_id)
        if row is None:
            raise TenantNotFound("no such tenant")
        return _tenant(row)

    async def search_tenants(self, text: str, limit: int = 50) -> list[Tenant]:
        """Operators' search: the tenant with this exact id, or those whose name
        contains ``text`` (case-insensitive), newest first, at most ``limit``."""
        assert 1 <= limit <= 500, limit
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self._pool.fetch(self._queries["tenant_search"], pattern, text, limit)
        return [_tenant(row) for row in rows]

    async def set_tenant_plan(self, tenant_id: str, plan_id: object) -> Tenant:
        """Move a tenant to another plan; every replica forgets its cached principals."""
        plan_id = check_plan_id(plan_id, "plan_id")
        if not isinstance(tenant_id, str) or not is_id(tenant_id, "ten"):
            raise TenantNotFound("no such tenant")
        row = await self._pool.fetchrow(self._queries["tenant_set_plan"], tenant_id, plan_id)
        if row is None:
            await self.get_tenant(tenant_id)  # raises TenantNotFound when that is why
            raise PlanNotFound(f"no plan {plan_id!r}")
        await self._broadcast(self.cache.publish_flush(), f"tenant {tenant_id} changed plan")
        return await self.get_tenant(tenant_id)

    # --- keys --------------------------------------------------------------------------

    async def issue_key_record(
        self,
        tenant_id: str,
        name: object = None,
        requests_per_minute: object = None,
        spend_limit_usd_micros: object = None,
    ) -> tuple[ApiKey, str]:
        """A new key for the tenant: its stored record and the key (shown once).

        ``requests_per_minute`` (optional) is the key's own limit; it binds only
        when lower than the tenant's plan (SPEC §6). ``spend_limit_usd_micros``
        (optional) caps what runs submitted with the key may spend (SPEC §7).
        """
        name_text = "" if name is None else check_name(name)
        key_rpm = (
            None if requests_per_minute is None else check_requests_per_minute(requests_per_minute)
        )
        spend_limit = check_spend_limit(spend_limit_usd_micros)
        if not isinstance(tenant_id, str) or not is_id(tenant_id, "ten"):
            raise TenantNotFound("no such tenant")
        key = generate_api_key()
        row = await self._pool.fetchrow(
            self._queries["api_key_insert"],
            new_id("key"),
            tenant_id,
            name_text,
            key_sha256(key),
            key_hint(key),
            key_rpm,
            spend_limit,
        )
        if row is None:
            raise TenantNotFound("no such tenant")
        record = _api_key(row)
        assert record.tenant_id == tenant_id and record.revoked_at is None
        log.info(
            "api key issued",
            extra={"tenant_id": tenant_id, "key_id": record.id, "key_hint": record.key_hint},
        )
        return record, key

    async def issue_key(
        self,
        tenant_id: str,
        name: object = None,
        requests_per_minute: object = None,
    ) -> tuple[str, str]:
        """``(key_id, key)``: the key is shown once; only its hash is stored."""
        record, key = await self.issue_key_record(tenant_id, name, requests_per_minute)
        return record.id, key

    async def get_api_key(self, key_id: str) -> ApiKey:
        if not isinstance(key_id, str) or not is_id(key_id, "key"):
            raise ApiKeyNotFound("no such API key")
        row = await self._pool.fetchrow(self._queries["api_key_by_id"], key_id)
        if row is None:
            raise ApiKeyNotFound("no such API key")
        return _api_key(row)

    async def tenant_keys(self, tenant_id: str, limit: int = 200) -> list[ApiKey]:
        """Every key of the tenant, revoked ones too, newest first (never the key)."""
        assert 1 <= limit <= 1000, limit
        if not isinstance(tenant_id, str) or not is_id(tenant_id, "ten"):
            return []
        rows = await self._pool.fetch(self._queries["api_keys_of_tenant"], tenant_id, limit)
        return [_api_key(row) for row in rows]

    async def set_key_spend_limit(self, key_id: str, spend_limit_usd_micros: object) -> ApiKey:
        """Set (or with None, remove) a live key's spend limit (SPEC §7). A limit
        below what the key has spent is accepted: later submits are refused until
        refunds or a higher limit make room. ``ApiKeyNotFound`` for an unknown or
        revoked key. The limit is read by each reservation under the key's row
        lock, so no cache needs telling."""
        spend_limit = check_spend_limit(spend_limit_usd_micros)
        if not isinstance(key_id, str) or not is_id(key_id, "key"):
            raise ApiKeyNotFound("no such API key")
        row = await self._pool.fetchrow(
            self._queries["api_key_set_spend_limit"], key_id, spend_limit
        )
        if row is None:
            raise ApiKeyNotFound("no such API key")
        record = _api_key(row)
        assert record.spend_limit_usd_micros == spend_limit and record.revoked_at is None
        log.info(
            "api key spend limit set",
            extra={"tenant_id": record.tenant_id, "key_id": record.id},
        )
        return record

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke (idempotent) and tell every replica to forget the key now.

        Order: Postgres first (the truth every cache miss reads), then the
        local cache, then the broadcast. Raises ``InvalidationNotBroadcast``
        when the broadcast fails; a retry broadcasts again.
        """
        if not isinstance(key_id, str) or not is_id(key_id, "key"):
            raise ApiKeyNotFound("no such API key")
        row = await self._pool.fetchrow(self._queries["api_key_revoke"], key_id)
        if row is None:
            raise ApiKeyNotFound("no such API key")
        record = _api_key(row)
        digest = bytes(row["key_sha256"])
        assert record.revoked_at is not None and len(digest) == 32
        log.info("api key revoked", extra={"tenant_id": record.tenant_id, "key_id": record.id})
        await self._broadcast(self.cache.publish_eviction(digest), f"key {key_id} revoked")
        return record

    @staticmethod
    async def _broadcast(publish: Awaitable[None], what: str) -> None:
        try:
            await publish
        except REDIS_ERRORS as error:
            raise InvalidationNotBroadcast(
                f"{what} in storage, but the other replicas could not be told "
                f"({type(error).__name__}); retry to broadcast again"
            ) from error

    # --- authentication ----------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization`` header value, or None.

        A value that is not ``Bearer <key>`` with a well-formed key and a
        matching checksum is refused here, without touching storage or cache.
        Raises ``TenancyUnavailable`` when Postgres cannot answer a lookup.
        """
        credentials = parse_bearer(authorization)
        if credentials is None:
            return None
        parsed = parse_api_key(credentials)
        if parsed is None:
            return None
        digest = key_sha256(parsed.text)
        cached = self.cache.get(digest)
        if cached is not MISS:
            assert cached is None or isinstance(cached, Principal)
            return cached
        return await self._lookup_shared(digest)

    async def _lookup_shared(self, digest: bytes) -> Principal | None:
        """Look up once for all concurrent requests with this key (no stampede)."""
        flight = self._flights.get(digest)
        if flight is not None and flight.epoch == self.cache.epoch:
            await flight.done.wait()
            if flight.ok and flight.epoch == self.cache.epoch:
                return flight.result
        flight = _Flight(self.cache.epoch)
        self._flights[digest] = flight
        try:
            result = await self._lookup(digest)
            flight.result, flight.ok = result, True
            self.cache.put(digest, result, flight.epoch)
            return result
        finally:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            flight.done.set()

    async def _lookup(self, digest: bytes) -> Principal | None:
        self._lookups += 1
        try:
            async with self._pool.acquire(timeout=POOL_ACQUIRE_TIMEOUT_S) as connection:
                row = await connection.fetchrow(
                    self._queries["api_key_authenticate"],
                    digest,
                    LAST_USED_INTERVAL_S,
                    timeout=LOOKUP_TIMEOUT_S,
                )
        except POSTGRES_ERRORS as error:
            raise TenancyUnavailable(
                f"authentication storage unavailable ({type(error).__name__})"
            ) from error
        if row is None:
            return None
        # The unique index made the match exact; compare in constant time anyway.
        if not hmac.compare_digest(bytes(row["key_sha256"]), digest):
            return None
        if row["revoked_at"] is not None:
            return None
        return Principal(
            tenant_id=row["tenant_id"],
            key_id=row["key_id"],
            plan_id=row["plan_id"],
            requests_per_minute=row["requests_per_minute"],
            max_concurrent_runs=row["max_concurrent_runs"],
            retention_days=row["retention_days"],
            key_requests_per_minute=row["key_requests_per_minute"],
        )

    # --- the cache and its listener ---------------------------------------------------

    def cache_usable(self) -> bool:
        return self.cache.usable()

    async def wait_listening(self) -> None:
        """Return once the invalidation channel is subscribed (the cache is on)."""
        await self.cache.wait_listening()

    async def run_invalidation_listener(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The cache's invalidation listener: a supervised child, runs until cancelled.

        Reports started at once; until its subscription is up the cache is off.
        """
        await self.cache.run_listener(task_status=task_status)

    def statistics(self) -> TenancyStatistics:
        cache = self.cache.statistics()
        return TenancyStatistics(
            listening=cache.listening,
            subscriptions=cache.subscriptions,
            cache_entries=cache.entries,
            negative_cache_entries=cache.negative_entries,
            cache_hits=cache.hits,
            lookups=self._lookups,
        )
