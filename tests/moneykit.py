"""Helpers for tests that move money without the HTTP layer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import asyncpg

from dpp import ids
from dpp.actors.budgets import Budgets
from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.redis import Redis, open_redis
from dpp.money import ledger
from dpp.money.accounts import Accounts
from dpp.money.ledger import LedgerStore
from dpp.money.mirror import BudgetMirror


@dataclass
class Replica:
    """One replica's money side: its own pool, Redis client and budget actors
    (``budgets``: the one door money moves through; ``accounts``: the reads)."""

    pool: asyncpg.Pool
    redis: Redis
    queries: Queries
    mirror: BudgetMirror
    budgets: Budgets
    accounts: Accounts


@contextlib.asynccontextmanager
async def open_replica(
    database_url: str, redis_url: str, prefix: str, *, idle_timeout_s: float = 30.0
) -> AsyncIterator[Replica]:
    pool = await create_pool(database_url)
    redis = await open_redis(redis_url)
    queries = Queries.load()
    mirror = BudgetMirror(redis, prefix)
    budgets = Budgets(LedgerStore(pool, queries), mirror, idle_timeout_s=idle_timeout_s)
    try:
        async with anyio.create_task_group() as group:
            await group.start(budgets.run)
            try:
                yield Replica(
                    pool, redis, queries, mirror, budgets, Accounts(pool, queries, mirror)
                )
            finally:
                group.cancel_scope.cancel()
    finally:
        await redis.aclose()
        await pool.close()


async def create_tenant(pool: asyncpg.Pool, *, plan_id: str = "default", name: str = "t") -> str:
    tenant_id = ids.new_id("ten")
    await pool.execute(
        "INSERT INTO tenants (id, name, plan_id) VALUES ($1, $2, $3)", tenant_id, name, plan_id
    )
    return tenant_id


async def create_plan(pool: asyncpg.Pool, plan_id: str, *, max_concurrent_runs: int) -> None:
    await pool.execute(
        "INSERT INTO plans (id, requests_per_minute, max_concurrent_runs, retention_days)"
        " VALUES ($1, 600, $2, 30)",
        plan_id,
        max_concurrent_runs,
    )


def draft(
    reserved_usd_micros: int = 1_000,
    *,
    minimum_fee_usd_micros: int = 100,
    pack_type: str = "echo",
    api_key_id: str | None = None,
) -> ledger.RunDraft:
    return ledger.RunDraft(
        run_id=ids.new_id("run"),
        pack_type=pack_type,
        inputs={"payload": 1},
        metadata={},
        reserved_usd_micros=reserved_usd_micros,
        minimum_fee_usd_micros=minimum_fee_usd_micros,
        timebox_sec=30,
        trace_id=None,
        created_at=datetime.now(UTC),
        api_key_id=api_key_id,
    )


async def claim_for_test(pool: asyncpg.Pool, run_id: str) -> str:
    """Move a QUEUED run to CLAIMED with a lease, as a worker would (claim, then
    finalize's phase 1: the database allows no shortcut); return the token."""
    async with pool.acquire() as connection, connection.transaction():
        token = await connection.fetchval(
            "UPDATE runs SET status = 'PROCESSING', lease_token = gen_random_uuid(),"
            " lease_expires_at = now() + interval '1 minute', started_at = now(),"
            " version = version + 1"
            " WHERE id = $1 AND status = 'QUEUED' RETURNING lease_token",
            run_id,
        )
        assert token is not None
        await connection.execute(
            "UPDATE runs SET status = 'CLAIMED', claimed_at = now(), version = version + 1"
            " WHERE id = $1",
            run_id,
        )
    return str(token)
