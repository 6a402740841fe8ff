"""Benchmark: hot-tenant batched reservations/s of this tree beside another commit's.

Runs `bench_reservations.py`'s one-tenant, batch_max=64 scenario from two
source trees (this one and, e.g., a worktree at the baseline commit), each in
its own process and its own freshly migrated database, alternating
A, B, A, B, ... so that machine noise falls on both alike; prints each figure,
the median of each side and the ratio.

    git worktree add --detach /tmp/base e6212eb
    .venv/bin/python bench/compare_hot_tenant.py --baseline /tmp/base --rounds 3
    .venv/bin/python bench/compare_hot_tenant.py --baseline /tmp/base --rounds 3 --tenants 1000

``--tenants 1000`` runs the 1,000-tenant scenario instead (same load, spread).

Uses DPP_BENCH_DATABASE_URL / DPP_BENCH_REDIS_URL like the other benchmarks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# One measurement in a child process whose imports come from ``tree``.
CHILD = """
import asyncio, importlib.util, os, secrets, sys
tree, n, tenant_count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
spec = importlib.util.spec_from_file_location("b", tree + "/bench/bench_reservations.py")
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
import asyncpg, anyio

async def main():
    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"dpp_bench_{secrets.token_hex(4)}"
    prefix = f"dppbench{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = b.with_database(admin_url, name)
        await b.apply_migrations(url)
        pool = await b.create_pool(url, max_size=20)
        redis = b.create_redis(redis_url)
        await b.create_plan(pool, "bench", max_concurrent_runs=100_000)
        rate = await b.scenario(pool, redis, prefix, tenant_count, 64, n)
        assert b.__file__.startswith(tree)
        print(f"{rate:.1f}")
        await redis.aclose()
        await pool.close()
    finally:
        await anyio.to_thread.run_sync(b.delete_redis_prefix, redis_url, prefix)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

asyncio.run(main())
"""


def measure(tree: Path, reservations: int, tenants: int = 1) -> float:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(reservations), str(tenants)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    ).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reservations", type=int, default=3000)
    parser.add_argument(
        "--tenants", type=int, default=1, help="spread the load over T tenants (1: the hot one)"
    )
    arguments = parser.parse_args()
    trees = {"baseline": arguments.baseline.resolve(), "this tree": HERE}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    for round_index in range(arguments.rounds):
        for name, tree in trees.items():
            rate = measure(tree, arguments.reservations, arguments.tenants)
            rates[name].append(rate)
            print(f"round {round_index + 1} {name:9s} ({tree}): {rate:8.0f} reservations/s")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"median {name:9s}: {value:8.0f} reservations/s")
    print(f"this tree / baseline: {medians['this tree'] / medians['baseline']:.2f}")


if __name__ == "__main__":
    main()
