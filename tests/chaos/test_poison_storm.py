"""Issue 12's worst finding, replayed against a real `dpp serve`: bursts of
NUL-bearing submissions with a valid key, concurrent with another tenant's
normal load. Before the fix six bursts of 40 made the root supervisor give up
and the process exit 1; now every poison request is a 422, the neighbour's
requests all 202, the process stays up, nothing restarted, the audit is clean,
and the replica still stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os

import anyio
import httpx
import pytest

from tests.chaos.test_sigkill import EXIT_TIMEOUT_S, SETTLE_TIMEOUT_S, Replica
from tests.replica import admin_funded_tenant, admin_plan, wait_audit_ok
from tests.services import store_env

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "poison-admin-token-0123456789"
BURSTS = 8
BURST_SIZE = 40
POISON = b'{"pack_type": "echo", "inputs": {"payload": "a\\u0000b"}, "metadata": {"k": "\\u0000"}}'


async def test_poison_bursts_against_a_real_replica_change_nothing(
    services, database_url, redis_prefix, tmp_path
) -> None:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    replica = Replica(env, tmp_path / "replica.log")
    try:
        limits = httpx.Limits(max_connections=BURST_SIZE * 2)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            await replica.wait_ready(client)
            await admin_plan(
                client,
                replica.url,
                admin,
                "wide",
                requests_per_minute=100_000,
                max_concurrent_runs=10_000,
            )
            poisoner, neighbour = [
                (
                    await admin_funded_tenant(
                        client, replica.url, admin, 100_000_000, plan_id="wide"
                    )
                ).bearer
                for _ in range(2)
            ]
            poison_statuses: list[int] = []
            normal_statuses: list[int] = []

            async def attack() -> None:
                answer = await client.post(
                    f"{replica.url}/v1/runs",
                    content=POISON,
                    headers={**poisoner, "Content-Type": "application/json"},
                )
                poison_statuses.append(answer.status_code)

            async def work(n: int) -> None:
                answer = await client.post(
                    f"{replica.url}/v1/runs",
                    json={"pack_type": "echo", "inputs": {"payload": n}},
                    headers=neighbour,
                )
                normal_statuses.append(answer.status_code)

            for burst in range(BURSTS):
                async with anyio.create_task_group() as group:
                    for n in range(BURST_SIZE):
                        group.start_soon(attack)
                        if n % 4 == 0:
                            group.start_soon(work, burst * BURST_SIZE + n)
                assert replica.process.poll() is None, replica.output()

            assert poison_statuses == [422] * (BURSTS * BURST_SIZE)
            assert normal_statuses == [202] * (BURSTS * BURST_SIZE // 4)
            tree = (await client.get(f"{replica.url}/admin/actors", headers=admin)).json()
            assert tree["state"] == "running" and tree["restarts"] == 0
            (budgets,) = [child for child in tree["children"] if child["name"] == "budgets"]
            assert (budgets["restarts"], budgets["actor_restarts"], budgets["cooldowns"]) == (
                0,
                0,
                0,
            )
            # the neighbour's runs execute meanwhile: the mirror agrees once they settle
            await wait_audit_ok(client, replica.url, admin, SETTLE_TIMEOUT_S)
            replica.drain(EXIT_TIMEOUT_S)
    finally:
        replica.close()
