import asyncpg
import redis.asyncio as redis


async def test_database_is_migrated(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        plan = await connection.fetchrow("SELECT * FROM plans WHERE id = 'default'")
        assert plan is not None
        assert plan["max_concurrent_runs"] == 10
    finally:
        await connection.close()


async def test_redis_answers(services, redis_prefix: str) -> None:
    client = redis.Redis.from_url(services.redis_url)
    try:
        await client.set(f"{redis_prefix}:probe", "1")
        assert await client.get(f"{redis_prefix}:probe") == b"1"
    finally:
        await client.aclose()
