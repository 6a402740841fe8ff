"""A reservation, a settlement and a burst's read cost what their batch costs, at
any table size, on a connection whose plans were made while the tables were
empty (migration 0009).

Postgres keeps a connection's plans (PL/pgSQL's, a prepared statement's generic
one) until an ANALYZE invalidates them. Planned on near-empty tables, the
money statements scanned whole tables, and went on doing so as the tables
grew: every key of the tenant, every run of the tenant, every reserve entry of
the ledger, per reservation or settlement. Here one connection reserves,
settles and reads while the tables are empty, the tables then grow by
thousands of rows of the same tenant (autovacuum off, so no ANALYZE replans
behind the test's back), and one more reservation, settlement and read on that
connection must read only the rows of its batch: Postgres's own per-table
counters of the transaction (``pg_stat_xact_user_tables``) say how many rows
each table gave up, and how.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence
from dataclasses import replace

import asyncpg

from dpp.adapters.postgres import Queries, create_pool
from dpp.money import ledger
from dpp.money.ledger import KeyClaim, RunDraft, SettleRequest
from dpp.money.rules import Outcome, RunStatus
from tests.moneykit import create_plan, create_tenant, draft

GROWTH_BATCHES = 40
GROWTH_BATCH = 50  # 2,000 runs, 4,000 more ledger entries, 2,000 keys: all one tenant's
WARM_UP = 8  # past PL/pgSQL's five custom plans, so the generic ones are made and kept
TABLES = ("runs", "ledger_entries", "idempotency_keys", "tenants", "api_keys")
# the rows one reservation, its cancel and a read of two runs may touch per table,
# with room to spare; growth adds thousands
ROWS_PER_TABLE_MAX = 40


class _Acquired:
    """``pool.acquire()``'s two uses: awaited, or ``async with``."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    def __await__(self) -> Generator[None, None, asyncpg.Connection]:
        yield from ()
        return self.connection

    async def __aenter__(self) -> asyncpg.Connection:
        return self.connection

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class OneConnection:
    """A pool of the one connection whose plans are measured; a ledger
    function's transaction becomes a savepoint of the test's own."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection

    def acquire(self, timeout: float | None = None) -> _Acquired:
        return _Acquired(self.connection)

    async def release(self, connection: asyncpg.Connection) -> None:
        assert connection is self.connection


def keyed(key: str, api_key_id: str) -> RunDraft:
    completion = ledger.IdempotencyCompletion(
        "POST",
        "/v1/runs",
        key,
        uuid.uuid4(),
        202,
        {"Content-Type": "application/json"},
        b"{}",
        claim=KeyClaim(b"s" * 32, 60.0),
    )
    return replace(draft(1_000, api_key_id=api_key_id), idempotency=completion)


async def reserve_and_cancel(
    pool: OneConnection, queries: Queries, tenant_id: str, drafts: Sequence[RunDraft]
) -> list[str]:
    result = await ledger.reserve_batch(pool, queries, tenant_id, drafts)  # type: ignore[arg-type]
    assert result.accepted() == [True] * len(drafts)
    cancels = [
        SettleRequest(d.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED}))
        for d in drafts
    ]
    outcomes = await ledger.settle_batch(pool, queries, cancels)  # type: ignore[arg-type]
    assert all(isinstance(outcome, ledger.SettleResult) for outcome in outcomes), outcomes
    return [d.run_id for d in drafts]


async def table_reads(connection: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """This transaction's (rows read by sequential scans, rows fetched through
    indexes) per table, so far."""
    rows = await connection.fetch(
        "SELECT relname, coalesce(seq_tup_read, 0) AS seq, coalesce(idx_tup_fetch, 0) AS idx"
        " FROM pg_stat_xact_user_tables WHERE relname = ANY($1::text[])",
        list(TABLES),
    )
    return {row["relname"]: (row["seq"], row["idx"]) for row in rows}


async def test_money_statements_read_their_batch_not_the_table(database_url: str) -> None:
    queries = Queries.load()
    setup = await create_pool(database_url, max_size=2)
    measured = await create_pool(database_url, max_size=1)  # the replica's own settings
    connection: asyncpg.Connection = await measured.acquire()
    try:
        for table in TABLES:
            await setup.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await create_plan(setup, "wide", max_concurrent_runs=100_000)
        tenant_id = await create_tenant(setup, plan_id="wide")
        api_key_id = f"key_{tenant_id[4:30]}"
        await setup.execute(
            "INSERT INTO api_keys (id, tenant_id, key_sha256, key_hint)"
            " VALUES ($1, $2, sha256(convert_to($1::text, 'UTF8')), 'abcd')",
            api_key_id,
            tenant_id,
        )
        await ledger.credit(setup, queries, tenant_id, 10**12, "seed")
        pool = OneConnection(connection)

        # plans made on empty tables, and kept
        seen: list[str] = []
        for index in range(WARM_UP):
            seen += await reserve_and_cancel(
                pool, queries, tenant_id, [keyed(f"warm-{index}", api_key_id)]
            )
            await connection.fetch(queries["owned_runs"], [tenant_id], [seen[-1]])

        # the tables grow, all of it the same tenant's
        for batch in range(GROWTH_BATCHES):
            await reserve_and_cancel(
                setup,  # type: ignore[arg-type]
                queries,
                tenant_id,
                [keyed(f"grow-{batch}-{i}", api_key_id) for i in range(GROWTH_BATCH)],
            )
        grown = await setup.fetchval("SELECT count(*) FROM runs")
        assert grown >= GROWTH_BATCHES * GROWTH_BATCH

        async with connection.transaction():
            before = await table_reads(connection)
            ran = await reserve_and_cancel(
                pool, queries, tenant_id, [keyed("measured", api_key_id)]
            )
            rows = await connection.fetch(
                queries["owned_runs"], [tenant_id, tenant_id], [ran[0], seen[0]]
            )
            assert {row["id"] for row in rows} == {ran[0], seen[0]}
            after = await table_reads(connection)
        for table in TABLES:
            seq = after.get(table, (0, 0))[0] - before.get(table, (0, 0))[0]
            idx = after.get(table, (0, 0))[1] - before.get(table, (0, 0))[1]
            assert seq <= ROWS_PER_TABLE_MAX and idx <= ROWS_PER_TABLE_MAX, (
                f"{table}: {seq} rows by sequential scans, {idx} through indexes, for one"
                f" reservation, its cancel and a read of two runs ({grown} runs in the table)"
            )
    finally:
        await measured.release(connection)
        await measured.close()
        await setup.close()
