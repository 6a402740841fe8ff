"""`dpp migrate`: apply the numbered plain-SQL files of ``sql/migrations``.

Each file runs in its own transaction and is recorded with its SHA-256 in
``schema_migrations``; a recorded file whose text changed afterwards is an
error, never silently re-applied. A session-level advisory lock makes two
replicas' release phases take turns.

`dpp migrate --check` (``check``) answers "is this database what the files
produce?" without trusting the bookkeeping alone: it builds a scratch database
on the same server from the recorded files and compares a normalised
introspection of both (``introspect`` / ``compare_schemas``). Someone's hand
edit in production (an added column, a dropped index, a disabled trigger)
shows up as one line each. The same comparison proves ``sql/schema.sql``
equals the migrations (tests/integration/test_migrate.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg

from dpp.adapters.postgres import SQL_DIRECTORY

MIGRATIONS_DIRECTORY = SQL_DIRECTORY / "migrations"
SCHEMA_FILE = SQL_DIRECTORY / "schema.sql"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
ADVISORY_LOCK_ID = 0x6470705F6D6967  # "dpp_mig"
LEDGER_TABLE = "schema_migrations"
SCRATCH_PREFIX = "dpp_check_"
# A schema gone badly wrong could differ in thousands of ways; the first ones
# say enough, and an operator's terminal is not a log sink.
PROBLEMS_MAX = 200
# Values longer than this (long CHECKs) and function bodies are reported as
# "differs" instead of printing both sides on one line.
VALUE_SHOWN_CHARACTERS_MAX = 240

CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version     TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The database and the migration files disagree; the message says how (one line)."""


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
    exists = await connection.fetchval(f"SELECT to_regclass('{LEDGER_TABLE}') IS NOT NULL")
    if not exists:
        return {}
    rows = await connection.fetch(f"SELECT version, sha256 FROM {LEDGER_TABLE}")
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


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


async def _apply_one(connection: asyncpg.Connection, migration: Migration) -> None:
    async with connection.transaction():
        try:
            await connection.execute(migration.sql)
        except asyncpg.PostgresError as error:
            raise MigrationError(f"{migration.version}: {_one_line(error)}") from error
        await connection.execute(
            f"INSERT INTO {LEDGER_TABLE} (version, sha256) VALUES ($1, $2)",
            migration.version,
            migration.sha256,
        )


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
                await _apply_one(connection, migration)
                done.append(migration.version)
            return done
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_ID)
    finally:
        await connection.close()


# --- the scratch database ------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    """The same server and role, another database (URL form, as config demands)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("dbname", "database")]
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, urlencode(query), parts.fragment))


@contextlib.asynccontextmanager
async def scratch_database(dsn: str) -> AsyncIterator[str]:
    """An empty database on the server of ``dsn``, dropped afterwards even on error.

    Created with the connecting role, so ``--check`` needs no extra credentials,
    only the CREATEDB privilege.
    """
    name = f"{SCRATCH_PREFIX}{secrets.token_hex(6)}"
    assert re.fullmatch(r"[a-z0-9_]+", name)  # interpolated into DDL below
    admin = await asyncpg.connect(dsn)
    try:
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.InsufficientPrivilegeError as error:
            raise MigrationError(
                "DATABASE_URL: --check builds a scratch database and this role may not "
                f"CREATE DATABASE ({_one_line(error)})"
            ) from error
        try:
            yield with_database(dsn, name)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        with anyio.CancelScope(shield=True):
            await admin.close()


# --- introspection -------------------------------------------------------------------

# Only what the migrations own: user schemas, minus extension members and the
# runner's own bookkeeping table.
_USER_SCHEMA = """
    n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
"""
_NOT_EXTENSION_MEMBER = """
    NOT EXISTS (SELECT 1 FROM pg_depend d
                WHERE d.classid = '{catalog}'::regclass AND d.objid = {oid} AND d.deptype = 'e')
"""
_NOT_LEDGER = f"NOT (n.nspname = 'public' AND c.relname = '{LEDGER_TABLE}')"

_SCHEMAS = f"SELECT n.nspname FROM pg_namespace n WHERE {_USER_SCHEMA}"

_EXTENSIONS = "SELECT extname FROM pg_extension"

_RELATIONS = f"""
SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS view_definition,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END AS partition_bound,
       format_type(s.seqtypid, NULL) AS sequence_type, s.seqstart, s.seqincrement,
       s.seqmin, s.seqmax, s.seqcycle
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_sequence s ON s.seqrelid = c.oid
WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND {_NOT_LEDGER}
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_class", oid="c.oid")}
"""

_COLUMNS = f"""
SELECT n.nspname, c.relname, a.attname, a.attnum,
       format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(ad.adbin, ad.adrelid) AS default_expression,
       a.attidentity::text, a.attgenerated::text,
       CASE WHEN a.attcollation <> t.typcollation THEN co.collname END AS collation
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') AND {_NOT_LEDGER}
  AND a.attnum > 0 AND NOT a.attisdropped
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_class", oid="c.oid")}
ORDER BY n.nspname, c.relname, a.attnum
"""

_CONSTRAINTS = f"""
SELECT n.nspname, coalesce(c.relname, t.typname) AS owner, con.conname,
       pg_get_constraintdef(con.oid) AS definition, con.convalidated
FROM pg_constraint con
JOIN pg_namespace n ON n.oid = con.connamespace
LEFT JOIN pg_class c ON c.oid = con.conrelid
LEFT JOIN pg_type t ON t.oid = con.contypid
WHERE {_USER_SCHEMA} AND (c.oid IS NULL OR {_NOT_LEDGER})
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_constraint", oid="con.oid")}
"""

_INDEXES = f"""
SELECT n.nspname, i.relname AS index_name, pg_get_indexdef(x.indexrelid) AS definition,
       x.indisvalid
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class c ON c.oid = x.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {_USER_SCHEMA} AND {_NOT_LEDGER}
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_class", oid="c.oid")}
"""

_TRIGGERS = f"""
SELECT n.nspname, c.relname, tg.tgname, pg_get_triggerdef(tg.oid) AS definition,
       tg.tgenabled::text
FROM pg_trigger tg
JOIN pg_class c ON c.oid = tg.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {_USER_SCHEMA} AND NOT tg.tgisinternal AND {_NOT_LEDGER}
"""

_FUNCTIONS = f"""
SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
       p.prokind::text,
       CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END AS definition
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {_USER_SCHEMA} AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_proc", oid="p.oid")}
"""

_TYPES = f"""
SELECT n.nspname, t.typname, t.typtype::text,
       (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
        FROM pg_enum e WHERE e.enumtypid = t.oid) AS labels,
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS base,
       t.typnotnull, t.typdefault
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE {_USER_SCHEMA} AND t.typtype IN ('e', 'd')
  AND {_NOT_EXTENSION_MEMBER.format(catalog="pg_type", oid="t.oid")}
"""

_POLICIES = f"""
SELECT schemaname AS nspname, tablename, policyname, permissive, roles, cmd, qual, with_check
FROM pg_policies n
WHERE n.schemaname NOT IN ('pg_catalog', 'information_schema')
  AND NOT (n.schemaname = 'public' AND n.tablename = '{LEDGER_TABLE}')
"""

_RELATION_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "S": "sequence",
    "f": "foreign table",
    "c": "composite type",
}


@dataclass(frozen=True, slots=True)
class Schema:
    """A normalised picture of a database's schema.

    ``objects`` maps a stable key ("index public.runs_queued") to a one-line
    description; ``column_order`` keeps each relation's column names in order,
    compared separately so one moved column is one problem, not one per column.
    """

    objects: Mapping[str, str]
    column_order: Mapping[str, tuple[str, ...]]


def _squash(text: str | None) -> str:
    """Whitespace-insensitive form: reformatting a body is not a schema change."""
    return " ".join((text or "").split())


def _name(schema: str, *parts: str) -> str:
    return ".".join((schema, *parts))


async def introspect(connection: asyncpg.Connection) -> Schema:
    """Read the schema the migrations own, normalised so two databases compare."""
    objects: dict[str, str] = {}
    column_order: dict[str, list[str]] = {}

    for row in await connection.fetch(_SCHEMAS):
        objects[f"schema {row['nspname']}"] = "present"
    for row in await connection.fetch(_EXTENSIONS):
        objects[f"extension {row['extname']}"] = "installed"
    for row in await connection.fetch(_RELATIONS):
        kind = _RELATION_KINDS[row["relkind"]]
        details = [kind]
        if row["relpersistence"] == "u":
            details.append("UNLOGGED")
        if row["relrowsecurity"]:
            details.append("ROW LEVEL SECURITY")
        if row["view_definition"] is not None:
            details.append(f"AS {_squash(row['view_definition'])}")
        if row["partition_key"] is not None:
            details.append(f"PARTITION BY {row['partition_key']}")
        if row["partition_bound"] is not None:
            details.append(row["partition_bound"])
        if row["sequence_type"] is not None:
            details.append(
                f"{row['sequence_type']} START {row['seqstart']} INCREMENT {row['seqincrement']}"
                f" MINVALUE {row['seqmin']} MAXVALUE {row['seqmax']}"
                + (" CYCLE" if row["seqcycle"] else "")
            )
        objects[f"{kind} {_name(row['nspname'], row['relname'])}"] = " ".join(details)
    for row in await connection.fetch(_COLUMNS):
        relation = _name(row["nspname"], row["relname"])
        column_order.setdefault(relation, []).append(row["attname"])
        details = [row["type"]]
        if row["collation"] is not None:
            details.append(f'COLLATE "{row["collation"]}"')
        details.append("NOT NULL" if row["attnotnull"] else "NULL")
        if row["attidentity"]:
            details.append(
                "GENERATED ALWAYS AS IDENTITY"
                if row["attidentity"] == "a"
                else "GENERATED BY DEFAULT AS IDENTITY"
            )
        elif row["attgenerated"]:
            details.append(f"GENERATED ALWAYS AS ({row['default_expression']}) STORED")
        elif row["default_expression"] is not None:
            details.append(f"DEFAULT {row['default_expression']}")
        objects[f"column {relation}.{row['attname']}"] = " ".join(details)
    for row in await connection.fetch(_CONSTRAINTS):
        definition = _squash(row["definition"])
        if not row["convalidated"]:
            definition += " NOT VALID"
        objects[f"constraint {_name(row['nspname'], row['owner'], row['conname'])}"] = definition
    for row in await connection.fetch(_INDEXES):
        definition = _squash(row["definition"])
        if not row["indisvalid"]:
            definition += " [INVALID]"
        objects[f"index {_name(row['nspname'], row['index_name'])}"] = definition
    for row in await connection.fetch(_TRIGGERS):
        definition = _squash(row["definition"])
        if row["tgenabled"] == "D":
            definition += " [DISABLED]"
        elif row["tgenabled"] in ("R", "A"):
            definition += f" [ENABLED {'REPLICA' if row['tgenabled'] == 'R' else 'ALWAYS'}]"
        objects[f"trigger {_name(row['nspname'], row['relname'], row['tgname'])}"] = definition
    for row in await connection.fetch(_FUNCTIONS):
        key = f"function {_name(row['nspname'], row['proname'])}({row['arguments']})"
        objects[key] = _squash(row["definition"]) or {"a": "aggregate", "w": "window"}.get(
            row["prokind"], row["prokind"]
        )
    for row in await connection.fetch(_TYPES):
        key = f"type {_name(row['nspname'], row['typname'])}"
        if row["typtype"] == "e":
            objects[key] = "ENUM (" + ", ".join(row["labels"] or []) + ")"
        else:
            details = [f"DOMAIN {row['base']}"]
            if row["typnotnull"]:
                details.append("NOT NULL")
            if row["typdefault"] is not None:
                details.append(f"DEFAULT {row['typdefault']}")
            objects[key] = " ".join(details)
    for row in await connection.fetch(_POLICIES):
        key = f"policy {_name(row['nspname'], row['tablename'], row['policyname'])}"
        objects[key] = _squash(
            f"{row['permissive']} FOR {row['cmd']} TO {','.join(row['roles'])}"
            f" USING ({row['qual']}) WITH CHECK ({row['with_check']})"
        )
    return Schema(objects, {name: tuple(columns) for name, columns in column_order.items()})


def _shown(value: str) -> str:
    return value if len(value) <= VALUE_SHOWN_CHARACTERS_MAX else ""


def compare_schemas(live: Schema, expected: Schema) -> list[str]:
    """One line per difference between ``live`` and what the files produce."""
    problems = []
    for key in sorted(live.objects.keys() | expected.objects.keys()):
        have, want = live.objects.get(key), expected.objects.get(key)
        if have == want:
            continue
        if want is None:
            problems.append(f"{key}: in the database but not in the migrations ({have})")
        elif have is None:
            problems.append(f"{key}: missing from the database (want {want})")
        elif _shown(have) and _shown(want) and not key.startswith("function "):
            problems.append(f"{key}: database has {have}; migrations give {want}")
        else:
            problems.append(f"{key}: definition differs from the migrations")
    for relation in sorted(live.column_order.keys() & expected.column_order.keys()):
        shared = set(live.column_order[relation]) & set(expected.column_order[relation])
        have_order = [c for c in live.column_order[relation] if c in shared]
        want_order = [c for c in expected.column_order[relation] if c in shared]
        if have_order != want_order:
            problems.append(
                f"columns of {relation}: database order {', '.join(have_order)}; "
                f"migrations give {', '.join(want_order)}"
            )
    return problems


# --- check ---------------------------------------------------------------------------


async def introspect_url(dsn: str) -> Schema:
    connection = await asyncpg.connect(dsn)
    try:
        return await introspect(connection)
    finally:
        await connection.close()


async def check(dsn: str, directory: Path = MIGRATIONS_DIRECTORY) -> list[str]:
    """Every way the database at ``dsn`` differs from what the files produce (empty = OK).

    Reports changed or unknown recorded versions, files not applied yet, and
    drift of the live schema from a scratch database built from the files the
    live one records as applied (so a pending file is one line, not a diff).
    """
    migrations = discover(directory)
    connection = await asyncpg.connect(dsn)
    try:
        applied = await recorded(connection)
        live = await introspect(connection)
    finally:
        await connection.close()
    problems = compare_recorded(migrations, applied)
    problems += [
        f"{m.version}: not applied yet (run `dpp migrate`)"
        for m in migrations
        if m.version not in applied
    ]
    async with scratch_database(dsn) as scratch_dsn:
        scratch = await asyncpg.connect(scratch_dsn)
        try:
            await scratch.execute(CREATE_LEDGER)
            for migration in migrations:
                if migration.version in applied:
                    await _apply_one(scratch, migration)
            expected = await introspect(scratch)
        except MigrationError as error:
            return [*problems, f"{error} (on an empty scratch database)"]
        finally:
            await scratch.close()
    problems += compare_schemas(live, expected)
    if len(problems) > PROBLEMS_MAX:
        hidden = len(problems) - PROBLEMS_MAX
        problems = [*problems[:PROBLEMS_MAX], f"... and {hidden} more differences"]
    return problems
