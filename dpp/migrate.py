"""`dpp migrate`: apply the numbered plain-SQL files of ``sql/migrations``.

Each file runs in its own transaction and is recorded with its SHA-256 in
``schema_migrations``; a recorded file whose text changed afterwards is an
error, never silently re-applied. A session-level advisory lock makes two
replicas' release phases take turns.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dpp.db import SQL_DIRECTORY

MIGRATIONS_DIRECTORY = SQL_DIRECTORY / "migrations"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
ADVISORY_LOCK_ID = 0x6470705F6D6967  # "dpp_mig"

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The database and the migration files disagree; the message says how."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    path: Path
    sql: str
    sha256: str


def discover(directory: Path = MIGRATIONS_DIRECTORY) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_words.sql")
        sql = path.read_text(encoding="utf-8")
        digest = hashlib.sha256(sql.encode()).hexdigest()
        migrations.append(Migration(path.stem, path, sql, digest))
    versions = [m.version[:4] for m in migrations]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    return migrations


async def recorded(connection: asyncpg.Connection) -> dict[str, str]:
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await connection.fetch("SELECT version, sha256 FROM schema_migrations")
    return {row["version"]: row["sha256"] for row in rows}


def compare_recorded(migrations: list[Migration], applied: dict[str, str]) -> list[str]:
    """Problems with what is recorded: changed files and unknown versions."""
    problems = []
    by_version = {m.version: m for m in migrations}
    for version, digest in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            problems.append(f"{version}: recorded in the database but no such file")
        elif migration.sha256 != digest:
            problems.append(f"{version}: file changed after it was applied")
    return problems


async def apply_migrations(dsn: str, directory: Path = MIGRATIONS_DIRECTORY) -> list[str]:
    """Apply every file not yet recorded, in order; return the versions applied."""
    migrations = discover(directory)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_ID)
        try:
            await connection.execute(CREATE_LEDGER)
            applied = await recorded(connection)
            problems = compare_recorded(migrations, applied)
            if problems:
                raise MigrationError("; ".join(problems))
            done = []
            for migration in migrations:
                if migration.version in applied:
                    continue
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, sha256) VALUES ($1, $2)",
                        migration.version,
                        migration.sha256,
                    )
                done.append(migration.version)
            return done
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    finally:
        await connection.close()
