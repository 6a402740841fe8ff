"""Tenancy: plans, tenants and API keys, and authenticating a request's key.

Storage is Postgres (``sql/queries/tenancy.sql``). ``authenticate`` sits on
every ``/v1`` request, so each replica keeps a small cache of recent answers
(positive and negative) keyed by the key's SHA-256 — never by the key.

Why the cache is safe:

* A revocation is written to Postgres, then published on the Redis channel
  ``<prefix>:auth:revoked``. Every replica runs ``run_invalidation_listener``,
  which evicts the entry on receipt, so a revoked key is refused at once
  everywhere (within pub/sub delivery, milliseconds).
* Pub/sub is fire-and-forget: a message sent while a subscriber is
  disconnected is lost. So the cache is used only while the subscription is
  confirmed alive (the listener pings; silence beyond
  ``LISTENER_SILENCE_MAX_S`` disables it), and it is emptied whenever the
  subscription is (re)established or lost. Correctness never depends on the
  listener running: without it every lookup goes to Postgres.
* A lookup that was in flight while an eviction happened does not fill the
  cache (the ``epoch`` check), so a stale answer read just before a revoke
  cannot be cached just after it.
* Entries expire after ``cache_ttl_s`` (30 s) as a backstop for anything else
  (a plan change whose broadcast failed, say).

Expected failures are typed exceptions (``TenancyError`` subclasses) that the
HTTP layer maps to problems and the CLI to one line on stderr.
"""

from __future__ import annotations

import collections
import datetime
import hmac
import logging
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import asyncpg
from anyio.abc import TaskStatus
from redis.exceptions import RedisError

from dpp.ids import is_id, new_id
from dpp.keys import generate_api_key, key_hint, key_sha256, parse_api_key, parse_bearer

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dpp.config import Settings
    from dpp.db import Queries

log = logging.getLogger("dpp.tenancy")

DEFAULT_PLAN_ID: Final = "default"
PLAN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # the plans.id CHECK
REQUESTS_PER_MINUTE_MAX: Final = 1_000_000
MAX_CONCURRENT_RUNS_MAX: Final = 100_000
RETENTION_DAYS_MAX: Final = 3_650
NAME_LENGTH_MAX: Final = 200

CACHE_TTL_S: Final = 30.0
CACHE_ENTRIES_MAX: Final = 10_000
# Negative answers live apart, so a flood of well-formed random keys cannot
# push the real tenants' entries out.
NEGATIVE_CACHE_ENTRIES_MAX: Final = 4_096
LAST_USED_INTERVAL_S: Final = 60.0
POOL_ACQUIRE_TIMEOUT_S: Final = 5.0
PUBLISH_TIMEOUT_S: Final = 5.0
LISTENER_PING_INTERVAL_S: Final = 1.0
LISTENER_SILENCE_MAX_S: Final = 3.0
LISTENER_BACKOFF_FIRST_S: Final = 0.1
LISTENER_BACKOFF_MAX_S: Final = 5.0
LISTENER_CLOSE_TIMEOUT_S: Final = 2.0
FLUSH_ALL: Final = b"*"


# --- errors ----------------------------------------------------------------------------


class TenancyError(Exception):
    """An expected tenancy failure; ``str(error)`` is one line, safe to show."""


class InvalidField(TenancyError):
    """A value is malformed or out of range; ``field`` names it (HTTP 422)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class PlanExists(TenancyError):
    """A plan with this id exists already (HTTP 409)."""


class PlanNotFound(TenancyError):
    """No plan with this id (HTTP 422 when named in a body)."""


class TenantNotFound(TenancyError):
    """No tenant with this id (HTTP 404)."""


class ApiKeyNotFound(TenancyError):
    """No API key with this id (HTTP 404)."""


class TenancyUnavailable(TenancyError):
    """Postgres did not answer an authentication lookup (HTTP 503, fail closed)."""


class InvalidationNotBroadcast(TenancyError):
    """The change is stored, but telling the other replicas failed (HTTP 503).

    Retrying is safe (revocation is idempotent) and broadcasts again; until
    then other replicas refuse the key once their cache entry ages out.
    """


# --- validation (shared by the admin API and the CLI) ----------------------------------


def check_whole_number(value: object, field: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, f"expected a whole number from {low} to {high}")
    if not low <= value <= high:
        raise InvalidField(field, f"expected a whole number from {low} to {high}, got {value}")
    return value


def check_plan_id(value: object, field: str = "id") -> str:
    if not isinstance(value, str) or PLAN_ID_PATTERN.fullmatch(value) is None:
        raise InvalidField(
            field, "expected 1-63 of [a-z0-9_-], starting with a lowercase letter or digit"
        )
    return value


def check_name(value: object, field: str = "name") -> str:
    """A display name: 1-200 characters, not blank, no control characters."""
    if not isinstance(value, str):
        raise InvalidField(field, "expected a string")
    if not 1 <= len(value) <= NAME_LENGTH_MAX:
        raise InvalidField(field, f"expected 1 to {NAME_LENGTH_MAX} characters")
    if not value.strip():
        raise InvalidField(field, "must not be blank")
    if any(unicodedata.category(character) in ("Cc", "Cs") for character in value):
        raise InvalidField(field, "must not contain control characters")
    return value


def check_requests_per_minute(value: object, field: str = "requests_per_minute") -> int:
    return check_whole_number(value, field, 1, REQUESTS_PER_MINUTE_MAX)


# --- records ---------------------------------------------------------------------------


def timestamp_text(moment: datetime.datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, as every DPP document writes times."""
    if moment is None:
        return None
    assert moment.tzinfo is not None, "timestamps are timezone-aware"
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    requests_per_minute: int
    max_concurrent_runs: int
    retention_days: int
    created_at: datetime.datetime
    updated_at: datetime.datetime

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "requests_per_minute": self.requests_per_minute,
            "max_concurrent_runs": self.max_concurrent_runs,
            "retention_days": self.retention_days,
            "created_at": timestamp_text(self.created_at),
            "updated_at": timestamp_text(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    plan: Plan
    created_at: datetime.datetime

    @property
    def plan_id(self) -> str:
        return self.plan.id

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "plan_id": self.plan.id,
            "created_at": timestamp_text(self.created_at),
            "plan": self.plan.document(),
        }


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's stored facts; never the key itself (only its hash is stored)."""

    id: str
    tenant_id: str
    name: str
    key_hint: str
    requests_per_minute: int | None
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "key_hint": self.key_hint,
            "requests_per_minute": self.requests_per_minute,
            "created_at": timestamp_text(self.created_at),
            "last_used_at": timestamp_text(self.last_used_at),
            "revoked_at": timestamp_text(self.revoked_at),
        }


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated request acts for, and the limits that apply to it."""

    tenant_id: str
    key_id: str
    plan_id: str
    requests_per_minute: int
    max_concurrent_runs: int
    retention_days: int
    key_requests_per_minute: int | None

    def __post_init__(self) -> None:
        assert is_id(self.tenant_id, "ten") and is_id(self.key_id, "key")
        assert 1 <= self.requests_per_minute <= REQUESTS_PER_MINUTE_MAX
        assert self.key_requests_per_minute is None or (
            1 <= self.key_requests_per_minute <= REQUESTS_PER_MINUTE_MAX
        )

    def plan_document(self) -> dict[str, Any]:
        """The ``plan`` member of ``GET /v1/budget`` (SPEC §6 "Plan limits")."""
        return {
            "id": self.plan_id,
            "requests_per_minute": self.requests_per_minute,
            "max_concurrent_runs": self.max_concurrent_runs,
            "retention_days": self.retention_days,
        }


@dataclass(frozen=True, slots=True)
class TenancyStatistics:
    listening: bool
    subscriptions: int  # how many times the invalidation channel was (re)subscribed
    cache_entries: int
    negative_cache_entries: int
    cache_hits: int
    lookups: int  # authentication lookups that went to Postgres


def _plan(row: asyncpg.Record, prefix: str = "") -> Plan:
    return Plan(
        id=row["plan_id" if prefix else "id"],
        requests_per_minute=row["requests_per_minute"],
        max_concurrent_runs=row["max_concurrent_runs"],
        retention_days=row["retention_days"],
        created_at=row[f"{prefix}created_at"],
        updated_at=row[f"{prefix}updated_at"],
    )


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"], name=row["name"], plan=_plan(row, "plan_"), created_at=row["created_at"]
    )


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        key_hint=row["key_hint"],
        requests_per_minute=row["requests_per_minute"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


# --- the cache -------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    principal: Principal | None
    expires_at: float


class _Flight:
    """One Postgres lookup that concurrent requests with the same key share."""

    __slots__ = ("done", "epoch", "ok", "result")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.done = anyio.Event()
        self.ok = False
        self.result: Principal | None = None


_MISS: Final = object()


class Tenancy:
    """Plans, tenants and keys in Postgres; authentication with a per-replica cache.

    ``run_invalidation_listener`` must run (under the supervisor) for the cache
    to be used at all; without it every authentication reads Postgres.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Queries,
        redis: Redis,
        settings: Settings,
        *,
        cache_ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert cache_ttl_s > 0
        self._pool = pool
        self._queries = queries
        self._redis = redis
        self._clock = clock
        self._cache_ttl_s = cache_ttl_s
        self.channel = f"{settings.redis_prefix}:auth:revoked"
        self._positive: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._negative: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._flights: dict[bytes, _Flight] = {}
        # bumped on every eviction, so a lookup that straddles one is not cached
        self._epoch = 0
        self._listening = False
        self._listening_event = anyio.Event()
        self._heard_at = float("-inf")
        self._subscriptions = 0
        self._cache_hits = 0
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
        if PLAN_ID_PATTERN.fullmatch(plan_id) is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        row = await self._pool.fetchrow(
            self._queries["plan_update"], plan_id, rpm, concurrent, retention
        )
        if row is None:
            raise PlanNotFound(f"no plan {plan_id!r}")
        await self._broadcast(FLUSH_ALL, f"plan {plan_id} updated")
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

    async def set_tenant_plan(self, tenant_id: str, plan_id: object) -> Tenant:
        """Move a tenant to another plan; every replica forgets its cached principals."""
        plan_id = check_plan_id(plan_id, "plan_id")
        if not is_id(tenant_id, "ten"):
            raise TenantNotFound("no such tenant")
        row = await self._pool.fetchrow(self._queries["tenant_set_plan"], tenant_id, plan_id)
        if row is None:
            await self.get_tenant(tenant_id)  # raises TenantNotFound when that is why
            raise PlanNotFound(f"no plan {plan_id!r}")
        await self._broadcast(FLUSH_ALL, f"tenant {tenant_id} changed plan")
        return await self.get_tenant(tenant_id)

    # --- keys --------------------------------------------------------------------------

    async def issue_key_record(
        self,
        tenant_id: str,
        name: object = None,
        requests_per_minute: object = None,
    ) -> tuple[ApiKey, str]:
        """A new key for the tenant: its stored record and the key (shown once).

        ``requests_per_minute`` (optional) is the key's own limit; it binds only
        when lower than the tenant's plan (SPEC §6).
        """
        name_text = "" if name is None else check_name(name)
        key_rpm = (
            None if requests_per_minute is None else check_requests_per_minute(requests_per_minute)
        )
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
        self._evict(digest)
        log.info("api key revoked", extra={"tenant_id": record.tenant_id, "key_id": record.id})
        await self._broadcast(digest.hex().encode("ascii"), f"key {key_id} revoked")
        return record

    async def _broadcast(self, payload: bytes, what: str) -> None:
        try:
            with anyio.fail_after(PUBLISH_TIMEOUT_S):
                await self._redis.publish(self.channel, payload)
        except (RedisError, OSError) as error:
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
        cached = self._cache_get(digest)
        if cached is not _MISS:
            assert cached is None or isinstance(cached, Principal)
            return cached
        return await self._lookup_shared(digest)

    async def _lookup_shared(self, digest: bytes) -> Principal | None:
        """Look up once for all concurrent requests with this key (no stampede)."""
        flight = self._flights.get(digest)
        if flight is not None and flight.epoch == self._epoch:
            await flight.done.wait()
            if flight.ok and flight.epoch == self._epoch:
                return flight.result
        flight = _Flight(self._epoch)
        self._flights[digest] = flight
        try:
            result = await self._lookup(digest)
            flight.result, flight.ok = result, True
            if flight.epoch == self._epoch:
                self._cache_put(digest, result)
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
                    self._queries["api_key_authenticate"], digest, LAST_USED_INTERVAL_S
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
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

    # --- the cache -------------------------------------------------------------------

    def cache_usable(self) -> bool:
        """Whether the invalidation subscription is confirmed alive right now."""
        return self._listening and self._clock() - self._heard_at <= LISTENER_SILENCE_MAX_S

    def _cache_get(self, digest: bytes) -> object:
        if not self.cache_usable():
            return _MISS
        now = self._clock()
        for entries in (self._positive, self._negative):
            entry = entries.get(digest)
            if entry is None:
                continue
            if entry.expires_at <= now:
                del entries[digest]
                return _MISS
            entries.move_to_end(digest)
            self._cache_hits += 1
            return entry.principal
        return _MISS

    def _cache_put(self, digest: bytes, principal: Principal | None) -> None:
        if not self.cache_usable():
            return
        entries, other, limit = (
            (self._positive, self._negative, CACHE_ENTRIES_MAX)
            if principal is not None
            else (self._negative, self._positive, NEGATIVE_CACHE_ENTRIES_MAX)
        )
        other.pop(digest, None)
        entries[digest] = _Entry(principal, self._clock() + self._cache_ttl_s)
        entries.move_to_end(digest)
        while len(entries) > limit:
            entries.popitem(last=False)
        assert len(self._positive) <= CACHE_ENTRIES_MAX
        assert len(self._negative) <= NEGATIVE_CACHE_ENTRIES_MAX

    def _evict(self, digest: bytes) -> None:
        self._epoch += 1
        self._positive.pop(digest, None)
        self._negative.pop(digest, None)

    def _clear(self) -> None:
        self._epoch += 1
        self._positive.clear()
        self._negative.clear()

    def statistics(self) -> TenancyStatistics:
        return TenancyStatistics(
            listening=self._listening,
            subscriptions=self._subscriptions,
            cache_entries=len(self._positive),
            negative_cache_entries=len(self._negative),
            cache_hits=self._cache_hits,
            lookups=self._lookups,
        )

    # --- the invalidation listener ---------------------------------------------------

    async def wait_listening(self) -> None:
        """Return once the invalidation channel is subscribed (the cache is on)."""
        while not self._listening:
            await self._listening_event.wait()

    async def run_invalidation_listener(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Evict cached keys as revocations arrive; runs until cancelled.

        Started at once: until the subscription is up the cache is simply off.
        Reconnects with bounded exponential backoff; never returns normally.
        """
        task_status.started()
        backoff_s = LISTENER_BACKOFF_FIRST_S
        while True:
            subscriptions_before = self._subscriptions
            try:
                await self._listen()
            except (RedisError, OSError) as error:
                log.warning(
                    "auth invalidation channel lost; key cache off until it is back",
                    extra={"error": type(error).__name__, "retry_in_s": backoff_s},
                )
            if self._subscriptions != subscriptions_before:
                backoff_s = LISTENER_BACKOFF_FIRST_S
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, LISTENER_BACKOFF_MAX_S)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            ping_sent_at: float | None = None
            while True:
                message = await pubsub.get_message(timeout=LISTENER_PING_INTERVAL_S)
                now = self._clock()
                if message is None:
                    if ping_sent_at is None:
                        await pubsub.ping()
                        ping_sent_at = now
                    elif now - ping_sent_at > LISTENER_SILENCE_MAX_S:
                        raise TimeoutError("no answer to ping on the invalidation channel")
                    continue
                kind = message["type"]
                kind = kind.decode() if isinstance(kind, bytes) else kind
                if kind == "pong":
                    # everything published before the ping has been delivered
                    self._heard_at = ping_sent_at if ping_sent_at is not None else now
                    ping_sent_at = None
                elif kind == "subscribe":
                    self._on_subscribed(now)
                elif kind == "message":
                    self._heard_at = now
                    self._on_invalidation(message["data"])
                elif kind == "unsubscribe":
                    raise RedisError("unsubscribed from the invalidation channel")
        finally:
            self._on_unsubscribed()
            with anyio.move_on_after(LISTENER_CLOSE_TIMEOUT_S, shield=True):
                await pubsub.aclose()

    def _on_subscribed(self, now: float) -> None:
        # Anything may have been published while we were not subscribed
        # (redis-py also resubscribes by itself after a reconnect): start empty.
        self._clear()
        self._subscriptions += 1
        self._heard_at = now
        self._listening = True
        self._listening_event.set()
        log.info("auth invalidation channel subscribed", extra={"channel": self.channel})

    def _on_unsubscribed(self) -> None:
        self._listening = False
        self._heard_at = float("-inf")
        self._clear()
        if self._listening_event.is_set():
            self._listening_event = anyio.Event()

    def _on_invalidation(self, data: object) -> None:
        if not isinstance(data, bytes):
            data = str(data).encode()
        if data == FLUSH_ALL:
            self._clear()
            return
        try:
            digest = bytes.fromhex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != 32:
            # unknown message: be safe and forget everything
            log.warning("unrecognised auth invalidation message; cache cleared")
            self._clear()
            return
        self._evict(digest)
