"""Benchmark: CPU µs per request of the HTTP front, in-process (no server, no socket).

Opens a whole replica in this process (``open_runtime``, as the integration
tests do, nothing dispatched) on the local Postgres and Redis and calls its
ASGI app directly with a constant ``receive`` and a ``send`` that drops what it
is given, one request at a time, for:

  - GET /health           the front and routing alone (no I/O; logged at DEBUG)
  - GET /nope             an unknown path: the router's 404 problem, logged at INFO
  - GET /v1/budget        + auth cache, one rate-limit script, one Postgres read
  - GET /v1/runs/{id}     + the run's read (issue 11's profiled request)
  - GET /v1/runs/{id} c=64  the same, ``--concurrency`` requests at a time over
                          eight runs (concurrent reads share Postgres queries,
                          rate-limit checks share script calls)

Reports ``time.process_time`` per request (this process only: Postgres and
Redis are not counted), the median of ``--rounds`` rounds. ``--tree PATH``
imports ``dpp`` from another source tree (e.g. a worktree of the parent
commit) so two trees are measured by the same script:

    .venv/bin/python bench/bench_front.py --requests 3000 --rounds 3
    git worktree add --detach /tmp/dpp-base HEAD~1
    .venv/bin/python bench/bench_front.py --tree /tmp/dpp-base

The access log goes to a string buffer at ``--log-level`` (default INFO, so each
request builds its log line as a production replica does).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

ADMIN_TOKEN = "bench-admin-token-0123456789"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the source tree to import")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="the c=N case's requests at once"
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--profile", help="cProfile this case (e.g. budget) and print the top")
    return parser.parse_args()


def scope_for(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench/1"),
            (b"accept", b"*/*"),
            *headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def measure(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], n: int
) -> tuple[float, int]:
    """CPU µs per request over ``n`` sequential requests, and the last status."""
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    started = time.process_time()
    for _ in range(n):
        await app(scope_for(method, path, headers), receive, send)
    return (time.process_time() - started) / n * 1e6, status


async def measure_concurrent(
    app: Any, paths: list[str], headers: list[tuple[bytes, bytes]], n: int, concurrency: int
) -> tuple[float, int]:
    """CPU µs per request over ``n`` requests, ``concurrency`` at a time (each
    worker cycling through ``paths``), and the last status."""
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    per_worker = max(1, n // concurrency)

    async def worker(offset: int) -> None:
        for index in range(per_worker):
            path = paths[(offset + index) % len(paths)]
            await app(scope_for("GET", path, headers), receive, send)

    started = time.process_time()
    await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
    return (time.process_time() - started) / (per_worker * concurrency) * 1e6, status


async def main(arguments: argparse.Namespace) -> None:
    import asyncpg

    from dpp.adapters.migrate import apply_migrations
    from dpp.app import open_runtime
    from dpp.config import load_settings
    from dpp.logs import configure_logging

    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    name, prefix = f"dpp_bench_{secrets.token_hex(4)}", f"dppbench{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        await apply_migrations(database_url)
        with tempfile.TemporaryDirectory() as results_dir:
            env = {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "DPP_REDIS_PREFIX": prefix,
                "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
                "DPP_RESULTS_DIR": results_dir,
                "DPP_RESULT_SIGNING_KEY": secrets.token_hex(32),
                "LOG_LEVEL": arguments.log_level,
            }
            settings = load_settings(env)
            configure_logging(settings, stream=io.StringIO())  # lines built, then dropped
            async with open_runtime(settings, environment=env, dispatch=False) as runtime:
                await run_cases(runtime.app, arguments)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        from tests.services import delete_redis_prefix

        delete_redis_prefix(redis_url, prefix)


async def run_cases(app: Any, arguments: argparse.Namespace) -> None:
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        plan = {
            "id": "bench",
            "requests_per_minute": 1_000_000,
            "max_concurrent_runs": 100_000,
            "retention_days": 1,
        }
        (await client.post("/admin/plans", json=plan, headers=admin)).raise_for_status()
        r = await client.post(
            "/admin/tenants", json={"name": "b", "plan_id": "bench"}, headers=admin
        )
        tenant = r.raise_for_status().json()["id"]
        r = await client.post(f"/admin/tenants/{tenant}/api-keys", json={}, headers=admin)
        key = r.raise_for_status().json()["api_key"]
        r = await client.post(
            f"/admin/tenants/{tenant}/credits",
            json={"amount_usd_micros": 10**13},
            headers={**admin, "Idempotency-Key": "bench"},
        )
        r.raise_for_status()
        auth = {"Authorization": f"Bearer {key}"}
        run = {"pack_type": "echo", "inputs": {"payload": 1}}
        run_ids = []
        for _ in range(8):
            r = await client.post("/v1/runs", json=run, headers=auth)
            run_ids.append(r.raise_for_status().json()["id"])
        run_id = run_ids[0]
    bearer = [(b"authorization", f"Bearer {key}".encode())]
    cases = [
        ("GET /health", "/health", [], 200),
        ("GET /nope (404)", "/nope", [], 404),
        ("GET /v1/budget", "/v1/budget", bearer, 200),
        ("GET /v1/runs/{id}", f"/v1/runs/{run_id}", bearer, 200),
    ]
    import dpp

    where = Path(dpp.__file__).parent.parent
    print(f"tree {where}; {arguments.requests} requests x {arguments.rounds} rounds")
    for label, path, headers, expected in cases:
        await measure(app, "GET", path, headers, 200)  # warm caches (auth, plans)
        samples = []
        for _ in range(arguments.rounds):
            us, status = await measure(app, "GET", path, headers, arguments.requests)
            assert status == expected, (label, status)
            samples.append(us)
        rounds = " ".join(f"{s:.1f}" for s in samples)
        print(f"{label:20} {statistics.median(samples):7.1f} µs CPU/request  ({rounds})")
        again = functools.partial(measure, app, "GET", path, headers, arguments.requests)
        await profile(arguments, label, again)
    label = f"GET /v1/runs/{{id}} c={arguments.concurrency}"
    paths = [f"/v1/runs/{each}" for each in run_ids]

    def concurrent() -> Awaitable[tuple[float, int]]:
        return measure_concurrent(app, paths, bearer, arguments.requests, arguments.concurrency)

    await concurrent()  # warm
    samples = []
    for _ in range(arguments.rounds):
        us, status = await concurrent()
        assert status == 200, (label, status)
        samples.append(us)
    rounds = " ".join(f"{s:.1f}" for s in samples)
    print(f"{label:20} {statistics.median(samples):7.1f} µs CPU/request  ({rounds})")
    await profile(arguments, label, concurrent)


async def profile(
    arguments: argparse.Namespace, label: str, run: Callable[[], Awaitable[object]]
) -> None:
    """cProfile one more measurement (``run()``) when ``--profile`` names ``label``."""
    if not (arguments.profile and arguments.profile in label):
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    await run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    args = parse_arguments()
    sys.path.insert(0, str(args.tree.resolve()))
    sys.path.insert(1, str(ROOT))  # tests.services
    asyncio.run(main(args))
