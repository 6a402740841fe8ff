"""Benchmark: end-to-end runs per second and submit→COMPLETED latency.

One replica (the full runtime, driven in-process over ASGI) runs echo packs
with no delay: submit → claim → execute → S3 put → settle → COMPLETED. For
each queue backend it reports runs/s and the p50/p99 latency from the 202 to
the first GET that sees COMPLETED, and — as the baseline measured in the same
run — the admission-only rate (submits with nothing executing), so figures
read as ratios independent of the machine.

    .venv/bin/python bench/bench_end_to_end.py [--runs 300] [--otlp]

``--otlp``: tracing on, exporting with OTLP/HTTP to a sink in this process
(``tests/otlp_sink.py``, a thread beside the runtime).

Uses DPP_BENCH_DATABASE_URL / DPP_BENCH_REDIS_URL (defaults: the local
servers), and moto's server mode for S3/SQS (~100 requests/s: with SQS or S3
in the path, moto is the bottleneck, which the report says).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpp import tracing
from dpp.adapters.migrate import apply_migrations
from dpp.app import open_runtime
from dpp.config import load_settings
from tests.integration.test_execution import create_sqs_queues
from tests.otlp_sink import otlp_sink
from tests.services import delete_redis_prefix, with_database

ADMIN = {"Authorization": "Bearer bench-admin-token-0123456789"}
ECHO = {"pack_type": "echo", "inputs": {"payload": {"n": 1}}}
CONCURRENCY = int(os.environ.get("DPP_BENCH_CLIENTS", "16"))


async def tenant_key(http: httpx.AsyncClient) -> dict[str, str]:
    plan = {
        "id": "bench",
        "requests_per_minute": 1_000_000,
        "max_concurrent_runs": 100_000,
        "retention_days": 1,
    }
    await http.post("/admin/plans", json=plan, headers=ADMIN)
    tenant = (
        await http.post("/admin/tenants", json={"name": "b", "plan_id": "bench"}, headers=ADMIN)
    ).json()["id"]
    key = (await http.post(f"/admin/tenants/{tenant}/api-keys", json={}, headers=ADMIN)).json()
    await http.post(
        f"/admin/tenants/{tenant}/credits",
        json={"amount_usd_micros": 10**12},
        headers={**ADMIN, "Idempotency-Key": "bench"},
    )
    return {"Authorization": f"Bearer {key['api_key']}"}


async def drive(http: httpx.AsyncClient, key: dict[str, str], runs: int, wait: bool):
    latencies: list[float] = []
    remaining = runs

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            answer = await http.post("/v1/runs", json=ECHO, headers=key)
            assert answer.status_code == 202, answer.text
            if not wait:
                continue
            run_id = answer.json()["id"]
            with anyio.fail_after(60):
                while True:
                    status = (await http.get(f"/v1/runs/{run_id}", headers=key)).json()["status"]
                    if status == "COMPLETED":
                        break
                    assert status in ("QUEUED", "PROCESSING", "CLAIMED"), status
                    await anyio.sleep(0.05)  # a polling client, not a flood
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(CONCURRENCY):
            group.start_soon(worker)
    return runs / (time.perf_counter() - began), latencies


async def scenario(env: dict[str, str], runs: int, *, dispatch: bool) -> tuple[float, list[float]]:
    async with open_runtime(load_settings(env), environment=env, dispatch=dispatch) as runtime:
        transport = httpx.ASGITransport(app=runtime.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            key = await tenant_key(http)
            await drive(http, key, 20, wait=dispatch)  # warm up
            return await drive(http, key, runs, wait=dispatch)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_for_port(port: int) -> None:
    with anyio.fail_after(30):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(runs: int) -> None:
    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    # moto in its own process: in ours it would compete for the GIL with DPP
    port = free_port()
    store_url = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"},
    )
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    await wait_for_port(port)
    admin = await asyncpg.connect(admin_url)
    results = {}
    try:
        for backend in ("admission-only", "postgres", "sqs"):
            name = f"dpp_bench_{secrets.token_hex(4)}"
            prefix = f"dppbench{secrets.token_hex(4)}"
            await admin.execute(f'CREATE DATABASE "{name}"')
            try:
                url = with_database(admin_url, name)
                await apply_migrations(url)
                env = {
                    "DATABASE_URL": url,
                    "REDIS_URL": redis_url,
                    "S3_ENDPOINT_URL": store_url,
                    "S3_RESULT_BUCKET": f"bench-{prefix}",
                    "DPP_REDIS_PREFIX": prefix,
                    "DPP_ADMIN_TOKEN": ADMIN["Authorization"][7:],
                    "LOG_LEVEL": "WARNING",
                    "DPP_WORKER_CONCURRENCY": "32",
                }
                if backend == "sqs":
                    queue_url, _ = await create_sqs_queues(store_url)
                    env |= {
                        "DPP_QUEUE": "sqs",
                        "SQS_QUEUE_URL": queue_url,
                        "SQS_ENDPOINT_URL": store_url,
                    }
                rate, latencies = await scenario(env, runs, dispatch=backend != "admission-only")
                results[backend] = (rate, latencies)
            finally:
                await anyio.to_thread.run_sync(delete_redis_prefix, redis_url, prefix)
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
        moto.terminate()
        moto.wait(timeout=10)
    baseline = results["admission-only"][0]
    print(f"runs per measurement: {runs}, concurrent clients: {CONCURRENCY}")
    print(f"  admission only (baseline): {baseline:8.0f} submits/s")
    for backend in ("postgres", "sqs"):
        rate, latencies = results[backend]
        print(
            f"  {backend:8s} end to end: {rate:8.0f} runs/s ({rate / baseline:.2f}x baseline), "
            f"submit->COMPLETED p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.0f} ms"
        )


def traced_main(runs: int) -> None:
    with otlp_sink(keep=False) as sink:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.url
        assert tracing.configure_tracing()
        try:
            asyncio.run(main(runs))
        finally:
            tracing.shutdown_tracing()
    print(f"  tracing on: the sink received {sink.spans} spans in {sink.posts} exports")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument(
        "--otlp", action="store_true", help="tracing on: export to a local OTLP sink"
    )
    arguments = parser.parse_args()
    if arguments.otlp:
        traced_main(arguments.runs)
    else:
        asyncio.run(main(arguments.runs))
