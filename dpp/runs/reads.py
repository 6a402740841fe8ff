"""Tenants' reads of their own runs (``GET /v1/runs/{id}``), one query per burst.

Coalescing, as the rate limiter's checks (``dpp.tenancy.ratelimit``): a read
that finds no query in flight makes its own (no queue, no task hop: a lone
read costs one query, as before); a read that finds one in flight queues
behind it, and when it returns one task (the drain) sends the queue as ONE
query (``owned_runs``: at most ``BATCH_MAX`` reads, the rest in the next), and
answers each reader. A queue of one is told to make its own query. Under a
burst a replica pays one pool acquire, one round trip and one decode per
batch instead of per request. Tenants may share a query (one Postgres, no hash
slots): each pair (tenant, run id) is matched on both columns, in the query
and again here, so another tenant's run is None exactly as an unknown id is
(the stealth 404 of SPEC §3).

Freshness: a queued read is answered by a query sent after it queued, never by
the one in flight when it arrived, so a read still sees every write that
committed before it began (a cancel's re-read sees the cancel).

Failure: a query that fails (Postgres down, the batch's deadline passed) fails
each read of its batch with the driver's error, which the front answers 503
with Retry-After; reads queued behind it go in the next query. A reader whose
client went (its task cancelled) is dropped from its batch; the batch, and the
reads behind it, go on.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from dpp.adapters.postgres import Pool, Queries, Record

BATCH_MAX: Final = 64  # reads per query: bounds its arrays and Postgres's time in it
# A read's answer within this (pool acquire and statement together) from the
# moment it was asked, or the driver's TimeoutError (503): a batch's one
# deadline is its earliest reader's, so no reader waits past its own.
READ_TIMEOUT_S: Final = 5.0


class _Lead(enum.Enum):
    """A queued read's answer that says: the query before yours returned and you
    are alone behind it, make your own."""

    LEAD = enum.auto()


Answer = Record | None | _Lead


@dataclass(frozen=True, slots=True)
class RunReadsStatistics:
    """``in_flight``: a query is under way (or its successor about to be);
    ``reads_queued``: reads waiting for the next one."""

    in_flight: bool
    reads_queued: int


@dataclass(frozen=True, slots=True)
class _Read:
    """A read queued behind the query in flight."""

    tenant_id: str
    run_id: str
    deadline: float  # the loop's clock
    answer: asyncio.Future[Answer]


class RunReads:
    """``owned(tenant_id, run_id)`` for concurrent readers, one query at a time per
    replica (see the module's docstring)."""

    def __init__(
        self,
        pool: Pool,
        queries: Queries,
        *,
        batch_max: int = BATCH_MAX,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        """``on_batch`` is told the number of reads each query answers."""
        assert batch_max >= 1
        self._on_batch = on_batch
        self._pool = pool
        self._query = queries["owned_runs"]
        self._lone_query = queries["owned_run"]
        self._batch_max = batch_max
        # None: no query in flight. Otherwise the reads queued behind the one in
        # flight (or about to be: by its leader, a drain, or the lone queued
        # read told to lead).
        self._queue: list[_Read] | None = None
        self._drains: set[asyncio.Task[None]] = set()

    def statistics(self) -> RunReadsStatistics:
        queue = self._queue
        return RunReadsStatistics(queue is not None, 0 if queue is None else len(queue))

    async def owned(self, tenant_id: str, run_id: str) -> Record | None:
        """The tenant's run, or None when there is none or it is another tenant's.
        Raises what the driver raises when Postgres cannot answer by the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_TIMEOUT_S
        queue = self._queue
        if queue is None:
            # nothing in flight: this read leads, making its query itself
            self._queue = queue = []
        else:
            answer: asyncio.Future[Answer] = loop.create_future()
            queue.append(_Read(tenant_id, run_id, deadline, answer))
            try:
                found = await answer
            except asyncio.CancelledError:
                if _told_to_lead(answer):
                    # told to lead, but its client went first: the next one leads
                    self._hand_over(queue)
                raise
            if not isinstance(found, _Lead):
                return found
            # alone behind the query that just returned: a batch of one needs no task
        try:
            # a read of its own: the primary-key lookup, no arrays to unnest
            self._on_batch(1)
            return await self._fetch_one(tenant_id, run_id, deadline)
        finally:
            # whatever became of the query (rows, failure, the client gone), the
            # reads that queued behind it get theirs
            self._hand_over(queue)

    def _hand_over(self, queue: list[_Read]) -> None:
        """The query is over: nothing queued, and reads are idle; one read, and it
        leads its own query; more, and a drain sends them."""
        queue[:] = [read for read in queue if not read.answer.done()]  # clients gone
        if not queue:
            assert self._queue is queue
            self._queue = None
        elif len(queue) == 1:
            queue.pop().answer.set_result(_Lead.LEAD)
        else:
            # a context of its own: it serves other requests than the one whose
            # query just returned, so it must not carry that one's (log fields)
            drain = asyncio.get_running_loop().create_task(
                self._drain(queue), name="run reads drain", context=contextvars.Context()
            )
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)

    async def _drain(self, queue: list[_Read]) -> None:
        """Send the queued reads, at most ``batch_max`` per query, while at least two
        are queued; then hand over as a leader's query does."""
        batch: list[_Read] = []
        try:
            while len(queue) >= 2:
                taken = queue[: self._batch_max]
                del queue[: self._batch_max]
                batch = [read for read in taken if not read.answer.done()]
                if batch:
                    await self._answer(batch)
        except BaseException:
            # only when the drain itself is cancelled (the loop closing) are reads
            # left unanswered: none may wait forever
            assert self._queue is queue
            self._queue = None
            for read in [*batch, *queue]:
                if not read.answer.done():
                    read.answer.set_exception(ConnectionAbortedError("run reads stopped"))
            queue.clear()
            raise
        self._hand_over(queue)

    async def _answer(self, batch: list[_Read]) -> None:
        """One query for ``batch``, by the earliest deadline of its reads (the first
        queued); each read its own row, a failure each read's."""
        self._on_batch(len(batch))
        try:
            rows = await self._fetch(
                [read.tenant_id for read in batch],
                [read.run_id for read in batch],
                batch[0].deadline,
            )
        except Exception as error:
            # Postgres down or too slow, or a fault: each read fails with it, as it
            # would have with a query of its own; the drain goes on. One error
            # object for all: a future re-raises it with its original traceback,
            # which is what says "postgres" to the front's 503.
            for read in batch:
                if not read.answer.done():
                    read.answer.set_exception(error)
            return
        found = _by_pair(rows)
        for read in batch:
            if not read.answer.done():  # its client is gone
                read.answer.set_result(found.get((read.tenant_id, read.run_id)))

    async def _fetch_one(self, tenant_id: str, run_id: str, deadline: float) -> Record | None:
        """``_fetch`` for one pair (``owned_run``): the tenant's run or None."""
        loop = asyncio.get_running_loop()
        async with self._pool.acquire(timeout=deadline - loop.time()) as connection:
            row: Record | None = await connection.fetchrow(
                self._lone_query, run_id, tenant_id, timeout=deadline - loop.time()
            )
            return row

    async def _fetch(
        self, tenant_ids: Sequence[str], run_ids: Sequence[str], deadline: float
    ) -> list[Record]:
        """The rows of these (tenant, run id) pairs, acquire and statement both by
        ``deadline``: past it, asyncpg raises its TimeoutError (a timeout of
        asyncpg's own, so the front names postgres in the 503)."""
        loop = asyncio.get_running_loop()
        async with self._pool.acquire(timeout=deadline - loop.time()) as connection:
            return list(
                await connection.fetch(
                    self._query, tenant_ids, run_ids, timeout=deadline - loop.time()
                )
            )


def _by_pair(rows: Sequence[Record]) -> dict[tuple[str, str], Record]:
    """Rows by (tenant, run id): the tenant is matched here too, so a run asked
    for by its owner and by another tenant in one batch goes to its owner only."""
    return {(row["tenant_id"], row["id"]): row for row in rows}


def _told_to_lead(answer: asyncio.Future[Answer]) -> bool:
    return (
        answer.done()
        and not answer.cancelled()
        and answer.exception() is None
        and isinstance(answer.result(), _Lead)
    )
