"""What every `dpp` command shares: exit codes, settings, one-line failures,
running a coroutine on asyncio, and opening (and always closing) the stores.

Failures an operator causes or can fix end as ONE line on stderr,
``dpp: <message>``, and a non-zero status: 2 for configuration, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import orjson

from dpp.adapters import migrate
from dpp.adapters.migrate import MigrationError
from dpp.adapters.postgres import POSTGRES_ERRORS, Pool, Queries, connect_postgres, create_pool
from dpp.adapters.redis import DETECT_ATTEMPTS_MAX, Redis, open_redis
from dpp.config import Settings, load_settings, require
from dpp.logs import configure_logging as configure_dpp_logging
from dpp.money.mirror import BudgetMirror

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells expect after Ctrl-C
# One command, one connection (plus one spare).
CLI_POOL_SIZE_MAX = 2


class Terminated(BaseException):
    """SIGTERM arrived before the server installed its own graceful handler.

    A BaseException so it unwinds like KeyboardInterrupt: context managers
    (the embedded services) still stop what they started.
    """


# --- helpers for every command ---------------------------------------------------------


def settings_from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The validated settings; ConfigError (one line, exit 2) when a value is bad."""
    return load_settings(os.environ if environ is None else environ)


def run_async(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a coroutine function on asyncio (asyncpg, redis-py and hypercorn need it)."""
    return anyio.run(function, *args, backend="asyncio")


def configure_logging(settings: Settings) -> None:
    configure_dpp_logging(settings)


def redacted_url(url: str) -> str:
    """The URL with any password replaced, fit to print or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def _on_sigterm(signal_number: int, frame: FrameType | None) -> NoReturn:
    # One shot: a second SIGTERM during the unwinding must not interrupt cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def install_fallback_sigterm() -> None:
    """Make SIGTERM unwind (stopping what we started) until the server takes over.

    The server installs its own handler (graceful drain) while it runs and
    restores this one afterwards.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)


def fail(message: str, status: int) -> int:
    """Print ``dpp: <message>`` as one line on stderr; return the exit status."""
    print("dpp: " + " ".join(message.split()), file=sys.stderr)
    return status


def print_json(document: Any) -> None:
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


@dataclass(frozen=True, slots=True)
class Stores:
    """Postgres and Redis for a command that works on them directly."""

    pool: Pool
    redis: Redis
    queries: Queries
    mirror: BudgetMirror


@contextlib.asynccontextmanager
async def open_stores(settings: Settings, *, patient: bool = False) -> AsyncIterator[Stores]:
    """Open Postgres and Redis for one command; close both however it ends.

    ``patient`` retries an unreachable Postgres with backoff (a StartupError
    after the last attempt) instead of failing at once, and asks a silent Redis
    again before taking it for a single one.
    """
    database_url = require(settings.database_url, "DATABASE_URL")
    redis_url = require(settings.redis_url, "REDIS_URL")
    if patient:
        pool = await connect_postgres(database_url, max_size=CLI_POOL_SIZE_MAX)
    else:
        pool = await create_pool(database_url, max_size=CLI_POOL_SIZE_MAX)
    try:
        redis = await open_redis(redis_url, attempts=DETECT_ATTEMPTS_MAX if patient else 1)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await pool.close()
        raise
    try:
        yield Stores(pool, redis, Queries.load(), BudgetMirror(redis, settings.redis_prefix))
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
            await pool.close()


async def run_server(settings: Settings) -> None:
    """`dpp serve`'s replica (imported late: the composition root pulls in every
    layer and its dependencies, which `dpp --help` or `dpp tenant` never need)."""
    from dpp.app import run_server as serve

    await serve(settings)


async def migrate_database(database_url: str, check_only: bool) -> list[str]:
    """Apply the migrations, or (``check_only``) list how the database differs."""
    try:
        if check_only:
            return await migrate.check(database_url)
        return await migrate.apply_migrations(database_url)
    except POSTGRES_ERRORS as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise MigrationError(f"DATABASE_URL: cannot migrate ({detail})") from error
