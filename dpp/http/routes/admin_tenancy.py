"""Admin routes for plans, tenants and API keys (SPEC §3 "Admin API").

Thin: parse and strictly check the body's *shape* here (a JSON object, no
unknown members, required members present), then hand the values to
``Tenancy``, which checks types and ranges — the same checks the CLI gets.
Typed tenancy errors become problems in one place (``tenancy_problem``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import body_object, json_response, read_json_body
from dpp.http.endpoints import (
    ADMIN_TOKEN,
    KEY_ID,
    TENANT_ID,
    Endpoint,
    Handler,
    Reply,
    problem,
)
from dpp.http.problems import Problem, field_problem
from dpp.tenancy.principal import (
    API_KEY,
    API_KEY_CREATE,
    API_KEY_CREATED,
    API_KEY_UPDATE,
    DEFAULT_PLAN_ID,
    PLAN,
    PLAN_CREATE,
    TENANT,
    TENANT_CREATE,
    ApiKeyNotFound,
    InvalidationNotBroadcast,
    InvalidField,
    PlanExists,
    PlanNotFound,
    TenancyError,
    TenantNotFound,
)
from dpp.tenancy.service import Tenancy

__all__ = ["ENDPOINTS", "tenancy_problem"]

NO_STORE = {"Cache-Control": "no-store"}


def tenancy_problem(error: TenancyError) -> Problem:
    """The problem a typed tenancy error becomes (one mapping for every route)."""
    match error:
        case InvalidField():
            return field_problem(error.field, f"{error.field}: {error.detail}")
        case PlanExists():
            return Problem(409, "plan-exists", str(error))
        case PlanNotFound():
            return field_problem("plan_id", f"plan_id: {error}")
        case TenantNotFound():
            return Problem(404, "not-found", "No tenant with this id.")
        case ApiKeyNotFound():
            return Problem(404, "not-found", "No API key with this id.")
        case InvalidationNotBroadcast():
            return Problem(503, "unavailable", str(error), headers={"Retry-After": "1"})
        case _:
            raise AssertionError(f"unmapped tenancy error {type(error).__name__}")


async def _optional_json_body(request: Request) -> Any:
    """``{}`` for a request with no body at all; otherwise the JSON body (or 4xx)."""
    headers = request.headers
    if (
        "content-type" not in headers
        and headers.get("content-length", "0") == "0"
        and "transfer-encoding" not in headers
    ):
        return {}
    return await read_json_body(request)


def _with_tenancy(call: Callable[[Request, Tenancy], Awaitable[Response]]) -> Handler:
    """Admin check, then the call, with tenancy errors rendered as problems."""

    async def endpoint(request: Request) -> Response:
        require_admin(request)
        context: AppContext = request.app.state.context
        try:
            response: Response = await call(request, context.tenancy)
        except TenancyError as error:
            raise tenancy_problem(error) from None
        return response

    return endpoint


async def create_plan(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(await read_json_body(request), PLAN_CREATE.members, PLAN_CREATE.required)
    plan = await tenancy.create_plan(
        body["id"], body["requests_per_minute"], body["max_concurrent_runs"], body["retention_days"]
    )
    return json_response(plan.document(), status=201)


async def create_tenant(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(await read_json_body(request), TENANT_CREATE.members, TENANT_CREATE.required)
    plan_id = body.get("plan_id")
    tenant = await tenancy.create_tenant(
        body["name"], DEFAULT_PLAN_ID if plan_id is None else plan_id
    )
    return json_response(
        tenant.document(), status=201, headers={"Location": f"/admin/tenants/{tenant.id}"}
    )


async def get_tenant(request: Request, tenancy: Tenancy) -> Response:
    tenant = await tenancy.get_tenant(request.path_params["tenant_id"])
    return json_response(tenant.document())


async def issue_key(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(await _optional_json_body(request), API_KEY_CREATE.members)
    record, key = await tenancy.issue_key_record(
        request.path_params["tenant_id"],
        body.get("name"),
        body.get("requests_per_minute"),
        body.get("spend_limit_usd_micros"),
    )
    document = {**record.document(), "api_key": key}
    # the key is shown only here: no cache anywhere may keep this response
    return json_response(document, status=201, headers=NO_STORE)


async def get_key(request: Request, tenancy: Tenancy) -> Response:
    record = await tenancy.get_api_key(request.path_params["key_id"])
    return json_response(record.document())


async def update_key(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(
        await read_json_body(request), API_KEY_UPDATE.members, API_KEY_UPDATE.required
    )
    record = await tenancy.set_key_spend_limit(
        request.path_params["key_id"], body["spend_limit_usd_micros"]
    )
    return json_response(record.document())


async def revoke_key(request: Request, tenancy: Tenancy) -> Response:
    await tenancy.revoke_key(request.path_params["key_id"])
    return Response(status_code=204)


ENDPOINTS = (
    Endpoint(
        "POST",
        "/admin/plans",
        _with_tenancy(create_plan),
        "createPlan",
        "Create a plan",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(201, "The plan.", PLAN),
            problem(409, "A plan with this id exists."),
            problem(422, "An invalid member."),
        ),
        request=PLAN_CREATE,
        name="admin_create_plan",
    ),
    Endpoint(
        "POST",
        "/admin/tenants",
        _with_tenancy(create_tenant),
        "createTenant",
        "Create a tenant",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(201, "The tenant.", TENANT, ("Location",)),
            problem(422, "An invalid member or unknown plan_id."),
        ),
        request=TENANT_CREATE,
        name="admin_create_tenant",
    ),
    Endpoint(
        "GET",
        "/admin/tenants/{tenant_id}",
        _with_tenancy(get_tenant),
        "getTenant",
        "A tenant and its plan",
        "admin",
        ADMIN_TOKEN,
        (Reply(200, "The tenant.", TENANT), problem(404, "No such tenant.")),
        parameters=(TENANT_ID,),
        name="admin_get_tenant",
    ),
    Endpoint(
        "POST",
        "/admin/tenants/{tenant_id}/api-keys",
        _with_tenancy(issue_key),
        "createApiKey",
        "Issue an API key",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(201, "The key, shown only here.", API_KEY_CREATED),
            problem(404, "No such tenant."),
            problem(422, "An invalid member."),
        ),
        parameters=(TENANT_ID,),
        request=API_KEY_CREATE,
        request_required=False,
        name="admin_issue_api_key",
    ),
    Endpoint(
        "GET",
        "/admin/api-keys/{key_id}",
        _with_tenancy(get_key),
        "getApiKey",
        "An API key: its limits and what it has spent",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(200, "The key view (never the key itself).", API_KEY),
            problem(404, "No such API key."),
        ),
        parameters=(KEY_ID,),
        name="admin_get_api_key",
    ),
    Endpoint(
        "PATCH",
        "/admin/api-keys/{key_id}",
        _with_tenancy(update_key),
        "updateApiKey",
        "Set or remove an API key's spend limit",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(200, "The key view.", API_KEY),
            problem(404, "No such API key, or it is revoked."),
            problem(422, "An invalid member."),
        ),
        parameters=(KEY_ID,),
        request=API_KEY_UPDATE,
        name="admin_update_api_key",
    ),
    Endpoint(
        "DELETE",
        "/admin/api-keys/{key_id}",
        _with_tenancy(revoke_key),
        "revokeApiKey",
        "Revoke an API key",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(204, "Revoked; the key fails at once on every replica."),
            problem(404, "No such API key."),
            problem(
                503,
                "Revoked in storage, but the other replicas could not be told, or a "
                "dependency is unavailable; retry.",
                "Retry-After",
            ),
        ),
        parameters=(KEY_ID,),
        name="admin_revoke_api_key",
    ),
)
