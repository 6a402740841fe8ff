"""AppContext: the explicit handles the HTTP front and the actors are built from.

Built once by the composition root (`dpp/app.py`). Nothing reaches for a global:
a route gets what it needs from here, so tests can build a context over real
services of their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg
    import prometheus_client
    from redis.asyncio import Redis

    from dpp.adapters.blobs import Blobs
    from dpp.adapters.postgres import Queries
    from dpp.config import Settings
    from dpp.packs import PackRegistry


@dataclass(frozen=True, slots=True)
class ReadinessCheck:
    """One dependency `/readyz` asks; ``check`` raises (or times out) when it is down."""

    name: str
    check: Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AppContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    blobs: Blobs
    queries: Queries
    packs: PackRegistry
    metrics_registry: prometheus_client.CollectorRegistry
    readiness: tuple[ReadinessCheck, ...]
    # the live supervision tree as JSON-ready nodes (GET /admin/actors)
    actors_tree: Callable[[], dict[str, Any]]
    # services, each owned by its module (see docs/architecture.md)
    tenancy: Any = None  # dpp.tenancy.Tenancy: plans, tenants, keys, auth cache
    rate_limiter: Any = None  # dpp.tenancy.ratelimit.RateLimiter
    money: Any = None  # dpp.money_service.MoneyService: credit, reserve, settle, audit
    admission: Any = None  # dpp.runs.admission.Admission: submit
    runs: Any = None  # dpp.runs.service.Runs: get, page, cancel, usage, resolve
    reconciler: Any = None  # dpp.actors.reconciler handle: reconcile_once()
    queue: Any = None  # dpp.adapters.queue backend: enqueue() after a reservation commits
