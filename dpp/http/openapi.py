"""The OpenAPI 3.1 document, rendered from the endpoints the app routes.

Nothing here is hand-kept: the operations are the route modules' ``Endpoint``s
(``dpp.http.routes.ENDPOINTS``), their bodies the ``dpp.schemas.Schema``
objects that the validators read their members from and the renderers assert
against, their bounds ``dpp.limits``. What this module adds is what every
operation of a kind shares (the problems any /v1 or admin request can get,
the headers every answer carries) and the document's frame. Schemas are JSON
Schema 2020-12, the OpenAPI 3.1 dialect.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from starlette.routing import BaseRoute, Route

from dpp.http.endpoints import (
    ADMIN_TOKEN,
    API_KEY,
    IDEMPOTENCY_KEY,
    IDEMPOTENCY_KEY_REQUIRED,
    TRACEPARENT,
    X_REQUEST_ID,
    Endpoint,
    Parameter,
    Reply,
    problem,
)
from dpp.limits import IDEMPOTENCY_KEY_CHARS_MAX
from dpp.schemas import Components

__all__ = ["HEADERS", "document", "documented_operations", "routed_operations"]

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"


def _header(description: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": dict(schema)}


DECIMAL = {"type": "string", "pattern": "^[0-9]+$"}
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": _header(
        "The request's id: the incoming one when valid, else generated.",
        X_REQUEST_ID.schema,
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
    "X-DPP-Cost-Reserved": _header("Reserved USD micros.", DECIMAL),
    "X-DPP-Cost-Actual": _header("Charged USD micros, once settled.", DECIMAL),
    "X-DPP-Cost-Minimum-Fee": _header("Minimum fee in USD micros.", DECIMAL),
    "WWW-Authenticate": _header("The scheme to authenticate with.", {"type": "string"}),
    "Content-Range": _header(
        "The part sent (bytes 0-99/1000), or the size when none could be (bytes */1000).",
        {"type": "string"},
    ),
}
RATE_LIMITED = ("RateLimit", "RateLimit-Policy")
COMMON_PARAMETERS = (TRACEPARENT, X_REQUEST_ID)

TAGS = (
    ("runs", "Submit, inspect, list and cancel runs."),
    ("budget", "The tenant's prepaid budget."),
    ("usage", "Counts and money per day and pack."),
    ("packs", "The catalog of work on offer."),
    ("operations", "Probes, metrics and this document; no credentials."),
    ("admin", "Operator API: DPP_ADMIN_TOKEN."),
)
SECURITY_SCHEMES = {
    API_KEY: {"type": "http", "scheme": "bearer", "description": "A tenant API key."},
    ADMIN_TOKEN: {"type": "http", "scheme": "bearer", "description": "DPP_ADMIN_TOKEN."},
}


UNAVAILABLE = (
    "A dependency (Postgres, Redis, object storage, SQS) or, under /v1, authentication "
    "or rate limiting is unavailable; nothing was done. Retry after Retry-After seconds."
)


def common_problems(endpoint: Endpoint) -> list[Reply]:
    """What every endpoint of its kind can answer besides its own replies: the
    body checks (``dpp.http.bodies``), the /v1 gate and the admin gate
    (``dpp.http.auth``), the idempotency header, the 503 of an unavailable
    dependency and the last-resort 500."""
    common: list[Reply] = []
    if endpoint.request is not None:
        common += [
            problem(400, "Malformed JSON or body not UTF-8."),
            problem(413, "Body over the limit (DPP_MAX_BODY_BYTES, default 256 KiB)."),
            problem(415, "Content-Type is not application/json."),
            problem(422, "A member is missing, unknown or invalid."),
        ]
    if endpoint.security == API_KEY:
        common += [
            problem(401, "Missing, malformed or revoked API key.", "WWW-Authenticate"),
            problem(429, "Over the rate limit.", "Retry-After", *RATE_LIMITED),
        ]
    if endpoint.security == ADMIN_TOKEN:
        common += [
            problem(401, "Missing or wrong admin token.", "WWW-Authenticate"),
            problem(404, "Unknown resource, or the admin API is not configured."),
        ]
    if any(p in (IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_REQUIRED) for p in endpoint.parameters):
        common.append(
            problem(
                400,
                f"An invalid (or, where required, missing) Idempotency-Key "
                f"(1-{IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII).",
            )
        )
    if endpoint.security is not None:
        # dpp.http.middleware.problem_for_error: a lost, refused or timed-out
        # Postgres, Redis, object storage or SQS connection (or no free pooled one)
        common.append(problem(503, UNAVAILABLE, "Retry-After"))
    common.append(problem(500, "An unexpected error; the body never carries a traceback."))
    return common


def replies(endpoint: Endpoint) -> list[Reply]:
    """Every documented answer of ``endpoint``, its own wording first."""
    by_status: dict[int, Reply] = {}
    for reply in [*endpoint.replies, *common_problems(endpoint)]:
        by_status.setdefault(reply.status, reply)
    return [by_status[status] for status in sorted(by_status)]


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _responses(endpoint: Endpoint, components: Components) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for reply in replies(endpoint):
        headers = ["X-Request-ID", *reply.headers]
        if endpoint.security == API_KEY and reply.status != 401:
            headers += [name for name in RATE_LIMITED if name not in headers]
        assert set(headers) <= HEADERS.keys(), (endpoint.operation_id, headers)
        response: dict[str, Any] = {
            "description": reply.description,
            "headers": {name: _ref("headers", name) for name in headers},
        }
        if reply.schema is not None:
            schema = components.render(reply.schema)
            response["content"] = {reply.media_type: {"schema": schema}}
        elif reply.media_type != "application/json":
            response["content"] = {reply.media_type: {"schema": {"type": "string"}}}
        responses[str(reply.status)] = response
    return responses


def _operation(
    endpoint: Endpoint, components: Components, parameters: dict[str, Any]
) -> dict[str, Any]:
    references = []
    for parameter in [*endpoint.parameters, *COMMON_PARAMETERS]:
        name = _parameter_name(parameter)
        known = parameters.setdefault(name, parameter.document())
        assert known == parameter.document(), f"two parameters named {name}"
        references.append(_ref("parameters", name))
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "parameters": references,
        "responses": _responses(endpoint, components),
        "security": [{endpoint.security: []}] if endpoint.security else [],
    }
    if endpoint.description:
        operation["description"] = endpoint.description
    if endpoint.request is not None:
        operation["requestBody"] = {
            "required": endpoint.request_required,
            "content": {"application/json": {"schema": components.render(endpoint.request)}},
        }
    return operation


def _parameter_name(parameter: Parameter) -> str:
    """The component name: the header's own name, or "<name>" (path, query);
    a required variant of a header gets its own."""
    if parameter.location == "header" and parameter.required:
        return f"{parameter.name}-Required"
    return parameter.name


def document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints`` (a fresh dict each call)."""
    components = Components()
    parameters: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for endpoint in endpoints:
        assert endpoint.operation_id not in operation_ids, endpoint.operation_id
        operation_ids.add(endpoint.operation_id)
        item = paths.setdefault(endpoint.path, {})
        assert endpoint.method.lower() not in item, (endpoint.method, endpoint.path)
        item[endpoint.method.lower()] = _operation(endpoint, components, parameters)
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
            "schemas": dict(sorted(components.schemas.items())),
            "parameters": dict(sorted(parameters.items())),
            "headers": {name: dict(header) for name, header in HEADERS.items()},
            "securitySchemes": {name: dict(scheme) for name, scheme in SECURITY_SCHEMES.items()},
        },
    }


def documented_operations(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    """``{(METHOD, path template)}`` a rendered document describes."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


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
