"""The hand-listed money guards (scripts/mutation/guards.toml) still point at
live code: each mutant's text occurs exactly once in its file, and none falls
inside a SQL function that a later migration replaces. Otherwise a mutant
mutates dead code and "survives" for no reason a guard run would tell apart
from an undefended guard (0005 replacing 0004's ledger_entries_apply() did
that to entry-matches-run). Cheap and static: the mutants themselves run in
the mutation job (scripts/mutation/guards.py), not here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _guards() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dpp_mutation_guards", ROOT / "scripts" / "mutation" / "guards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


GUARDS = _guards()
MUTANTS = GUARDS.load()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_every_mutant_targets_live_code(mutant) -> None:
    for edit in mutant.edits:
        text = (ROOT / edit.file).read_text(encoding="utf-8")
        assert text.count(edit.find) == 1, (edit.file, edit.find)
        assert GUARDS.superseded(edit, ROOT) is None
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), test


def test_a_mutant_of_a_replaced_function_is_called_dead(tmp_path: Path) -> None:
    migrations = tmp_path / "sql" / "migrations"
    migrations.mkdir(parents=True)
    (migrations / "0001_a.sql").write_text(
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN IF x THEN RAISE EXCEPTION 'rule'; END IF; END $$;\n"
        "CREATE TABLE t (a int CHECK (a > 0));\n"
    )
    (migrations / "0002_b.sql").write_text(
        "CREATE OR REPLACE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN END $$;\n"
    )
    inside = GUARDS.Edit("sql/migrations/0001_a.sql", "IF x THEN", "IF false THEN")
    after = GUARDS.Edit("sql/migrations/0001_a.sql", "CHECK (a > 0)", "CHECK (true)")
    assert "replaced by 0002_b.sql" in GUARDS.superseded(inside, tmp_path)
    assert GUARDS.superseded(after, tmp_path) is None
