"""SPEC §7 against two real `dpp serve` processes: a storm of concurrent submits
through one limited key, alternating between the replicas, admits exactly as
many runs as the key's limit covers, however the requests interleave; the
runs execute and settle meanwhile (echo charges its whole reservation, so no
refund frees room mid-storm), and the audit — invariant 6 included — is clean.
"""

from __future__ import annotations

import os

import anyio
import httpx
import pytest

from tests.replica import Replica, admin_plan
from tests.services import store_env

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "spend-storm-admin-token-0123456789"
R = 1_000  # echo's default reservation, and its fixed price
LIMIT_RUNS = 12
SUBMITS = 80
SETTLE_TIMEOUT_S = 60.0


async def test_a_storm_through_one_key_on_two_replicas_admits_exactly_its_limit(
    services, database_url, redis_prefix, tmp_path
) -> None:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    replicas = [Replica(env, tmp_path / f"replica-{n}.log") for n in range(2)]
    try:
        limits = httpx.Limits(max_connections=SUBMITS * 2)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
            for replica in replicas:
                await replica.wait_ready(client)
            first, second = (replica.url for replica in replicas)
            await admin_plan(
                client,
                first,
                admin,
                "wide",
                requests_per_minute=100_000,
                max_concurrent_runs=10_000,
            )
            tenant = (
                await client.post(
                    f"{second}/admin/tenants", json={"name": "t", "plan_id": "wide"}, headers=admin
                )
            ).json()["id"]
            issued = await client.post(
                f"{first}/admin/tenants/{tenant}/api-keys",
                json={"name": "agent", "spend_limit_usd_micros": LIMIT_RUNS * R},
                headers=admin,
            )
            assert issued.status_code == 201, issued.text
            key_id = issued.json()["id"]
            key = {"Authorization": f"Bearer {issued.json()['api_key']}"}
            credited = await client.post(
                f"{second}/admin/tenants/{tenant}/credits",
                json={"amount_usd_micros": 100 * LIMIT_RUNS * R},
                headers={**admin, "Idempotency-Key": "seed"},
            )
            assert credited.status_code == 201, credited.text
            answers: list[httpx.Response] = []

            async def submit(index: int) -> None:
                url = replicas[index % 2].url
                answers.append(
                    await client.post(
                        f"{url}/v1/runs",
                        json={"pack_type": "echo", "inputs": {"payload": index}},
                        headers=key,
                    )
                )

            async with anyio.create_task_group() as group:
                for index in range(SUBMITS):
                    group.start_soon(submit, index)
            statuses = sorted(answer.status_code for answer in answers)
            assert statuses == [202] * LIMIT_RUNS + [402] * (SUBMITS - LIMIT_RUNS), statuses
            assert all(
                answer.json()["type"].endswith("/key-spend-limit")
                for answer in answers
                if answer.status_code == 402
            )
            view = (await client.get(f"{second}/admin/api-keys/{key_id}", headers=admin)).json()
            assert view["spent_usd_micros"] == LIMIT_RUNS * R
            budget = (await client.get(f"{first}/v1/budget", headers=key)).json()
            assert budget["key"]["available_usd_micros"] == 0
            # the runs execute on both replicas; once settled, the audit is clean
            with anyio.fail_after(SETTLE_TIMEOUT_S):
                while True:
                    audit = (await client.get(f"{first}/admin/audit", headers=admin)).json()
                    budget = (await client.get(f"{second}/v1/budget", headers=key)).json()
                    if audit["ok"] and budget["reserved_usd_micros"] == 0:
                        break
                    await anyio.sleep(0.5)
            assert budget["key"]["spent_usd_micros"] == LIMIT_RUNS * R  # charged, not refunded
            for replica in replicas:
                assert replica.process.poll() is None, replica.output()
    finally:
        for replica in replicas:
            replica.close()
