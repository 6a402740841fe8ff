"""Dependencies fail mid-storm; a served replica answers 503 + Retry-After, loses nothing.

A real ``dpp serve`` reaches Postgres, Redis and S3 (and, for the SQS fault,
SQS) only through a ``TcpProxy`` each. While clients submit runs (each with
its own Idempotency-Key, retried with it on 503), read them, list them and
read the budget, and runs execute, one fault strikes for a few seconds:

* a dependency is *down*: every connection reset, new ones refused, then back;
* the replica's Postgres sessions are killed (``pg_terminate_backend``) in rounds;
* the replica's Redis data is lost (every key under its prefix: its FLUSHDB —
  the Redis server is shared with other tests).

Afterwards, without restarting the replica: no answer was a 500 (or any 5xx
but 503), every 503 carried ``Retry-After``; ``/readyz`` answers 200; every run
reaches a terminal state; every 202 is a run and every run was a 202 (or a key
whose outcome the client never learnt); an exactly-funded budget then admits
exactly what it holds; every COMPLETED result downloads and matches its
sha256; ``/admin/audit`` and ``dpp audit`` are clean (and the fixture audits
again).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import httpx
import orjson
import pytest

from tests import services as test_services
from tests.replica import Replica, admin_funded_tenant, admin_plan, wait_audit_ok
from tests.services import delete_redis_prefix, store_env
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "faults-admin-token-0123456789"
RUN_PRICE_USD_MICROS = 1_000  # echo's fixed price = its default reservation
FUNDED_RUNS = 300
SUBMITTERS = 4
READERS = 2
PACE_S = 0.08  # between one worker's requests: ~60 requests/s in all
BEFORE_FAULT_S = 1.5
FAULT_S = 4.0
AFTER_FAULT_S = 3.0
KEY_RESOLVE_TIMEOUT_S = 20.0
SETTLE_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 20.0
TERMINAL = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELED"})
ECHO_DELAY_MS = 300


def _through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    address = proxy.address if len(netloc) == 1 else f"{netloc[0]}@{proxy.address}"
    return urlunsplit((parts.scheme, address, parts.path, parts.query, parts.fragment))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # 5xx other than 503
    without_retry_after: list[str] = field(default_factory=list)
    transport_errors: int = 0
    admitted: dict[str, str] = field(default_factory=dict)  # idempotency key -> run id
    unresolved: set[str] = field(default_factory=set)  # keys whose outcome is unknown

    def record(self, operation: str, response: httpx.Response) -> None:
        self.statuses[(operation, response.status_code)] += 1
        if response.status_code >= 500 and response.status_code != 503:
            self.server_errors.append(f"{operation} {response.status_code} {response.text[:300]}")
        if response.status_code in (503, 429) and "retry-after" not in response.headers:
            self.without_retry_after.append(f"{operation} {response.text[:200]}")

    def summary(self) -> dict[str, int]:
        return {f"{op} {status}": n for (op, status), n in sorted(self.statuses.items())}


@dataclass
class Storm:
    client: httpx.AsyncClient
    url: str
    bearer: dict[str, str]
    tally: Tally = field(default_factory=Tally)
    running: bool = True

    async def submit(self, key: str) -> None:
        """Resolve one idempotency key: retried on 503/transport errors until a 202 or 402."""
        body = {
            "pack_type": "echo",
            "inputs": {"payload": key, "delay_ms": ECHO_DELAY_MS},
            "metadata": {"client_key": key},
        }
        headers = {**self.bearer, "Idempotency-Key": key}
        with anyio.move_on_after(KEY_RESOLVE_TIMEOUT_S):
            while True:
                try:
                    response = await self.client.post(
                        f"{self.url}/v1/runs", json=body, headers=headers
                    )
                except httpx.TransportError:
                    self.tally.transport_errors += 1
                    await anyio.sleep(0.2)
                    continue
                self.tally.record("submit", response)
                if response.status_code == 202:
                    self.tally.admitted[key] = response.json()["id"]
                    return
                if response.status_code == 402:
                    return
                if response.status_code == 409:
                    break  # the key is locked in flight: its outcome is not learnt here
                assert response.status_code in (429, 503) or response.status_code >= 500, (
                    response.status_code,
                    response.text,
                )
                await anyio.sleep(min(float(response.headers.get("retry-after", 1)), 0.5))
        self.tally.unresolved.add(key)

    async def submitter(self, worker: int) -> None:
        n = 0
        while self.running:
            await self.submit(f"w{worker}-{n}")
            n += 1
            await anyio.sleep(PACE_S)

    async def reader(self) -> None:
        while self.running:
            run_ids = list(self.tally.admitted.values())
            reads: list[tuple[str, str]] = [
                ("list", "/v1/runs?limit=20"),
                ("budget", "/v1/budget"),
            ]
            if run_ids:
                reads.append(("get", f"/v1/runs/{random.choice(run_ids)}"))
            for operation, path in reads:
                try:
                    response = await self.client.get(f"{self.url}{path}", headers=self.bearer)
                except httpx.TransportError:
                    self.tally.transport_errors += 1
                    continue
                self.tally.record(operation, response)
                assert response.status_code in (200, 429, 503) or response.status_code >= 500, (
                    operation,
                    response.status_code,
                    response.text,
                )
            await anyio.sleep(PACE_S)

    async def blow(self, fault: Callable[[], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as group:
            for worker in range(SUBMITTERS):
                group.start_soon(self.submitter, worker)
            for _ in range(READERS):
                group.start_soon(self.reader)
            await anyio.sleep(BEFORE_FAULT_S)
            await fault()
            await anyio.sleep(AFTER_FAULT_S)
            self.running = False


@dataclass
class Rig:
    """The proxies, the replica and what the test needs to reach around them."""

    database_url: str  # direct, not through the proxy
    redis_url: str
    redis_prefix: str
    postgres: TcpProxy
    redis: TcpProxy
    object_storage: TcpProxy
    # the SQS endpoint's own proxy (the same moto server), when runs go through SQS
    queue: TcpProxy | None
    replica: Replica
    env: dict[str, str]


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest,
    services: test_services.TestServices,
    database_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    postgres = TcpProxy(*_host_port(database_url))
    redis = TcpProxy(*_host_port(services.redis_url))
    object_storage = TcpProxy(*_host_port(services.object_store_url))
    proxies = [postgres, redis, object_storage]
    queue = None
    queue_env: dict[str, str] = {}
    if request.node.callspec.params.get("fault", "").startswith("sqs"):
        # Runs announced through SQS, reached through a proxy of its own so only
        # the queue is cut (S3 is served by the same moto server).
        queue = TcpProxy(*_host_port(services.object_store_url))
        proxies.append(queue)
        queue_url, _ = await test_services.create_sqs_queues(services.object_store_url)
        queue_env = {"DPP_QUEUE": "sqs", "SQS_QUEUE_URL": queue_url}
    for proxy in proxies:
        await proxy.start()
    if queue is not None:
        queue_env["SQS_ENDPOINT_URL"] = _through(services.object_store_url, queue)
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        # every dependency through its proxy
        "DATABASE_URL": _through(database_url, postgres),
        "REDIS_URL": _through(services.redis_url, redis),
        "S3_ENDPOINT_URL": _through(services.object_store_url, object_storage),
        **queue_env,
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_LEASE_SEC": "3",
        "DPP_HEARTBEAT_SEC": "1",
        "DPP_REAPER_INTERVAL_SEC": "1",
        "DPP_RECONCILE_INTERVAL_SEC": "1",
        "DPP_RECONCILE_THRESHOLD_SEC": "2",
        "DPP_SHUTDOWN_GRACE_SEC": "2",
        "LOG_LEVEL": "INFO",
    }
    replica = Replica(env, tmp_path / "replica.log")
    try:
        yield Rig(
            database_url=database_url,
            redis_url=services.redis_url,
            redis_prefix=redis_prefix,
            postgres=postgres,
            redis=redis,
            object_storage=object_storage,
            queue=queue,
            replica=replica,
            env=env,
        )
    finally:
        replica.close()
        for proxy in proxies:
            await proxy.close()


async def _fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def _terminate_sessions(database_url: str) -> int:
    """Kill every session on the test's database but this one (the replica's all)."""
    name = urlsplit(database_url).path.lstrip("/")
    rows = await _fetch(
        database_url,
        "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )
    return sum(1 for row in rows if row["killed"])


def _required(proxy: TcpProxy | None) -> TcpProxy:
    assert proxy is not None, "this fault needs the rig's SQS proxy"
    return proxy


def _fault(rig: Rig, kind: str) -> Callable[[], Awaitable[None]]:
    async def outage(proxy: TcpProxy) -> None:
        async with proxy.outage():
            await anyio.sleep(FAULT_S)

    async def terminate_rounds() -> None:
        killed = 0
        for _ in range(5):
            killed += await _terminate_sessions(rig.database_url)
            await anyio.sleep(FAULT_S / 5)
        assert killed > 0, "no session of the replica was killed"

    async def flush() -> None:
        await anyio.to_thread.run_sync(delete_redis_prefix, rig.redis_url, rig.redis_prefix)
        await anyio.sleep(FAULT_S / 2)
        await anyio.to_thread.run_sync(delete_redis_prefix, rig.redis_url, rig.redis_prefix)

    faults: dict[str, Callable[[], Awaitable[None]]] = {
        "postgres_down": lambda: outage(rig.postgres),
        "redis_down": lambda: outage(rig.redis),
        "object_storage_down": lambda: outage(rig.object_storage),
        "sqs_down": lambda: outage(_required(rig.queue)),
        "postgres_sessions_killed": terminate_rounds,
        "redis_data_lost": flush,
    }
    return faults[kind]


async def _setup_tenant(client: httpx.AsyncClient, url: str, funded_usd_micros: int) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await admin_plan(
        client, url, admin, "storm", requests_per_minute=1_000_000, max_concurrent_runs=10_000
    )
    tenant = await admin_funded_tenant(
        client, url, admin, funded_usd_micros, name="storm", plan_id="storm"
    )
    assert tenant.api_key is not None
    return tenant.api_key


async def _wait_ready(rig: Rig, client: httpx.AsyncClient) -> None:
    with anyio.fail_after(READY_TIMEOUT_S):
        while True:
            assert rig.replica.process.poll() is None, rig.replica.output()
            try:
                if (await client.get(f"{rig.replica.url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.2)


async def _wait_settled(database_url: str) -> dict[str, asyncpg.Record]:
    with anyio.fail_after(SETTLE_TIMEOUT_S):
        while True:
            rows = await _fetch(
                database_url,
                "SELECT id, status, charged_usd_micros, metadata FROM runs",
            )
            if all(row["status"] in TERMINAL for row in rows):
                return {row["id"]: row for row in rows}
            await anyio.sleep(0.3)


async def _drain_budget(storm: Storm) -> tuple[int, int]:
    """Submit one run at a time until the first 402: (admitted, available before)."""
    budget = await storm.client.get(f"{storm.url}/v1/budget", headers=storm.bearer)
    assert budget.status_code == 200, budget.text
    available = int(budget.json()["available_usd_micros"])
    assert budget.json()["reserved_usd_micros"] == 0, budget.json()
    admitted = 0
    while True:
        key = f"drain-{admitted}"
        before = len(storm.tally.admitted)
        await storm.submit(key)
        assert key not in storm.tally.unresolved, "a quiet replica did not answer a submit"
        if len(storm.tally.admitted) == before:
            return admitted, available
        admitted += 1
        assert admitted <= FUNDED_RUNS, "the budget admitted more than it holds"


async def _check_results(storm: Storm, completed: list[str]) -> None:
    for run_id in completed:
        response = await storm.client.get(f"{storm.url}/v1/runs/{run_id}", headers=storm.bearer)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert result is not None, response.json()
        body = await storm.client.get(result["download_url"])
        assert body.status_code == 200, (run_id, body.status_code)
        assert hashlib.sha256(body.content).hexdigest() == result["sha256"], run_id
        assert len(body.content) == result["bytes"]
        assert "payload" in orjson.loads(body.content)


@pytest.mark.parametrize(
    "fault",
    [
        "postgres_down",
        "redis_down",
        "object_storage_down",
        "sqs_down",
        "postgres_sessions_killed",
        "redis_data_lost",
    ],
)
async def test_a_dependency_fault_mid_storm_answers_503_and_loses_nothing(
    rig: Rig, fault: str
) -> None:
    funded = FUNDED_RUNS * RUN_PRICE_USD_MICROS
    async with httpx.AsyncClient(timeout=15.0) as client:
        await _wait_ready(rig, client)
        pid = rig.replica.process.pid
        api_key = await _setup_tenant(client, rig.replica.url, funded)
        storm = Storm(client, rig.replica.url, {"Authorization": f"Bearer {api_key}"})

        await storm.blow(_fault(rig, fault))

        # Back without a restart: the same process, ready again.
        await _wait_ready(rig, client)
        assert rig.replica.process.pid == pid and rig.replica.process.poll() is None
        tally = storm.tally
        report = {"fault": fault, "statuses": tally.summary(), "unresolved": len(tally.unresolved)}
        print(orjson.dumps(report).decode())
        assert not tally.server_errors, (tally.server_errors[:5], report)
        assert not tally.without_retry_after, (tally.without_retry_after[:5], report)
        assert tally.admitted, report

        runs = await _wait_settled(rig.database_url)
        # Every 202 is a run; every run is a 202, or a key the client never resolved.
        assert set(tally.admitted.values()) <= runs.keys()
        strays = {
            run_id
            for run_id, row in runs.items()
            if run_id not in set(tally.admitted.values())
            and row["metadata"]["client_key"] not in tally.unresolved
        }
        assert not strays, strays

        # Exactly funded: what is left admits exactly what it holds, no more.
        # First the mirror catches up: a hold the fault kept Redis from giving
        # back is repaired by drift repair (the audit's invariant 5), and until
        # then the fast path refuses as if it were still held.
        await wait_audit_ok(
            client,
            rig.replica.url,
            {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            SETTLE_TIMEOUT_S,
        )
        charged = sum(row["charged_usd_micros"] or 0 for row in runs.values())
        drained, available = await _drain_budget(storm)
        assert available == funded - charged, (available, funded, charged)
        assert drained == available // RUN_PRICE_USD_MICROS, (drained, available)

        runs = await _wait_settled(rig.database_url)
        completed = [run_id for run_id, row in runs.items() if row["status"] == "COMPLETED"]
        assert completed
        await _check_results(storm, completed)

        # The audit: through the API (the mirror may lag until drift repair), and the CLI.
        await wait_audit_ok(
            client,
            rig.replica.url,
            {"Authorization": f"Bearer {ADMIN_TOKEN}"},
            SETTLE_TIMEOUT_S,
        )
    cli = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "dpp.cli", "audit"],
            env={
                **rig.env,
                "DATABASE_URL": rig.database_url,
                "REDIS_URL": rig.redis_url,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert orjson.loads(cli.stdout)["ok"] is True
