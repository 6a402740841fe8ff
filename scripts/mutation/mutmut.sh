#!/usr/bin/env bash
# The periodic mutation job over the money path (docs/mutation.md): mutmut over
# the money rules, the ledger, the budget actor and the run actor, capped at
# MUTATION_BUDGET_SEC (default 60 minutes), then the hand-listed SQL/Lua/Python
# guard mutants (scripts/mutation/guards.py). Not part of every CI run.
#
# Needs the suite's services: DPP_TEST_DATABASE_URL / DPP_TEST_REDIS_URL, or
# nothing for the embedded ones. Writes mutants/ (mutmut's scratch tree) and
# prints the surviving mutants; `mutmut show NAME` shows one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source scripts/_venv.sh
dpp_ensure_venv

MUTMUT_VERSION=3.8.1
BUDGET_SEC="${MUTATION_BUDGET_SEC:-3600}"

if ! .venv/bin/python -c "import mutmut" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "mutmut==$MUTMUT_VERSION"
fi

echo "--- mutmut (at most ${BUDGET_SEC}s)" >&2
status=0
timeout --kill-after=30 "$BUDGET_SEC" .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" || status=$?
if [[ $status -eq 124 ]]; then
    echo "mutmut: stopped at the ${BUDGET_SEC}s budget; the next run resumes where this one left off" >&2
fi
.venv/bin/mutmut results || true

echo "--- hand-listed guards" >&2
.venv/bin/python scripts/mutation/guards.py
