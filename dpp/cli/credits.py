"""`dpp credits add`: top up a tenant's budget from a shell.

The same transaction as ``POST /admin/tenants/{id}/credits``
(``dpp.money.ledger.credit`` under the same operation id ``credit:<tenant>:<key>``),
so a key used on either side is a replay on the other. The Redis mirror is
credited under the same marker afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio
import asyncpg
import orjson
from redis.exceptions import RedisError

from dpp import ids
from dpp.adapters.postgres import Queries, create_pool
from dpp.adapters.redis import create_redis
from dpp.config import ConfigError, load_settings, require
from dpp.limits import CREDIT_USD_MICROS_MAX
from dpp.money import ledger
from dpp.money.mirror import BudgetMirror
from dpp.runs import idempotency

EXIT_REFUSED = 1
EXIT_CONFIGURATION = 2


class CreditRefused(Exception):
    """An operator error, printed as one line."""


async def add_credits(tenant_id: str, amount_usd_micros: int, key: str) -> dict[str, Any]:
    settings = load_settings(os.environ)
    pool = await create_pool(require(settings.database_url, "DATABASE_URL"), max_size=2)
    redis = create_redis(require(settings.redis_url, "REDIS_URL"))
    try:
        queries = Queries.load()
        operation_id = f"credit:{tenant_id}:{key}"
        try:
            result = await ledger.credit(pool, queries, tenant_id, amount_usd_micros, operation_id)
        except ledger.TenantNotFound:
            raise CreditRefused(f"no tenant {tenant_id}") from None
        except ledger.CreditConflict:
            raise CreditRefused("this idempotency key was used with a different amount") from None
        await BudgetMirror(redis, settings.redis_prefix).credit(
            tenant_id, operation_id, amount_usd_micros
        )
        budget = result.budget
        return {
            "tenant_id": tenant_id,
            "balance_usd_micros": budget.balance_usd_micros,
            "reserved_usd_micros": budget.reserved_usd_micros,
            "available_usd_micros": budget.available_usd_micros,
            "replayed": result.replayed,
        }
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
            await pool.close()


def _fail(message: str, status: int) -> int:
    print("dpp: " + message, file=sys.stderr)
    return status


def command_add(args: argparse.Namespace) -> int:
    if not ids.is_id(args.tenant, "ten"):
        return _fail(f"--tenant: {args.tenant!r} is not a tenant id (ten_...)", EXIT_REFUSED)
    if not args.amount.isdigit() or not 0 < int(args.amount) <= CREDIT_USD_MICROS_MAX:
        return _fail(
            f"--amount: expected a whole number of USD micros from 1 to {CREDIT_USD_MICROS_MAX}",
            EXIT_REFUSED,
        )
    if not idempotency.valid_key(args.idempotency_key):
        return _fail("--idempotency-key: expected 1-255 printable ASCII characters", EXIT_REFUSED)
    try:
        document = anyio.run(
            add_credits, args.tenant, int(args.amount), args.idempotency_key, backend="asyncio"
        )
    except ConfigError as error:
        return _fail(str(error), EXIT_CONFIGURATION)
    except CreditRefused as error:
        return _fail(str(error), EXIT_REFUSED)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError) as error:
        return _fail(f"storage unavailable: {type(error).__name__}", EXIT_REFUSED)
    sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
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
    add.set_defaults(handler=command_add, func=command_add)
