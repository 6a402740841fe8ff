"""Idempotency keys (SPEC §3, §6) stored in Postgres.

The primary key (tenant, method, path, key) is what stops two concurrent
requests with one key from both proceeding — not a check-then-act. A
reservation's stored response is written in the reservation's own
transaction (`dpp.money.ledger.reserve_batch`), so a crash can never leave a run whose
key would let a retry create a second one. An in-flight record whose holder
died is taken over after its lock expires.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from dpp.adapters.postgres import Queries

KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")
LOCK_S = 60.0
RETENTION_HOURS = 24
REPLAYED_HEADER = "Idempotent-Replayed"


def valid_key(value: str) -> bool:
    return KEY_PATTERN.fullmatch(value) is not None


def request_fingerprint(body: Any) -> bytes:
    """Equal JSON after parsing gives equal fingerprints (key order, whitespace)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    method: str
    path: str
    key: str


@dataclass(frozen=True, slots=True)
class Proceed:
    pass


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class InFlight:
    pass


@dataclass(frozen=True, slots=True)
class Mismatch:
    pass


Begin = Proceed | Replay | InFlight | Mismatch


async def begin(pool: asyncpg.Pool, queries: Queries, scope: Scope, fingerprint: bytes) -> Begin:
    args = (scope.tenant_id, scope.method, scope.path, scope.key)
    if await pool.fetchval(queries["idempotency_insert"], *args, fingerprint, LOCK_S):
        return Proceed()
    row = await pool.fetchrow(queries["idempotency_get"], *args)
    if row is None:  # swept between the two statements: try once more
        if await pool.fetchval(queries["idempotency_insert"], *args, fingerprint, LOCK_S):
            return Proceed()
        return InFlight()
    if bytes(row["request_sha256"]) != fingerprint:
        return Mismatch()
    if row["state"] == "done":
        return Replay(row["response_status"], dict(row["response_headers"]), row["response_body"])
    if row["lock_expired"] and await pool.fetchval(queries["idempotency_take_over"], *args, LOCK_S):
        return Proceed()
    return InFlight()


async def complete(
    pool: asyncpg.Pool,
    queries: Queries,
    scope: Scope,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    await pool.fetchval(
        queries["idempotency_complete"],
        scope.tenant_id,
        scope.method,
        scope.path,
        scope.key,
        status,
        headers,
        body,
    )


async def abandon(pool: asyncpg.Pool, queries: Queries, scope: Scope) -> None:
    """Forget an in-flight key whose outcome is not stored (a retry is safe)."""
    await pool.execute(
        queries["idempotency_abandon"], scope.tenant_id, scope.method, scope.path, scope.key
    )


async def sweep(pool: asyncpg.Pool, queries: Queries, *, batch: int = 1000) -> int:
    status = await pool.execute(queries["idempotency_sweep"], RETENTION_HOURS, batch)
    return int(status.split()[-1])
