"""Redis adapter: the client and its bounded pool, key names, and the errors.

One of the few modules that import redis (redis-py asyncio). Per-tenant keys
carry the tenant id in braces — the Redis Cluster hash tag — so a script
that touches several of a tenant's keys stays in one slot.

``REDIS_URL`` may name a single Redis or any node of a Redis Cluster (SPEC §5):
``open_redis`` asks the node (``INFO cluster``) at start and answers redis-py's
cluster client when ``cluster_enabled:1``. A node that does not answer yet is
asked again with backoff (as Postgres is): a Redis started a moment after DPP
(one compose file, a rollout during an outage) is still detected. The layers above see one type,
``Redis``; what differs between the two (readiness over every primary) is a
function here. Nothing in DPP scans or flushes Redis: the audit and drift
repair walk tenants from Postgres and read each one's keys by name.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

import anyio
from redis.asyncio import BlockingConnectionPool, RedisCluster
from redis.asyncio import Redis as SingleRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from dpp.config import StartupError

__all__ = [
    "REDIS_ERRORS",
    "NoScriptError",
    "Redis",
    "RedisError",
    "create_redis",
    "is_cluster",
    "open_redis",
    "ping_all",
    "tenant_key",
    "watch_cluster_mode",
]

log = logging.getLogger("dpp.adapters.redis")

SOCKET_TIMEOUT_S = 5.0
CONNECTIONS_MAX = 64
# a cluster client's pool is per node and does not wait for a free connection
# (MaxConnectionsError, a 503): give each primary room for a hot tenant's burst
CLUSTER_CONNECTIONS_PER_NODE_MAX = 128
# how long a caller waits for a free pooled connection before failing (closed)
CONNECTION_WAIT_S = 5.0
# Asking an unanswering node at start again: the first delay, doubling, for this
# many attempts in all (0.5 + 1 + 2 + 4 + 8 s: Postgres's connect backoff).
DETECT_ATTEMPTS_MAX = 6
DETECT_BACKOFF_FIRST_S = 0.5
# After that, a replica on the single client asks the node this often until it
# answers (watch_cluster_mode): a late cluster node makes the replica restart.
CLUSTER_WATCH_INTERVAL_S = 5.0

# Either client: a single Redis or a Redis Cluster (both redis-py asyncio).
Redis: TypeAlias = SingleRedis | RedisCluster

# What this adapter raises when Redis is down, refuses, or times out (a
# TimeoutError is an OSError): code above the adapters catches these names.
# The cluster client's own failures (a slot no primary covers, a cluster it
# cannot reach) are RedisClusterException, which is not a RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)


class ClusterNotSpoken(RedisError):
    """The single client meets a cluster node: the process must restart to detect it."""


def create_redis(url: str) -> SingleRedis:
    """A single-Redis client over a bounded, *blocking* pool: a burst waits for a
    connection (back-pressure) instead of failing with MaxConnectionsError."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=CONNECTIONS_MAX,
        timeout=CONNECTION_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        decode_responses=False,
    )
    return SingleRedis.from_pool(pool)  # the client owns (and closes) the pool


class _Cluster(RedisCluster):
    """redis-py's cluster client, with one of its races named for what it is.

    When a primary dies, the client disconnects that node's connections while
    other tasks are still writing on them (or re-handshaking them): the writer
    is gone and redis-py raises AttributeError ('NoneType' ... 'writelines').
    That is a lost connection — a 503, not a 500 — so it is re-raised as one.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as error:
            if not _raised_in_redis_connection(error):
                raise
            raise RedisConnectionError(
                "redis connection closed under a command (cluster reconnect)"
            ) from error


def _raised_in_redis_connection(error: BaseException) -> bool:
    traceback = error.__traceback__
    module = ""
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        traceback = traceback.tb_next
    return module == "redis.asyncio.connection"


def create_cluster(url: str) -> RedisCluster:
    """redis-py's cluster client, started from the node ``url`` names (it learns the
    rest of the cluster from that node and follows MOVED/ASK itself)."""
    return _Cluster.from_url(
        url,
        max_connections=CLUSTER_CONNECTIONS_PER_NODE_MAX,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        decode_responses=False,
    )


async def _cluster_enabled(client: SingleRedis) -> bool:
    info = await client.info("cluster")
    return int(info.get("cluster_enabled", 0) or 0) == 1


async def _cluster_mode(
    single: SingleRedis, attempts: int, first_delay_s: float
) -> dict[str, Any] | None:
    """``INFO cluster`` of the node ``single`` names, asked until it answers or
    ``attempts`` are spent (None: it never answered)."""
    delay_s = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            info: dict[str, Any] = await single.info("cluster")
            return info
        except (RedisError, OSError) as error:
            if attempt == attempts:
                log.warning(
                    "redis unreachable at start; cluster mode not detected",
                    extra={"attempts": attempt, "error": type(error).__name__},
                )
                return None
            log.warning(
                "redis not reachable, asking again",
                extra={"attempt": attempt, "delay_s": delay_s, "error": type(error).__name__},
            )
            await anyio.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable: attempts >= 1")


async def open_redis(
    url: str,
    *,
    attempts: int = DETECT_ATTEMPTS_MAX,
    first_delay_s: float = DETECT_BACKOFF_FIRST_S,
) -> Redis:
    """The client for ``url``: a cluster client when the node it names has cluster
    mode on, else the single client. A node that does not answer is asked again
    with backoff; one still silent after ``attempts`` cannot say which it is: the
    single client is answered (the replica starts, and serves 503s until Redis
    is back); should the node turn out to be a cluster node, ``ping_all`` keeps
    the replica unready and ``watch_cluster_mode`` tells it to restart (the
    fresh start detects it)."""
    assert attempts >= 1
    single = create_redis(url)
    try:
        enabled = await _cluster_mode(single, attempts, first_delay_s)
    except BaseException:
        await single.aclose()
        raise
    if enabled is None:
        return single
    if int(enabled.get("cluster_enabled", 0) or 0) != 1:
        return single
    await single.aclose()
    cluster = create_cluster(url)
    try:
        await cluster.initialize()
    except REDIS_ERRORS as error:
        await cluster.aclose()
        raise StartupError(
            f"REDIS_URL: names a cluster node, but the cluster cannot be used ({error})"
        ) from error
    except BaseException:
        await cluster.aclose()
        raise
    log.info("redis cluster detected", extra={"primaries": len(cluster.get_primaries())})
    return cluster


def is_cluster(redis: Redis) -> bool:
    return isinstance(redis, RedisCluster)


async def ping_all(redis: Redis) -> None:
    """Readiness: every primary of a cluster answers (a tenant on a dead one could
    not be served), or the single Redis does — and is not a cluster node the
    process started too early to detect (that one needs a restart)."""
    if isinstance(redis, RedisCluster):
        primaries = redis.get_primaries()
        if not primaries:
            raise RedisClusterException("no primary known")
        await redis.ping(target_nodes=primaries)
        return
    if await _cluster_enabled(redis):
        raise ClusterNotSpoken("REDIS_URL names a cluster node; restart to detect it")


async def watch_cluster_mode(redis: Redis, *, interval_s: float = CLUSTER_WATCH_INTERVAL_S) -> bool:
    """Whether ``redis`` speaks the single protocol to a cluster node, asked until
    the node answers (every ``interval_s`` while it does not).

    ``open_redis`` answers the single client when the node stayed silent through
    every attempt at start; were that node a cluster node, the single client
    would meet MOVED on two slots in three for as long as the process lives. The
    replica watches with this and, on True, exits to be restarted (a fresh start
    detects the cluster). A cluster client, or a node that answers as a single
    Redis, ends the watch with False at once: after a normal start it costs one
    ``INFO cluster``."""
    assert interval_s > 0
    if isinstance(redis, RedisCluster):
        return False
    while True:
        try:
            return await _cluster_enabled(redis)
        except REDIS_ERRORS:
            await anyio.sleep(interval_s)


def tenant_key(prefix: str, area: str, tenant_id: str, *rest: str) -> str:
    """``<prefix>:<area>:{<tenant_id>}[:rest...]`` — hash-tagged per tenant."""
    assert prefix and area and tenant_id
    key = f"{prefix}:{area}:{{{tenant_id}}}"
    return ":".join([key, *rest]) if rest else key
