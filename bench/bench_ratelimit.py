"""Benchmark: rate-limit checks per second and CPU µs per check, in one process.

``concurrency`` tasks call ``RateLimiter.check`` back to back for ``seconds``
against the local Redis: one hot tenant (every task checks the same one: what
coalescing batches), ``--tenants`` tenants (the load spread: little to batch),
and one task alone (the lone check, which must cost what it did before).
Reports checks/s, this process's CPU µs per check (``time.process_time``:
DPP's and redis-py's Python, not the Redis server's) and EVALSHA calls per
check (from ``INFO commandstats``; approximate when others share the Redis).

With ``--baseline TREE`` (e.g. a worktree at the parent commit) each scenario
runs from both trees, each in its own process, alternating baseline / this
tree for ``--rounds`` rounds, and the medians' ratios are printed:

    git worktree add --detach /tmp/rb-base <parent>
    .venv/bin/python bench/bench_ratelimit.py --baseline /tmp/rb-base --seconds 5 --rounds 3

Uses DPP_BENCH_REDIS_URL (default: the local Redis on 127.0.0.1) and a Redis
prefix of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
QUOTA = 1_000_000  # per minute: the checks are allowed (a refusal costs the same)


@dataclasses.dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    concurrency: int
    tenants: int


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    checks_per_s: float
    cpu_us_per_check: float
    calls_per_check: float


async def evalsha_calls(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def measure(tree: Path, scenario: Scenario, seconds: float) -> Figures:
    """One scenario with ``dpp`` imported from ``tree`` (this process's only import)."""
    sys.path.insert(0, str(tree))
    from dpp.adapters.redis import create_redis
    from dpp.tenancy.principal import Principal
    from dpp.tenancy.ratelimit import RateLimiter

    assert Path(sys.modules["dpp"].__file__ or "").is_relative_to(tree)
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"dppbench{secrets.token_hex(4)}"
    redis = create_redis(redis_url)
    limiter = RateLimiter(redis, prefix)
    principals = [
        Principal(
            tenant_id=f"ten_bench{index}",
            key_id=f"key_bench{index}",
            plan_id="bench",
            requests_per_minute=QUOTA,
            max_concurrent_runs=10,
            retention_days=30,
            key_requests_per_minute=None,
        )
        for index in range(scenario.tenants)
    ]
    checks = 0
    deadline = 0.0

    async def checker(offset: int) -> None:
        nonlocal checks
        index = offset
        while time.perf_counter() < deadline:
            decision = await limiter.check(principals[index % len(principals)])
            assert decision.allowed
            checks += 1
            index += 1

    try:
        for who in principals:  # warm up: the script cached, the pool's connections open
            await limiter.check(who)
        calls_before = await evalsha_calls(redis)
        cpu_before, started = time.process_time(), time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(checker(offset) for offset in range(scenario.concurrency)))
        cpu_s, elapsed_s = time.process_time() - cpu_before, time.perf_counter() - started
        calls = await evalsha_calls(redis) - calls_before
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    return Figures(checks / elapsed_s, cpu_s / checks * 1e6, calls / checks)


def run_child(tree: Path, scenario: Scenario, seconds: float) -> Figures:
    output = subprocess.run(
        [sys.executable, __file__, "--child", str(tree), "--scenario", json.dumps(
            [scenario.name, scenario.concurrency, scenario.tenants]
        ), "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    ).stdout  # fmt: skip
    return Figures(**json.loads(output.strip().splitlines()[-1]))


def report(label: str, figures: Figures) -> str:
    return (
        f"{label}: {figures.checks_per_s:9.0f} checks/s  "
        f"{figures.cpu_us_per_check:6.1f} CPU µs/check  "
        f"{figures.calls_per_check:5.3f} EVALSHA/check"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tenants", type=int, default=64, help="for the spread scenario")
    parser.add_argument("--only", default="", help="run the scenarios whose name has this")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child is not None:
        name, concurrency, tenants = json.loads(arguments.scenario)
        figures = asyncio.run(
            measure(arguments.child, Scenario(name, concurrency, tenants), arguments.seconds)
        )
        print(json.dumps(dataclasses.asdict(figures)))
        return
    scenarios = [
        Scenario(f"one hot tenant, c={arguments.concurrency}", arguments.concurrency, 1),
        Scenario(
            f"{arguments.tenants} tenants, c={arguments.concurrency}",
            arguments.concurrency,
            arguments.tenants,
        ),
        Scenario("one check at a time, c=1", 1, 1),
    ]
    scenarios = [scenario for scenario in scenarios if arguments.only in scenario.name]
    trees = {"this tree": HERE}
    if arguments.baseline is not None:
        trees = {"baseline": arguments.baseline.resolve(), "this tree": HERE}
    for scenario in scenarios:
        print(f"== {scenario.name}")
        results: dict[str, list[Figures]] = {name: [] for name in trees}
        for round_index in range(arguments.rounds):
            for name, tree in trees.items():
                figures = run_child(tree, scenario, arguments.seconds)
                results[name].append(figures)
                print("  " + report(f"round {round_index + 1} {name:9s}", figures))
        medians = {
            name: Figures(
                statistics.median(f.checks_per_s for f in values),
                statistics.median(f.cpu_us_per_check for f in values),
                statistics.median(f.calls_per_check for f in values),
            )
            for name, values in results.items()
        }
        for name, figures in medians.items():
            print("  " + report(f"median  {name:9s}", figures))
        if "baseline" in medians:
            base, this = medians["baseline"], medians["this tree"]
            print(
                f"  this tree / baseline: checks/s {this.checks_per_s / base.checks_per_s:.2f}x, "
                f"CPU per check {this.cpu_us_per_check / base.cpu_us_per_check:.2f}x"
            )


if __name__ == "__main__":
    main()
