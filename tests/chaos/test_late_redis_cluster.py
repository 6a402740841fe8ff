"""A replica started while its Redis Cluster node was silent (SPEC §5: cluster mode
is detected at start) does not stay unready for the rest of its life.

``open_redis`` asks a silent node again for ~15 s, then starts the replica on
the single client (it serves 503s until Redis is back). When the node then
answers as a cluster node, the replica drains and exits 1 naming why, so that
whatever supervises it (``dpp serve --processes N``, systemd, Kubernetes)
starts it afresh, and the fresh start speaks the cluster protocol: its first
credit top-up, the request that once met ``MovedError``, is answered.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from tests import services as test_services
from tests.replica import Replica, admin_funded_tenant, admin_plan
from tests.services import store_env
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("redis_topology", ["cluster"])]

ADMIN_TOKEN = "late-cluster-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FALLBACK_LINE = "redis unreachable at start; cluster mode not detected"
EXIT_LINE = "a restart detects the cluster"
# the start's own attempts (~15.5 s) and the watch's interval (5 s), with room
DETECTION_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0


async def _wait_for_line(replica: Replica, line: str) -> None:
    with anyio.fail_after(DETECTION_TIMEOUT_S):
        while line not in replica.output():
            assert replica.process.poll() is None, f"replica exited:\n{replica.output()}"
            await anyio.sleep(0.2)


async def _wait_for_exit(replica: Replica) -> int:
    with anyio.fail_after(EXIT_TIMEOUT_S):
        while True:
            code = replica.process.poll()
            if code is not None:
                return code
            await anyio.sleep(0.2)


async def test_a_replica_started_before_its_redis_cluster_restarts_to_speak_it(
    services: test_services.TestServices, database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    node = urlsplit(services.redis_url)
    assert node.hostname and node.port
    proxy = TcpProxy(node.hostname, node.port)  # not listening: the node is silent
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "REDIS_URL": f"redis://{proxy.address}/0",
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_SHUTDOWN_GRACE_SEC": "1",
        "LOG_LEVEL": "INFO",
    }
    first = Replica(env, tmp_path / "first.log")
    second: Replica | None = None
    try:
        await _wait_for_line(first, FALLBACK_LINE)  # started on the single client
        await proxy.start()  # the cluster node answers now
        code = await _wait_for_exit(first)
        assert code == 1, first.output()
        assert EXIT_LINE in first.output()
        assert "draining to restart" in first.output()

        second = Replica(env, tmp_path / "second.log")  # what its supervisor does
        async with httpx.AsyncClient(timeout=30.0) as client:
            await second.wait_ready(client)  # every primary answers
            assert "redis cluster detected" in second.output()
            await admin_plan(
                client, second.url, ADMIN, "late", requests_per_minute=600, max_concurrent_runs=10
            )
            await admin_funded_tenant(
                client, second.url, ADMIN, 5_000_000, plan_id="late", key=False
            )
    finally:
        first.close()
        if second is not None:
            second.close()
        await proxy.close()
