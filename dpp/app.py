"""Composition root: open the adapters, build the AppContext and the supervision tree.

The only module that knows every layer. ``open_adapters`` opens Postgres,
Redis, object storage and the run queue for the life of the process;
``build_budgets``, ``build_run_services``, ``build_reconciler`` and
``build_context`` wire the ports each layer names (admission's ``Reserver``,
the runs service's ``Settler``, the actors' stores) to their implementations;
``open_runtime`` builds the supervision tree on top, and ``run_server`` (used
by `dpp serve` / `dpp dev`) serves HTTP until SIGTERM.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import prometheus_client
from anyio.abc import TaskStatus
from starlette.applications import Starlette

from dpp import tracing
from dpp.actors.budgets import Budgets
from dpp.actors.dispatcher import Dispatcher
from dpp.actors.reconciler import Reconciler
from dpp.actors.run import RunServices
from dpp.actors.supervisor import ChildSpec, Restart, Supervisor, SupervisorSpec
from dpp.adapters import postgres
from dpp.adapters.blobs import ResultStore, open_blobs
from dpp.adapters.failures import unavailable_dependency
from dpp.adapters.local_results import LocalResults, open_local_results
from dpp.adapters.postgres import Pool, Queries, connect_postgres
from dpp.adapters.queue import open_queue
from dpp.adapters.queue.base import LeaseStore, RunQueue
from dpp.adapters.redis import Redis, open_redis, ping_all, watch_cluster_mode
from dpp.config import Settings, StartupError, require
from dpp.context import AppContext, ReadinessCheck
from dpp.http.app import build_app
from dpp.metrics import metrics_for
from dpp.money.accounts import Accounts
from dpp.money.drift import DriftRepair, PostgresCounters
from dpp.money.ledger import LedgerStore
from dpp.money.mirror import BudgetMirror
from dpp.packs import PackRegistry
from dpp.runs.admission import Admission
from dpp.runs.downloads import ResultDownloads
from dpp.runs.gauges import OperatorGauges
from dpp.runs.idempotency import IdempotencyKeys
from dpp.runs.service import Runs
from dpp.runs.store import RunStore
from dpp.tenancy.ratelimit import RateLimiter
from dpp.tenancy.service import Tenancy

log = logging.getLogger("dpp.app")

READINESS_TIMEOUT_S = 2.0
ROOT_INTENSITY = 5
ROOT_PERIOD_S = 30.0

ActorsTree = Callable[[], dict[str, Any]]


def no_tree() -> dict[str, Any]:
    """The /admin/actors node of a context without a supervision tree (tests of the
    HTTP front alone, or a replica still starting): a root that is not running."""
    return {
        "name": "root",
        "kind": "supervisor",
        "state": "stopped",
        "mailbox_depth": 0,
        "restarts": 0,
        "children": [],
    }


@dataclass(frozen=True, slots=True)
class Adapters:
    """One replica's open connections and what was loaded with them.

    Only the composition root (and tests that reach around the API on purpose)
    holds these; every layer above gets the ports it needs, never the pool.
    """

    settings: Settings
    pool: Pool
    redis: Redis
    blobs: ResultStore  # S3 (adapters.blobs) or a local directory (adapters.local_results)
    queries: Queries
    queue: RunQueue
    mirror: BudgetMirror
    packs: PackRegistry
    metrics_registry: prometheus_client.CollectorRegistry


def _load_packs(env: dict[str, str]) -> PackRegistry:
    try:
        return PackRegistry.load(env)
    except ValueError as error:  # PackConfigError, DuplicatePackTypeError: one line each
        raise StartupError(str(error)) from error


@contextlib.asynccontextmanager
async def open_adapters(
    settings: Settings, *, environment: dict[str, str] | None = None
) -> AsyncIterator[Adapters]:
    """Open every adapter; close them in reverse order on the way out."""
    database_url = require(settings.database_url, "DATABASE_URL")
    redis_url = require(settings.redis_url, "REDIS_URL")
    env = dict(os.environ if environment is None else environment)
    if settings.webhook_url:
        env["DPP_WEBHOOK_URL"] = settings.webhook_url
    packs = _load_packs(env)
    queries = Queries.load()
    pool = await connect_postgres(database_url)
    try:
        redis = await open_redis(redis_url)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await pool.close()
        raise
    try:
        async with (
            open_results(settings) as blobs,
            open_queue(settings, pool, queries) as queue,
        ):
            yield Adapters(
                settings=settings,
                pool=pool,
                redis=redis,
                blobs=blobs,
                queries=queries,
                queue=queue,
                mirror=BudgetMirror(redis, settings.redis_prefix),
                packs=packs,
                metrics_registry=prometheus_client.CollectorRegistry(),
            )
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
            await pool.close()


@contextlib.asynccontextmanager
async def open_results(settings: Settings) -> AsyncIterator[ResultStore]:
    """The results store SPEC §5 says: a local directory when DPP_RESULTS_DIR is
    set, else the S3 bucket (created if missing)."""
    if settings.results_dir is not None:
        signing_key = settings.result_signing_key
        if signing_key is None:
            # only in development (config refuses it otherwise): links die with the process
            assert settings.development, "DPP_RESULT_SIGNING_KEY is required outside development"
            log.warning("DPP_RESULT_SIGNING_KEY unset: result links last until this process exits")
            signing_key = secrets.token_urlsafe(32)
        try:
            local = await open_local_results(
                settings.results_dir, signing_key, settings.presign_expiry_sec
            )
        except OSError as error:
            raise StartupError(
                f"DPP_RESULTS_DIR: cannot use {settings.results_dir} ({type(error).__name__})"
            ) from error
        yield local
        return
    async with open_blobs(
        settings.s3_endpoint_url,
        settings.s3_result_bucket,
        settings.s3_region,
        settings.presign_expiry_sec,
    ) as blobs:
        try:
            await blobs.ensure_bucket()
        except Exception as error:
            raise StartupError(
                f"S3_ENDPOINT_URL: cannot reach object storage ({type(error).__name__})"
            ) from error
        yield blobs


def local_results_of(adapters: Adapters) -> LocalResults | None:
    """The local store when the replica uses one (it serves /v1/results/{token})."""
    return adapters.blobs if isinstance(adapters.blobs, LocalResults) else None


def readiness_checks(adapters: Adapters) -> tuple[ReadinessCheck, ...]:
    """What ``/readyz`` asks: each dependency by the name SPEC §3 gives it."""
    redis, blobs, queue = adapters.redis, adapters.blobs, adapters.queue

    async def redis_ping() -> None:
        await ping_all(redis)

    checks = [
        ReadinessCheck("postgres", lambda: postgres.ping(adapters.pool, READINESS_TIMEOUT_S)),
        ReadinessCheck("redis", redis_ping),
        ReadinessCheck("object_storage", blobs.ping),
    ]
    if queue.backend == "sqs":
        checks.append(ReadinessCheck("sqs", queue.ping))
    return tuple(checks)


def build_budgets(adapters: Adapters) -> Budgets:
    """The budget and settlement actors' handle (its registries run under the
    supervisor)."""
    return Budgets(
        LedgerStore(adapters.pool, adapters.queries),
        adapters.mirror,
        metrics=metrics_for(adapters.metrics_registry),
        is_outage=lambda error: unavailable_dependency(error) is not None,
    )


def build_run_services(adapters: Adapters, budgets: Budgets) -> RunServices:
    settings = adapters.settings
    return RunServices(
        leases=LeaseStore(adapters.pool, adapters.queries),
        queue=adapters.queue,
        results=adapters.blobs,
        settler=budgets,
        packs=adapters.packs,
        lease_sec=settings.lease_sec,
        heartbeat_sec=settings.heartbeat_sec,
        metrics=metrics_for(adapters.metrics_registry),
    )


def build_reconciler(adapters: Adapters, budgets: Budgets, **timing: Any) -> Reconciler:
    """The reconciler over the replica's stores; ``timing`` overrides its intervals
    and thresholds (tests age runs faster than the settings would)."""
    settings = adapters.settings
    pool, queries = adapters.pool, adapters.queries
    intervals: dict[str, Any] = {
        "reaper_interval_s": settings.reaper_interval_sec,
        "reconcile_interval_s": settings.reconcile_interval_sec,
        "claimed_threshold_sec": settings.reconcile_threshold_sec,
    }
    return Reconciler(
        runs=RunStore(pool, queries),
        ledger=LedgerStore(pool, queries),
        keys=IdempotencyKeys(pool, queries),
        drift=DriftRepair(PostgresCounters(pool, queries), adapters.mirror),
        results=adapters.blobs,
        settler=budgets,
        queue=adapters.queue,
        metrics=metrics_for(adapters.metrics_registry),
        **(intervals | timing),
    )


def build_context(
    adapters: Adapters,
    budgets: Budgets,
    *,
    reconciler: Reconciler | None = None,
    actors_tree: ActorsTree | None = None,
) -> AppContext:
    """The services the HTTP front calls, each wired to the ports it names."""
    settings = adapters.settings
    pool, queries, redis = adapters.pool, adapters.queries, adapters.redis
    metrics = metrics_for(adapters.metrics_registry)
    accounts = Accounts(pool, queries, adapters.mirror)
    return AppContext(
        settings=settings,
        packs=adapters.packs,
        metrics_registry=adapters.metrics_registry,
        readiness=readiness_checks(adapters),
        actors_tree=actors_tree or no_tree,
        tenancy=Tenancy(pool, queries, redis, settings),
        rate_limiter=RateLimiter(
            redis, settings.redis_prefix, on_batch=metrics.batch_observer("rate_limit")
        ),
        accounts=accounts,
        budgets=budgets,
        admission=Admission(
            keys=IdempotencyKeys(pool, queries),
            reserver=budgets,
            announcer=adapters.queue,
            metrics=metrics,
        ),
        runs=Runs(
            RunStore(
                pool,
                queries,
                on_read_batch=metrics.batch_observer("read"),
                on_settled_read=metrics.settled_run_reads.inc,
            ),
            adapters.blobs,
            budgets,
        ),
        reconciler=reconciler,
        gauges=OperatorGauges(
            RunStore(pool, queries),
            lambda: accounts.audit(include_mirror=False),
            metrics,
            adapters.packs.pack_types(),
        ),
        unavailable_dependency=unavailable_dependency,
        downloads=ResultDownloads(local_results_of(adapters)),
    )


@contextlib.asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    actors_tree: ActorsTree | None = None,
    environment: dict[str, str] | None = None,
) -> AsyncIterator[AppContext]:
    """The context over freshly opened adapters, without a supervision tree (tests
    of the HTTP front that need no actor running)."""
    async with open_adapters(settings, environment=environment) as adapters:
        yield build_context(adapters, build_budgets(adapters), actors_tree=actors_tree)


@dataclass
class Runtime:
    """A live replica: its adapters, context, ASGI app and supervision tree."""

    adapters: Adapters
    context: AppContext
    app: Starlette
    supervisor: Supervisor


def _children(
    context: AppContext,
    budgets: Budgets,
    reconciler: Reconciler,
    dispatcher: Dispatcher | None,
    http: ChildSpec | None,
) -> list[ChildSpec]:
    """The tree in dependency order (started in order, stopped in reverse):
    the auth listener, the budget and settlement registries (runs in flight
    settle through them while the dispatcher drains), the dispatcher, the
    reconciler, the HTTP front last (it starts when everything it calls is
    up, and stops first)."""
    children = [
        ChildSpec(
            id="auth-invalidation",
            kind="listener",
            start=context.tenancy.run_invalidation_listener,
            shutdown_s=2.0,
        ),
        *budgets.child_specs(),
    ]
    if dispatcher is not None:
        children.append(dispatcher.child_spec())
    children.append(reconciler.child_spec())
    if http is not None:
        children.append(http)
    return children


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    http: Callable[[Starlette], ChildSpec] | None = None,
    environment: dict[str, str] | None = None,
    dispatch: bool = True,
) -> AsyncIterator[Runtime]:
    """A replica without a listening socket unless ``http`` builds the HTTP child.

    Tests drive ``runtime.app`` in-process; `dpp serve` adds hypercorn. With
    ``dispatch=False`` nothing claims runs (API tests that need runs to stay
    QUEUED); the reconciler still runs.
    """
    holder: dict[str, Supervisor] = {}

    def tree() -> dict[str, Any]:
        supervisor = holder.get("root")
        return supervisor.statistics() if supervisor is not None else no_tree()

    async with open_adapters(settings, environment=environment) as adapters:
        metrics = metrics_for(adapters.metrics_registry)
        budgets = build_budgets(adapters)
        reconciler = build_reconciler(adapters, budgets)

        context = build_context(adapters, budgets, reconciler=reconciler, actors_tree=tree)
        dispatcher = None
        if dispatch:
            dispatcher = Dispatcher(
                build_run_services(adapters, budgets),
                concurrency=settings.worker_concurrency,
                shutdown_grace_s=settings.shutdown_grace_sec,
                on_run_crash=lambda run_id, error: reconciler.trigger(),
            )
        app = build_app(context)

        def on_child_crash(supervisor_name: str, child: str, error: BaseException) -> None:
            metrics.supervisor_restarts.labels(child).inc()
            log.error(
                "actor crashed; restarting and reconciling",
                extra={
                    "supervisor": supervisor_name,
                    "child": child,
                    "error": type(error).__name__,
                },
            )
            reconciler.trigger()

        supervisor = Supervisor(
            "root",
            SupervisorSpec("one_for_one", intensity=ROOT_INTENSITY, period_s=ROOT_PERIOD_S),
            _children(
                context,
                budgets,
                reconciler,
                dispatcher,
                http(app) if http is not None else None,
            ),
            on_child_crash=on_child_crash,
        )
        holder["root"] = supervisor
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            try:
                yield Runtime(adapters, context, app, supervisor)
            finally:
                with anyio.CancelScope(shield=True):
                    await supervisor.shutdown()


def freeze_startup_heap() -> int:
    """Move every object alive now (modules, the app, pools, the OpenAPI
    document: what startup built, kept for the process's life) out of the
    cyclic collector's reach; returns how many are frozen.

    Without it each full collection under load walked that whole heap again
    (~85 ms each, ~5 % of a loaded replica's CPU, and as many ms added to the
    requests in flight). Objects are still freed by reference counting; only
    a reference cycle among them would no longer be collected, and these live
    until exit anyway. A collection first, so garbage is not frozen with them.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def run_server(settings: Settings) -> None:
    """`dpp serve`: the whole replica, until SIGTERM/SIGINT (SPEC §5, §6 Shutdown)."""
    from dpp.http.server import install_signal_handlers, serve_http

    shutdown = anyio.Event()

    def http_child(app: Starlette) -> ChildSpec:
        async def start(*, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
            await serve_http(app, settings, shutdown_trigger=shutdown, task_status=task_status)

        return ChildSpec(
            id="http",
            kind="http",
            start=start,
            # a normal exit (the shutdown trigger fired) is not restarted
            restart=Restart.TRANSIENT,
            shutdown_s=float(settings.shutdown_grace_sec) + 5,
            stop=shutdown.set,
        )

    if tracing.configure_tracing():  # before the app is built: it adds the server spans
        log.info(
            "tracing on: spans exported with OTLP",
            extra={"endpoint": tracing.tracing_endpoint(os.environ)},
        )
    late_cluster = False

    async def restart_on_late_cluster(redis: Redis) -> None:
        """Drain the replica when its Redis, silent at start, answers as a cluster
        node: the single client it started on would meet MOVED on most slots, and
        only a fresh start speaks the cluster protocol (``watch_cluster_mode``)."""
        nonlocal late_cluster
        if await watch_cluster_mode(redis):
            log.error(
                "redis answered as a cluster node after this replica started on the "
                "single client; draining to restart"
            )
            late_cluster = True
            shutdown.set()

    undo_signals = install_signal_handlers(shutdown)
    try:
        async with open_runtime(settings, http=http_child) as runtime:
            freeze_startup_heap()
            log.info("dpp serving", extra={"port": settings.port})
            async with anyio.create_task_group() as watchers:
                watchers.start_soon(restart_on_late_cluster, runtime.adapters.redis)
                await shutdown.wait()
                watchers.cancel_scope.cancel()
            log.info("shutting down")
            await runtime.supervisor.shutdown()
    finally:
        undo_signals()
        with anyio.CancelScope(shield=True):
            # flushes the spans still batched (bounded by the exporter's timeout)
            await anyio.to_thread.run_sync(tracing.shutdown_tracing)
    if late_cluster:
        # exit 1: `dpp serve --processes N`, systemd or Kubernetes start it afresh
        raise StartupError(
            "REDIS_URL: names a Redis Cluster node that did not answer when this "
            "replica started; it drained and exits so that a restart detects the cluster"
        )
