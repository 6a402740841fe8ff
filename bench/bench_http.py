"""Benchmark: requests per second through a real `dpp serve` (hypercorn, loopback).

Starts moto and one `dpp serve` replica as subprocesses against the local
Postgres and Redis, then drives it from this process with aiohttp over
keep-alive connections for a fixed time per endpoint:

  - GET /health           the baseline: HTTP stack only (middleware, no I/O)
  - GET /v1/budget        + auth cache, one rate-limit script, one Postgres read
  - POST /v1/runs         + validation, idempotency-free reservation (budget
                          actor group commit), enqueue; runs are not executed
                          (DPP_WORKER_CONCURRENCY=1 and a long echo delay keep
                          workers out of the measurement)

and reports each as a ratio of the baseline. The load generator shares the
machine's two cores with the server, so absolute numbers understate a real
deployment; the ratios are what to compare across changes. It also reports the
server's CPU time per request (user + system, all its processes), which moves
far less than req/s when other work shares the machine.

    .venv/bin/python bench/bench_http.py [--seconds 5] [--connections 32] [--processes N]

With ``--processes N`` the server is ``dpp serve --processes N``: N replicas
sharing the port, the kernel spreading the connections over them.

With ``--otlp`` the server traces every request and exports with OTLP/HTTP
(``OTEL_EXPORTER_OTLP_ENDPOINT``) to a sink in this process
(``tests/otlp_sink.py``), which counts the spans it receives. Without it any
``OTEL_*`` variable of the environment is dropped, so tracing is off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpp.adapters.migrate import apply_migrations  # noqa: E402
from tests.otlp_sink import otlp_sink  # noqa: E402
from tests.services import delete_redis_prefix, with_database  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server and its replicas so far."""
    server = psutil.Process(pid)
    total = 0.0
    for process in [server, *server.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


async def hammer(
    base: str, method: str, path: str, seconds: float, connections: int, **request
) -> tuple[float, dict[int, int]]:
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def worker() -> None:
            while time.monotonic() < stop_at:
                async with session.request(method, path, **request) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
    return sum(statuses.values()) / elapsed, statuses


async def main(
    seconds: float,
    connections: int,
    only: str | None = None,
    replicas: int = 1,
    otlp: str | None = None,
) -> None:
    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    name, prefix = f"dpp_bench_{secrets.token_hex(4)}", f"dppbench{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = with_database(admin_url, name)
    moto_port, port = free_port(), free_port()
    aws = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    processes = []
    try:
        await apply_migrations(database_url)
        processes.append(
            subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **aws},
            )
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            **({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp} if otlp else {}),
            **aws,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
            "DPP_REDIS_PREFIX": prefix,
            "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
            "PORT": str(port),
            "DPP_HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
            "DPP_WORKER_CONCURRENCY": "1",
        }
        await wait_http(f"http://127.0.0.1:{moto_port}/")
        processes.append(
            subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
                [str(ROOT / ".venv" / "bin" / "dpp"), "serve", "--processes", str(replicas)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/health")
        if replicas > 1:
            # /health answered from the first replica up; give the rest time to listen
            await asyncio.sleep(10)
        admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(base) as session:
            plan = {
                "id": "bench",
                "requests_per_minute": 1_000_000,
                "max_concurrent_runs": 100_000,
                "retention_days": 1,
            }
            async with session.post("/admin/plans", json=plan, headers=admin_headers):
                pass
            async with session.post(
                "/admin/tenants", json={"name": "b", "plan_id": "bench"}, headers=admin_headers
            ) as r:
                tenant = (await r.json())["id"]
            async with session.post(
                f"/admin/tenants/{tenant}/api-keys", json={}, headers=admin_headers
            ) as r:
                key = (await r.json())["api_key"]
            await session.post(
                f"/admin/tenants/{tenant}/credits",
                json={"amount_usd_micros": 10**13},
                headers={**admin_headers, "Idempotency-Key": "bench"},
            )
        auth = {"Authorization": f"Bearer {key}"}
        run = {"pack_type": "echo", "inputs": {"payload": 1, "delay_ms": 3_600_000}}
        cases = [
            ("GET /health", "GET", "/health", {}),
            ("GET /v1/budget", "GET", "/v1/budget", {"headers": auth}),
            ("POST /v1/runs", "POST", "/v1/runs", {"headers": auth, "json": run}),
        ]
        print(f"{connections} keep-alive connections, {seconds:.0f} s per endpoint")
        if os.environ.get("DPP_BENCH_PAUSE"):  # attach a profiler to the server now
            print(f"server pid {processes[-1].pid}", flush=True)
            await asyncio.sleep(float(os.environ["DPP_BENCH_PAUSE"]))
        baseline = None
        if only:  # profiling one endpoint: keep the baseline first
            cases = [cases[0], *[case for case in cases[1:] if only in case[0]]]
        for label, method, path, request in cases:
            await hammer(base, method, path, 1.0, connections, **request)  # warm up
            cpu_before = server_cpu_s(processes[-1].pid)
            rate, statuses = await hammer(base, method, path, seconds, connections, **request)
            cpu_us = (server_cpu_s(processes[-1].pid) - cpu_before) * 1e6 / sum(statuses.values())
            baseline = baseline or rate
            print(
                f"  {label:16s} {rate:7.0f} req/s  ({rate / baseline:.2f}x baseline)  "
                f"server CPU {cpu_us:5.0f} us/request  statuses {dict(sorted(statuses.items()))}"
            )
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        delete_redis_prefix(redis_url, prefix)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", help="measure only the endpoints whose label contains this")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="dpp serve --processes N (replicas sharing the port)",
    )
    parser.add_argument(
        "--otlp", action="store_true", help="tracing on: export to a local OTLP sink"
    )
    arguments = parser.parse_args()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(otlp_sink(keep=False)) if arguments.otlp else None
        asyncio.run(
            main(
                arguments.seconds,
                arguments.connections,
                arguments.only,
                arguments.processes,
                sink.url if sink else None,
            )
        )
    if sink is not None:
        print(f"  tracing on: the sink received {sink.spans} spans in {sink.posts} exports")
