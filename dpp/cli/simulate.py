"""`dpp simulate`: the deterministic simulation of the money path (docs/simulation.md).

``dpp simulate --seeds 1000`` runs seeds 0..999; ``--seed S`` replays one seed
(add ``--trace`` to print every step). Exit status 1 on any violation, with
the failing seed printed first so that it can be replayed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from dpp.cli.common import EXIT_FAILURE, fail

EXIT_VIOLATION = 1


def command_simulate(args: argparse.Namespace) -> int:
    try:
        import trio  # noqa: F401  (the simulation's scheduler)
    except ImportError:
        return fail("dpp simulate needs trio: pip install 'dpp[sim]'", EXIT_FAILURE)
    from dpp.sim.simulate import run_seed
    from dpp.sim.world import HOLES, KNOWN_HOLES, SCENARIOS

    scenarios = frozenset(args.scenario or ())
    unknown = scenarios - set(SCENARIOS)
    if unknown:
        return fail(f"--scenario: unknown {sorted(unknown)}; known: {sorted(SCENARIOS)}", 2)
    known = frozenset() if args.strict else KNOWN_HOLES - set(args.fail_on or ())
    if args.seed is not None:
        seeds = [args.seed]
    else:
        seeds = list(range(args.first, args.first + args.seeds))
    started = time.perf_counter()
    failed = 0
    known_seeds: dict[str, int] = {}
    ran = 0
    for seed in seeds:
        if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
            print(f"stopped after {args.max_seconds} s (--max-seconds)")
            break
        result = run_seed(seed, scenarios, known=known, keep_trace=args.trace)
        ran += 1
        if args.trace:
            for line in result.trace:
                print(line)
        for line in result.known_holes:
            hole = line.rsplit("[", 1)[-1].rstrip("]")
            known_seeds.setdefault(hole, seed)
        if args.seed is not None or args.verbose or not result.ok:
            print(
                f"seed {seed} {'ok' if result.ok else 'VIOLATION'} trace {result.digest}"
                f" runs {result.runs} crashes {result.crashes}"
                + (f" known-holes {len(result.known_holes)}" if result.known_holes else "")
            )
        for line in result.violations + (result.known_holes if args.seed is not None else []):
            print(f"  {line}")
        if not result.ok:
            failed += 1
            print(f"  replay: dpp simulate --seed {seed}" + _flags(args), file=sys.stderr)
            if not args.keep_going:
                break
    elapsed = time.perf_counter() - started
    rate = ran / elapsed if elapsed > 0 else 0.0
    print(f"{ran} seeds, {failed} with violations, {rate:.1f} seeds/second")
    for hole, seed in sorted(known_seeds.items()):
        print(f"known hole {hole} ({HOLES[hole]}) first seen at seed {seed}; tolerated")
    return EXIT_VIOLATION if failed else 0


def _flags(args: argparse.Namespace) -> str:
    flags = "".join(f" --scenario {name}" for name in args.scenario or ())
    flags += "".join(f" --fail-on {name}" for name in args.fail_on or ())
    return flags + (" --strict" if args.strict else "")


def register(subparsers: Any) -> None:
    from dpp.sim.world import HOLES, KNOWN_HOLES, SCENARIOS

    parser = subparsers.add_parser(
        "simulate",
        help="deterministic simulation of the money path under faults",
        description="Run the real budget, run, dispatcher and reconciler actors over "
        "in-memory stores, with the seed choosing every interleaving and fault, checking "
        "SPEC §1's invariants after every step. Exit 1 on any violation.",
    )
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="replay this one seed")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="add a fault scenario: "
        + "; ".join(f"{name}: {text}" for name, text in sorted(SCENARIOS.items())),
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"fail on the known holes too ({', '.join(sorted(KNOWN_HOLES))})",
    )
    parser.add_argument(
        "--fail-on",
        action="append",
        choices=sorted(HOLES),
        help="fail on this known hole (repeatable); --strict fails on all",
    )
    parser.add_argument("--trace", action="store_true", help="print every step (with --seed)")
    parser.add_argument(
        "--max-seconds", type=float, help="stop starting seeds after this long (a soak's budget)"
    )
    parser.add_argument("--keep-going", action="store_true", help="do not stop at a failure")
    parser.add_argument("--verbose", action="store_true", help="one line per seed")
    parser.set_defaults(handler=command_simulate)
