"""Run queues: how a committed QUEUED run reaches a worker.

``open_queue(settings, pool, queries)`` picks the backend named by
``settings.queue_backend`` (``DPP_QUEUE``): ``postgres`` (default, the run row
is the queue entry, NOTIFY wakes dispatchers) or ``sqs`` (one message per run).
Either way Postgres decides who holds a run; see `dpp.adapters.queue.base`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from dpp.adapters.postgres import Queries
from dpp.adapters.queue.base import ClaimedRun, DeadLetter, QueuedRun, RunQueue
from dpp.adapters.queue.postgres import PostgresQueue
from dpp.adapters.queue.sqs import SqsQueue, open_sqs_queue
from dpp.config import Settings, require

__all__ = [
    "ClaimedRun",
    "DeadLetter",
    "PostgresQueue",
    "QueuedRun",
    "RunQueue",
    "SqsQueue",
    "open_queue",
]


@contextlib.asynccontextmanager
async def open_queue(
    settings: Settings, pool: asyncpg.Pool, queries: Queries
) -> AsyncIterator[RunQueue]:
    """The configured queue for the life of the block (SQS holds a client open)."""
    match settings.queue_backend:
        case "postgres":
            yield PostgresQueue(
                pool,
                queries,
                dsn=require(settings.database_url, "DATABASE_URL"),
                lease_sec=settings.lease_sec,
            )
        case "sqs":
            async with open_sqs_queue(
                queue_url=require(settings.sqs_queue_url, "SQS_QUEUE_URL"),
                endpoint_url=settings.sqs_endpoint_url,
                region=settings.s3_region,
                pool=pool,
                queries=queries,
                lease_sec=settings.lease_sec,
            ) as queue:
                yield queue
        case other:
            raise AssertionError(f"config admitted an unknown queue backend {other!r}")
