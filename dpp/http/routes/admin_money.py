"""Admin money routes: credits, a tenant's budget in both stores, audit, resolve."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dpp import ids
from dpp.actors.budgets import CreditUnavailable
from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import body_object, json_response, read_json_body
from dpp.http.endpoints import (
    ADMIN_TOKEN,
    IDEMPOTENCY_KEY_REQUIRED,
    RUN_ID,
    TENANT_ID,
    Endpoint,
    Reply,
    problem,
)
from dpp.http.problems import Problem
from dpp.limits import CREDIT_USD_MICROS_MAX
from dpp.money import ledger
from dpp.money.accounts import BUDGET_VIEW, budget_view
from dpp.money.audit import AUDIT_REPORT
from dpp.money.rules import Outcome, is_amount
from dpp.runs import idempotency
from dpp.runs.documents import RUN
from dpp.runs.service import (
    ChargeAboveReservation,
    RunNotAuditRequired,
    RunNotFound,
    SettlementUnavailable,
)
from dpp.schemas import USD_MICROS, Schema, all_required, integer, nullable

CREDIT_CREATE = Schema(
    "CreditCreate", all_required({"amount_usd_micros": integer(1, CREDIT_USD_MICROS_MAX)})
)
BOTH_STORES = Schema(
    "BudgetConsistency",
    all_required(
        {
            "postgres": BUDGET_VIEW,
            "redis": {
                **nullable(BUDGET_VIEW),
                "description": "null while the tenant is not mirrored yet.",
            },
            "consistent": {"type": "boolean"},
        }
    ),
)
RESOLVE_OUTCOMES = (Outcome.COMPLETED, Outcome.FAILED)
RESOLVE_REQUEST = Schema(
    "ResolveRequest",
    all_required(
        {
            "outcome": {"enum": [outcome.value for outcome in RESOLVE_OUTCOMES]},
            "charged_usd_micros": {
                "type": "integer",
                "minimum": 0,
                "description": "0 <= charged <= the run's reservation.",
            },
        }
    ),
)
RESOLVE_RESULT = Schema(
    "ResolveResult",
    all_required(
        {
            "id": RUN.properties["id"],
            "status": {"enum": [outcome.value for outcome in RESOLVE_OUTCOMES]},
            "charged_usd_micros": USD_MICROS,
            "refunded_usd_micros": USD_MICROS,
        }
    ),
)


def _tenant_not_found() -> Problem:
    return Problem(404, "not-found", "No tenant with this id.")


async def add_credits(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    tenant_id = request.path_params["tenant_id"]
    key = request.headers.get("idempotency-key")
    if key is None:
        raise Problem(
            400,
            "idempotency-key-required",
            "Credits require an Idempotency-Key header, so a retry adds nothing.",
        )
    if not idempotency.valid_key(key):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Idempotency-Key must be 1-255 printable ASCII characters.",
        )
    body = body_object(await read_json_body(request), CREDIT_CREATE.members)
    amount = body.get("amount_usd_micros")
    if not is_amount(amount) or not 0 < amount <= CREDIT_USD_MICROS_MAX:
        raise Problem(
            422,
            "invalid-request",
            f"amount_usd_micros must be an integer from 1 to {CREDIT_USD_MICROS_MAX}.",
            extensions={"field": "amount_usd_micros"},
        )
    if not ids.is_id(tenant_id, "ten"):
        raise _tenant_not_found()
    try:
        result = await context.budgets.credit(tenant_id, amount, f"credit:{tenant_id}:{key}")
    except CreditUnavailable as busy:
        raise Problem(
            503,
            "unavailable",
            "This tenant's budget is busy; retry with the same Idempotency-Key.",
            headers={"Retry-After": str(busy.retry_after_s)},
        ) from None
    except ledger.TenantNotFound:
        raise _tenant_not_found() from None
    except ledger.CreditConflict:
        raise Problem(
            422,
            "idempotency-key-reused",
            "This Idempotency-Key was used with a different amount.",
            extensions={"field": "Idempotency-Key"},
        ) from None
    view = budget_view(result.budget.balance_usd_micros, result.budget.reserved_usd_micros)
    if result.replayed:
        return json_response(view, status=200, headers={idempotency.REPLAYED_HEADER: "true"})
    return json_response(view, status=201)


async def tenant_budget(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    tenant_id = request.path_params["tenant_id"]
    if not ids.is_id(tenant_id, "ten"):
        raise _tenant_not_found()
    try:
        both = await context.accounts.both_stores(tenant_id)
    except ledger.TenantNotFound:
        raise _tenant_not_found() from None
    mirrored = both.redis
    return json_response(
        {
            "postgres": budget_view(
                both.postgres.balance_usd_micros, both.postgres.reserved_usd_micros
            ),
            "redis": None
            if mirrored is None
            else budget_view(mirrored.balance_usd_micros, mirrored.reserved_usd_micros),
            # a tenant not mirrored yet is rebuilt from Postgres before first use
            "consistent": both.consistent,
        }
    )


async def audit(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    report = await context.accounts.audit()
    return json_response(report.as_json())


async def resolve_run(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    run_id = request.path_params["run_id"]
    body = body_object(await read_json_body(request), RESOLVE_REQUEST.members)
    outcome = body.get("outcome")
    if outcome not in RESOLVE_OUTCOMES:
        raise Problem(
            422,
            "invalid-request",
            "outcome must be COMPLETED or FAILED.",
            extensions={"field": "outcome"},
        )
    charged = body.get("charged_usd_micros")
    if not is_amount(charged) or charged < 0:
        raise Problem(
            422,
            "invalid-request",
            "charged_usd_micros must be a non-negative integer.",
            extensions={"field": "charged_usd_micros"},
        )
    try:
        settlement = await context.runs.resolve(run_id, Outcome(outcome), charged)
    except SettlementUnavailable as busy:
        raise Problem(
            503,
            "unavailable",
            "The tenant's budget could not settle it now; retry.",
            headers={"Retry-After": str(busy.retry_after_s)},
        ) from None
    except RunNotFound:
        raise Problem(404, "not-found", "No run with this id.") from None
    except RunNotAuditRequired as refused:
        raise Problem(
            409,
            "run-not-audit-required",
            f"Only an AUDIT_REQUIRED run can be resolved; this one is {refused.status}.",
            extensions={"run_status": refused.status},
        ) from None
    except ChargeAboveReservation as above:
        raise Problem(
            422,
            "invalid-request",
            f"charged_usd_micros must be at most the reservation ({above.reserved_usd_micros}).",
            extensions={"field": "charged_usd_micros"},
        ) from None
    return json_response(
        {
            "id": run_id,
            "status": outcome,
            "charged_usd_micros": settlement.charged_usd_micros,
            "refunded_usd_micros": settlement.refunded_usd_micros,
        }
    )


ENDPOINTS = (
    Endpoint(
        "POST",
        "/admin/tenants/{tenant_id}/credits",
        add_credits,
        "addCredits",
        "Top up a tenant's budget",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(201, "Credited: the budget.", BUDGET_VIEW),
            Reply(
                200,
                "A replay: nothing added, the original body.",
                BUDGET_VIEW,
                ("Idempotent-Replayed",),
            ),
            problem(404, "No such tenant."),
            problem(422, "An invalid amount, or the key reused with another amount."),
            problem(503, "The tenant's budget is busy; retry with the same key.", "Retry-After"),
        ),
        parameters=(TENANT_ID, IDEMPOTENCY_KEY_REQUIRED),
        request=CREDIT_CREATE,
    ),
    Endpoint(
        "GET",
        "/admin/tenants/{tenant_id}/budget",
        tenant_budget,
        "getTenantBudget",
        "A tenant's budget in Postgres and Redis",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(200, "Both views and whether they agree.", BOTH_STORES),
            problem(404, "No such tenant."),
        ),
        parameters=(TENANT_ID,),
    ),
    Endpoint(
        "GET",
        "/admin/audit",
        audit,
        "audit",
        "Prove the money invariants from storage",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(
                200, "ok is false while any violation or AUDIT_REQUIRED run exists.", AUDIT_REPORT
            ),
        ),
    ),
    Endpoint(
        "POST",
        "/admin/runs/{run_id}/resolve",
        resolve_run,
        "resolveRun",
        "Settle an AUDIT_REQUIRED run once",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(200, "The settlement: charged and refunded.", RESOLVE_RESULT),
            problem(404, "No such run."),
            problem(409, "The run is not AUDIT_REQUIRED."),
            problem(422, "An invalid outcome or charged amount (0 <= charged <= reserved)."),
            problem(503, "The tenant's budget could not settle it now; retry.", "Retry-After"),
        ),
        parameters=(RUN_ID,),
        request=RESOLVE_REQUEST,
    ),
)
