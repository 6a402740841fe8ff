"""Adapters: the only modules that speak to a driver.

``postgres`` (asyncpg: the pool, named queries, errors), ``redis`` (redis-py
asyncio: the client, key names, errors), ``blobs`` (aiobotocore S3: the
results store), ``queue`` (the run queue on Postgres or SQS), ``migrate``
(`dpp migrate`) and ``embedded`` (the development servers). They are
asyncio-only; everything above reaches them through the names they export.
"""
