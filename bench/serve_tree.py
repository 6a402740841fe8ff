"""Serve another source tree's DPP, for a before/after table in one run.

``bench_ratios.py`` serves DPP with ``python $DPP_BENCH_SERVE`` when that is
set; pointing it here with ``DPP_TREE=/path/to/tree`` serves that tree's
``dpp serve`` (its code, this environment's packages), e.g. a worktree of the
commit before a change::

    git worktree add --detach /tmp/dpp-base <commit>
    DPP_TREE=/tmp/dpp-base DPP_BENCH_SERVE=bench/serve_tree.py \\
        .venv/bin/python bench/bench_ratios.py --no-echo

The database is migrated by this tree's ``bench_ratios.py``: a tree older than
the newest migration runs on a schema with objects it does not use.
"""

from __future__ import annotations

import os
import sys

tree = os.environ["DPP_TREE"]
sys.path.insert(0, tree)

from dpp.cli.main import main  # noqa: E402 - imported from DPP_TREE

sys.exit(main(["serve"]))
