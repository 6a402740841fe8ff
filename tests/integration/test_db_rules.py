"""The database refuses every write that would break SPEC §1's invariants 1-4.

Each test tries the raw SQL a hand edit, a bug or a bad restore would run,
inside a transaction that is rolled back, and shows Postgres refuses it with
the rule's name (sql/migrations/0004_database_rules.sql); and that the legal
paths — the ledger's own writes and SPEC §2's transitions — still go through.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from dpp.adapters.postgres import Queries, create_pool
from dpp.money import ledger
from dpp.money.audit import run_audit
from dpp.money.rules import Outcome, RunStatus
from tests.moneykit import claim_for_test, create_plan, create_tenant, draft

R = 5_000
M = 500
CREDIT = 1_000_000
TERMINAL = ("COMPLETED", "FAILED", "EXPIRED", "CANCELED")
OPEN = ("QUEUED", "PROCESSING", "CLAIMED")


@dataclass
class World:
    """One tenant with a run in every status (each reached by the legal path)."""

    pool: asyncpg.Pool
    queries: Queries
    tenant: str
    other_tenant: str
    runs: dict[str, str]  # status -> run id


@pytest.fixture
async def world(database_url: str) -> AsyncIterator[World]:
    pool = await create_pool(database_url, max_size=4)
    queries = Queries.load()
    try:
        await create_plan(pool, "wide", max_concurrent_runs=1000)
        tenant = await create_tenant(pool, plan_id="wide")
        other = await create_tenant(pool, plan_id="wide")
        for who in (tenant, other):
            await ledger.credit(pool, queries, who, CREDIT, f"credit:{who}:seed")
        drafts = {status: draft(R, minimum_fee_usd_micros=M) for status in RunStatus}
        result = await ledger.reserve_batch(pool, queries, tenant, list(drafts.values()))
        assert result.budget.reserved_usd_micros == len(drafts) * R
        runs = {status.value: d.run_id for status, d in drafts.items()}
        lease = 60
        for status in ("PROCESSING", "FAILED", "EXPIRED"):
            assert await pool.fetchrow(queries["claim_run_by_id"], runs[status], lease)
        claimed_token = await claim_for_test(pool, runs["CLAIMED"])
        completed_token = await claim_for_test(pool, runs["COMPLETED"])
        processing = frozenset({RunStatus.PROCESSING})
        for request in (
            ledger.SettleRequest(
                runs["COMPLETED"],
                Outcome.COMPLETED,
                actual_cost_usd_micros=1_234,
                lease_token=completed_token,
            ),
            ledger.SettleRequest(runs["FAILED"], Outcome.FAILED, from_statuses=processing),
            ledger.SettleRequest(runs["EXPIRED"], Outcome.EXPIRED, from_statuses=processing),
            ledger.SettleRequest(
                runs["CANCELED"], Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
            ),
        ):
            await ledger.settle(pool, queries, request)
        version = await pool.fetchval(
            "SELECT version FROM runs WHERE id = $1", runs["AUDIT_REQUIRED"]
        )
        assert await ledger.mark_audit_required(
            pool, queries, runs["AUDIT_REQUIRED"], version, {"title": "test"}
        )
        assert claimed_token
        yield World(pool, queries, tenant, other, runs)
        # leave nothing for an operator: the audit at teardown wants no AUDIT_REQUIRED run
        await ledger.settle(
            pool,
            queries,
            ledger.SettleRequest(
                runs["AUDIT_REQUIRED"],
                Outcome.FAILED,
                from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
                charged_override_usd_micros=M,
            ),
        )
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def rolled_back(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that never commits, whatever happens inside."""
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            yield connection
        finally:
            await transaction.rollback()


async def refused(pool: asyncpg.Pool, rule: str, *statements: tuple[str, ...]) -> None:
    """Each statement in turn, then the deferred checks; the last must be refused
    by ``rule`` (a rule's name, or a constraint's)."""
    with pytest.raises(asyncpg.PostgresError) as caught:
        async with rolled_back(pool) as connection:
            for statement, *args in statements:
                await connection.execute(statement, *args)
            await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert rule in str(caught.value), caught.value


async def accepted(pool: asyncpg.Pool, *statements: tuple[str, ...]) -> None:
    async with rolled_back(pool) as connection:
        for statement, *args in statements:
            await connection.execute(statement, *args)
        await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")


async def counters(pool: asyncpg.Pool, tenant: str) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT balance_usd_micros, reserved_usd_micros, ledger_version FROM tenants WHERE id = $1",
        tenant,
    )
    assert row is not None
    return row["balance_usd_micros"], row["reserved_usd_micros"], row["ledger_version"]


# ------------------------------------------------ invariants 1 and 2: counters


@pytest.mark.parametrize(
    "assignment",
    [
        "balance_usd_micros = balance_usd_micros + 1",
        "balance_usd_micros = balance_usd_micros - 1",
        f"reserved_usd_micros = reserved_usd_micros - {R}",  # release while runs are open
        "reserved_usd_micros = reserved_usd_micros + 1",
        "ledger_version = ledger_version + 1",
        "balance_usd_micros = 0, reserved_usd_micros = 0",
    ],
)
async def test_a_counter_never_moves_without_a_ledger_entry(world: World, assignment) -> None:
    await refused(
        world.pool,
        "dpp rule counters_from_ledger",
        (f"UPDATE tenants SET {assignment} WHERE id = $1", world.tenant),
    )


async def test_a_tenant_is_born_with_zero_counters(world: World) -> None:
    insert = (
        "INSERT INTO tenants (id, name, plan_id, balance_usd_micros)"
        " VALUES ('ten_" + "b" * 24 + "', 'rich', 'default', 1000000)"
    )
    await refused(world.pool, "dpp rule counters_from_ledger", (insert,))


async def test_other_tenant_columns_stay_writable(world: World) -> None:
    await accepted(
        world.pool,
        ("UPDATE tenants SET name = 'renamed', plan_id = 'default' WHERE id = $1", world.tenant),
    )


async def test_ledger_entries_move_the_counters(world: World) -> None:
    """The legal raw path: a credit entry is a movement, and moves the balance."""
    before = await counters(world.pool, world.tenant)
    async with world.pool.acquire() as connection, connection.transaction():
        await connection.execute(
            "INSERT INTO ledger_entries (tenant_id, kind, amount_usd_micros, operation_id)"
            " VALUES ($1, 'credit', 700, 'credit:raw')",
            world.tenant,
        )
    balance, reserved, version = await counters(world.pool, world.tenant)
    assert (balance, reserved, version) == (before[0] + 700, before[1], before[2] + 1)


# ----------------------------------------------------- invariant 3: available


async def test_available_never_goes_negative(world: World) -> None:
    balance, reserved, _ = await counters(world.pool, world.tenant)
    too_much = balance - reserved + 1
    run = draft(too_much, minimum_fee_usd_micros=0)
    # the run's insert writes its reserve entry, whose counter update the CHECK refuses
    await refused(
        world.pool,
        "tenants_available_nonnegative",
        (
            "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
            " minimum_fee_usd_micros, timebox_sec) VALUES ($1, $2, 'echo', 'QUEUED', '{}', $3,"
            " 0, 30)",
            run.run_id,
            world.tenant,
            too_much,
        ),
    )


# ------------------------------------------------- ledger entries match their runs


def _entry(kind: str, run_id: str, amount: int, tenant: str) -> tuple[str, ...]:
    return (
        "INSERT INTO ledger_entries (tenant_id, run_id, kind, amount_usd_micros, operation_id)"
        " VALUES ($1, $2, $3, $4, 'raw:' || $3 || ':' || $2)",
        tenant,
        run_id,
        kind,
        amount,
    )


async def test_a_charge_entry_is_refused_on_an_open_run(world: World) -> None:
    for status in (*OPEN, "AUDIT_REQUIRED"):
        for kind in ("charge", "refund"):
            await refused(
                world.pool,
                "dpp rule entry_matches_run",
                _entry(kind, world.runs[status], M, world.tenant),
            )


async def test_a_charge_entry_larger_than_r_is_refused(world: World) -> None:
    run = world.runs["PROCESSING"]
    fail = (
        "UPDATE runs SET status = 'FAILED', charged_usd_micros = minimum_fee_usd_micros,"
        " refunded_usd_micros = reserved_usd_micros - minimum_fee_usd_micros,"
        " finished_at = now(), retention_until = now(), lease_token = NULL WHERE id = $1",
        run,
    )
    await refused(
        world.pool,
        "dpp rule entry_matches_run",
        fail,
        _entry("charge", run, R + 1, world.tenant),
    )
    # the same settlement with entries equal to its columns is the legal path
    await accepted(
        world.pool,
        fail,
        _entry("charge", run, M, world.tenant),
        _entry("refund", run, R - M, world.tenant),
    )


async def test_a_second_settlement_entry_is_refused(world: World) -> None:
    run = world.runs["COMPLETED"]
    await refused(
        world.pool, "ledger_one_entry_per_run_kind", _entry("charge", run, 0, world.tenant)
    )
    await refused(
        world.pool, "ledger_one_entry_per_run_kind", _entry("reserve", run, R, world.tenant)
    )


async def test_an_entry_for_another_tenants_run_is_refused(world: World) -> None:
    run = world.runs["PROCESSING"]
    await refused(
        world.pool,
        "dpp rule entry_matches_run",
        _move(run, "FAILED", M),
        _entry("charge", run, M, world.other_tenant),
    )


# ------------------------------------------- runs: born QUEUED with their reserve


def _insert_run(run_id: str, tenant: str, status: str = "QUEUED") -> tuple[str, ...]:
    return (
        "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
        " minimum_fee_usd_micros, timebox_sec, lease_token)"
        " VALUES ($1, $2, 'echo', $3, '{}', $4, $5, 30,"
        " CASE WHEN $3 IN ('PROCESSING', 'CLAIMED') THEN gen_random_uuid() END)",
        run_id,
        tenant,
        status,
        R,
        M,
    )


async def test_a_run_is_reserved_in_the_ledger_by_its_own_insert(world: World) -> None:
    """A run cannot exist without its reservation: inserting it writes its reserve
    entry of R and moves reserved; no second or different reserve entry fits."""
    run = draft(R).run_id
    before = await counters(world.pool, world.tenant)
    async with rolled_back(world.pool) as connection:
        statement, *args = _insert_run(run, world.tenant)
        await connection.execute(statement, *args)
        entries = await connection.fetch(
            "SELECT kind, amount_usd_micros FROM ledger_entries WHERE run_id = $1", run
        )
        assert [tuple(e) for e in entries] == [("reserve", R)]
        row = await connection.fetchrow(
            "SELECT balance_usd_micros, reserved_usd_micros FROM tenants WHERE id = $1",
            world.tenant,
        )
        assert (row[0], row[1]) == (before[0], before[1] + R)
    await refused(
        world.pool,
        "ledger_one_entry_per_run_kind",
        _insert_run(run, world.tenant),
        _entry("reserve", run, R - 1, world.tenant),
    )
    # a reserve entry for a run that does not exist
    await refused(world.pool, "foreign key", _entry("reserve", draft(R).run_id, R, world.tenant))


@pytest.mark.parametrize("status", ["PROCESSING", "CLAIMED", "AUDIT_REQUIRED"])
async def test_a_run_is_born_queued(world: World, status) -> None:
    await refused(
        world.pool, "dpp rule run_born_queued", _insert_run(draft(R).run_id, world.tenant, status)
    )


# ------------------------------------------ invariant 4: SPEC §2's transitions

# (from, to) -> the charge the table allows (None: the move settles nothing)
ALLOWED: dict[tuple[str, str], int | None] = {
    ("QUEUED", "PROCESSING"): None,
    ("QUEUED", "CANCELED"): 0,
    ("PROCESSING", "CLAIMED"): None,
    ("PROCESSING", "FAILED"): M,
    ("PROCESSING", "EXPIRED"): M,
    ("PROCESSING", "QUEUED"): None,
    ("CLAIMED", "COMPLETED"): M + 1,
    ("CLAIMED", "FAILED"): M,
    ("QUEUED", "AUDIT_REQUIRED"): None,
    ("PROCESSING", "AUDIT_REQUIRED"): None,
    ("CLAIMED", "AUDIT_REQUIRED"): None,
    ("AUDIT_REQUIRED", "COMPLETED"): 0,
    ("AUDIT_REQUIRED", "FAILED"): R,
}


def _natural_charge(target: str) -> int | None:
    return {"CANCELED": 0, "FAILED": M, "EXPIRED": M, "COMPLETED": M + 1}.get(target)


def _move(run_id: str, target: str, charged: int | None) -> tuple[str, ...]:
    """A raw UPDATE to ``target`` that satisfies every CHECK of the table."""
    return (
        "UPDATE runs SET status = $2,"
        " lease_token = CASE WHEN $2 IN ('PROCESSING', 'CLAIMED')"
        "     THEN coalesce(lease_token, gen_random_uuid()) END,"
        " charged_usd_micros = $3::bigint,"
        " refunded_usd_micros = reserved_usd_micros - $3::bigint,"
        " finished_at = CASE WHEN $3::bigint IS NULL THEN NULL ELSE now() END,"
        " retention_until = CASE WHEN $3::bigint IS NULL THEN NULL ELSE now() END"
        " WHERE id = $1",
        run_id,
        target,
        charged,
    )


def _settlement_entries(world: World, run_id: str, charged: int) -> list[tuple[str, ...]]:
    return [
        _entry("charge", run_id, charged, world.tenant),
        _entry("refund", run_id, R - charged, world.tenant),
    ]


async def _attempt(world: World, source: str, target: str, charged: int | None) -> str | None:
    """Move the ``source`` run to ``target`` in a rolled-back transaction; the
    refusal's message, or None if the database allowed it."""
    run = world.runs[source]
    statements = [_move(run, target, charged)]
    if charged is not None and source not in TERMINAL:
        statements += _settlement_entries(world, run, charged)
    try:
        await accepted(world.pool, *statements)
    except asyncpg.PostgresError as error:
        return str(error)
    return None


async def test_only_spec_transitions_are_allowed(world: World) -> None:
    wrong = []
    statuses = [status.value for status in RunStatus]
    for source in statuses:
        for target in statuses:
            if source == target:
                continue
            charged = ALLOWED.get((source, target), _natural_charge(target))
            refusal = await _attempt(world, source, target, charged)
            expected = (source, target) in ALLOWED
            if expected != (refusal is None):
                wrong.append((source, target, charged, refusal))
            if refusal is not None and "dpp rule" not in refusal:
                wrong.append((source, target, charged, f"refused by something else: {refusal}"))
    assert wrong == []


@pytest.mark.parametrize(
    ("source", "target", "charged", "rule"),
    [
        ("PROCESSING", "FAILED", R, "transition"),  # a FAILED run charged R
        ("CLAIMED", "FAILED", R, "transition"),
        ("PROCESSING", "FAILED", 0, "transition"),
        ("PROCESSING", "EXPIRED", R, "transition"),
        ("CLAIMED", "COMPLETED", M - 1, "transition"),  # below the minimum fee
        ("QUEUED", "CANCELED", M, "transition"),  # a cancel charges nothing
        ("QUEUED", "FAILED", M, "transition"),  # never started: no FAILED (SPEC §2)
        ("COMPLETED", "QUEUED", None, "terminal_is_final"),  # re-opened, columns cleared
        ("CANCELED", "QUEUED", None, "terminal_is_final"),
        ("FAILED", "COMPLETED", R, "terminal_is_final"),
        ("COMPLETED", "COMPLETED", 0, "terminal_is_final"),  # settlement rewritten
    ],
)
async def test_a_transition_charging_what_the_table_forbids_is_refused(
    world: World, source, target, charged, rule
) -> None:
    refusal = await _attempt(world, source, target, charged)
    assert refusal is not None and f"dpp rule {rule}" in refusal, refusal


@pytest.mark.parametrize("refund_error", [-1, 1])
async def test_a_settlement_whose_charge_and_refund_miss_r_is_refused(
    world: World, refund_error: int
) -> None:
    # An allowed move and charge, with ledger entries equal to the columns: only
    # charged + refunded = R is wrong. Short, R would stay reserved forever;
    # over, the tenant would get back money it never reserved.
    run = world.runs["PROCESSING"]
    refunded = R - M + refund_error
    with pytest.raises(asyncpg.PostgresError) as caught:
        async with rolled_back(world.pool) as connection:
            await connection.execute(
                "UPDATE runs SET status = 'FAILED', lease_token = NULL,"
                " charged_usd_micros = $2, refunded_usd_micros = $3,"
                " finished_at = now(), retention_until = now() WHERE id = $1",
                run,
                M,
                refunded,
            )
            for statement, *args in (
                _entry("charge", run, M, world.tenant),
                _entry("refund", run, refunded, world.tenant),
            ):
                await connection.execute(statement, *args)
            await connection.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert "runs_settlement_matches_status" in str(caught.value), caught.value


@pytest.mark.parametrize("charged", [0, M - 1, R])
async def test_an_operator_resolve_may_charge_anything_up_to_r(world: World, charged) -> None:
    for target in ("COMPLETED", "FAILED"):
        assert await _attempt(world, "AUDIT_REQUIRED", target, charged) is None
    assert await _attempt(world, "AUDIT_REQUIRED", "FAILED", R + 1) is not None


@pytest.mark.parametrize(
    "assignment",
    [
        "reserved_usd_micros = reserved_usd_micros + 1",
        "minimum_fee_usd_micros = 0",
        "tenant_id = $2",
    ],
)
async def test_a_run_keeps_its_tenant_r_and_m(world: World, assignment) -> None:
    for status in ("QUEUED", "PROCESSING"):
        await refused(
            world.pool,
            "dpp rule run_terms_fixed",
            (
                f"UPDATE runs SET {assignment} WHERE id = $1 AND $2 <> ''",
                world.runs[status],
                world.other_tenant,
            ),
        )


async def test_a_terminal_run_keeps_its_settlement(world: World) -> None:
    run = world.runs["COMPLETED"]
    for assignment in (
        "charged_usd_micros = refunded_usd_micros, refunded_usd_micros = charged_usd_micros",
        "finished_at = now() - interval '1 day'",
    ):
        await refused(
            world.pool,
            "dpp rule terminal_is_final",
            (f"UPDATE runs SET {assignment} WHERE id = $1", run),
        )
    # what is not money stays writable (retention, the result's deletion)
    await accepted(
        world.pool,
        (
            "UPDATE runs SET retention_until = now(), result_deleted_at = now(),"
            " version = version + 1 WHERE id = $1",
            run,
        ),
    )


async def test_a_run_settled_without_its_entries_is_refused_at_commit(world: World) -> None:
    await refused(world.pool, "dpp rule run_settled", _move(world.runs["QUEUED"], "CANCELED", 0))
    await refused(
        world.pool,
        "dpp rule run_settled",
        _move(world.runs["CLAIMED"], "COMPLETED", M + 1),
        _entry("charge", world.runs["CLAIMED"], M + 1, world.tenant),
    )


# ------------------------------------------------------- append-only, no TRUNCATE


@pytest.mark.parametrize(
    "statement",
    [
        # CASCADE: without it a referencing table's foreign key refuses first
        "TRUNCATE ledger_entries CASCADE",
        "TRUNCATE runs CASCADE",
        "TRUNCATE tenants CASCADE",
        "TRUNCATE ledger_entries, runs, tenants, api_keys CASCADE",
    ],
)
async def test_truncate_of_a_money_table_is_refused(world: World, statement) -> None:
    await refused(world.pool, "dpp rule no_truncate", (statement,))


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount_usd_micros = 1 WHERE tenant_id = $1",
        "DELETE FROM ledger_entries WHERE tenant_id = $1",
    ],
)
async def test_the_ledger_is_append_only(world: World, statement) -> None:
    await refused(world.pool, "append-only", (statement, world.tenant))


async def test_deleting_a_run_or_tenant_with_money_is_refused(world: World) -> None:
    await refused(
        world.pool, "foreign key", ("DELETE FROM runs WHERE id = $1", world.runs["QUEUED"])
    )
    await refused(
        world.pool,
        "foreign key",
        ("DELETE FROM api_keys WHERE tenant_id = $1", world.tenant),
        ("DELETE FROM tenants WHERE id = $1", world.tenant),
    )


# ------------------------------- the concurrency limit's count (migration 0012)


async def open_runs(pool: asyncpg.Pool, tenant: str) -> int:
    """What the tenant's row counts (what a reservation decides on)."""
    return int(await pool.fetchval("SELECT open_runs FROM tenants WHERE id = $1", tenant))


async def runs_open(pool: asyncpg.Pool, tenant: str) -> int:
    """What the runs themselves say."""
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM runs WHERE tenant_id = $1 AND status = ANY($2::text[])",
            tenant,
            list(OPEN),
        )
    )


async def as_a_restore(pool: asyncpg.Pool, statement: str, *args: object) -> None:
    """``statement`` committed as a restore writes, with the triggers off
    (session_replication_role = replica; the CHECKs still apply)."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("SET LOCAL session_replication_role = replica")
        await connection.execute(statement, *args)


async def test_the_open_run_count_follows_every_move_of_a_run(world: World) -> None:
    pool, queries, tenant = world.pool, world.queries, world.tenant

    async def count_is(expected: int) -> None:
        assert (await open_runs(pool, tenant), await runs_open(pool, tenant)) == (
            expected,
            expected,
        )

    # the fixture reached every status by the legal paths: three of them are open
    await count_is(3)
    assert await open_runs(pool, world.other_tenant) == 0
    fresh = [draft(R, minimum_fee_usd_micros=M) for _ in range(4)]
    await ledger.reserve_batch(pool, queries, tenant, fresh)  # one statement, four runs
    await count_is(7)
    # a claim, a lease renewal and a release move no run in or out
    claimed = await pool.fetchrow(queries["claim_run_by_id"], fresh[0].run_id, 60)
    assert claimed is not None
    assert await pool.fetchval(
        queries["renew_lease"], fresh[0].run_id, claimed["lease_token"], claimed["version"], 60
    )
    assert await pool.fetchval(queries["release_run"], fresh[0].run_id, claimed["lease_token"])
    token = await claim_for_test(pool, fresh[1].run_id)  # PROCESSING, then CLAIMED
    await count_is(7)
    await ledger.settle(
        pool,
        queries,
        ledger.SettleRequest(
            fresh[1].run_id, Outcome.COMPLETED, actual_cost_usd_micros=M, lease_token=token
        ),
    )
    await count_is(6)
    queued = frozenset({RunStatus.QUEUED})
    await ledger.settle(
        pool, queries, ledger.SettleRequest(fresh[2].run_id, Outcome.CANCELED, from_statuses=queued)
    )
    await count_is(5)
    version = await pool.fetchval("SELECT version FROM runs WHERE id = $1", fresh[3].run_id)
    assert await ledger.mark_audit_required(
        pool, queries, fresh[3].run_id, version, {"title": "test"}
    )
    await count_is(4)  # AUDIT_REQUIRED does not count toward the limit (SPEC §6)
    await ledger.settle(
        pool,
        queries,
        ledger.SettleRequest(
            fresh[3].run_id,
            Outcome.FAILED,
            from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
            charged_override_usd_micros=0,
        ),
    )
    await count_is(4)
    await ledger.settle(
        pool, queries, ledger.SettleRequest(fresh[0].run_id, Outcome.CANCELED, from_statuses=queued)
    )
    await count_is(3)
    assert await open_runs(pool, world.other_tenant) == 0


async def test_one_statement_moving_runs_of_two_tenants_counts_each(world: World) -> None:
    theirs = draft(R, minimum_fee_usd_micros=M)
    await ledger.reserve_batch(world.pool, world.queries, world.other_tenant, [theirs])
    assert await open_runs(world.pool, world.other_tenant) == 1
    moved = [world.runs["QUEUED"], world.runs["PROCESSING"], theirs.run_id]
    async with rolled_back(world.pool) as connection:
        await connection.execute(
            "UPDATE runs SET status = 'AUDIT_REQUIRED', lease_token = NULL,"
            " lease_expires_at = NULL, version = version + 1 WHERE id = ANY($1::text[])",
            moved,
        )
        rows = await connection.fetch(
            "SELECT id, open_runs FROM tenants WHERE id = ANY($1::text[])",
            [world.tenant, world.other_tenant],
        )
        assert {row["id"]: row["open_runs"] for row in rows} == {
            world.tenant: 1,
            world.other_tenant: 0,
        }
    await ledger.settle(
        world.pool,
        world.queries,
        ledger.SettleRequest(
            theirs.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        ),
    )


async def test_a_settling_statement_holds_every_tenant_it_settles_from_its_update_on(
    world: World,
) -> None:
    """Two settlements never each hold a tenant the other waits for: the runs'
    UPDATE locks, in tenant id order, every tenant whose ledger entries the
    settlement inserts next, an AUDIT_REQUIRED run's tenant included although
    its open-run count does not move."""
    theirs = draft(R, minimum_fee_usd_micros=M)
    await ledger.reserve_batch(world.pool, world.queries, world.other_tenant, [theirs])
    resolved = world.runs["AUDIT_REQUIRED"]
    async with rolled_back(world.pool) as connection:
        # an operator's resolve (charging M) and a cancel, in one statement
        await connection.execute(
            "UPDATE runs SET status = CASE id WHEN $1 THEN 'FAILED' ELSE 'CANCELED' END,"
            " charged_usd_micros = CASE id WHEN $1 THEN $3::bigint ELSE 0 END,"
            " refunded_usd_micros = CASE id WHEN $1 THEN $4::bigint ELSE $5::bigint END,"
            " finished_at = now(), retention_until = now() + interval '30 days',"
            " version = version + 1 WHERE id = ANY(ARRAY[$1, $2])",
            resolved,
            theirs.run_id,
            M,
            R - M,
            R,
        )
        async with world.pool.acquire() as other:
            for tenant in (world.tenant, world.other_tenant):
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await other.fetchval(
                        "SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE NOWAIT", tenant
                    )
    await ledger.settle(
        world.pool,
        world.queries,
        ledger.SettleRequest(
            theirs.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        ),
    )


async def test_deleting_a_run_the_count_never_held_leaves_the_count_alone(world: World) -> None:
    """Only a run written with the triggers off (no reserve entry, so no foreign
    key holds it; never counted) can be deleted: its delete must not take the
    tenant's count below its real open runs."""
    stray = "run_" + "d" * 26
    await as_a_restore(
        world.pool,
        "INSERT INTO runs (id, tenant_id, pack_type, status, inputs, reserved_usd_micros,"
        " minimum_fee_usd_micros, timebox_sec)"
        " VALUES ($1, $2, 'echo', 'QUEUED', '{}', $3, $4, 30)",
        stray,
        world.tenant,
        R,
        M,
    )
    assert await open_runs(world.pool, world.tenant) == 3
    await world.pool.execute("DELETE FROM runs WHERE id = $1", stray)
    assert (
        await open_runs(world.pool, world.tenant) == await runs_open(world.pool, world.tenant) == 3
    )


@pytest.mark.parametrize(
    "assignment", ["open_runs = 0", "open_runs = open_runs + 1", "open_runs = 100000"]
)
async def test_the_open_run_count_never_moves_by_hand(world: World, assignment: str) -> None:
    await refused(
        world.pool,
        "dpp rule open_runs_from_runs",
        (f"UPDATE tenants SET {assignment} WHERE id = $1", world.tenant),
    )


async def test_a_tenant_is_born_with_no_open_runs(world: World) -> None:
    insert = (
        "INSERT INTO tenants (id, name, plan_id, open_runs)"
        " VALUES ('ten_" + "c" * 24 + "', 'busy', 'default', 5)"
    )
    await refused(world.pool, "dpp rule open_runs_from_runs", (insert,))


async def test_the_open_run_count_is_never_negative_even_with_the_triggers_off(
    world: World,
) -> None:
    await refused(
        world.pool,
        "tenants_open_runs_nonnegative",
        ("SET LOCAL session_replication_role = replica",),
        ("UPDATE tenants SET open_runs = -1 WHERE id = $1", world.tenant),
    )


async def test_the_audit_reports_an_open_run_count_out_of_step(world: World) -> None:
    async def set_by_restore(value: int) -> None:
        # as a partial restore with the triggers off would leave it
        await as_a_restore(
            world.pool, "UPDATE tenants SET open_runs = $2 WHERE id = $1", world.tenant, value
        )

    before = await run_audit(world.pool, world.queries, None, tenant_id=world.tenant)
    assert before.violations == []
    await set_by_restore(9)
    try:
        report = await run_audit(world.pool, world.queries, None, tenant_id=world.tenant)
        assert report.violations == [
            {"invariant": 2, "tenant_id": world.tenant, "open_runs": 9, "runs_open": 3}
        ]
    finally:
        await set_by_restore(3)
