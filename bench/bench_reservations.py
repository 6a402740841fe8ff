"""Benchmark: reservations per second, batched (group commit) vs unbatched.

Measures, in one run against the same Postgres and Redis:
  - one hot tenant, 64 concurrent submitters, batch_max=64 vs batch_max=1;
  - 1,000 tenants, the same load spread across them;
  - the resident memory of one process with 10,000 budget actors started,
    and after they idle out.
Figures are reported as ratios against the unbatched baseline measured in the
same run (absolute numbers depend on the machine).

    .venv/bin/python bench/bench_reservations.py [--reservations 4000]

Uses DPP_BENCH_DATABASE_URL / DPP_BENCH_REDIS_URL (defaults: the local servers
on 127.0.0.1); creates and drops its own database and Redis prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpp.actors.budgets import Budgets
from dpp.adapters.migrate import apply_migrations
from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.redis import create_redis
from dpp.money.ledger import LedgerStore, Reserved
from dpp.money.mirror import BudgetMirror
from tests.moneykit import create_plan, create_tenant, draft
from tests.services import delete_redis_prefix, with_database

CONCURRENCY = 64


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(budgets: Budgets, tenants: list[str], reservations: int) -> float:
    remaining = reservations
    accepted = 0

    async def submitter() -> None:
        nonlocal remaining, accepted
        index = 0
        while remaining > 0:
            remaining -= 1
            index += 1
            tenant = tenants[(index * 7919 + id(asyncio.current_task())) % len(tenants)]
            if isinstance(await budgets.reserve(tenant, draft(100)), Reserved):
                accepted += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(CONCURRENCY):
            group.start_soon(submitter)
    elapsed = time.perf_counter() - started
    assert accepted == reservations, (accepted, reservations)
    return reservations / elapsed


async def scenario(pool, redis, prefix, tenant_count: int, batch_max: int, n: int) -> float:
    queries = Queries.load()
    budgets = Budgets(LedgerStore(pool, queries), BudgetMirror(redis, prefix), batch_max=batch_max)
    tenants = []
    for _ in range(tenant_count):
        tenant = await create_tenant(pool, plan_id="bench")
        await money_credit(pool, queries, tenant)
        tenants.append(tenant)
    async with anyio.create_task_group() as group:
        await group.start(budgets.run)
        await measure(budgets, tenants, min(n, 256))  # warm up: actors, mirrors, plans
        rate = await measure(budgets, tenants, n)
        group.cancel_scope.cancel()
    return rate


async def money_credit(pool, queries, tenant: str) -> None:
    from dpp.money import ledger

    await ledger.credit(pool, queries, tenant, 10**12, f"credit:{tenant}:bench")


async def actor_memory(pool, redis, prefix: str, count: int) -> tuple[float, float, float]:
    queries = Queries.load()
    budgets = Budgets(LedgerStore(pool, queries), BudgetMirror(redis, prefix), idle_timeout_s=10.0)
    tenants = [await create_tenant(pool, plan_id="bench") for _ in range(count)]
    before = rss_mib()
    async with anyio.create_task_group() as group:
        await group.start(budgets.run)
        limiter = anyio.Semaphore(64)

        async def touch(tenant: str) -> None:
            async with limiter:
                await budgets.registry.get(tenant)

        async with anyio.create_task_group() as starters:
            for tenant in tenants:
                starters.start_soon(touch, tenant)
        started = rss_mib()
        running = len(budgets.registry)
        await anyio.sleep(12.0)
        idle = rss_mib()
        left = len(budgets.registry)
        group.cancel_scope.cancel()
    print(f"  budget actors started: {running}, still running after idle: {left}")
    return before, started, idle


async def main(reservations: int, actors: int) -> None:
    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"dpp_bench_{secrets.token_hex(4)}"
    import asyncpg

    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    prefix = f"dppbench{secrets.token_hex(4)}"
    url = with_database(admin_url, name)
    try:
        await apply_migrations(url)
        pool = await create_pool(url, max_size=20)
        redis = create_redis(redis_url)
        await create_plan(pool, "bench", max_concurrent_runs=100_000)
        print(f"reservations per measurement: {reservations}, submitters: {CONCURRENCY}")
        results = {}
        for tenants in (1, 1000):
            for batch_max in (1, 64):
                rate = await scenario(pool, redis, prefix, tenants, batch_max, reservations)
                results[(tenants, batch_max)] = rate
                print(
                    f"  tenants={tenants:5d} batch_max={batch_max:3d}: {rate:9.0f} reservations/s"
                )
        for tenants in (1, 1000):
            ratio = results[(tenants, 64)] / results[(tenants, 1)]
            print(f"  ratio batched/unbatched, {tenants} tenant(s): {ratio:.1f}x")
        before, started, idle = await actor_memory(pool, redis, prefix, actors)
        print(
            f"  RSS: {before:.0f} MiB before, {started:.0f} MiB with {actors} budget actors "
            f"(+{(started - before) * 1024 / actors:.1f} KiB each), {idle:.0f} MiB after idle-out"
        )
        await redis.aclose()
        await pool.close()
    finally:
        await anyio.to_thread.run_sync(delete_redis_prefix, redis_url, prefix)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reservations", type=int, default=4000)
    parser.add_argument("--actors", type=int, default=10_000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.reservations, arguments.actors))
