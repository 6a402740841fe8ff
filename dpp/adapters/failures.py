"""Which dependency an error says is down: the drivers' failures, classified once.

A request that meets a lost, refused or timed-out connection to Postgres,
Redis, object storage or SQS, or a pool with no free connection in time, must
answer 503 with ``Retry-After`` (SPEC §3, docs/operations.md), never 500. The
layers above never name a driver's exception; the composition root hands the
HTTP front ``unavailable_dependency`` and the front's one error layer asks it.

Only *unavailability* counts: a refused statement (a constraint, a data error),
a script error or a 4xx from S3 is a fault of the request or of DPP and stays
what it is. Programmer errors are never turned into 503s.
"""

from __future__ import annotations

from types import TracebackType
from typing import Final

import asyncpg
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from redis import exceptions as redis_errors

__all__ = ["DEPENDENCY_NAMES", "unavailable_dependency"]

POSTGRES: Final = "postgres"
REDIS: Final = "redis"
OBJECT_STORAGE: Final = "object_storage"  # S3, and SQS when it carries the queue
UNKNOWN: Final = "dependency"  # an OSError whose traceback names no driver
DEPENDENCY_NAMES: Final = (POSTGRES, REDIS, OBJECT_STORAGE, UNKNOWN)

# Lost, refused or shut-down connections (class 08), an administrator's
# termination or a statement timeout (class 57), no connection slots (class 53),
# the client's "connection is closed" / "pool is closing", and a protocol
# caught mid-message by the server's end of the session (see
# dpp.adapters.postgres.BROKEN_CONNECTION_ERRORS: that connection is discarded).
_POSTGRES_DOWN: Final[tuple[type[Exception], ...]] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_REDIS_DOWN: Final[tuple[type[Exception], ...]] = (
    redis_errors.ConnectionError,  # refused, reset, BusyLoading, MaxConnections
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica promoted under us
    redis_errors.ClusterError,  # CLUSTERDOWN, MASTERDOWN, and a cluster client out of retries
    redis_errors.TryAgainError,
    # a redirection storm the cluster client gave up following (slots moving
    # while a primary restarts or fails over): the cluster is busy, not the request
    redis_errors.AskError,  # and MovedError, its subclass
    redis_errors.SlotNotCoveredError,  # a primary that owns slots is gone
)
# What the cluster client raises (not a RedisError) when no node it knows answers.
_REDIS_CLUSTER_UNREACHABLE: Final = (
    "Redis Cluster cannot be connected",
    "All slots are not covered",
    "startup_nodes could not agree",
)
_S3_DOWN: Final[tuple[type[Exception], ...]] = (BotoConnectionError, HTTPClientError)
# S3/SQS answers that mean "the service, not the request": retry later.
_S3_BUSY_CODES: Final = frozenset(
    {"SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError", "Throttling"}
)
# Module prefixes that tell whose socket an OSError came from.
_DRIVER_MODULES: Final = (
    ("asyncpg", POSTGRES),
    ("redis", REDIS),
    ("aiobotocore", OBJECT_STORAGE),
    ("botocore", OBJECT_STORAGE),
    ("aiohttp", OBJECT_STORAGE),
)
_TRACEBACK_FRAMES_MAX: Final = 200


def unavailable_dependency(error: BaseException) -> str | None:
    """The name of the dependency ``error`` says is unavailable, or None.

    A group (a task group's failure) counts when every one of its errors does;
    its first names the dependency.
    """
    if isinstance(error, BaseExceptionGroup):
        names = [unavailable_dependency(inner) for inner in error.exceptions]
        if names and all(names):
            return names[0]
        return None
    if isinstance(error, _POSTGRES_DOWN):
        return POSTGRES
    if isinstance(error, _REDIS_DOWN):
        return REDIS
    if isinstance(error, redis_errors.RedisClusterException) and str(error).startswith(
        _REDIS_CLUSTER_UNREACHABLE
    ):
        return REDIS
    if isinstance(error, _S3_DOWN):
        return OBJECT_STORAGE
    if isinstance(error, ClientError):
        response = error.response
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = response.get("Error", {}).get("Code", "")
        return OBJECT_STORAGE if status >= 500 or code in _S3_BUSY_CODES else None
    if isinstance(error, BotoCoreError):
        return None
    if isinstance(error, OSError):
        # refused, reset, unreachable, or a timeout (a pool's acquire, a connect)
        return _driver_in(error.__traceback__) or UNKNOWN
    return None


def _driver_in(traceback: TracebackType | None) -> str | None:
    """The driver whose code raised (the innermost frame that names one)."""
    found = None
    for _ in range(_TRACEBACK_FRAMES_MAX):
        if traceback is None:
            break
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        for prefix, name in _DRIVER_MODULES:
            if module == prefix or module.startswith(prefix + "."):
                found = name
        traceback = traceback.tb_next
    return found
