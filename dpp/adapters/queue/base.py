"""The run queue contract, and the Postgres writes both backends share.

Postgres is the truth about a run; a queue only says "this run may be
waiting". So a queue entry is a hint: claiming is always the guarded UPDATE
(``claim_*`` in ``sql/queries/execution.sql``) that moves a QUEUED row to
PROCESSING with a fresh lease token. Whatever a backend delivers twice, late,
or for a run someone else took, the guard turns into a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import anyio
import asyncpg
from anyio.abc import TaskStatus

from dpp.adapters.postgres import Queries
from dpp.limits import TIMEBOX_SEC_MAX, TIMEBOX_SEC_MIN

log = logging.getLogger("dpp.adapters.queue")

# A claim or release is a short statement; past this, something is wrong and the
# caller moves on (the run is then either untouched or found by the reaper).
STATEMENT_DEADLINE_S = 10.0
MESSAGE_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class QueuedRun:
    """A run just committed QUEUED: what a queue message carries."""

    run_id: str
    tenant_id: str
    pack_type: str
    trace_id: str | None
    enqueued_at: datetime

    def message(self) -> dict[str, Any]:
        """The SQS message body (schema_version lets consumers evolve)."""
        return {
            "run_id": self.run_id,
            "tenant_id": self.tenant_id,
            "pack_type": self.pack_type,
            "enqueued_at": self.enqueued_at.isoformat(),
            "schema_version": MESSAGE_SCHEMA_VERSION,
            "trace_id": self.trace_id,
        }


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    """A run this replica holds a lease on: everything its run actor needs."""

    run_id: str
    tenant_id: str
    pack_type: str
    inputs: Any
    timebox_sec: int
    reserved_usd_micros: int
    minimum_fee_usd_micros: int
    trace_id: str | None
    lease_token: str
    # the row's version right after the claim: the heartbeat's optimistic guard
    version: int
    attempts: int
    # anyio clock at the claim: the timebox counts from here (SPEC §6)
    claimed_at_monotonic: float
    # SQS only: the handle that extends, deletes or releases the message
    receipt_handle: str | None = None

    def __post_init__(self) -> None:
        assert self.run_id and self.tenant_id and self.lease_token
        assert TIMEBOX_SEC_MIN <= self.timebox_sec <= TIMEBOX_SEC_MAX, self.timebox_sec
        assert 0 <= self.minimum_fee_usd_micros <= self.reserved_usd_micros
        assert self.version >= 1 and self.attempts >= 1


def claimed_from_row(
    row: asyncpg.Record | Mapping[str, Any], receipt_handle: str | None = None
) -> ClaimedRun:
    """A claimed run from its claim statement's row (or the simulator's likeness of it)."""
    return ClaimedRun(
        run_id=row["id"],
        tenant_id=row["tenant_id"],
        pack_type=row["pack_type"],
        inputs=row["inputs"],
        timebox_sec=row["timebox_sec"],
        reserved_usd_micros=row["reserved_usd_micros"],
        minimum_fee_usd_micros=row["minimum_fee_usd_micros"],
        trace_id=row["trace_id"],
        lease_token=str(row["lease_token"]),
        version=row["version"],
        attempts=row["attempts"],
        claimed_at_monotonic=anyio.current_time(),
        receipt_handle=receipt_handle,
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the queue gave up on. ``run_id`` is None when it names no run."""

    receipt_handle: str
    run_id: str | None


class RunQueue(Protocol):
    """What the runs API, the dispatcher, run actors and the reconciler use."""

    backend: str
    # True when claim_batch itself waits for work (SQS long polling): the
    # dispatcher then polls again at once instead of waiting for a wake-up.
    claim_waits: bool

    async def enqueue(self, runs: Sequence[QueuedRun]) -> None:
        """Announce runs committed QUEUED (called after the reservation commits)."""
        ...

    async def claim_batch(self, n: int) -> list[ClaimedRun]:
        """Claim up to ``n`` QUEUED runs (PROCESSING, fresh lease)."""
        ...

    async def extend_visibility(self, run: ClaimedRun, visibility_sec: int) -> None:
        """Keep the run's message hidden while its lease lives (SQS; else no-op)."""
        ...

    async def ack(self, run: ClaimedRun) -> None:
        """The run left PROCESSING for good: forget its message (SQS; else no-op)."""
        ...

    async def release(self, run: ClaimedRun) -> bool:
        """Give an unfinished run back to QUEUED (shutdown). False: lease was lost."""
        ...

    async def requeue_unsent(self, older_than_sec: int) -> int:
        """Backstop: announce again QUEUED runs whose announcement never happened."""
        ...

    async def receive_dead_letters(self, n: int) -> list[DeadLetter]:
        """Up to ``n`` runs whose delivery failed for good (SQS redrive; else none)."""
        ...

    async def delete_dead_letter(self, letter: DeadLetter) -> None:
        """The dead letter was dealt with."""
        ...

    async def listen(
        self, wake: Callable[[], None], *, task_status: TaskStatus[None] = ...
    ) -> None:
        """Call ``wake`` whenever work may have arrived, until cancelled."""
        ...

    async def ping(self) -> None:
        """Raise when the queue's service does not answer (readiness)."""
        ...


async def claim_guarded(pool: asyncpg.Pool, query: str, *args: object) -> list[asyncpg.Record]:
    """Run a claim statement shielded from cancellation, within a deadline.

    A claim cancelled half-way could commit on the server while this side
    never learns the lease token: the run would sit PROCESSING until the
    reaper charges the minimum fee for work that never started. Shielding
    lets the statement finish and its runs reach their run actors.
    """
    with anyio.fail_after(STATEMENT_DEADLINE_S, shield=True):
        return await pool.fetch(query, *args)


async def release_claimed(pool: asyncpg.Pool, queries: Queries, run: ClaimedRun) -> bool:
    """The guarded QUEUED-again write; True when this lease still held the run."""
    with anyio.fail_after(STATEMENT_DEADLINE_S, shield=True):
        version = await pool.fetchval(queries["release_run"], run.run_id, run.lease_token)
    if version is None:
        log.info("release found the lease already gone", extra={"run_id": run.run_id})
        return False
    assert version > run.version
    return True


class LeaseStore:
    """The lease writes a run actor makes, each guarded and row-count checked.

    Kept beside the queue (an adapter) so the actors never hold SQL: they ask
    for a renewal or a finalize-claim and get the new version, or None when
    the run is no longer theirs.
    """

    def __init__(self, pool: asyncpg.Pool, queries: Queries) -> None:
        self._pool = pool
        self._queries = queries

    async def renew(self, run: ClaimedRun, version: int, lease_sec: int) -> int | None:
        """Push the lease out by ``lease_sec``; None when the heartbeat lost."""
        assert lease_sec >= 1
        renewed: int | None = await self._pool.fetchval(
            self._queries["renew_lease"], run.run_id, run.lease_token, version, lease_sec
        )
        assert renewed is None or renewed == version + 1, (renewed, version)
        return renewed

    async def claim_for_finalize(self, run: ClaimedRun, version: int) -> int | None:
        """Finalize phase 1, PROCESSING -> CLAIMED; None when the lease was lost."""
        claimed: int | None = await self._pool.fetchval(
            self._queries["claim_for_finalize"], run.run_id, run.lease_token, version
        )
        assert claimed is None or claimed == version + 1, (claimed, version)
        return claimed
