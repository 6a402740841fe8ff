"""`dpp credits add`: top up a tenant's budget from a shell.

Through the same door as ``POST /admin/tenants/{id}/credits``: the tenant's
budget actor (``dpp.actors.budgets.Budgets``), under the same operation id
``credit:<tenant>:<key>``, so a key used on either side is a replay on the
other, and the Redis mirror is credited by the actor as for the API.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import anyio

from dpp import ids
from dpp.actors.budgets import Budgets, CreditUnavailable
from dpp.adapters.postgres import POSTGRES_ERRORS
from dpp.adapters.redis import REDIS_ERRORS
from dpp.cli.common import EXIT_CONFIG, EXIT_FAILURE, fail, open_stores, print_json
from dpp.config import ConfigError, load_settings
from dpp.limits import CREDIT_USD_MICROS_MAX
from dpp.money import ledger
from dpp.money.ledger import LedgerStore
from dpp.runs import idempotency


class CreditRefused(Exception):
    """An operator error, printed as one line."""


async def add_credits(tenant_id: str, amount_usd_micros: int, key: str) -> dict[str, Any]:
    settings = load_settings(os.environ)
    async with open_stores(settings) as stores:
        budgets = Budgets(LedgerStore(stores.pool, stores.queries), stores.mirror)
        outcome: ledger.CreditResult | Exception
        async with anyio.create_task_group() as group:
            await group.start(budgets.run)
            try:
                outcome = await budgets.credit(
                    tenant_id, amount_usd_micros, f"credit:{tenant_id}:{key}"
                )
            except Exception as error:  # raised below, outside the task group
                outcome = error
            finally:
                group.cancel_scope.cancel()
    if isinstance(outcome, ledger.TenantNotFound):
        raise CreditRefused(f"no tenant {tenant_id}")
    if isinstance(outcome, ledger.CreditConflict):
        raise CreditRefused("this idempotency key was used with a different amount")
    if isinstance(outcome, Exception):
        raise outcome
    budget = outcome.budget
    return {
        "tenant_id": tenant_id,
        "balance_usd_micros": budget.balance_usd_micros,
        "reserved_usd_micros": budget.reserved_usd_micros,
        "available_usd_micros": budget.available_usd_micros,
        "replayed": outcome.replayed,
    }


def command_add(args: argparse.Namespace) -> int:
    if not ids.is_id(args.tenant, "ten"):
        return fail(f"--tenant: {args.tenant!r} is not a tenant id (ten_...)", EXIT_FAILURE)
    if not args.amount.isdigit() or not 0 < int(args.amount) <= CREDIT_USD_MICROS_MAX:
        return fail(
            f"--amount: expected a whole number of USD micros from 1 to {CREDIT_USD_MICROS_MAX}",
            EXIT_FAILURE,
        )
    if not idempotency.valid_key(args.idempotency_key):
        return fail("--idempotency-key: expected 1-255 printable ASCII characters", EXIT_FAILURE)
    try:
        document = anyio.run(
            add_credits, args.tenant, int(args.amount), args.idempotency_key, backend="asyncio"
        )
    except ConfigError as error:
        return fail(str(error), EXIT_CONFIG)
    except CreditRefused as error:
        return fail(str(error), EXIT_FAILURE)
    except CreditUnavailable as error:
        # Busy, timed out or crashed: whether it applied is unknown, and the
        # idempotency key makes the retry safe either way.
        return fail(
            f"credit not confirmed ({error}); run the same command again with the same"
            " --idempotency-key: it applies once",
            EXIT_FAILURE,
        )
    except (*POSTGRES_ERRORS, *REDIS_ERRORS) as error:
        return fail(f"storage unavailable: {type(error).__name__}", EXIT_FAILURE)
    print_json(document)
    return 0


def register(subparsers: Any) -> None:
    credits = subparsers.add_parser("credits", help="tenant budgets: top-ups")
    commands = credits.add_subparsers(dest="credits_command", required=True)
    add = commands.add_parser(
        "add",
        help="add credit to a tenant, once per idempotency key",
        description="Add USD micros to a tenant's balance. Re-running with the same "
        "--idempotency-key adds nothing (and says replayed: true).",
    )
    add.add_argument("--tenant", required=True, help="tenant id (ten_...)")
    add.add_argument("--amount", required=True, help="USD micros (1 USD = 1000000)")
    add.add_argument("--idempotency-key", required=True, help="1-255 printable ASCII")
    add.set_defaults(handler=command_add)
