"""Idempotency keys (SPEC §3, §6) stored in Postgres.

The primary key (tenant, method, path, key) is what stops two concurrent
requests with one key from both proceeding — not a check-then-act. A
reservation's stored response is written in the reservation's own
transaction (`dpp.money.ledger.reserve_batch`), so a crash can never leave a run whose
key would let a retry create a second one. An in-flight record whose holder
died is taken over after its lock expires.

A first submit's record is written by its reservation's transaction
(``dpp.money.ledger.KeyClaim``, migration 0008), where a record that exists
wins; only a request whose key has a record (a retry, a concurrent twin) or
whose reservation was refused before Postgres goes through ``begin``.

Each holder is named by an owner token (random, one per request), written at
begin, at takeover and by a reservation's claim. Completing or releasing a
record names the token and touches the record only while that request still
owns it; the reservation's transaction locks the key row and admits a draft
only if its request still owns the key. So a holder that was slow, not dead, and lost its key to a
retry can neither reserve a second run nor overwrite the retry's outcome, and
a request that did not commit can release its own record at once (a retry
after a 503 proceeds instead of waiting out the lock): if its reservation
committed after all the record is done and the release does nothing; if not,
the reservation, should it still arrive, finds the key no longer its own.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from dpp.adapters.postgres import Pool, Queries
from dpp.limits import (
    IDEMPOTENCY_KEY_CHARS_MAX,
    IDEMPOTENCY_LOCK_S,
    IDEMPOTENCY_RETENTION_HOURS,
)

# printable ASCII (SPEC §3)
KEY_PATTERN = re.compile(rf"^[\x20-\x7e]{{1,{IDEMPOTENCY_KEY_CHARS_MAX}}}$")
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
class Held:
    """A key this request holds: its scope and the request's owner token."""

    scope: Scope
    owner: uuid.UUID


@dataclass(frozen=True, slots=True)
class Proceed:
    """The key is this request's now (a new record, or one taken over)."""

    held: Held


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


SWEEP_BATCH_MAX = 1_000


class IdempotencyKeys:
    """The ``idempotency_keys`` table: begin, complete, release, sweep."""

    def __init__(self, pool: Pool, queries: Queries) -> None:
        self._pool = pool
        self._queries = queries

    def new_holder(self, scope: Scope) -> Held:
        """A fresh owner token for ``scope``, for a request whose reservation
        claims the key (``dpp.money.ledger.KeyClaim``): held once it commits."""
        return Held(scope, uuid.uuid4())

    async def begin(self, scope: Scope, fingerprint: bytes) -> Begin:
        """Hold the key for this request, or say why not (replay, in flight, mismatch)."""
        pool, queries = self._pool, self._queries
        args = (scope.tenant_id, scope.method, scope.path, scope.key)
        insert = queries["idempotency_insert"]
        held = Held(scope, uuid.uuid4())
        if await pool.fetchval(insert, *args, fingerprint, IDEMPOTENCY_LOCK_S, held.owner):
            return Proceed(held)
        row = await pool.fetchrow(queries["idempotency_get"], *args)
        if row is None:  # released or swept between the two statements: try once more
            if await pool.fetchval(insert, *args, fingerprint, IDEMPOTENCY_LOCK_S, held.owner):
                return Proceed(held)
            return InFlight()
        if bytes(row["request_sha256"]) != fingerprint:
            return Mismatch()
        if row["state"] == "done":
            return Replay(
                row["response_status"], dict(row["response_headers"]), row["response_body"]
            )
        if row["lock_expired"] and await pool.fetchval(
            queries["idempotency_take_over"], *args, IDEMPOTENCY_LOCK_S, held.owner
        ):
            return Proceed(held)
        return InFlight()

    async def complete(self, held: Held, status: int, headers: dict[str, str], body: bytes) -> bool:
        """Store the outcome a retry with this key replays; False (nothing stored)
        when this request no longer owns the key."""
        scope = held.scope
        stored = await self._pool.fetchval(
            self._queries["idempotency_complete"],
            scope.tenant_id,
            scope.method,
            scope.path,
            scope.key,
            status,
            headers,
            body,
            held.owner,
        )
        return stored is not None

    async def release(self, held: Held) -> bool:
        """Forget this request's in-flight record, whose outcome is not stored (a
        retry proceeds at once). Another request's record, or a completed one, stays.
        True if a record went."""
        scope = held.scope
        released = await self._pool.fetchval(
            self._queries["idempotency_release"],
            scope.tenant_id,
            scope.method,
            scope.path,
            scope.key,
            held.owner,
        )
        return released is not None

    async def sweep(self, *, batch: int = SWEEP_BATCH_MAX) -> int:
        """Delete up to ``batch`` keys past retention; how many went."""
        assert 1 <= batch <= SWEEP_BATCH_MAX
        status = await self._pool.execute(
            self._queries["idempotency_sweep"], IDEMPOTENCY_RETENTION_HOURS, batch
        )
        return int(status.split()[-1])
