"""Composition root: open the adapters, build the AppContext and the supervision tree.

``open_context`` opens Postgres, Redis and object storage for the life of the
process (the `pools` layer of docs/architecture.md). ``run_server`` (used by
`dpp serve` / `dpp dev`) builds the tree on top and serves HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import asyncpg
import prometheus_client
from redis.asyncio import Redis

from dpp.blobs import open_blobs
from dpp.cache import create_redis
from dpp.config import ConfigError, Settings, require
from dpp.context import AppContext, ReadinessCheck
from dpp.db import Queries, create_pool
from dpp.packs import PackRegistry

log = logging.getLogger("dpp.app")

CONNECT_ATTEMPTS_MAX = 6
CONNECT_BACKOFF_FIRST_S = 0.5
READINESS_TIMEOUT_S = 2.0


class StartupError(Exception):
    """A dependency could not be reached at start; the message is one line."""


async def connect_postgres(url: str) -> asyncpg.Pool:
    """The pool, retrying with exponential backoff (a database may start after us)."""
    delay_s = CONNECT_BACKOFF_FIRST_S
    for attempt in range(1, CONNECT_ATTEMPTS_MAX + 1):
        try:
            return await create_pool(url)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            if attempt == CONNECT_ATTEMPTS_MAX:
                raise StartupError(
                    f"DATABASE_URL: cannot reach Postgres after {attempt} attempts "
                    f"({type(error).__name__})"
                ) from error
            log.warning(
                "postgres not reachable, retrying",
                extra={"attempt": attempt, "delay_s": delay_s, "error": type(error).__name__},
            )
            await anyio.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable")


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
                packs=PackRegistry.load(env),
                metrics_registry=prometheus_client.CollectorRegistry(),
                readiness=_readiness(pool, redis, blobs),
                actors_tree=actors_tree or (lambda: {}),
            )
            yield context
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
            await pool.close()


__all__ = ["ConfigError", "StartupError", "open_context"]
