"""The run queue contract, and the Postgres writes both backends share.

Postgres is the truth about a run; a queue only says "this run may be
waiting". So a queue entry is a hint: claiming is always the guarded UPDATE
(``claim_*`` in ``sql/queries/execution.sql``) that moves a QUEUED row to
PROCESSING with a fresh lease token. Whatever a backend delivers twice, late,
or for a run someone else took, the guard turns into a no-op.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
# Finalize claims sent in one round trip, at most (see LeaseStore).
FINALIZE_CLAIM_BATCH_MAX = 64


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


@dataclass(slots=True)
class _FinalizeClaim:
    """One run actor's finalize claim, waiting for its turn in a batch."""

    run: ClaimedRun
    version: int
    # set when the outcome is in, or when this request must lead the next batch
    turn: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False
    claimed_version: int | None = None
    error: BaseException | None = None

    def outcome(self) -> int | None:
        assert self.finished
        if self.error is not None:
            raise self.error
        return self.claimed_version


class LeaseStore:
    """The lease writes a run actor makes, each guarded and row-count checked.

    Kept beside the queue (an adapter) so the actors never hold SQL: they ask
    for a renewal or a finalize-claim and get the new version, or None when
    the run is no longer theirs.

    Finalize claims are group-committed: while one batch is on the wire, the
    claims asked for meanwhile wait, and the first of them then sends them all
    as one pipelined round trip (``claim_for_finalize`` once per run, in one
    implicit transaction) — at most ``FINALIZE_CLAIM_BATCH_MAX`` per batch. A
    lone claim goes out at once, exactly as before; under load, runs finishing
    together share a round trip and a commit instead of one each. Every
    statement keeps its guard (lease token, PROCESSING, version).
    """

    def __init__(self, pool: asyncpg.Pool, queries: Queries) -> None:
        self._pool = pool
        self._queries = queries
        self._pending: collections.deque[_FinalizeClaim] = collections.deque()
        self._leading = False  # a batch is being sent (by one of the callers)
        self.finalize_batches = 0  # statistics, tests

    def finalize_claims_waiting(self) -> int:
        """Finalize claims waiting for the batch on the wire (statistics, tests)."""
        return len(self._pending)

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
        request = _FinalizeClaim(run, version)
        self._pending.append(request)
        if self._leading:
            try:
                await request.turn.wait()
            except BaseException:
                self._abandon(request)
                raise
        if not request.finished:
            await self._lead()
        claimed = request.outcome()
        assert claimed is None or claimed == version + 1, (claimed, version)
        return claimed

    async def _lead(self) -> None:
        """Send the next batch (it holds the caller's request: the caller is
        first in line), then hand the lead to whoever waits next."""
        self._leading = True
        batch = [
            self._pending.popleft()
            for _ in range(min(len(self._pending), FINALIZE_CLAIM_BATCH_MAX))
        ]
        try:
            await self._claim_batch(batch)
        except BaseException as error:  # each caller raises it (Exception: UNKNOWN)
            for request in batch:
                request.error = error
        finally:
            for request in batch:
                request.finished = True
                request.turn.set()
            self._hand_on()

    def _hand_on(self) -> None:
        if self._pending:
            self._pending[0].turn.set()  # leads the next batch
        else:
            self._leading = False

    def _abandon(self, request: _FinalizeClaim) -> None:
        """A waiter cancelled (its finalize deadline): leave the line, and pass
        on the lead if it had just been handed to it."""
        if request.finished:
            return
        if request in self._pending:
            handed = self._pending[0] is request and request.turn.is_set()
            self._pending.remove(request)
            if handed:
                self._hand_on()

    async def _claim_batch(self, batch: list[_FinalizeClaim]) -> None:
        """One round trip for the batch: each run's new version, or None."""
        assert 1 <= len(batch) <= FINALIZE_CLAIM_BATCH_MAX
        query = self._queries["claim_for_finalize"]
        # shielded like a claim: a batch cut short would leave its outcome unknown
        with anyio.fail_after(STATEMENT_DEADLINE_S, shield=True):
            if len(batch) == 1:
                request = batch[0]
                request.claimed_version = await self._pool.fetchval(
                    query, request.run.run_id, request.run.lease_token, request.version
                )
                return
            # in id order, as settlements lock runs: batches never deadlock
            batch = sorted(batch, key=lambda request: request.run.run_id)
            self.finalize_batches += 1
            async with self._pool.acquire() as connection:
                rows = await connection.fetchmany(
                    query,
                    [(r.run.run_id, r.run.lease_token, r.version) for r in batch],
                )
                if len(rows) == len(batch):  # every guard held: a row each, in order
                    for request, row in zip(batch, rows, strict=True):
                        assert row["version"] == request.version + 1, (row, request.version)
                        request.claimed_version = row["version"]
                    return
                # Some guard failed: the rows no longer say whose is whose. A run
                # is CLAIMED at exactly version + 1 only by the write of the lease
                # holder that last wrote it at ``version`` (everyone else's path
                # to CLAIMED moves the version further), so the row tells.
                assert len(rows) < len(batch), (len(rows), len(batch))
                for request in batch:
                    now = await connection.fetchrow(self._queries["run_by_id"], request.run.run_id)
                    assert now is not None, request.run.run_id
                    if now["status"] == "CLAIMED" and now["version"] == request.version + 1:
                        request.claimed_version = now["version"]
