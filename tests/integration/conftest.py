"""HTTP fixtures over real services: settings → context → app → client.

Each layer is its own fixture so a test (or a later, fuller runtime) can swap
one: override ``settings_env`` to change configuration, ``context`` to run the
whole supervision tree, ``app`` to add routes or middleware. ``adapters`` holds
the open pool, Redis client and bucket, for tests that set up or inspect state
around the API.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette

from dpp.adapters.redis import Redis, open_redis
from dpp.app import Adapters, Runtime, build_budgets, build_context, open_adapters, open_runtime
from dpp.config import Settings, load_settings
from dpp.context import AppContext
from dpp.http.app import create_app
from dpp.logs import configure_logging
from dpp.tenancy.ratelimit import RateLimiter
from tests.services import TestServices, store_env

ADMIN_TOKEN = "test-admin-token-0123456789"
BASE_URL = "http://testserver"


@pytest.fixture
def settings_env(services: TestServices, database_url: str, redis_prefix: str) -> dict[str, str]:
    """The environment the settings are read from (a plain dict, never os.environ)."""
    return {
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "DEBUG",
    }


@pytest.fixture
async def redis(services: TestServices) -> AsyncIterator[Redis]:
    """A Redis client of the test services' (a cluster client on a cluster)."""
    client = await open_redis(services.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def limiter(redis: Redis, redis_prefix: str) -> RateLimiter:
    """The rate limiter over ``redis``, under the test's key prefix."""
    return RateLimiter(redis, redis_prefix)


@pytest.fixture
def settings(settings_env: dict[str, str]) -> Settings:
    return load_settings(settings_env)


@pytest.fixture
async def adapters(settings: Settings, settings_env: dict[str, str]) -> AsyncIterator[Adapters]:
    """The replica's open connections (tests reach around the API through these)."""
    async with open_adapters(settings, environment=settings_env) as adapters:
        yield adapters


@pytest.fixture
def context(adapters: Adapters) -> AppContext:
    """The services over ``adapters``, without a supervision tree (no actor runs)."""
    return build_context(adapters, build_budgets(adapters))


@pytest.fixture
async def runtime(settings: Settings, settings_env: dict[str, str]) -> AsyncIterator[Runtime]:
    """A whole replica (supervision tree, every route) in-process; nothing claims
    runs, so the API's runs stay QUEUED."""
    async with open_runtime(settings, environment=settings_env, dispatch=False) as runtime:
        yield runtime


@pytest.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``runtime``'s app."""
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
def app(context: AppContext) -> Starlette:
    return create_app(context)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
def admin_headers(settings: Settings) -> dict[str, str]:
    assert settings.admin_token
    return {"Authorization": f"Bearer {settings.admin_token}"}


@dataclass(frozen=True, slots=True)
class CapturedLogs:
    """Everything the DPP log handler wrote during the test, as the process would."""

    stream: io.StringIO

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.text().splitlines() if line.startswith("{")]


@pytest.fixture
def captured_logs(settings: Settings) -> Iterator[CapturedLogs]:
    """The production JSON log handler, writing into memory, at DEBUG."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging(
        settings.with_overrides(json_logs=True, log_level="DEBUG"), stream=stream
    )
    try:
        yield CapturedLogs(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
