"""The `dpp` command: serve, migrate, audit, and the commands of the other modules.

Each subcommand is a ``register(subparsers)`` (or ``register_<name>``) that
adds its parser and sets ``handler``: a callable ``(args) -> int`` (the exit
status). `dpp.cli.dev` adds ``dev``, `dpp.cli.tenancy` ``plan``, ``tenant`` and
``key``, `dpp.cli.credits` ``credits``.

Failures an operator causes or can fix (bad configuration, a dependency that
does not answer, the port in use, migrations that disagree) end as ONE line
on stderr, ``dpp: <message>``, and a non-zero status: 2 for configuration, 1
otherwise. A traceback means a bug in DPP.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from dpp.actors.supervisor import IntensityExceeded
from dpp.adapters import embedded
from dpp.adapters.migrate import MigrationError
from dpp.cli import credits, dev, mcp, processes, simulate, tenancy
from dpp.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Terminated,
    configure_logging,
    install_fallback_sigterm,
    migrate_database,
    open_stores,
    print_json,
    run_async,
    run_server,
    settings_from_environment,
)
from dpp.config import MAX_PROCESSES, ConfigError, Settings, StartupError, require
from dpp.money.audit import run_audit

Handler = Callable[[argparse.Namespace], int | None]


# --- serve ---------------------------------------------------------------------------


def command_serve(args: argparse.Namespace) -> int:
    settings = settings_from_environment()
    if args.processes is not None:
        settings = settings.with_overrides(processes=args.processes)
    configure_logging(settings)
    if settings.processes > 1:
        return processes.run_processes(settings)
    run_async(run_server, settings)
    return EXIT_OK


def _process_count(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_PROCESSES}")
    return int(raw)


def register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run DPP: HTTP API, actors, dispatcher and reconciler in one process",
        description=(
            "Run one DPP replica, configured by environment (see README). Run N of "
            "them behind a load balancer against the same Postgres, Redis and object "
            "storage. SIGTERM drains: stop claiming, finish in-flight work within "
            "DPP_SHUTDOWN_GRACE_SEC, then exit 0."
        ),
    )
    parser.add_argument(
        "--processes",
        type=_process_count,
        metavar="N",
        help=(
            "run N full replicas sharing the port (SO_REUSEPORT), each its own "
            "supervision tree; a crashed one is restarted (default: DPP_PROCESSES or 1)"
        ),
    )
    parser.set_defaults(handler=command_serve)


def command_migrate(args: argparse.Namespace) -> int:
    settings = settings_from_environment()
    configure_logging(settings)
    database_url = require(settings.database_url, "DATABASE_URL")
    if args.check:
        problems = run_async(migrate_database, database_url, True)
        for problem in problems:
            print(problem)
        if problems:
            print(f"dpp: {len(problems)} difference(s) from sql/migrations", file=sys.stderr)
            return EXIT_FAILURE
        print("schema up to date")
        return EXIT_OK
    applied = run_async(migrate_database, database_url, False)
    for migration_version in applied:
        print(f"applied {migration_version}")
    if not applied:
        print("schema up to date: nothing to apply")
    return EXIT_OK


def register_migrate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="apply the SQL migrations in sql/migrations (the release step)",
        description=(
            "Apply each file of sql/migrations not yet recorded in schema_migrations, "
            "in order, each in its own transaction. Replicas may run it at once: an "
            "advisory lock makes them take turns."
        ),
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "change nothing; exit 1 listing every difference between the database and "
            "what the files produce (needs CREATE DATABASE for a scratch copy)"
        ),
    )
    parser.set_defaults(handler=command_migrate)


# --- audit ---------------------------------------------------------------------------


async def _audit(settings: Settings, tenant_id: str | None) -> dict[str, Any]:
    async with open_stores(settings, patient=True) as stores:
        report = await run_audit(stores.pool, stores.queries, stores.mirror, tenant_id=tenant_id)
        return report.as_json()


def command_audit(args: argparse.Namespace) -> int:
    settings = settings_from_environment()
    configure_logging(settings)
    report = run_async(_audit, settings, args.tenant)
    print_json(report)
    return EXIT_OK if report["ok"] else EXIT_FAILURE


def register_audit(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="prove the money invariants from storage; exit 1 on any violation",
        description=(
            "Check SPEC §1's invariants against Postgres and the Redis mirror and print "
            "the report as JSON. Exit 0 when ok, 1 on violations or AUDIT_REQUIRED runs. "
            "Invariant 5 (Redis == Postgres) holds once in-flight operations finish."
        ),
    )
    parser.add_argument("--tenant", metavar="TENANT_ID", help="audit one tenant only")
    parser.set_defaults(handler=command_audit)


# --- the parser and main ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpp",
        description="DPP, the Decision Pack Platform: metered agent work on prepaid budgets.",
    )
    with contextlib.suppress(PackageNotFoundError):  # a bare checkout has no metadata
        parser.add_argument("--version", action="version", version=f"dpp {version('dpp')}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for register in (
        register_serve,
        register_migrate,
        dev.register,
        tenancy.register,
        credits.register,
        register_audit,
        simulate.register,
        mcp.register,
    ):
        register(subparsers)
    return parser


def one_line_failure(error: BaseException) -> tuple[int, str] | None:
    """(exit status, message) when ``error`` is an operator-facing failure."""
    if isinstance(error, BaseExceptionGroup):
        # anyio task groups wrap a child's StartupError; report the first such.
        for inner in error.exceptions:
            found = one_line_failure(inner)
            if found is not None:
                return found
        return None
    if isinstance(error, ConfigError):
        return EXIT_CONFIG, str(error)
    if isinstance(error, MigrationError | embedded.EmbeddedError | StartupError):
        return EXIT_FAILURE, str(error)
    if isinstance(error, IntensityExceeded):
        return EXIT_FAILURE, f"supervisor gave up: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    install_fallback_sigterm()
    try:
        status = handler(args)
    except Terminated:
        return EXIT_OK  # asked to stop, and everything we started has stopped
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseException as error:
        failure = one_line_failure(error)
        if failure is None:
            raise
        exit_status, message = failure
        print(f"dpp: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return exit_status
    return EXIT_OK if status is None else status


if __name__ == "__main__":
    sys.exit(main())
