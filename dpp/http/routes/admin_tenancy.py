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
from starlette.routing import BaseRoute, Route

from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import body_object, json_response, read_json_body
from dpp.http.problems import Problem, field_problem
from dpp.tenancy.principal import (
    DEFAULT_PLAN_ID,
    ApiKeyNotFound,
    InvalidationNotBroadcast,
    InvalidField,
    PlanExists,
    PlanNotFound,
    TenancyError,
    TenantNotFound,
)
from dpp.tenancy.service import Tenancy

__all__ = ["routes", "tenancy_problem"]

PLAN_MEMBERS = ("id", "requests_per_minute", "max_concurrent_runs", "retention_days")
TENANT_MEMBERS = ("name", "plan_id")
KEY_MEMBERS = ("name", "requests_per_minute")
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


def _handler(
    context: AppContext, call: Callable[[Request, Tenancy], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Admin check, then the call, with tenancy errors rendered as problems."""

    async def endpoint(request: Request) -> Response:
        require_admin(request)
        tenancy = context.tenancy
        assert isinstance(tenancy, Tenancy), "AppContext.tenancy is not wired"
        try:
            response: Response = await call(request, tenancy)
        except TenancyError as error:
            raise tenancy_problem(error) from None
        return response

    return endpoint


async def create_plan(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(await read_json_body(request), PLAN_MEMBERS, PLAN_MEMBERS)
    plan = await tenancy.create_plan(
        body["id"], body["requests_per_minute"], body["max_concurrent_runs"], body["retention_days"]
    )
    return json_response(plan.document(), status=201)


async def create_tenant(request: Request, tenancy: Tenancy) -> Response:
    body = body_object(await read_json_body(request), TENANT_MEMBERS, ("name",))
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
    body = body_object(await _optional_json_body(request), KEY_MEMBERS)
    record, key = await tenancy.issue_key_record(
        request.path_params["tenant_id"], body.get("name"), body.get("requests_per_minute")
    )
    document = {**record.document(), "api_key": key}
    # the key is shown only here: no cache anywhere may keep this response
    return json_response(document, status=201, headers=NO_STORE)


async def revoke_key(request: Request, tenancy: Tenancy) -> Response:
    await tenancy.revoke_key(request.path_params["key_id"])
    return Response(status_code=204)


def routes(context: AppContext) -> list[BaseRoute]:
    """The tenancy admin routes; ``context.tenancy`` must be a ``Tenancy``."""
    assert isinstance(context.tenancy, Tenancy), "AppContext.tenancy is not wired"
    return [
        Route(
            "/admin/plans",
            _handler(context, create_plan),
            methods=["POST"],
            name="admin_create_plan",
        ),
        Route(
            "/admin/tenants",
            _handler(context, create_tenant),
            methods=["POST"],
            name="admin_create_tenant",
        ),
        Route(
            "/admin/tenants/{tenant_id}",
            _handler(context, get_tenant),
            methods=["GET"],
            name="admin_get_tenant",
        ),
        Route(
            "/admin/tenants/{tenant_id}/api-keys",
            _handler(context, issue_key),
            methods=["POST"],
            name="admin_issue_api_key",
        ),
        Route(
            "/admin/api-keys/{key_id}",
            _handler(context, revoke_key),
            methods=["DELETE"],
            name="admin_revoke_api_key",
        ),
    ]
