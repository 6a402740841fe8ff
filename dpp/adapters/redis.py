"""Redis adapter: the client and its bounded pool, key names, and the errors.

One of the few modules that import redis (redis-py asyncio). Per-tenant keys
carry the tenant id in braces — the Redis Cluster hash tag — so a script
that touches several of a tenant's keys stays in one slot.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import NoScriptError, RedisError

__all__ = [
    "REDIS_ERRORS",
    "NoScriptError",
    "Redis",
    "RedisError",
    "create_redis",
    "tenant_key",
]

SOCKET_TIMEOUT_S = 5.0
CONNECTIONS_MAX = 64
# how long a caller waits for a free pooled connection before failing (closed)
CONNECTION_WAIT_S = 5.0
# What this adapter raises when Redis is down, refuses, or times out (a
# TimeoutError is an OSError): code above the adapters catches these names.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


def create_redis(url: str) -> Redis:
    """A client over a bounded, *blocking* pool: a burst waits for a connection
    (back-pressure) instead of failing with MaxConnectionsError."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=CONNECTIONS_MAX,
        timeout=CONNECTION_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        decode_responses=False,
    )
    return Redis.from_pool(pool)  # the client owns (and closes) the pool


def tenant_key(prefix: str, area: str, tenant_id: str, *rest: str) -> str:
    """``<prefix>:<area>:{<tenant_id>}[:rest...]`` — hash-tagged per tenant."""
    assert prefix and area and tenant_id
    key = f"{prefix}:{area}:{{{tenant_id}}}"
    return ":".join([key, *rest]) if rest else key
