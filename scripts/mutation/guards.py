"""Mutate each money guard by hand, in a scratch copy, and check a test notices.

"A guard no test defends is not there." ``guards.toml`` beside this file lists
the guards that protect money — WHERE clauses, CHECK constraints, triggers, Lua
conditions, lease-token and version checks — each as one or more textual edits
that remove or weaken it. For every entry this copies the checkout (tracked and
untracked files, not ``.venv``), applies the edits, runs the entry's tests
against the real services, and calls the mutant

- **killed** when pytest fails (some test noticed),
- **survived** when pytest passes (no test defends the guard),
- **broken** when an edit does not apply (its text is gone: update the list).

Exit status 0 only when every mutant is killed. Run it with the same
environment as the suite (``DPP_TEST_DATABASE_URL`` / ``DPP_TEST_REDIS_URL``,
or nothing for the embedded services)::

    .venv/bin/python scripts/mutation/guards.py            # all of them
    .venv/bin/python scripts/mutation/guards.py --list
    .venv/bin/python scripts/mutation/guards.py --only reaper-version

It is a periodic job (docs/mutation.md), not part of every CI run: each
mutant runs its tests once, a few minutes in all.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("guards.toml")
SKIPPED = {".venv", ".git", "mutants", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
DEFAULT_TIMEOUT_S = 900


@dataclass(frozen=True)
class Edit:
    file: str
    find: str
    replace: str


@dataclass(frozen=True)
class Mutant:
    name: str
    guard: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    mutant: Mutant
    outcome: str  # killed | survived | broken
    seconds: float
    detail: str


def load(path: Path = LIST) -> list[Mutant]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    mutants = []
    for entry in data["mutant"]:
        edits = tuple(Edit(e["file"], e["find"], e["replace"]) for e in entry["edit"])
        mutants.append(Mutant(entry["name"], entry["guard"], edits, tuple(entry["tests"])))
    names = [m.name for m in mutants]
    assert len(names) == len(set(names)), "mutant names are unique"
    return mutants


def scratch_copy(into: Path) -> None:
    """The checkout as it is on disk (uncommitted edits included)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        relative = Path(raw.decode())
        if relative.parts[0] in SKIPPED or not (ROOT / relative).is_file():
            continue
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)


_FUNCTION_HEADER = re.compile(r"CREATE (?:OR REPLACE )?FUNCTION\s+(\w+)\s*\(")


def superseded(edit: Edit, tree: Path) -> str | None:
    """Why mutating ``edit`` would change dead code: it falls inside the body of a
    SQL function that a later migration replaces (``CREATE OR REPLACE``), so the
    database runs the later copy and the mutant could never be noticed."""
    path = tree / edit.file
    if path.parent.name != "migrations" or path.suffix != ".sql":
        return None
    text = path.read_text(encoding="utf-8")
    at = text.find(edit.find)
    headers = [m for m in _FUNCTION_HEADER.finditer(text) if m.start() < at]
    if at < 0 or not headers:
        return None
    header = headers[-1]
    if text.count("$$", header.start(), at) != 1:
        return None  # past that function's body
    name = header.group(1)
    replaced = re.compile(rf"CREATE OR REPLACE FUNCTION\s+{name}\s*\(")
    for later in sorted(path.parent.glob("*.sql")):
        if later.name > path.name and replaced.search(later.read_text(encoding="utf-8")):
            return f"{edit.file}: {name}() is replaced by {later.name}; mutate the live copy"
    return None


def apply(edits: tuple[Edit, ...], tree: Path) -> str | None:
    """Apply every edit; the reason it cannot, if one does not match exactly once
    or would mutate a superseded copy of a SQL function."""
    for edit in edits:
        path = tree / edit.file
        text = path.read_text(encoding="utf-8")
        count = text.count(edit.find)
        if count != 1:
            return f"{edit.file}: the text to mutate occurs {count} times (expected 1)"
        dead = superseded(edit, tree)
        if dead is not None:
            return dead
        path.write_text(text.replace(edit.find, edit.replace), encoding="utf-8")
    return None


def run_one(mutant: Mutant, python: str, timeout_s: int) -> Verdict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dpp-guard-") as scratch:
        tree = Path(scratch)
        scratch_copy(tree)
        problem = apply(mutant.edits, tree)
        if problem is not None:
            return Verdict(mutant, "broken", time.monotonic() - started, problem)
        env = dict(os.environ, PYTHONPATH=str(tree))  # the scratch dpp, not the installed one
        command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        try:
            done = subprocess.run(
                command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return Verdict(mutant, "killed", time.monotonic() - started, "tests timed out")
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return Verdict(mutant, "survived", seconds, last_line(done.stdout))
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.MULTILINE)
    detail = failed[0] if failed else last_line(done.stdout + done.stderr)
    return Verdict(mutant, "killed", seconds, detail)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", action="append", default=[], help="run this mutant (repeatable)")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = load()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            parser.error(f"no such mutant: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}: {mutant.guard}")
        return 0
    python = str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    verdicts = []
    for mutant in mutants:
        verdict = run_one(mutant, python, args.timeout)
        verdicts.append(verdict)
        print(
            f"{verdict.outcome:8} {verdict.seconds:6.1f}s  {mutant.name}  ({verdict.detail})",
            flush=True,
        )
    survivors = [v for v in verdicts if v.outcome != "killed"]
    print(f"{len(verdicts) - len(survivors)} killed, {len(survivors)} not killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
