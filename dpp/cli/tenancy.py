"""`dpp plan|tenant|key ...`: tenancy administration from a shell.

The same validation and the same storage path as the admin API: every
command goes through ``dpp.tenancy.service.Tenancy``. Settings come from the
environment (``DATABASE_URL``, ``REDIS_URL``, ``DPP_REDIS_PREFIX``). A result
is one JSON document on stdout; an error is one line on stderr and a
non-zero exit status (1 for a refused operation or an unreachable service,
2 for bad configuration).

``dpp.cli.main`` calls ``register(subparsers)``; each command's parser carries
``handler(args) -> int`` for it to call.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from dpp.adapters.postgres import POSTGRES_ERRORS
from dpp.adapters.redis import REDIS_ERRORS
from dpp.cli.common import EXIT_CONFIG, EXIT_FAILURE, fail, open_stores, print_json
from dpp.config import ConfigError, load_settings
from dpp.tenancy.principal import DEFAULT_PLAN_ID, InvalidField, TenancyError
from dpp.tenancy.service import Tenancy

__all__ = ["register"]

WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")
# amounts: up to 20 digits, so a value above the limit is refused by its range check
AMOUNT = re.compile(r"[0-9]{1,20}")
NO_LIMIT = "none"

Command = Callable[[Tenancy, argparse.Namespace], Awaitable[Any]]


def _whole_number(text: str | None, field: str) -> int | None:
    """A decimal argument as an int; range checks are Tenancy's, as for the API."""
    if text is None:
        return None
    if WHOLE_NUMBER.fullmatch(text) is None:
        raise InvalidField(field, "expected a whole number")
    return int(text)


def _spend_limit(text: str | None, field: str = "spend_limit_usd_micros") -> int | None:
    """A spend limit argument: whole USD micros, or ``none`` (no limit)."""
    if text is None or text == NO_LIMIT:
        return None
    if AMOUNT.fullmatch(text) is None:
        raise InvalidField(field, "expected a whole number of USD micros, or 'none'")
    return int(text)


async def _with_tenancy(command: Command, args: argparse.Namespace) -> Any:
    settings = load_settings(os.environ)
    async with open_stores(settings) as stores:
        tenancy = Tenancy(stores.pool, stores.queries, stores.redis, settings)
        return await command(tenancy, args)


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            document = anyio.run(_with_tenancy, command, args, backend="asyncio")
        except ConfigError as error:
            return fail(str(error), EXIT_CONFIG)
        except TenancyError as error:
            return fail(str(error), EXIT_FAILURE)
        except (*POSTGRES_ERRORS, *REDIS_ERRORS) as error:
            return fail(f"storage unavailable: {type(error).__name__}: {error}", EXIT_FAILURE)
        print_json(document)
        return 0

    return handler


async def _plan_create(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    plan = await tenancy.create_plan(
        args.id,
        _whole_number(args.rpm, "requests_per_minute"),
        _whole_number(args.max_concurrent, "max_concurrent_runs"),
        _whole_number(args.retention_days, "retention_days"),
    )
    return plan.document()


async def _tenant_create(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    tenant = await tenancy.create_tenant(args.name, args.plan)
    return tenant.document()


async def _tenant_show(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    tenant = await tenancy.get_tenant(args.tenant_id)
    return tenant.document()


async def _key_issue(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    record, key = await tenancy.issue_key_record(
        args.tenant,
        args.name,
        _whole_number(args.rpm, "requests_per_minute"),
        _spend_limit(args.spend_limit),
    )
    return {**record.document(), "api_key": key}


async def _key_limit(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    record = await tenancy.set_key_spend_limit(args.key_id, _spend_limit(args.spend_limit))
    return record.document()


async def _key_show(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    record = await tenancy.get_api_key(args.key_id)
    return record.document()


async def _key_revoke(tenancy: Tenancy, args: argparse.Namespace) -> Any:
    record = await tenancy.revoke_key(args.key_id)
    return record.document()


def _command(
    subparsers: Any, name: str, help_text: str, command: Command
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text)
    handler = _runner(command)
    parser.set_defaults(handler=handler)
    return parser


def register(subparsers: Any) -> None:
    """Add ``plan``, ``tenant`` and ``key`` (with their subcommands) to ``dpp``."""
    plan = subparsers.add_parser("plan", help="plans: rate and concurrency limits, retention")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True)
    create = _command(plan_commands, "create", "create a plan", _plan_create)
    create.add_argument("--id", required=True, help="plan id: 1-63 of [a-z0-9_-]")
    create.add_argument("--rpm", required=True, help="requests per minute per tenant")
    create.add_argument("--max-concurrent", required=True, help="concurrent runs per tenant")
    create.add_argument("--retention-days", required=True, help="days results are kept")

    tenant = subparsers.add_parser("tenant", help="tenants")
    tenant_commands = tenant.add_subparsers(dest="tenant_command", required=True)
    create = _command(tenant_commands, "create", "create a tenant", _tenant_create)
    create.add_argument("--name", required=True)
    create.add_argument("--plan", default=DEFAULT_PLAN_ID, help="plan id (default: default)")
    show = _command(tenant_commands, "show", "a tenant and its plan", _tenant_show)
    show.add_argument("tenant_id")

    key = subparsers.add_parser("key", help="API keys")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    issue = _command(key_commands, "issue", "issue a key (printed once)", _key_issue)
    issue.add_argument("--tenant", required=True, help="tenant id (ten_...)")
    issue.add_argument("--name", default=None)
    issue.add_argument("--rpm", default=None, help="the key's own, lower requests per minute")
    issue.add_argument(
        "--spend-limit",
        default=None,
        help="USD micros the key's runs may spend over its life (default: no limit)",
    )
    limit = _command(
        key_commands, "limit", "set a key's spend limit (or 'none' to remove it)", _key_limit
    )
    limit.add_argument("key_id")
    limit.add_argument("--spend-limit", required=True, help="USD micros, or 'none' for no limit")
    show = _command(key_commands, "show", "a key's limits and what it has spent", _key_show)
    show.add_argument("key_id")
    revoke = _command(key_commands, "revoke", "revoke a key on every replica", _key_revoke)
    revoke.add_argument("key_id")
