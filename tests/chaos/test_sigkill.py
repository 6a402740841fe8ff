"""SIGKILL a whole replica mid-work; a fresh replica finishes every run, money balanced.

This is the crash no ``finally:`` sees: no release, no settlement, no mirror
update. What must hold afterwards is only what storage and the reconciler
guarantee: every run reaches a terminal state (work in flight is reaped
EXPIRED with the minimum fee, queued work runs), each settled exactly once,
and the audit is clean. Then the survivor drains on SIGTERM and exits 0.

Runs ``python -m dpp.cli serve`` (``dpp.app.run_server``) as real processes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from tests.replica import Replica, admin_funded_tenant, wait_audit_ok
from tests.services import store_env

pytestmark = pytest.mark.slow

RUNS = 8
ADMIN_TOKEN = "sigkill-admin-token-0123456789"
START_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 40.0
EXIT_TIMEOUT_S = 30.0
TERMINAL = ("COMPLETED", "FAILED", "EXPIRED", "CANCELED")


def _kinds(node: dict[str, Any]) -> Iterator[str]:
    yield str(node.get("kind"))
    for child in node.get("children", []):
        yield from _kinds(child)


async def run_statuses(database_url: str) -> dict[str, str]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT id, status FROM runs")
    finally:
        await connection.close()
    return {row["id"]: row["status"] for row in rows}


async def test_sigkill_mid_work_then_a_fresh_replica_settles_everything_once(
    services, database_url, redis_prefix, tmp_path
) -> None:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_LEASE_SEC": "2",
        "DPP_HEARTBEAT_SEC": "1",
        "DPP_REAPER_INTERVAL_SEC": "1",
        "DPP_RECONCILE_INTERVAL_SEC": "1",
        "DPP_RECONCILE_THRESHOLD_SEC": "1",
        "DPP_SHUTDOWN_GRACE_SEC": "2",
        "DPP_WORKER_CONCURRENCY": "4",
        "LOG_LEVEL": "INFO",
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    first = Replica(env, tmp_path / "first.log")
    second: Replica | None = None
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await first.wait_ready(client)
            tree = (await client.get(f"{first.url}/admin/actors", headers=admin)).json()
            if "dispatcher" not in set(_kinds(tree)):
                pytest.skip("dpp serve does not host the dispatcher yet (dpp/app.py wiring)")

            bearer = (
                await admin_funded_tenant(client, first.url, admin, 10_000_000, name="chaos")
            ).bearer
            for n in range(RUNS):
                accepted = await client.post(
                    f"{first.url}/v1/runs",
                    json={"pack_type": "echo", "inputs": {"payload": n, "delay_ms": 1_500}},
                    headers=bearer,
                )
                assert accepted.status_code == 202, accepted.text

            # Kill while work is in flight: no finally, no release, no settlement.
            with anyio.fail_after(START_TIMEOUT_S):
                while True:
                    if "PROCESSING" in (await run_statuses(database_url)).values():
                        break
                    await anyio.sleep(0.05)
            first.process.send_signal(signal.SIGKILL)
            assert first.process.wait(timeout=EXIT_TIMEOUT_S) == -signal.SIGKILL
            stranded = await run_statuses(database_url)
            assert any(status == "PROCESSING" for status in stranded.values())

            second = Replica(env, tmp_path / "second.log")
            await second.wait_ready(client)
            with anyio.fail_after(SETTLE_TIMEOUT_S):
                while True:
                    statuses = await run_statuses(database_url)
                    if len(statuses) == RUNS and all(s in TERMINAL for s in statuses.values()):
                        break
                    await anyio.sleep(0.2)
            # Killed work expires (minimum fee); the rest completes. Never anything else.
            assert set(statuses.values()) <= {"COMPLETED", "EXPIRED"}, statuses
            # The mirror may lag a killed settlement until drift repair runs.
            await wait_audit_ok(client, second.url, admin, SETTLE_TIMEOUT_S)

            second.drain(EXIT_TIMEOUT_S)
    finally:
        first.close()
        if second is not None:
            second.close()


def _chaos_env(services, database_url: str, redis_prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_LEASE_SEC": "2",
        "DPP_HEARTBEAT_SEC": "1",
        "DPP_REAPER_INTERVAL_SEC": "1",
        "DPP_RECONCILE_INTERVAL_SEC": "1",
        "DPP_RECONCILE_THRESHOLD_SEC": "1",
        "DPP_SHUTDOWN_GRACE_SEC": "2",
        "DPP_WORKER_CONCURRENCY": "2",
        "LOG_LEVEL": "INFO",
    }


# Where the kill lands -> what the survivor's reconciler must make of the killed run.
KILLED_IN_FINALIZE = {
    # CLAIMED, no result object: rolled back, minimum fee
    "run.after_finalize_claim": {"FAILED"},
    # CLAIMED with its receipt: rolled forward from the receipt
    "run.after_result_put": {"COMPLETED"},
    # the settlement's transaction dies uncommitted: CLAIMED with its receipt
    "settle.before_commit": {"COMPLETED"},
    # committed, the mirror never heard: drift repair
    "settle.after_commit": {"COMPLETED"},
}


@pytest.mark.parametrize("point", sorted(KILLED_IN_FINALIZE))
async def test_sigkill_during_finalize_or_settle_is_repaired_exactly_once(
    services, database_url, redis_prefix, tmp_path, point
) -> None:
    """The replica SIGKILLs itself at ``point`` (DPP_FAULT_SIGKILL_AT) in the middle of
    finishing a run; a fresh replica settles every run exactly once, each as the
    evidence says, and the audit (the mirror included) comes out clean."""
    env = {**_chaos_env(services, database_url, redis_prefix), "DPP_WORKER_CONCURRENCY": "1"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    first = Replica({**env, "DPP_FAULT_SIGKILL_AT": point}, tmp_path / "first.log")
    second: Replica | None = None
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await first.wait_ready(client)
            bearer = (
                await admin_funded_tenant(client, first.url, admin, 10_000_000, name="chaos")
            ).bearer
            for n in range(3):
                accepted = await client.post(
                    f"{first.url}/v1/runs",
                    json={"pack_type": "echo", "inputs": {"payload": n, "delay_ms": 500}},
                    headers=bearer,
                )
                assert accepted.status_code == 202, accepted.text
            # the first run to reach the point takes the whole process with it
            assert first.process.wait(timeout=SETTLE_TIMEOUT_S) == -signal.SIGKILL, first.output()
            stranded = await run_statuses(database_url)
            assert set(stranded.values()) - set(TERMINAL), stranded

            second = Replica(env, tmp_path / "second.log")
            await second.wait_ready(client)
            with anyio.fail_after(SETTLE_TIMEOUT_S):
                while True:
                    statuses = await run_statuses(database_url)
                    if all(s in TERMINAL for s in statuses.values()):
                        break
                    await anyio.sleep(0.2)
            # one worker: the run the kill caught ends as its evidence says, the
            # queued ones complete, nothing is settled twice (the audit)
            caught = [r for r, s in stranded.items() if s not in ("QUEUED", *TERMINAL)]
            if point == "settle.after_commit":
                assert caught == [], stranded  # its settlement had committed
            else:
                assert [stranded[r] for r in caught] == ["CLAIMED"], stranded
            for run_id, status in stranded.items():
                if run_id in caught:
                    assert statuses[run_id] in KILLED_IN_FINALIZE[point], (run_id, statuses)
                elif status == "QUEUED":
                    assert statuses[run_id] == "COMPLETED", (run_id, statuses)
            await wait_audit_ok(client, second.url, admin, SETTLE_TIMEOUT_S)
            second.drain(EXIT_TIMEOUT_S)
    finally:
        first.close()
        if second is not None:
            second.close()
