"""DPP on a three-master Redis Cluster (SPEC §5): REDIS_URL names one node.

The cluster is ``tests.redis_cluster``'s (one per session). Tests marked
``single_and_cluster`` run on the single Redis too, so the two are held to the
same contract; tenants are spread so every primary serves some of them.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster

from dpp.adapters.failures import unavailable_dependency
from dpp.adapters.redis import (
    Redis,
    create_redis,
    open_redis,
    ping_all,
    watch_cluster_mode,
)
from dpp.app import open_runtime
from dpp.config import Settings
from dpp.ids import new_id
from dpp.money import drift
from dpp.money.ledger import InsufficientBudget, Reserved
from dpp.runs.admission import ReservationUnavailable
from dpp.tenancy.principal import Principal
from dpp.tenancy.ratelimit import RateLimiter
from tests import services as test_services
from tests.integration.conftest import BASE_URL, CapturedLogs
from tests.moneykit import create_plan, draft, open_replica
from tests.redis_cluster import (
    MASTERS,
    NODE_TIMEOUT_MS,
    RedisClusterNodes,
    single_and_cluster,
    slot_third,
)
from tests.services import delete_redis_prefix
from tests.tcp_proxy import TcpProxy

RESERVATION = 1_000
on_cluster = pytest.mark.parametrize("redis_topology", ["cluster"])


def ids_on_every_primary(prefix: str, per_primary: int) -> list[str]:
    """Ids whose hash slots fall ``per_primary`` times on each of the three masters."""
    found: dict[int, list[str]] = {third: [] for third in range(MASTERS)}
    while any(len(ids) < per_primary for ids in found.values()):
        candidate = new_id(prefix)
        third = found[slot_third(candidate)]
        if len(third) < per_primary:
            third.append(candidate)
    return [one for ids in found.values() for one in ids]


async def tenants_on_every_primary(pool, per_primary: int, plan_id: str) -> list[str]:
    tenants = ids_on_every_primary("ten", per_primary)
    for tenant_id in tenants:
        await pool.execute(
            "INSERT INTO tenants (id, name, plan_id) VALUES ($1, 't', $2)", tenant_id, plan_id
        )
    return tenants


# --- the client: detection, readiness --------------------------------------------------


@on_cluster
async def test_any_node_is_detected_as_a_cluster_and_every_primary_answers(
    services: test_services.TestServices, redis_cluster: RedisClusterNodes
) -> None:
    for port in redis_cluster.ports:
        client = await open_redis(f"redis://127.0.0.1:{port}/0")
        try:
            assert isinstance(client, RedisCluster)
            assert len(client.get_primaries()) == MASTERS
            await ping_all(client)
        finally:
            await client.aclose()


@on_cluster
async def test_a_single_client_on_a_cluster_node_is_not_ready(
    services: test_services.TestServices,
) -> None:
    """A replica that could not detect the cluster at start (Redis was down) must not
    report ready: its single client would meet MOVED on two slots in three."""
    client = create_redis(services.redis_url)
    try:
        with pytest.raises(redis_errors.RedisError, match="cluster"):
            await ping_all(client)
    finally:
        await client.aclose()


async def open_when_it_answers(url: str, proxy: TcpProxy) -> Redis:
    """``open_redis`` on a node that does not listen yet, and starts to a moment later."""
    opened: list[Redis] = []

    async def open_it() -> None:
        opened.append(await open_redis(url, first_delay_s=0.1))

    async with anyio.create_task_group() as group:
        group.start_soon(open_it)
        await anyio.sleep(0.35)  # refused three times by now
        assert not opened
        await proxy.start()
    return opened[0]


@single_and_cluster
async def test_a_redis_that_answers_after_the_replica_starts_is_still_detected(
    services: test_services.TestServices, redis_topology: str, captured_logs: CapturedLogs
) -> None:
    """A replica started a moment before its Redis (one compose file, a rollout during
    an outage) asks again: a cluster node is then spoken to as a cluster, not kept
    unready with a single client until someone restarts the replica."""
    node = urlsplit(services.redis_url)
    assert node.hostname and node.port
    proxy = TcpProxy(node.hostname, node.port)  # not listening yet: refused
    try:
        client = await open_when_it_answers(f"redis://{proxy.address}/0", proxy)
        try:
            assert isinstance(client, RedisCluster) == (redis_topology == "cluster")
            await ping_all(client)  # ready
        finally:
            await client.aclose()
    finally:
        await proxy.close()
    retries = [
        line for line in captured_logs.lines() if line["msg"] == "redis not reachable, asking again"
    ]
    assert len(retries) >= 2


@single_and_cluster
async def test_a_node_silent_at_start_is_watched_until_it_says_what_it_is(
    services: test_services.TestServices, redis_topology: str
) -> None:
    """The replica's watch (it restarts on True): asked again while the node is
    silent, True once it answers as a cluster node, False as a single Redis."""
    node = urlsplit(services.redis_url)
    assert node.hostname and node.port
    proxy = TcpProxy(node.hostname, node.port)  # not listening yet: refused
    client = create_redis(f"redis://{proxy.address}/0")
    answers: list[bool] = []

    async def watch() -> None:
        answers.append(await watch_cluster_mode(client, interval_s=0.05))

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            await anyio.sleep(0.3)  # refused several times by now
            assert not answers
            await proxy.start()
        assert answers == [redis_topology == "cluster"]
    finally:
        await client.aclose()
        await proxy.close()


@single_and_cluster
async def test_a_client_that_detected_its_redis_ends_the_watch_at_once(
    services: test_services.TestServices,
) -> None:
    client = await open_redis(services.redis_url)
    try:
        with anyio.fail_after(5):
            assert await watch_cluster_mode(client, interval_s=60) is False
    finally:
        await client.aclose()


async def test_a_redis_silent_through_every_attempt_starts_on_the_single_client(
    captured_logs: CapturedLogs,
) -> None:
    proxy = TcpProxy("127.0.0.1", 1)  # never listens
    client = await open_redis(f"redis://{proxy.address}/0", attempts=3, first_delay_s=0.01)
    try:
        assert not isinstance(client, RedisCluster)
        with pytest.raises(redis_errors.ConnectionError):
            await ping_all(client)  # unready, and no 500: the error is Redis's
    finally:
        await client.aclose()
    messages = [line["msg"] for line in captured_logs.lines()]
    assert messages.count("redis not reachable, asking again") == 2
    assert "redis unreachable at start; cluster mode not detected" in messages


@single_and_cluster
async def test_single_redis_is_not_taken_for_a_cluster(
    services: test_services.TestServices,
) -> None:
    client = await open_redis(services.redis_url)
    try:
        await ping_all(client)
    finally:
        await client.aclose()


def test_cluster_failures_are_redis_unavailable_never_a_500() -> None:
    for error in (
        redis_errors.MovedError("3999 127.0.0.1:17002"),
        redis_errors.AskError("3999 127.0.0.1:17002"),
        redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis_errors.MasterDownError("MASTERDOWN"),
        redis_errors.ClusterError("TTL exhausted."),
        redis_errors.TryAgainError("TRYAGAIN"),
        redis_errors.SlotNotCoveredError('Slot "5" is not covered by the cluster.'),
        redis_errors.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node"
        ),
    ):
        assert unavailable_dependency(error) == "redis", error
    # a programmer's error stays one
    assert unavailable_dependency(redis_errors.RedisClusterException("No way to dispatch")) is None
    assert unavailable_dependency(redis_errors.ClusterCrossSlotError("CROSSSLOT")) is None


@single_and_cluster
async def test_readyz_and_a_credit_top_up(
    settings: Settings, settings_env: dict[str, str], admin_headers: dict[str, str]
) -> None:
    """The first report's failure: ready, then the first top-up answered 500 (MOVED)."""
    async with (
        open_runtime(settings, environment=settings_env, dispatch=False) as runtime,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.app), base_url=BASE_URL
        ) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        for _ in range(2 * MASTERS):  # tenants land on every primary sooner or later
            created = await http.post("/admin/tenants", json={"name": "t"}, headers=admin_headers)
            assert created.status_code == 201, created.text
            tenant_id = created.json()["id"]
            for expected in (201, 200):  # the second is a replay
                credited = await http.post(
                    f"/admin/tenants/{tenant_id}/credits",
                    json={"amount_usd_micros": 5_000},
                    headers={**admin_headers, "Idempotency-Key": f"top-up-{tenant_id}"},
                )
                assert credited.status_code == expected, credited.text
            budget = await http.get(f"/admin/tenants/{tenant_id}/budget", headers=admin_headers)
            assert budget.status_code == 200, budget.text


# --- money on every primary --------------------------------------------------------------


async def _storm(replicas, tenants: list[str], per_tenant: int) -> dict[str, list[object]]:
    outcomes: dict[str, list[object]] = {tenant: [] for tenant in tenants}

    async def one(replica, tenant: str) -> None:
        try:
            outcomes[tenant].append(await replica.budgets.reserve(tenant, draft(RESERVATION)))
        except ReservationUnavailable as unavailable:
            outcomes[tenant].append(unavailable)

    async with anyio.create_task_group() as group:
        for index in range(per_tenant):
            for position, tenant in enumerate(tenants):
                group.start_soon(one, replicas[(index + position) % len(replicas)], tenant)
    return outcomes


@single_and_cluster
async def test_a_storm_over_tenants_on_every_primary_admits_exactly_each_budget(
    database_url, services: test_services.TestServices, redis_prefix: str
) -> None:
    budget_runs = 10
    async with (
        open_replica(database_url, services.redis_url, redis_prefix) as first,
        open_replica(database_url, services.redis_url, redis_prefix) as second,
    ):
        await create_plan(first.pool, "wide", max_concurrent_runs=10_000)
        tenants = await tenants_on_every_primary(first.pool, 2, "wide")
        for tenant in tenants:
            await first.budgets.credit(tenant, budget_runs * RESERVATION, f"credit:{tenant}")
        outcomes = await _storm([first, second], tenants, 3 * budget_runs)
        for tenant, answers in outcomes.items():
            assert all(isinstance(o, Reserved | InsufficientBudget) for o in answers), answers
            assert sum(isinstance(o, Reserved) for o in answers) == budget_runs, tenant
            budget = await first.accounts.budget(tenant)
            assert budget["balance_usd_micros"] == budget["reserved_usd_micros"]
        await drift.repair_drift(first.pool, first.queries, first.mirror, settle_s=0.05)
        report = await first.accounts.audit()
        assert report.ok, report.violations


@single_and_cluster
async def test_rate_limits_hold_for_tenants_on_every_primary(
    services: test_services.TestServices, redis_prefix: str
) -> None:
    client = await open_redis(services.redis_url)
    try:
        limiter = RateLimiter(client, redis_prefix)
        who = [
            Principal(
                tenant_id=tenant_id,
                key_id=new_id("key"),
                plan_id="default",
                requests_per_minute=12,
                max_concurrent_runs=10,
                retention_days=30,
                key_requests_per_minute=8,
            )
            for tenant_id in ids_on_every_primary("ten", 1)
        ]
        allowed: dict[str, int] = {principal.tenant_id: 0 for principal in who}

        async def one(principal: Principal) -> None:
            if (await limiter.check(principal)).allowed:
                allowed[principal.tenant_id] += 1

        async with anyio.create_task_group() as group:
            for _ in range(20):
                for principal in who:
                    group.start_soon(one, principal)
        assert list(allowed.values()) == [8] * MASTERS  # the key's limit binds
    finally:
        await client.aclose()


@on_cluster
@pytest.mark.slow
async def test_a_master_restarted_mid_storm_leaves_the_audit_clean(
    database_url,
    services: test_services.TestServices,
    redis_prefix: str,
    redis_cluster: RedisClusterNodes,
) -> None:
    """Kill one master outright mid-storm and keep it down past the cluster's node
    timeout (its slots unserved: the cluster answers CLUSTERDOWN), then start it
    again on its port with its nodes.conf (its data and script cache gone).
    Meanwhile reservations wait it out or are refused as unavailable (a 503
    upstream, never a 500) and nothing is overspent; once the cluster is whole
    the mirror is rebuilt from Postgres and the audit is clean."""
    budget_runs = 40
    async with (
        open_replica(database_url, services.redis_url, redis_prefix) as first,
        open_replica(database_url, services.redis_url, redis_prefix) as second,
    ):
        await create_plan(first.pool, "wide", max_concurrent_runs=10_000)
        tenants = await tenants_on_every_primary(first.pool, 1, "wide")
        for tenant in tenants:
            await first.budgets.credit(tenant, budget_runs * RESERVATION, f"credit:{tenant}")
        victim = redis_cluster.port_of_slot(5461)  # the master of the middle third
        outcomes: dict[str, list[object]] = {tenant: [] for tenant in tenants}
        killed_at: list[float] = []
        restarted_at: list[float] = []
        answered_at: list[float] = []

        async def one(replica, tenant: str) -> None:
            try:
                outcomes[tenant].append(await replica.budgets.reserve(tenant, draft(RESERVATION)))
            except ReservationUnavailable as unavailable:
                outcomes[tenant].append(unavailable)
            except Exception as error:  # a Redis outage the HTTP front answers 503 for
                assert unavailable_dependency(error) == "redis", repr(error)
                outcomes[tenant].append(error)
            finally:
                if slot_third(tenant) == 1:
                    answered_at.append(time.monotonic())

        async def master_restart() -> None:
            await anyio.sleep(0.5)
            await anyio.to_thread.run_sync(redis_cluster.kill, victim)
            killed_at.append(time.monotonic())
            await anyio.sleep(NODE_TIMEOUT_MS / 1000 + 1.0)
            await anyio.to_thread.run_sync(redis_cluster.restart, victim)
            restarted_at.append(time.monotonic())

        started = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(master_restart)
            for index in range(3 * budget_runs):  # about six seconds of reservations
                for position, tenant in enumerate(tenants):
                    group.start_soon(one, (first, second)[(index + position) % 2], tenant)
                await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(redis_cluster.wait_ok)
        assert time.monotonic() - started < 120
        for tenant, answers in outcomes.items():
            assert sum(isinstance(o, Reserved) for o in answers) <= budget_runs, tenant
            committed = await first.pool.fetchval(
                "SELECT count(*) FROM runs WHERE tenant_id = $1", tenant
            )
            assert committed <= budget_runs
        # the storm was on both sides of the outage (calls in flight wait it out,
        # or are answered as unavailable)
        assert answered_at[0] < killed_at[0] and answered_at[-1] > restarted_at[0], (
            answered_at[0],
            killed_at,
            restarted_at,
            answered_at[-1],
        )
        # once whole again, each tenant admits exactly what is left of its budget
        for tenant in tenants:
            committed = await first.pool.fetchval(
                "SELECT count(*) FROM runs WHERE tenant_id = $1", tenant
            )
            for _ in range(budget_runs - committed):
                assert isinstance(await _reserve_patiently(first, tenant), Reserved)
            assert isinstance(await _reserve_patiently(second, tenant), InsufficientBudget)
        await drift.repair_drift(first.pool, first.queries, first.mirror, settle_s=0.05)
        report = await first.accounts.audit()
        assert report.ok, report.violations


async def _reserve_patiently(replica, tenant: str) -> object:
    """A reservation, retried while the replica still sees the cluster recovering."""
    deadline = anyio.current_time() + 30
    while True:
        try:
            return await replica.budgets.reserve(tenant, draft(RESERVATION))
        except Exception as error:
            if anyio.current_time() > deadline or not (
                isinstance(error, ReservationUnavailable) or unavailable_dependency(error)
            ):
                raise
            await anyio.sleep(0.2)


@on_cluster
async def test_redis_loss_on_every_primary_mid_storm_never_overspends(
    database_url, services: test_services.TestServices, redis_prefix: str
) -> None:
    """Every tenant's keys vanish (scanned on every primary) twice mid-storm."""
    budget_runs = 10
    async with open_replica(database_url, services.redis_url, redis_prefix) as replica:
        await create_plan(replica.pool, "wide", max_concurrent_runs=10_000)
        tenants = await tenants_on_every_primary(replica.pool, 1, "wide")
        for tenant in tenants:
            await replica.budgets.credit(tenant, budget_runs * RESERVATION, f"credit:{tenant}")
        outcomes: dict[str, list[object]] = {tenant: [] for tenant in tenants}

        async def one(tenant: str) -> None:
            try:
                outcomes[tenant].append(await replica.budgets.reserve(tenant, draft(RESERVATION)))
            except ReservationUnavailable as unavailable:
                outcomes[tenant].append(unavailable)

        async with anyio.create_task_group() as group:
            for index in range(3 * budget_runs):
                for tenant in tenants:
                    group.start_soon(one, tenant)
                if index in (5, 15):
                    await anyio.lowlevel.checkpoint()
                    await anyio.to_thread.run_sync(
                        delete_redis_prefix, services.redis_url, redis_prefix
                    )
        for tenant in tenants:
            committed = await replica.pool.fetchval(
                "SELECT count(*) FROM runs WHERE tenant_id = $1", tenant
            )
            assert committed <= budget_runs
            budget = await replica.accounts.budget(tenant)
            assert budget["balance_usd_micros"] >= budget["reserved_usd_micros"]
        await drift.repair_drift(replica.pool, replica.queries, replica.mirror, settle_s=0.05)
        report = await replica.accounts.audit()
        assert report.ok, report.violations


@on_cluster
async def test_readyz_reports_redis_down_while_a_master_is_dead(
    settings: Settings,
    settings_env: dict[str, str],
    redis_cluster: RedisClusterNodes,
) -> None:
    """/readyz pings every primary: one dead master (a third of the tenants
    unserved) is 'redis down', and ready again once it is back."""
    async with (
        open_runtime(settings, environment=settings_env, dispatch=False) as runtime,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.app), base_url=BASE_URL
        ) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        victim = redis_cluster.ports[2]  # not the node REDIS_URL names
        await anyio.to_thread.run_sync(redis_cluster.kill, victim)
        try:
            with anyio.fail_after(30):
                answer = await http.get("/readyz")
            assert answer.status_code == 503, answer.text
            assert answer.json()["checks"]["redis"] == "down"
        finally:
            await anyio.to_thread.run_sync(redis_cluster.restart, victim)
            await anyio.to_thread.run_sync(redis_cluster.wait_ok)
        deadline = time.monotonic() + 30
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after the master is back"
            await anyio.sleep(0.2)
