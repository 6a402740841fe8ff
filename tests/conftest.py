"""Shared fixtures: real services, a database and Redis prefix per test."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.redis import open_redis
from dpp.money.audit import AuditReport, run_audit
from dpp.money.mirror import BudgetMirror
from tests.redis_cluster import RedisClusterNodes, missing_binaries, skip_or_fail
from tests.services import (
    ServiceStack,
    TestServices,
    create_database,
    delete_redis_prefix,
    drop_database,
)

# Every in-process HTTP response is checked against the OpenAPI document.
pytest_plugins = ["tests.openapi_contract_plugin"]


# A signing key for tests of a local results store (SPEC §5): fixed, not a secret.
TEST_RESULT_SIGNING_KEY = "test-result-signing-key-0123456789abcdef"


@pytest.fixture(params=["s3", "local"])
def result_store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The settings of each results store (SPEC §5), for tests that must hold on
    both: S3 (moto, the suite's default) and a local directory of the test's own."""
    if request.param == "s3":
        return {}
    return {
        "DPP_RESULTS_DIR": str(tmp_path / "results"),
        "DPP_RESULT_SIGNING_KEY": TEST_RESULT_SIGNING_KEY,
    }


@pytest.fixture(scope="session")
def service_stack() -> Iterator[TestServices]:
    """The services, started (or found) once per session."""
    stack = ServiceStack()
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def redis_topology() -> str:
    """The Redis a test runs on: ``single`` unless the test is parametrized with
    ``tests.redis_cluster.single_and_cluster`` (then also ``cluster``)."""
    return "single"


@pytest.fixture
def services(
    service_stack: TestServices, redis_topology: str, request: pytest.FixtureRequest
) -> TestServices:
    """The session's services, with ``redis_url`` naming a node of the session's
    Redis Cluster when the test runs on it (function-scoped so a test can choose;
    fixtures of a wider scope use ``service_stack``)."""
    if redis_topology == "single":
        return service_stack
    assert redis_topology == "cluster", redis_topology
    cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
    return dataclasses.replace(service_stack, redis_url=cluster.url)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A three-master cluster on loopback, started on first use, stopped at the end."""
    missing = missing_binaries()
    if missing:
        skip_or_fail(missing)
    nodes = RedisClusterNodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def database_url(
    services: TestServices, redis_prefix: str, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh, migrated database of this test's own.

    Every test that touched it ends with the money audit: SPEC §1 invariants
    1-4, no AUDIT_REQUIRED run left, and invariant 5 — the Redis mirror under
    this test's prefix equals Postgres for every tenant it mirrors (the test is
    over, so nothing is in flight). A test that moves money can never pass while
    leaving the ledger or its mirror inconsistent. A test that leaves a bad
    state on purpose says so with ``@pytest.mark.audit_exempt``; one that leaves
    only the mirror behind on purpose (a crash with no drift repair after it),
    with ``@pytest.mark.mirror_exempt``. (Depending on ``redis_prefix`` makes its
    keys outlive this audit.)
    """
    name = f"dpp_test_{secrets.token_hex(6)}"
    url = create_database(services, name)
    try:
        yield url
        if request.node.get_closest_marker("audit_exempt") is None:
            with_mirror = request.node.get_closest_marker("mirror_exempt") is None
            prefix = redis_prefix if with_mirror else None
            report = asyncio.run(_audit(url, services.redis_url, prefix))
            assert report.ok, f"money audit failed after the test: {report.as_json()}"
    finally:
        drop_database(services, name)


async def _audit(url: str, redis_url: str, prefix: str | None) -> AuditReport:
    pool = await create_pool(url, max_size=2)
    redis = await open_redis(redis_url)
    try:
        mirror = None if prefix is None else BudgetMirror(redis, prefix)
        return await run_audit(pool, Queries.load(), mirror)
    finally:
        await redis.aclose()
        await pool.close()


@pytest.fixture
def redis_prefix(services: TestServices) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"dpptest{secrets.token_hex(5)}"
    try:
        yield prefix
    finally:
        delete_redis_prefix(services.redis_url, prefix)


@pytest.fixture
def anyio_backend() -> str:
    """Adapters (asyncpg, redis-py, aiobotocore) are asyncio-only; kernel and
    pure-logic modules override this to run on trio as well."""
    return "asyncio"
