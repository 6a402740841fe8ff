"""`dpp serve --processes N`: N real replicas sharing one port, supervised.

What an operator relies on: the port answers as long as one replica lives; a
replica that dies is replaced; money submitted through any of them settles
once; SIGTERM drains them all and the parent exits 0; a port in use or a bad
configuration is one line and a non-zero exit, not a crash loop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from tests.replica import Replica, admin_funded_tenant, free_port, wait_audit_ok
from tests.services import store_env

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "processes-admin-token-0123456789"
PROCESSES = 2
RUNS = 12
TIMEOUT_S = 40.0
EXIT_TIMEOUT_S = 40.0
# A run the killed replica held ends by reaping or rollback; none is left open.
SETTLED = ("COMPLETED", "EXPIRED", "FAILED")
DEATH_SETTLE_S = 0.5


def children_of(pid: int) -> set[int]:
    raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(word) for word in raw.split()}


async def wait_for_children(
    pid: int, count: int, *, other_than: set[int] = frozenset()
) -> set[int]:
    with anyio.fail_after(TIMEOUT_S):
        while True:
            found = children_of(pid)
            if len(found) == count and not (found & other_than):
                return found
            await anyio.sleep(0.1)


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def fresh_connections() -> httpx.AsyncClient:
    # No keep-alive: every request is a new connection the kernel may hand to
    # either replica.
    return httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0))


async def test_replicas_share_the_port_a_dead_one_is_replaced_and_sigterm_drains_all(
    services, database_url, redis_prefix, tmp_path
) -> None:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_SHUTDOWN_GRACE_SEC": "2",
        "DPP_WORKER_CONCURRENCY": "2",
        # the killed replica's runs are reaped within seconds, not minutes
        "DPP_LEASE_SEC": "2",
        "DPP_HEARTBEAT_SEC": "1",
        "DPP_REAPER_INTERVAL_SEC": "1",
        "DPP_RECONCILE_INTERVAL_SEC": "1",
        "DPP_RECONCILE_THRESHOLD_SEC": "1",
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    parent = Replica(env, tmp_path / "parent.log", ("--processes", str(PROCESSES)))
    try:
        async with fresh_connections() as client:
            await parent.wait_ready(client)
            first = await wait_for_children(parent.process.pid, PROCESSES)

            bearer = (
                await admin_funded_tenant(client, parent.url, admin, 10_000_000, name="multi")
            ).bearer
            run_ids = []
            for n in range(RUNS):
                accepted = await client.post(
                    f"{parent.url}/v1/runs",
                    json={"pack_type": "echo", "inputs": {"payload": n}},
                    headers={**bearer, "Idempotency-Key": f"run-{n}"},
                )
                assert accepted.status_code == 202, accepted.text
                run_ids.append(accepted.json()["id"])

            # One replica dies the hard way; the port keeps answering and the
            # parent starts a replacement.
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            # Connections the kernel had queued on the victim's socket die with
            # it (SO_REUSEPORT without net.ipv4.tcp_migrate_req=1; README), so
            # allow the moment of death to pass; after it, every connection
            # must find a live replica.
            with anyio.fail_after(TIMEOUT_S):
                while True:
                    if not alive(victim):
                        break
                    await anyio.sleep(0.05)
            await anyio.sleep(DEATH_SETTLE_S)
            for _ in range(20):
                answered = await client.get(f"{parent.url}/readyz")
                assert answered.status_code == 200
            survivors = await wait_for_children(parent.process.pid, PROCESSES, other_than={victim})
            assert len(survivors & first) == PROCESSES - 1

            with anyio.fail_after(TIMEOUT_S):
                while True:
                    statuses = [
                        (await client.get(f"{parent.url}/v1/runs/{run_id}", headers=bearer)).json()[
                            "status"
                        ]
                        for run_id in run_ids
                    ]
                    if all(status in SETTLED for status in statuses):
                        break
                    await anyio.sleep(0.2)
            # An idempotent retry through whichever replica answers: the same run.
            again = await client.post(
                f"{parent.url}/v1/runs",
                json={"pack_type": "echo", "inputs": {"payload": 0}},
                headers={**bearer, "Idempotency-Key": "run-0"},
            )
            assert again.json()["id"] == run_ids[0]
            await wait_audit_ok(client, parent.url, admin, TIMEOUT_S)

        parent.drain(EXIT_TIMEOUT_S)
        assert not any(alive(pid) for pid in survivors)
    finally:
        parent.close()


def run_dpp(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpp.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
    )


def test_a_port_in_use_is_one_line_before_any_replica_starts(
    services, database_url, redis_prefix
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            **store_env(services, database_url, redis_prefix),
            "PORT": str(port),
            "DPP_HOST": "127.0.0.1",
        }
        finished = run_dpp(["serve", "--processes", "2"], env)
    assert finished.returncode == 1
    assert finished.stderr.strip() == f"dpp: PORT={port}: address already in use"


def test_a_configuration_every_replica_refuses_stops_the_parent_with_status_2() -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL")
    }
    env.update({"PORT": str(free_port()), "DPP_HOST": "127.0.0.1"})
    finished = run_dpp(["serve", "--processes", "2"], env)
    assert finished.returncode == 2, finished.stderr
    assert "DATABASE_URL: required" in finished.stderr


@pytest.mark.parametrize("value", ["0", "two", "257"])
def test_a_bad_process_count_is_refused(value: str) -> None:
    finished = run_dpp(["serve", "--processes", value], dict(os.environ))
    assert finished.returncode == 2
    assert "--processes" in finished.stderr
