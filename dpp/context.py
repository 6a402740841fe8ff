"""AppContext: the typed handles the HTTP front is built from.

Built once per replica by the composition root (`dpp/app.py`). Nothing reaches
for a global, and no handle is an adapter: a route gets the one service it
calls from here (admission, runs, accounts, budgets, tenancy, ...), so the
HTTP layer never sees a pool, a Redis client or a bucket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from dpp.actors.budgets import Budgets
from dpp.actors.reconciler import Reconciler
from dpp.config import Settings
from dpp.money.accounts import Accounts
from dpp.packs import PackRegistry
from dpp.runs.admission import Admission
from dpp.runs.downloads import ResultDownloads
from dpp.runs.gauges import OperatorGauges
from dpp.runs.service import Runs
from dpp.tenancy.ratelimit import RateLimiter
from dpp.tenancy.service import Tenancy


@dataclass(frozen=True, slots=True)
class ReadinessCheck:
    """One dependency `/readyz` asks; ``check`` raises (or times out) when it is down."""

    name: str
    check: Callable[[], Awaitable[None]]


def no_dependency(error: BaseException) -> str | None:
    """A classifier that knows no dependency (tests of the HTTP front alone)."""
    return None


@dataclass(frozen=True, slots=True)
class AppContext:
    settings: Settings
    packs: PackRegistry
    metrics_registry: CollectorRegistry
    readiness: tuple[ReadinessCheck, ...]
    # the live supervision tree as JSON-ready nodes (GET /admin/actors)
    actors_tree: Callable[[], dict[str, Any]]
    tenancy: Tenancy  # plans, tenants, keys; authenticates /v1
    rate_limiter: RateLimiter
    accounts: Accounts  # money reads: budgets in both stores, the audit
    budgets: Budgets  # the one door money moves through (credits here)
    admission: Admission  # POST /v1/runs
    runs: Runs  # read, page, cancel, usage, resolve
    # one reconciliation pass on demand (POST /admin/reconcile); None off the tree
    reconciler: Reconciler | None = None
    # the deployment's queue and audit gauges, refreshed when /metrics is scraped
    gauges: OperatorGauges | None = None
    # which dependency (postgres, redis, object_storage) an unhandled error says is
    # down, or None: such a request answers 503 with Retry-After, never 500. The
    # composition root wires dpp.adapters.failures.unavailable_dependency.
    unavailable_dependency: Callable[[BaseException], str | None] = no_dependency
    # GET /v1/results/{token} of a local results store (with S3: every token is 404)
    downloads: ResultDownloads = field(default_factory=lambda: ResultDownloads(None))
