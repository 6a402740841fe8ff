"""Postgres adapter: the asyncpg pool and the named SQL queries.

One of the few modules that import asyncpg (asyncio-only). Queries live in
``sql/queries/*.sql`` as named blocks (``-- name: reserve_batch``) with native
``$1`` parameters, loaded once at start (procrastinate's layout).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import asyncpg
import orjson

from dpp.config import StartupError

log = logging.getLogger("dpp.adapters.postgres")

SQL_DIRECTORY = Path(__file__).resolve().parents[2] / "sql"
QUERY_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
POOL_SIZE_MAX = 20
STATEMENT_TIMEOUT_MS = 30_000
# A request waits this long for a pooled connection (the pool exhausted, or
# Postgres not accepting new ones) and then fails as "unavailable" (HTTP 503).
POOL_ACQUIRE_TIMEOUT_S = 5.0
# Opening one connection (TCP, TLS, startup): a black-holed server fails fast.
CONNECT_TIMEOUT_S = 5.0
POOL_QUERIES_PER_CONNECTION_MAX = 50_000
POOL_IDLE_CONNECTION_LIFETIME_S = 300.0
CONNECT_ATTEMPTS_MAX = 6
CONNECT_BACKOFF_FIRST_S = 0.5

# Whatever Postgres or the driver raises: the server down or refusing, a lost
# connection, a timeout (an OSError), a refused statement. Code above the
# adapters catches these names, never asyncpg's.
POSTGRES_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)
# A statement cancelled by its statement_timeout (or an operator's cancel): the
# statement did nothing, and the transaction around it rolls back.
STATEMENT_CANCELED: type[Exception] = asyncpg.QueryCanceledError
# A lock wait that outlived the lock_timeout a statement set for itself
# (dpp_reserve: its callers' time left): the statement did nothing.
LOCK_WAIT_TIMED_OUT: type[Exception] = asyncpg.LockNotAvailableError

# What Postgres refuses about the *data* of one statement, not the connection:
# SQLSTATE class 22 "data exception" (a NUL in text or jsonb, a number out of
# range, ...; asyncpg raises the same class when it cannot encode an argument)
# and class 54 "program limit exceeded" (a value too large for an index or a
# jsonb). Retrying the same data fails the same way; retrying a batch without
# the culprit does not.
POSTGRES_DATA_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.ProgramLimitExceededError,
)

# The driver's types under the names the layers above use. A pooled
# connection is a proxy of a Connection, with the same methods.
if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    Connection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )
    _PoolBase: TypeAlias = asyncpg.Pool[asyncpg.Record]
else:
    Pool = asyncpg.Pool
    Connection = asyncpg.Connection
    _PoolBase = asyncpg.Pool
Record = asyncpg.Record


class Queries(Mapping[str, str]):
    """The named queries of ``sql/queries``; ``queries["reserve_batch"]``."""

    def __init__(self, texts: dict[str, str]) -> None:
        self._texts = texts

    @classmethod
    def load(cls, directory: Path = SQL_DIRECTORY / "queries") -> Queries:
        texts: dict[str, str] = {}
        for path in sorted(directory.glob("*.sql")):
            source = path.read_text(encoding="utf-8")
            matches = list(QUERY_NAME.finditer(source))
            for index, match in enumerate(matches):
                end = matches[index + 1].start() if index + 1 < len(matches) else len(source)
                name = match.group(1)
                body = source[match.end() : end].strip()
                assert name not in texts, f"query {name} defined twice"
                assert body, f"query {name} in {path.name} is empty"
                texts[name] = body
        return cls(texts)

    def __getitem__(self, name: str) -> str:
        return self._texts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._texts)

    def __len__(self) -> int:
        return len(self._texts)


async def _init_connection(connection: asyncpg.Connection) -> None:
    # JSONB both ways through orjson: fast, and no float surprises for ints.
    await connection.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )
    await connection.set_type_codec(
        "json", encoder=json.dumps, decoder=orjson.loads, schema="pg_catalog"
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's default RESET ALL round trip.

    DPP leaves no session state on pooled connections: no SET, no session
    advisory locks (migrations use their own connection), no LISTEN (the queue
    listens on a dedicated connection). asyncpg still rolls back an open
    transaction before calling this. Measured: the default reset cost ~4 % of a
    loaded replica's CPU and one extra round trip per query.
    """


# What leaves a pooled connection unusable: the server ended the session
# (pg_terminate_backend, a restart: class 57, class 08), the socket broke, or the
# protocol was caught mid-message by such an end ("cannot switch to state 12;
# another operation is in progress": a FATAL arrived while the connection sat
# idle in the pool, its close not yet seen). Such a connection is terminated,
# never handed out again.
BROKEN_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class _DiscardBrokenConnection:
    """``pool.acquire()``'s context, terminating the connection when the block
    fails with a broken-connection error (asyncpg would otherwise return it to
    the pool whenever the failure left it looking open)."""

    def __init__(self, acquiring: asyncpg.pool.PoolAcquireContext[asyncpg.Record]) -> None:
        self._acquiring = acquiring
        self._connection: Connection | None = None

    async def __aenter__(self) -> Connection:
        self._connection = await self._acquiring.__aenter__()
        return self._connection

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, BROKEN_CONNECTION_ERRORS) and self._connection is not None:
            log.warning(
                "discarding a broken postgres connection",
                extra={"error_type": type(error).__name__},
            )
            self._connection.terminate()
        await self._acquiring.__aexit__(error_type, error, traceback)

    def __await__(self) -> Generator[Any, None, Connection]:
        return self._acquiring.__await__()


class BoundedPool(_PoolBase):
    """asyncpg's pool, whose ``acquire`` (and so ``fetch``, ``execute``, ...) waits
    at most ``POOL_ACQUIRE_TIMEOUT_S`` unless told otherwise: an exhausted pool or
    an unreachable server becomes a ``TimeoutError`` (503), never a request
    hanging for as long as the client cares to wait.

    Broken connections are never reused: a block that fails with one of
    ``BROKEN_CONNECTION_ERRORS`` terminates its connection before the release,
    asyncpg terminates one whose release (rollback) fails, and a closed one is
    replaced at the next acquire.
    """

    def acquire(  # type: ignore[override]
        self, *, timeout: float | None = POOL_ACQUIRE_TIMEOUT_S
    ) -> _DiscardBrokenConnection:
        return _DiscardBrokenConnection(super().acquire(timeout=timeout))


async def create_pool(dsn: str, *, max_size: int = POOL_SIZE_MAX) -> asyncpg.Pool:
    """A pool whose connections speak JSONB as Python values."""
    pool = BoundedPool(
        dsn,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        min_size=1,
        max_size=max_size,
        max_queries=POOL_QUERIES_PER_CONNECTION_MAX,
        max_inactive_connection_lifetime=POOL_IDLE_CONNECTION_LIFETIME_S,
        loop=None,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"statement_timeout": str(STATEMENT_TIMEOUT_MS)},
        command_timeout=STATEMENT_TIMEOUT_MS / 1000,
        timeout=CONNECT_TIMEOUT_S,
    )
    await pool
    return pool


async def ping(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Raise unless Postgres answers a trivial query within ``timeout_s`` (readiness)."""
    async with pool.acquire(timeout=timeout_s) as connection:
        await connection.fetchval("SELECT 1", timeout=timeout_s)


async def connect_postgres(url: str, *, max_size: int = POOL_SIZE_MAX) -> asyncpg.Pool:
    """The pool, retrying with exponential backoff (a database may start after us)."""
    delay_s = CONNECT_BACKOFF_FIRST_S
    for attempt in range(1, CONNECT_ATTEMPTS_MAX + 1):
        try:
            return await create_pool(url, max_size=max_size)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            if attempt == CONNECT_ATTEMPTS_MAX:
                raise StartupError(
                    f"DATABASE_URL: cannot reach Postgres after {attempt} attempts "
                    f"({type(error).__name__})"
                ) from error
            log.warning(
                "postgres not reachable, retrying",
                extra={"attempt": attempt, "delay_s": delay_s, "error": type(error).__name__},
            )
            await anyio.sleep(delay_s)
            delay_s *= 2
    raise AssertionError("unreachable")
