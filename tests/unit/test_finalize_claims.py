"""The finalize-claim group commit's hand-offs, on a fake pool (asyncio and trio).

Against real Postgres (one round trip per batch, guards, outcomes) it is proven
in tests/integration/test_finalize_claims.py; here: whoever waits is never
stranded — not by a waiter cancelled in line, nor by a batch that failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from dpp.adapters.queue.base import ClaimedRun, LeaseStore

TENANT = "ten_" + "B" * 26
TOKEN = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def claimed(n: int) -> ClaimedRun:
    return ClaimedRun(
        run_id=f"run_{n:026d}",
        tenant_id=TENANT,
        pack_type="echo",
        inputs={},
        timebox_sec=30,
        reserved_usd_micros=5_000,
        minimum_fee_usd_micros=100,
        trace_id=None,
        lease_token=TOKEN,
        version=3,
        attempts=1,
        claimed_at_monotonic=0.0,
    )


class FakePool:
    """Answers every guard as held; the first statement waits at a gate and
    may fail (``fail_first``)."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.gate = anyio.Event()
        self.on_the_wire = anyio.Event()
        self.fail_first = fail_first
        self.statements = 0
        self.batches: list[int] = []

    async def _first_waits(self) -> None:
        self.statements += 1
        if self.statements == 1:
            self.on_the_wire.set()
            await self.gate.wait()
            if self.fail_first:
                raise OSError("connection lost")

    async def fetchval(self, query: str, run_id: str, token: str, version: int) -> int:
        await self._first_waits()
        return version + 1

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakePool]:
        yield self

    async def fetchmany(self, query: str, args: list[tuple[str, str, int]]) -> list[Any]:
        await self._first_waits()
        self.batches.append(len(args))
        return [{"version": version + 1} for _, _, version in args]


QUERIES = {"claim_for_finalize": "claim", "run_by_id": "run"}


async def test_a_waiter_cancelled_in_line_strands_no_one() -> None:
    pool = FakePool()
    leases = LeaseStore(pool, QUERIES)  # type: ignore[arg-type]
    outcomes: dict[int, int | None] = {}
    cancelled = anyio.CancelScope()

    async def claim(n: int) -> None:
        outcomes[n] = await leases.claim_for_finalize(claimed(n), 3)

    async def cancelled_in_line() -> None:
        with cancelled:
            await claim(1)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(claim, 0)
            await pool.on_the_wire.wait()
            tasks.start_soon(cancelled_in_line)
            await anyio.wait_all_tasks_blocked()
            assert leases.finalize_claims_waiting() == 1
            for n in (2, 3):
                tasks.start_soon(claim, n)
            await anyio.wait_all_tasks_blocked()
            assert leases.finalize_claims_waiting() == 3
            cancelled.cancel()  # first in line: the one the lead goes to next
            await anyio.wait_all_tasks_blocked()
            assert leases.finalize_claims_waiting() == 2
            pool.gate.set()
    assert outcomes == {0: 4, 2: 4, 3: 4}
    assert pool.batches == [2]  # the two still in line, as one batch


async def test_a_failed_batch_fails_its_callers_and_hands_on_the_lead() -> None:
    pool = FakePool(fail_first=True)
    leases = LeaseStore(pool, QUERIES)  # type: ignore[arg-type]
    outcomes: dict[int, int | str | None] = {}

    async def claim(n: int) -> None:
        try:
            outcomes[n] = await leases.claim_for_finalize(claimed(n), 3)
        except OSError:
            outcomes[n] = "failed"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(claim, 0)
            await pool.on_the_wire.wait()
            for n in (1, 2):
                tasks.start_soon(claim, n)
            await anyio.wait_all_tasks_blocked()
            assert leases.finalize_claims_waiting() == 2
            pool.gate.set()
    assert outcomes == {0: "failed", 1: 4, 2: 4}
    assert pool.batches == [2]
    # and the line is empty again: a lone claim goes out at once
    assert await leases.claim_for_finalize(claimed(4), 3) == 4
