"""Where the tests find Postgres, Redis and S3/SQS.

`DPP_TEST_DATABASE_URL` / `DPP_TEST_REDIS_URL` name real servers (CI on this
machine sets them to the local ones); otherwise the embedded servers start
once per test session. S3 and SQS are always moto's server mode on loopback.
Each test gets its own database (cloned from a migrated template) and its own
Redis key prefix, and both are removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import redis as redis_sync
from aiobotocore.session import get_session

from dpp.adapters import embedded
from dpp.adapters.migrate import apply_migrations


@dataclass(frozen=True, slots=True)
class TestServices:
    admin_database_url: str
    redis_url: str
    object_store_url: str
    template_database: str

    def database_url(self, name: str) -> str:
        return with_database(self.admin_database_url, name)


def store_env(services: TestServices, database_url: str, redis_prefix: str) -> dict[str, str]:
    """The settings that point a DPP process at this test's own stores: its
    database, its Redis prefix, a fresh bucket on the suite's object store."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": services.redis_url,
        "S3_ENDPOINT_URL": services.object_store_url,
        "S3_RESULT_BUCKET": f"dpp-test-{secrets.token_hex(6)}",
        "DPP_REDIS_PREFIX": redis_prefix,
    }


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _admin_execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def create_database(services: TestServices, name: str) -> str:
    asyncio.run(
        _admin_execute(
            services.admin_database_url,
            f'CREATE DATABASE "{name}" TEMPLATE "{services.template_database}"',
        )
    )
    return services.database_url(name)


def drop_database(services: TestServices, name: str) -> None:
    asyncio.run(
        _admin_execute(
            services.admin_database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )
    )


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix``: on a cluster, scanned on every primary
    (each holds its own slots) and deleted one key at a time (no cross-slot DEL)."""
    probe = redis_sync.Redis.from_url(redis_url)
    try:
        clustered = int(probe.info("cluster").get("cluster_enabled", 0)) == 1
        if not clustered:
            _delete_matching(probe, f"{prefix}:*")
            return
    finally:
        probe.close()
    cluster = redis_sync.RedisCluster.from_url(redis_url)
    try:
        for node in cluster.get_primaries():
            client = cluster.get_redis_connection(node)
            _delete_matching(client, f"{prefix}:*", one_by_one=True)
    finally:
        cluster.close()


def _delete_matching(client: redis_sync.Redis, match: str, *, one_by_one: bool = False) -> None:
    batch: list[bytes] = []

    def flush() -> None:
        if one_by_one:
            pipeline = client.pipeline(transaction=False)
            for key in batch:
                pipeline.delete(key)
            pipeline.execute()
        else:
            client.delete(*batch)
        batch.clear()

    for key in client.scan_iter(match=match, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            flush()
    if batch:
        flush()


class ServiceStack:
    """Starts (or finds) the services once per test session."""

    def __init__(self) -> None:
        self._stops: list = []
        self.directory = Path(tempfile.mkdtemp(prefix="dpp-test-"))

    def start(self) -> TestServices:
        database_url = os.environ.get("DPP_TEST_DATABASE_URL")
        redis_url = os.environ.get("DPP_TEST_REDIS_URL")
        if not database_url:
            pg = embedded.start_postgres(self.directory / "postgres")
            self._stops.append(pg.handle.cleanup)
            database_url = pg.url
        if not redis_url:
            rd = embedded.start_redis(self.directory / "redis")
            self._stops.append(rd.handle.shutdown)
            redis_url = rd.url
        store = embedded.start_object_store()
        self._stops.append(store.handle.stop)
        template = f"dpp_template_{secrets.token_hex(4)}"
        asyncio.run(_admin_execute(database_url, f'CREATE DATABASE "{template}"'))
        self._stops.append(
            lambda: asyncio.run(
                _admin_execute(database_url, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
            )
        )
        asyncio.run(apply_migrations(with_database(database_url, template)))
        return TestServices(database_url, redis_url, store.url, template)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception as error:  # keep stopping the rest
                print(f"test service did not stop cleanly: {error!r}")


async def create_sqs_queues(endpoint_url: str, *, max_receive_count: int = 2) -> tuple[str, str]:
    """A fresh work queue with a dead-letter queue behind it; (queue_url, dlq_url)."""
    name = f"dpp-test-{secrets.token_hex(6)}"
    async with get_session().create_client(
        "sqs", endpoint_url=endpoint_url, region_name="us-east-1"
    ) as client:
        dead = (await client.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
        arn = (await client.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        policy = {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
        work = (
            await client.create_queue(
                QueueName=name, Attributes={"RedrivePolicy": orjson.dumps(policy).decode()}
            )
        )["QueueUrl"]
    return work, dead
