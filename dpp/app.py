"""Composition root: open the adapters, build the AppContext and the supervision tree.

``open_context`` opens Postgres, Redis and object storage for the life of the
process (the `pools` layer of docs/architecture.md). ``run_server`` (used by
`dpp serve` / `dpp dev`) builds the tree on top and serves HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import prometheus_client
from anyio.abc import TaskStatus
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware

from dpp.actors.dispatcher import Dispatcher
from dpp.actors.reconciler import Reconciler
from dpp.actors.run import RunServices
from dpp.actors.supervisor import ChildSpec, Restart, Supervisor, SupervisorSpec
from dpp.adapters.blobs import open_blobs
from dpp.adapters.postgres import Queries, connect_postgres
from dpp.adapters.queue import open_queue
from dpp.adapters.redis import create_redis
from dpp.config import ConfigError, Settings, StartupError, require
from dpp.context import AppContext, ReadinessCheck
from dpp.http.app import create_app
from dpp.http.auth import ApiAuthMiddleware
from dpp.metrics import metrics_for
from dpp.money.mirror import BudgetMirror
from dpp.money_service import MoneyService
from dpp.packs import PackRegistry
from dpp.runs.admission import Admission
from dpp.runs.idempotency import IdempotencyKeys
from dpp.runs.service import Runs
from dpp.runs.store import RunStore
from dpp.tenancy.ratelimit import RateLimiter
from dpp.tenancy.service import Tenancy

log = logging.getLogger("dpp.app")

READINESS_TIMEOUT_S = 2.0


def _load_packs(env: dict[str, str]) -> PackRegistry:
    try:
        return PackRegistry.load(env)
    except ValueError as error:  # PackConfigError, DuplicatePackTypeError: one line each
        raise StartupError(str(error)) from error


def _readiness(pool: asyncpg.Pool, redis: Redis, blobs: Any) -> tuple[ReadinessCheck, ...]:
    async def postgres() -> None:
        async with pool.acquire(timeout=READINESS_TIMEOUT_S) as connection:
            await connection.fetchval("SELECT 1")

    async def redis_check() -> None:
        await redis.ping()

    async def object_storage() -> None:
        await blobs.ping()

    return (
        ReadinessCheck("postgres", postgres),
        ReadinessCheck("redis", redis_check),
        ReadinessCheck("object_storage", object_storage),
    )


@contextlib.asynccontextmanager
async def open_context(
    settings: Settings,
    *,
    actors_tree: Callable[[], dict[str, Any]] | None = None,
    environment: dict[str, str] | None = None,
) -> AsyncIterator[AppContext]:
    """Open every adapter; close them in reverse order on the way out."""
    database_url = require(settings.database_url, "DATABASE_URL")
    redis_url = require(settings.redis_url, "REDIS_URL")
    pool = await connect_postgres(database_url)
    redis = create_redis(redis_url)
    try:
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
            env = dict(os.environ if environment is None else environment)
            if settings.webhook_url:
                env["DPP_WEBHOOK_URL"] = settings.webhook_url
            context = AppContext(
                settings=settings,
                pool=pool,
                redis=redis,
                blobs=blobs,
                queries=Queries.load(),
                packs=_load_packs(env),
                metrics_registry=prometheus_client.CollectorRegistry(),
                readiness=_readiness(pool, redis, blobs),
                actors_tree=actors_tree or (lambda: {}),
            )
            yield context
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
            await pool.close()


@dataclass
class Runtime:
    """A live replica: its context, its ASGI app and its supervision tree."""

    context: AppContext
    app: Starlette
    supervisor: Supervisor


ROOT_INTENSITY = 5
ROOT_PERIOD_S = 30.0


def _build_services(base: AppContext) -> AppContext:
    settings = base.settings
    mirror = BudgetMirror(base.redis, settings.redis_prefix)
    money = MoneyService.build(
        base.pool, base.queries, mirror, metrics=metrics_for(base.metrics_registry)
    )
    tenancy = Tenancy(base.pool, base.queries, base.redis, settings)
    rate_limiter = RateLimiter(base.redis, settings.redis_prefix)
    return dataclasses.replace(base, money=money, tenancy=tenancy, rate_limiter=rate_limiter)


def build_app(context: AppContext) -> Starlette:
    from dpp.http import admin_money, admin_tenancy, routes_reconcile, routes_runs

    return create_app(
        context,
        extra_routes=[
            *routes_runs.routes(context),
            *admin_tenancy.routes(context),
            *admin_money.routes(context),
            *routes_reconcile.routes(context),
        ],
        inner_middleware=[
            Middleware(
                ApiAuthMiddleware, tenancy=context.tenancy, rate_limiter=context.rate_limiter
            )
        ],
    )


def _children(
    context: AppContext, dispatcher: Dispatcher | None, http: ChildSpec | None
) -> list[ChildSpec]:
    """The tree in dependency order (started in order, stopped in reverse):
    the auth listener, budgets (runs in flight settle through them while the
    dispatcher drains), the dispatcher, the reconciler, the HTTP front last
    (it starts when everything it calls is up, and stops first)."""
    children = [
        ChildSpec(
            id="auth-invalidation",
            kind="listener",
            start=context.tenancy.run_invalidation_listener,
            shutdown_s=2.0,
        ),
        context.money.budgets.child_spec(id="budgets"),
    ]
    if dispatcher is not None:
        children.append(dispatcher.child_spec())
    children.append(context.reconciler.child_spec())
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
        return supervisor.statistics() if supervisor is not None else {}

    async with (
        open_context(settings, actors_tree=tree, environment=environment) as base,
        open_queue(settings, base.pool, base.queries) as queue,
    ):
        context = dataclasses.replace(_build_services(base), queue=queue)
        context = dataclasses.replace(
            context,
            admission=Admission(
                keys=IdempotencyKeys(base.pool, base.queries),
                reserver=context.money,
                announcer=queue,
                metrics=metrics_for(base.metrics_registry),
            ),
            runs=Runs(RunStore(base.pool, base.queries), base.blobs, context.money),
        )
        if settings.queue_backend == "sqs":
            readiness = (*context.readiness, ReadinessCheck("sqs", queue.ping))
            context = dataclasses.replace(context, readiness=readiness)
        reconciler = Reconciler.from_context(context, queue)
        context = dataclasses.replace(context, reconciler=reconciler)
        dispatcher = None
        if dispatch:
            dispatcher = Dispatcher(
                RunServices.from_context(context, queue),
                concurrency=settings.worker_concurrency,
                shutdown_grace_s=settings.shutdown_grace_sec,
                on_run_crash=lambda run_id, error: reconciler.trigger(),
            )
        app = build_app(context)

        def on_child_crash(supervisor_name: str, child: str, error: BaseException) -> None:
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
            _children(context, dispatcher, http(app) if http is not None else None),
            on_child_crash=on_child_crash,
        )
        holder["root"] = supervisor
        async with anyio.create_task_group() as group:
            await group.start(supervisor.run)
            try:
                yield Runtime(context, app, supervisor)
            finally:
                with anyio.CancelScope(shield=True):
                    await supervisor.shutdown()


async def run_server(settings: Settings) -> None:
    """`dpp serve`: the whole replica, until SIGTERM/SIGINT (SPEC §5, §6 Shutdown)."""
    from dpp.server import install_signal_handlers, serve_http

    shutdown = anyio.Event()

    def http_child(app: Starlette) -> ChildSpec:
        async def start(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
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

    undo_signals = install_signal_handlers(shutdown)
    try:
        async with open_runtime(settings, http=http_child) as runtime:
            log.info("dpp serving", extra={"port": settings.port})
            await shutdown.wait()
            log.info("shutting down")
            await runtime.supervisor.shutdown()
    finally:
        undo_signals()


__all__ = ["ConfigError", "Runtime", "StartupError", "open_context", "open_runtime", "run_server"]
