"""`dpp migrate` and `--check` against real Postgres.

The check must catch what a hurried operator does by hand in production,
one line per difference, and sql/schema.sql must stay exactly what the
migrations produce.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncpg
import pytest

from dpp.adapters import migrate
from dpp.adapters.postgres import Queries, create_pool
from dpp.money import ledger
from dpp.money.rules import Outcome, RunStatus
from tests.moneykit import claim_for_test, create_plan, create_tenant, draft

if TYPE_CHECKING:  # imported plainly, pytest would try to collect the class
    from tests.services import TestServices


async def _execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _database_exists(admin_url: str, name: str) -> bool:
    connection = await asyncpg.connect(admin_url)
    try:
        return bool(
            await connection.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
        )
    finally:
        await connection.close()


async def test_apply_on_an_empty_database_then_again_is_a_no_op(services: TestServices) -> None:
    versions = [m.version for m in migrate.discover()]
    async with migrate.scratch_database(services.admin_database_url) as url:
        assert await migrate.apply_migrations(url) == versions
        assert await migrate.apply_migrations(url) == []
        assert await migrate.check(url) == []


async def test_already_migrated_database_applies_nothing(database_url: str) -> None:
    assert await migrate.apply_migrations(database_url) == []


async def test_check_passes_on_a_fresh_database(database_url: str) -> None:
    assert await migrate.check(database_url) == []


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (
            "ALTER TABLE tenants ADD COLUMN x int",
            "column public.tenants.x: in the database but not in the migrations",
        ),
        ("DROP INDEX runs_queued", "index public.runs_queued: missing from the database"),
        (
            "ALTER TABLE runs DROP CONSTRAINT runs_canceled_charges_nothing",
            "constraint public.runs.runs_canceled_charges_nothing: missing from the database",
        ),
        (
            "ALTER TABLE tenants ALTER COLUMN name DROP NOT NULL",
            "column public.tenants.name: database has text NULL; migrations give text NOT NULL",
        ),
        (
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_no_update_or_delete",
            "trigger public.ledger_entries.ledger_entries_no_update_or_delete: database has",
        ),
        (
            "CREATE OR REPLACE FUNCTION ledger_entries_append_only() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END; $$",
            "function public.ledger_entries_append_only(): definition differs",
        ),
    ],
    ids=["added-column", "dropped-index", "dropped-check", "nullability", "trigger", "function"],
)
async def test_check_reports_a_hand_made_change_in_one_line(
    database_url: str, statement: str, expected: str
) -> None:
    await _execute(database_url, statement)
    problems = await migrate.check(database_url)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems
    assert "\n" not in problems[0]


async def test_check_reports_a_changed_recorded_checksum(database_url: str) -> None:
    await _execute(
        database_url,
        "UPDATE schema_migrations SET sha256 = repeat('0', 64) WHERE version = '0001_initial'",
    )
    assert await migrate.check(database_url) == ["0001_initial: file changed after it was applied"]


async def test_check_reports_a_recorded_version_without_a_file(database_url: str) -> None:
    await _execute(
        database_url,
        "INSERT INTO schema_migrations (version, sha256) VALUES ('0999_gone', repeat('0', 64))",
    )
    assert await migrate.check(database_url) == [
        "0999_gone: recorded in the database but no such file"
    ]


async def test_check_reports_a_file_not_applied_yet_as_one_line(
    database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIRECTORY, directory)
    (directory / "0999_extra.sql").write_text("CREATE TABLE extra (id int);\n")
    assert await migrate.check(database_url, directory) == [
        "0999_extra: not applied yet (run `dpp migrate`)"
    ]
    assert await migrate.apply_migrations(database_url, directory) == ["0999_extra"]
    assert await migrate.check(database_url, directory) == []


async def test_a_failing_migration_is_one_line_naming_it(
    services: TestServices, tmp_path: Path
) -> None:
    (tmp_path / "0001_broken.sql").write_text("CREATE TABLE ok (id int);\nCREATE TABEL nope ();\n")
    async with migrate.scratch_database(services.admin_database_url) as url:
        with pytest.raises(migrate.MigrationError) as caught:
            await migrate.apply_migrations(url, tmp_path)
        assert str(caught.value).startswith("0001_broken: PostgresSyntaxError")
        assert "\n" not in str(caught.value)
        # the file's transaction rolled back: nothing half-applied, nothing recorded
        schema = await migrate.introspect_url(url)
        assert "table public.ok" not in schema.objects
        connection = await asyncpg.connect(url)
        try:
            assert await migrate.recorded(connection) == {}
        finally:
            await connection.close()


async def test_scratch_database_is_dropped_even_on_error(services: TestServices) -> None:
    name = ""
    with pytest.raises(RuntimeError):
        async with migrate.scratch_database(services.admin_database_url) as url:
            name = urlsplit(url).path.lstrip("/")
            assert name.startswith(migrate.SCRATCH_PREFIX)
            assert await _database_exists(services.admin_database_url, name)
            raise RuntimeError("boom")
    assert not await _database_exists(services.admin_database_url, name)


async def test_schema_sql_is_what_the_migrations_produce(services: TestServices) -> None:
    """procrastinate's rule: the hand-kept full schema equals the migrations' result."""
    admin = services.admin_database_url
    async with (
        migrate.scratch_database(admin) as migrated_url,
        migrate.scratch_database(admin) as schema_url,
    ):
        await migrate.apply_migrations(migrated_url)
        await _execute(schema_url, migrate.SCHEMA_FILE.read_text(encoding="utf-8"))
        migrated = await migrate.introspect_url(migrated_url)
        from_schema = await migrate.introspect_url(schema_url)
    assert migrate.compare_schemas(from_schema, migrated) == []
    assert migrated.objects  # not two empty pictures


def test_compare_schemas_reports_column_order_once() -> None:
    live = migrate.Schema({"column public.t.a": "int", "column public.t.b": "int"}, {})
    expected = migrate.Schema(dict(live.objects), {})
    live = migrate.Schema(live.objects, {"public.t": ("b", "a")})
    expected = migrate.Schema(expected.objects, {"public.t": ("a", "b")})
    assert migrate.compare_schemas(live, expected) == [
        "columns of public.t: database order b, a; migrations give a, b"
    ]


async def test_0012_counts_the_open_runs_a_database_already_has(
    services: TestServices, tmp_path: Path
) -> None:
    """A database migrated while tenants have runs open starts the count on each
    tenant's row at what its runs say (the concurrency limit holds across the
    upgrade), and the count moves on from there."""
    before_0012 = tmp_path / "migrations"
    before_0012.mkdir()
    for migration in sorted(migrate.MIGRATIONS_DIRECTORY.glob("*.sql")):
        if migration.name < "0012":
            shutil.copy(migration, before_0012)
    async with migrate.scratch_database(services.admin_database_url) as url:
        await migrate.apply_migrations(url, before_0012)
        pool = await create_pool(url, max_size=2)
        try:
            queries = Queries.load()
            await create_plan(pool, "wide", max_concurrent_runs=100)
            busy = await create_tenant(pool, plan_id="wide")
            idle = await create_tenant(pool, plan_id="wide")
            await ledger.credit(pool, queries, busy, 1_000_000, "credit:seed")
            drafts = [draft() for _ in range(5)]
            await ledger.reserve_batch(pool, queries, busy, drafts)
            await claim_for_test(pool, drafts[0].run_id)  # CLAIMED: still open
            await ledger.settle(
                pool,
                queries,
                ledger.SettleRequest(
                    drafts[1].run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
                ),
            )
            assert await migrate.apply_migrations(url) == ["0012_open_runs_on_the_tenant"]
            count = "SELECT open_runs FROM tenants WHERE id = $1"
            assert (await pool.fetchval(count, busy), await pool.fetchval(count, idle)) == (4, 0)
            await ledger.reserve_batch(pool, queries, busy, [draft()])
            assert await pool.fetchval(count, busy) == 5
        finally:
            await pool.close()
