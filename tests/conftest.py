"""Shared fixtures: real services, a database and Redis prefix per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.services import (
    ServiceStack,
    TestServices,
    create_database,
    delete_redis_prefix,
    drop_database,
)


@pytest.fixture(scope="session")
def services() -> Iterator[TestServices]:
    stack = ServiceStack()
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture
def database_url(services: TestServices) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"dpp_test_{secrets.token_hex(6)}"
    url = create_database(services, name)
    try:
        yield url
    finally:
        drop_database(services, name)


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
