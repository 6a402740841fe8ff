"""The OpenAPI 3.1 document, built from ``OPERATIONS``: one entry per operation, as data.

A test compares ``documented_operations()`` with the routes the app registers,
so a new route cannot ship undocumented. Schemas are JSON Schema 2020-12 (the
OpenAPI 3.1 dialect) and follow SPEC §3 and §6 member for member.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Route

__all__ = [
    "OPERATIONS",
    "Operation",
    "Reply",
    "document",
    "documented_operations",
    "routed_operations",
]

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response: status, what it means, body schema, headers."""

    status: int
    description: str
    schema: str | None = None  # a name in SCHEMAS; None for no body
    headers: tuple[str, ...] = ()  # names in HEADERS
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    security: str | None  # "apiKey", "adminToken", or None (no credentials)
    replies: tuple[Reply, ...]
    parameters: tuple[str, ...] = ()  # names in PARAMETERS
    request_schema: str | None = None
    request_required: bool = True
    description: str | None = None


def problem(status: int, description: str, *headers: str) -> Reply:
    return Reply(status, description, "Problem", headers, PROBLEM_MEDIA_TYPE)


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


USD_MICROS = {"type": "integer", "minimum": 0, "description": "USD micros (1 USD = 1,000,000)."}
USD_MICROS_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
TIMESTAMP = {"type": "string", "format": "date-time"}
TIMESTAMP_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
RUN_STATUSES = [
    "QUEUED",
    "PROCESSING",
    "CLAIMED",
    "COMPLETED",
    "FAILED",
    "EXPIRED",
    "CANCELED",
    "AUDIT_REQUIRED",
]


def _object(
    properties: Mapping[str, Any], required: Iterable[str] = (), **more: Any
) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": list(required), **more}


def _all_required(properties: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    return _object(properties, properties.keys(), **more)


BUDGET_VIEW = {
    "balance_usd_micros": {"type": "integer", "description": "Credits minus charges."},
    "reserved_usd_micros": USD_MICROS,
    "available_usd_micros": USD_MICROS,
}
PLAN = {
    "id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
    "requests_per_minute": {"type": "integer", "minimum": 1},
    "max_concurrent_runs": {"type": "integer", "minimum": 1},
    "retention_days": {"type": "integer", "minimum": 1},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": _object(
        {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
        ["type", "title", "status", "detail", "instance"],
        description="RFC 9457 problem details; extension members vary by type.",
        additionalProperties=True,
    ),
    "RunSubmission": _object(
        {
            "pack_type": {"type": "string"},
            "inputs": {"type": "object", "description": "Checked against the pack's schema."},
            "max_cost_usd_micros": {
                **USD_MICROS,
                "description": "The reservation; the pack's default when omitted.",
            },
            "timebox_sec": {"type": "integer", "minimum": 1, "maximum": 3600},
            "metadata": {"type": "object", "description": "Stored and echoed; {} when omitted."},
        },
        ["pack_type", "inputs"],
    ),
    "RunResult": _all_required(
        {
            "download_url": {"type": "string", "format": "uri"},
            "expires_at": TIMESTAMP,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "bytes": {"type": "integer", "minimum": 0},
            "content_type": {"type": "string"},
        }
    ),
    "Run": _all_required(
        {
            "id": {"type": "string", "pattern": "^run_[0-9A-Za-z]{26}$"},
            "status": {"enum": RUN_STATUSES},
            "pack_type": {"type": "string"},
            "created_at": TIMESTAMP,
            "started_at": TIMESTAMP_OR_NULL,
            "finished_at": TIMESTAMP_OR_NULL,
            "reserved_usd_micros": USD_MICROS,
            "minimum_fee_usd_micros": USD_MICROS,
            "charged_usd_micros": USD_MICROS_OR_NULL,
            "refunded_usd_micros": USD_MICROS_OR_NULL,
            "metadata": {"type": "object"},
            "result": {"oneOf": [_schema("RunResult"), {"type": "null"}]},
            "error": {"oneOf": [_schema("RunError"), {"type": "null"}]},
            "retention_until": TIMESTAMP_OR_NULL,
        },
        description="Every member is always present; null until it applies.",
    ),
    "RunError": _object(
        {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
        ["type", "title", "status", "detail"],
        description="Why a run FAILED or EXPIRED: a problem object.",
        additionalProperties=True,
    ),
    "RunList": _all_required(
        {
            "data": {"type": "array", "items": _schema("Run"), "maxItems": 100},
            "next_cursor": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        }
    ),
    "Plan": _object(
        {**PLAN, "created_at": TIMESTAMP, "updated_at": TIMESTAMP},
        PLAN.keys(),
        additionalProperties=True,
    ),
    "Budget": _all_required({**BUDGET_VIEW, "plan": _schema("Plan")}),
    "BudgetView": _all_required(BUDGET_VIEW),
    "UsageDay": _all_required(
        {
            "date": {"type": "string", "format": "date"},
            "pack_type": {"type": "string"},
            "runs": {"type": "integer", "minimum": 0},
            "completed": {"type": "integer", "minimum": 0},
            "failed": {"type": "integer", "minimum": 0},
            "expired": {"type": "integer", "minimum": 0},
            "canceled": {"type": "integer", "minimum": 0},
            "charged_usd_micros": USD_MICROS,
            "refunded_usd_micros": USD_MICROS,
        }
    ),
    "Usage": _all_required(
        {
            "from": {"type": "string", "format": "date"},
            "to": {"type": "string", "format": "date"},
            "days": {"type": "array", "items": _schema("UsageDay")},
        }
    ),
    "Pack": _all_required(
        {
            "pack_type": {"type": "string"},
            "description": {"type": "string"},
            "input_schema": {"type": "object", "description": "A JSON Schema (2020-12)."},
            "minimum_fee_usd_micros": USD_MICROS,
            "default_reservation_usd_micros": USD_MICROS,
            "max_reservation_usd_micros": USD_MICROS,
            "default_timebox_sec": {"type": "integer", "minimum": 1, "maximum": 3600},
            "pricing": {"type": "object", "description": "How the actual cost is computed."},
        }
    ),
    "PackCatalog": _all_required({"packs": {"type": "array", "items": _schema("Pack")}}),
    "Health": _all_required({"status": {"const": "ok"}}),
    "Readiness": _all_required(
        {
            "status": {"const": "ready"},
            "checks": {"type": "object", "additionalProperties": {"enum": ["ok", "down"]}},
        }
    ),
    "OpenApiDocument": {"type": "object", "description": "This document."},
    "PlanCreate": _all_required(PLAN),
    "TenantCreate": _object(
        {"name": {"type": "string", "minLength": 1}, "plan_id": {"type": "string"}}, ["name"]
    ),
    "Tenant": _object(
        {
            "id": {"type": "string", "pattern": "^ten_[0-9A-Za-z]{26}$"},
            "name": {"type": "string"},
            "plan_id": {"type": "string"},
            "created_at": TIMESTAMP,
            "plan": _schema("Plan"),
        },
        ["id", "name", "plan_id"],
        additionalProperties=True,
    ),
    "ApiKeyCreate": _object(
        {
            "name": {"type": "string"},
            "requests_per_minute": {
                "type": "integer",
                "minimum": 1,
                "description": 'A per-key limit below the plan\'s (policy name "key").',
            },
        }
    ),
    "ApiKeyCreated": _object(
        {
            "id": {"type": "string", "pattern": "^key_[0-9A-Za-z]{26}$"},
            "tenant_id": {"type": "string"},
            "name": {"type": ["string", "null"]},
            "key_hint": {"type": "string", "description": "A few characters to recognise it."},
            "requests_per_minute": {"type": ["integer", "null"], "minimum": 1},
            "created_at": TIMESTAMP,
            "last_used_at": TIMESTAMP_OR_NULL,
            "revoked_at": TIMESTAMP_OR_NULL,
            "api_key": {
                "type": "string",
                "pattern": "^dpp_live_[0-9A-Za-z]{32}_[0-9a-f]{8}$",
                "description": "Shown only in this response; only its SHA-256 is stored.",
            },
        },
        ["id", "api_key"],
        additionalProperties=True,
    ),
    "CreditCreate": _all_required({"amount_usd_micros": {"type": "integer", "minimum": 1}}),
    "BudgetConsistency": _all_required(
        {
            "postgres": _schema("BudgetView"),
            "redis": {
                "oneOf": [_schema("BudgetView"), {"type": "null"}],
                "description": "null while the tenant is not mirrored yet.",
            },
            "consistent": {"type": "boolean"},
        }
    ),
    "ActorNode": _all_required(
        {
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "state": {"type": "string"},
            "mailbox_depth": {"type": "integer", "minimum": 0},
            "restarts": {"type": "integer", "minimum": 0},
            "children": {"type": "array", "items": _schema("ActorNode")},
        }
    ),
    "ReconcileReport": {"type": "object", "description": "What one pass did, by kind."},
    "AuditReport": _object(
        {
            "ok": {"type": "boolean"},
            "violations": {"type": "array", "items": {"type": "object"}},
            "audit_required_runs": {"type": "array", "items": {"type": "object"}},
            "tenants_checked": {"type": "integer", "minimum": 0},
        },
        ["ok", "violations", "audit_required_runs"],
    ),
    "ResolveResult": _all_required(
        {
            "id": {"type": "string", "pattern": "^run_[0-9A-Za-z]{26}$"},
            "status": {"enum": ["COMPLETED", "FAILED"]},
            "charged_usd_micros": USD_MICROS,
            "refunded_usd_micros": USD_MICROS,
        }
    ),
    "ResolveRequest": _all_required(
        {"outcome": {"enum": ["COMPLETED", "FAILED"]}, "charged_usd_micros": USD_MICROS}
    ),
}


def _header(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": dict(schema)}


HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": _header(
        "The request's id: the incoming one when valid, else generated.",
        {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
    ),
    "RateLimit": _header(
        'The tightest policy\'s remaining quota, e.g. "tenant";r=599;t=42.', {"type": "string"}
    ),
    "RateLimit-Policy": _header(
        'The tightest policy, e.g. "tenant";q=600;w=60.', {"type": "string"}
    ),
    "Retry-After": _header("Whole seconds to wait.", {"type": "integer", "minimum": 0}),
    "Location": _header("The created resource's URL.", {"type": "string"}),
    "Idempotent-Replayed": _header("Present (true) on a replayed response.", {"const": "true"}),
    "X-DPP-Cost-Reserved": _header(
        "Reserved USD micros.", {"type": "string", "pattern": "^[0-9]+$"}
    ),
    "X-DPP-Cost-Actual": _header(
        "Charged USD micros, once settled.", {"type": "string", "pattern": "^[0-9]+$"}
    ),
    "X-DPP-Cost-Minimum-Fee": _header(
        "Minimum fee in USD micros.", {"type": "string", "pattern": "^[0-9]+$"}
    ),
    "WWW-Authenticate": _header("The scheme to authenticate with.", {"type": "string"}),
}


def _parameter(
    name: str, where: str, schema: Mapping[str, Any], description: str, **more: Any
) -> dict[str, Any]:
    return {"name": name, "in": where, "schema": dict(schema), "description": description, **more}


ID_SCHEMA = {"type": "string"}
PARAMETERS: dict[str, dict[str, Any]] = {
    "run_id": _parameter("run_id", "path", ID_SCHEMA, "A run id (run_...).", required=True),
    "tenant_id": _parameter(
        "tenant_id", "path", ID_SCHEMA, "A tenant id (ten_...).", required=True
    ),
    "key_id": _parameter("key_id", "path", ID_SCHEMA, "An API key id (key_...).", required=True),
    "Idempotency-Key": _parameter(
        "Idempotency-Key",
        "header",
        {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
        "Replays the stored outcome of an earlier request with the same key (24 h or more).",
    ),
    "Idempotency-Key-Required": _parameter(
        "Idempotency-Key",
        "header",
        {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
        "Required: a replay adds nothing and answers 200 with the original body.",
        required=True,
    ),
    "limit": _parameter(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
        "Page size.",
    ),
    "cursor": _parameter(
        "cursor", "query", {"type": "string"}, "next_cursor of the previous page."
    ),
    "status": _parameter("status", "query", {"enum": RUN_STATUSES}, "Only runs in this state."),
    "from": _parameter(
        "from", "query", {"type": "string", "format": "date"}, "First UTC date (default today-29)."
    ),
    "to": _parameter("to", "query", {"type": "string", "format": "date"}, "Last UTC date (today)."),
    "traceparent": _parameter(
        "traceparent", "header", {"type": "string"}, "W3C trace context; its trace id is logged."
    ),
    "X-Request-ID": _parameter(
        "X-Request-ID",
        "header",
        {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
        "Echoed when valid; replaced by a generated id otherwise.",
    ),
}

RATE_LIMITED = ("RateLimit", "RateLimit-Policy")
RUN_COSTS = ("X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee")

V1 = "apiKey"
ADMIN = "adminToken"

OPERATIONS: tuple[Operation, ...] = (
    # --- tenant API ----------------------------------------------------------------
    Operation(
        "POST",
        "/v1/runs",
        "submitRun",
        "Submit a run",
        "runs",
        V1,
        (
            Reply(
                202,
                "Accepted: the maximum cost is reserved.",
                "Run",
                ("Location", *RUN_COSTS, "Idempotent-Replayed"),
            ),
            problem(402, "Budget short: nothing reserved (available/required members)."),
            problem(409, "The same Idempotency-Key is being processed concurrently."),
            problem(
                422, "Unknown pack, invalid inputs or reservation, or key reuse with another body."
            ),
            problem(503, "Overloaded (a mailbox is full); retry later.", "Retry-After"),
        ),
        parameters=("Idempotency-Key",),
        request_schema="RunSubmission",
    ),
    Operation(
        "GET",
        "/v1/runs",
        "listRuns",
        "List the tenant's runs, newest first",
        "runs",
        V1,
        (
            Reply(200, "A page of runs.", "RunList"),
            problem(422, "An invalid limit, cursor or status."),
        ),
        parameters=("limit", "cursor", "status"),
    ),
    Operation(
        "GET",
        "/v1/runs/{run_id}",
        "getRun",
        "A run's state, costs and result link",
        "runs",
        V1,
        (
            Reply(200, "The run.", "Run", (*RUN_COSTS, "X-DPP-Cost-Actual")),
            problem(404, "No such run for this tenant."),
            problem(410, "Past retention (status, charged and refunded members)."),
        ),
        parameters=("run_id",),
    ),
    Operation(
        "POST",
        "/v1/runs/{run_id}/cancel",
        "cancelRun",
        "Cancel a QUEUED run (full refund)",
        "runs",
        V1,
        (
            Reply(200, "The canceled run (also when it was already canceled).", "Run"),
            problem(404, "No such run for this tenant."),
            problem(409, "The run is not QUEUED."),
        ),
        parameters=("run_id",),
    ),
    Operation(
        "GET",
        "/v1/budget",
        "getBudget",
        "Balance, reserved, available and plan limits",
        "budget",
        V1,
        (Reply(200, "The tenant's budget.", "Budget"),),
    ),
    Operation(
        "GET",
        "/v1/usage",
        "getUsage",
        "Per-day, per-pack counts and money",
        "usage",
        V1,
        (
            Reply(200, "Usage by UTC date of creation.", "Usage"),
            problem(422, "A bad date, from after to, or more than 366 dates."),
        ),
        parameters=("from", "to"),
    ),
    Operation(
        "GET",
        "/v1/packs",
        "listPacks",
        "The pack catalog: input schemas and prices",
        "packs",
        V1,
        (Reply(200, "Every pack this deployment offers.", "PackCatalog"),),
    ),
    # --- operations ----------------------------------------------------------------
    Operation(
        "GET",
        "/health",
        "health",
        "Liveness",
        "operations",
        None,
        (Reply(200, "Serving.", "Health"),),
    ),
    Operation(
        "GET",
        "/readyz",
        "readiness",
        "Readiness of every dependency",
        "operations",
        None,
        (
            Reply(200, "Every dependency answers.", "Readiness"),
            problem(503, "Not ready: `checks` names each dependency ok or down."),
        ),
    ),
    Operation(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus text exposition",
        "operations",
        None,
        (Reply(200, "Metrics (text format 0.0.4).", None, (), "text/plain"),),
    ),
    Operation(
        "GET",
        "/openapi.json",
        "openapi",
        "This document",
        "operations",
        None,
        (Reply(200, "OpenAPI 3.1.", "OpenApiDocument"),),
    ),
    # --- admin -----------------------------------------------------------------------
    Operation(
        "POST",
        "/admin/plans",
        "createPlan",
        "Create a plan",
        "admin",
        ADMIN,
        (
            Reply(201, "The plan.", "Plan"),
            problem(409, "A plan with this id exists."),
            problem(422, "An invalid member."),
        ),
        request_schema="PlanCreate",
    ),
    Operation(
        "POST",
        "/admin/tenants",
        "createTenant",
        "Create a tenant",
        "admin",
        ADMIN,
        (
            Reply(201, "The tenant.", "Tenant", ("Location",)),
            problem(422, "An invalid member or unknown plan_id."),
        ),
        request_schema="TenantCreate",
    ),
    Operation(
        "GET",
        "/admin/tenants/{tenant_id}",
        "getTenant",
        "A tenant and its plan",
        "admin",
        ADMIN,
        (Reply(200, "The tenant.", "Tenant"),),
        parameters=("tenant_id",),
    ),
    Operation(
        "POST",
        "/admin/tenants/{tenant_id}/api-keys",
        "createApiKey",
        "Issue an API key",
        "admin",
        ADMIN,
        (
            Reply(201, "The key, shown only here.", "ApiKeyCreated"),
            problem(422, "An invalid member."),
        ),
        parameters=("tenant_id",),
        request_schema="ApiKeyCreate",
        request_required=False,
    ),
    Operation(
        "DELETE",
        "/admin/api-keys/{key_id}",
        "revokeApiKey",
        "Revoke an API key",
        "admin",
        ADMIN,
        (Reply(204, "Revoked; the key fails at once on every replica."),),
        parameters=("key_id",),
    ),
    Operation(
        "POST",
        "/admin/tenants/{tenant_id}/credits",
        "addCredits",
        "Top up a tenant's budget",
        "admin",
        ADMIN,
        (
            Reply(201, "Credited: the budget.", "BudgetView"),
            Reply(
                200,
                "A replay: nothing added, the original body.",
                "BudgetView",
                ("Idempotent-Replayed",),
            ),
            problem(422, "An invalid amount, or the key reused with another amount."),
        ),
        parameters=("tenant_id", "Idempotency-Key-Required"),
        request_schema="CreditCreate",
    ),
    Operation(
        "GET",
        "/admin/tenants/{tenant_id}/budget",
        "getTenantBudget",
        "A tenant's budget in Postgres and Redis",
        "admin",
        ADMIN,
        (Reply(200, "Both views and whether they agree.", "BudgetConsistency"),),
        parameters=("tenant_id",),
    ),
    Operation(
        "GET",
        "/admin/actors",
        "getActors",
        "The supervision tree",
        "admin",
        ADMIN,
        (Reply(200, "The root supervisor node.", "ActorNode"),),
    ),
    Operation(
        "POST",
        "/admin/reconcile",
        "reconcile",
        "Run one reconciliation pass",
        "admin",
        ADMIN,
        (
            Reply(200, "What the pass did.", "ReconcileReport"),
            problem(503, "The reconciler is not running or did not answer.", "Retry-After"),
        ),
    ),
    Operation(
        "GET",
        "/admin/audit",
        "audit",
        "Prove the money invariants from storage",
        "admin",
        ADMIN,
        (
            Reply(
                200, "ok is false while any violation or AUDIT_REQUIRED run exists.", "AuditReport"
            ),
        ),
    ),
    Operation(
        "POST",
        "/admin/runs/{run_id}/resolve",
        "resolveRun",
        "Settle an AUDIT_REQUIRED run once",
        "admin",
        ADMIN,
        (
            Reply(200, "The settlement: charged and refunded.", "ResolveResult"),
            problem(409, "The run is not AUDIT_REQUIRED."),
            problem(422, "An invalid outcome or charged amount (0 <= charged <= reserved)."),
        ),
        parameters=("run_id",),
        request_schema="ResolveRequest",
    ),
)

TAGS = (
    ("runs", "Submit, inspect, list and cancel runs."),
    ("budget", "The tenant's prepaid budget."),
    ("usage", "Counts and money per day and pack."),
    ("packs", "The catalog of work on offer."),
    ("operations", "Probes, metrics and this document; no credentials."),
    ("admin", "Operator API: DPP_ADMIN_TOKEN."),
)


def _common_problems(operation: Operation) -> list[Reply]:
    """Problems every operation of its kind can answer, added to its own list."""
    common: list[Reply] = []
    if operation.request_schema is not None:
        common += [
            problem(400, "Malformed JSON or body not UTF-8."),
            problem(413, "Body over the limit (DPP_MAX_BODY_BYTES, default 256 KiB)."),
            problem(415, "Content-Type is not application/json."),
            problem(422, "A member is missing or invalid."),
        ]
    if operation.security == V1:
        common += [
            problem(401, "Missing, malformed or revoked API key.", "WWW-Authenticate"),
            problem(429, "Over the rate or concurrent-run limit.", "Retry-After", *RATE_LIMITED),
            problem(503, "Overloaded (an actor mailbox is full); retry later.", "Retry-After"),
        ]
    if operation.security == ADMIN:
        common += [
            problem(401, "Missing or wrong admin token.", "WWW-Authenticate"),
            problem(404, "Unknown resource, or the admin API is not configured."),
        ]
    if (
        "Idempotency-Key" in operation.parameters
        or "Idempotency-Key-Required" in operation.parameters
    ):
        common.append(problem(400, "An invalid (or, where required, missing) Idempotency-Key."))
    common.append(problem(500, "An unexpected error; the body never carries a traceback."))
    return common


def _responses(operation: Operation) -> dict[str, Any]:
    replies: dict[int, Reply] = {}
    for reply in [*operation.replies, *_common_problems(operation)]:
        replies.setdefault(reply.status, reply)  # the operation's own wording wins
    responses: dict[str, Any] = {}
    for status in sorted(replies):
        reply = replies[status]
        headers = ["X-Request-ID", *reply.headers]
        if operation.security == V1 and status != 401:
            headers += [name for name in RATE_LIMITED if name not in headers]
        response: dict[str, Any] = {
            "description": reply.description,
            "headers": {name: _ref("headers", name) for name in headers},
        }
        if reply.schema is not None:
            response["content"] = {reply.media_type: {"schema": _schema(reply.schema)}}
        elif reply.media_type != "application/json":
            response["content"] = {reply.media_type: {"schema": {"type": "string"}}}
        responses[str(status)] = response
    return responses


def _operation_object(operation: Operation) -> dict[str, Any]:
    parameters = [*operation.parameters, "traceparent", "X-Request-ID"]
    document: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
        "parameters": [_ref("parameters", name) for name in parameters],
        "responses": _responses(operation),
        "security": [{operation.security: []}] if operation.security else [],
    }
    if operation.description:
        document["description"] = operation.description
    if operation.request_schema is not None:
        document["requestBody"] = {
            "required": operation.request_required,
            "content": {"application/json": {"schema": _schema(operation.request_schema)}},
        }
    return document


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation_object(
            operation
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "DPP — Decision Pack Platform",
            "version": API_VERSION,
            "description": (
                "Metered agent work against prepaid USD budgets. Amounts are integer USD "
                "micros; every error is RFC 9457 application/problem+json."
            ),
        },
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "parameters": copy.deepcopy(PARAMETERS),
            "headers": copy.deepcopy(HEADERS),
            "securitySchemes": {
                V1: {"type": "http", "scheme": "bearer", "description": "A tenant API key."},
                ADMIN: {"type": "http", "scheme": "bearer", "description": "DPP_ADMIN_TOKEN."},
            },
        },
    }


def documented_operations() -> set[tuple[str, str]]:
    """``{(METHOD, path template)}`` the document describes."""
    return {(operation.method, operation.path) for operation in OPERATIONS}


_CONVERTOR = re.compile(r"\{([^}:]+):[^}]+\}")


def routed_operations(routes: Iterable[BaseRoute]) -> set[tuple[str, str]]:
    """``{(METHOD, path template)}`` the app serves (HEAD, added with GET, left out)."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        assert isinstance(route, Route), f"only plain Routes are documented: {route!r}"
        path = _CONVERTOR.sub(r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, path))
    return found
