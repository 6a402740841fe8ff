"""``create_app``: the ASGI app, built from an ``AppContext`` and nothing else.

Middleware, outermost first (see ``dpp.http.middleware``)::

    RequestContext → AccessLog → CORS → UnhandledError
      → inner_middleware (the /v1 auth layer) → AdminAuth
      → ExceptionMiddleware (Problem, HTTPException) → Router

Every error the stack can produce leaves as ``application/problem+json`` with
``instance`` = the request path. Route modules import ``read_json_body`` and
``json_response`` from here; this module imports them only inside
``create_app``, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from dpp.context import AppContext
from dpp.http.middleware import (
    AccessLogMiddleware,
    CORSMiddleware,
    RequestContextMiddleware,
    UnhandledErrorMiddleware,
    cors_allowed_origins,
    problem_from_http_exception,
)
from dpp.http.problems import Problem, internal_error_problem, problem_response
from dpp.metrics import metrics_for

__all__ = ["JSON_MEDIA_TYPE", "create_app", "json_response", "read_json_body"]

JSON_MEDIA_TYPE = "application/json"
JSON_CHARSETS = frozenset({"utf-8", "utf8"})


def create_app(
    context: AppContext,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    inner_middleware: Sequence[Middleware] = (),
) -> Starlette:
    """The whole HTTP front. ``inner_middleware`` runs after CORS and the error
    layer but before routing: the place for the /v1 auth and rate-limit layers."""
    from dpp.http import admin, ops

    settings = context.settings
    routes = [*ops.routes(context), *admin.routes(context), *extra_routes]
    middleware = [
        Middleware(RequestContextMiddleware),
        Middleware(AccessLogMiddleware, metrics=metrics_for(context.metrics_registry)),
        Middleware(CORSMiddleware, allowed_origins=cors_allowed_origins(settings)),
        Middleware(UnhandledErrorMiddleware),
        *inner_middleware,
        Middleware(admin.AdminAuthMiddleware, admin_token=settings.admin_token),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            Problem: _problem_handler,
            HTTPException: _http_exception_handler,
            # Starlette's own outermost ServerErrorMiddleware: unreachable while
            # UnhandledErrorMiddleware is in place, but it too must speak problem+json.
            Exception: _last_resort_handler,
        },
    )
    # "/health/" is an unknown path (404), not a redirect: one URL per resource.
    app.router.redirect_slashes = False
    app.state.context = context
    return app


async def _problem_handler(request: Request, error: Exception) -> Response:
    assert isinstance(error, Problem)
    return problem_response(error, request.scope["path"])


async def _http_exception_handler(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return problem_response(problem_from_http_exception(error), request.scope["path"])


async def _last_resort_handler(request: Request, error: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id")
    return problem_response(internal_error_problem(request_id), request.scope["path"])


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialized with orjson (datetimes as RFC 3339)."""
    return Response(
        orjson.dumps(data), status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers
    )


async def read_json_body(request: Request, *, max_body_bytes: int | None = None) -> Any:
    """The request's JSON body, or a problem: 415 (not application/json), 413 (over
    ``settings.max_body_bytes``, by Content-Length or while streaming), 400
    (empty, not UTF-8, or not JSON)."""
    if max_body_bytes is None:
        max_body_bytes = request.app.state.context.settings.max_body_bytes
    assert max_body_bytes > 0, max_body_bytes
    _check_content_type(request.headers.get("content-type"))
    too_large = Problem(
        413, "content-too-large", f"The request body is larger than {max_body_bytes} bytes."
    )
    content_length = request.headers.get("content-length")
    if (
        content_length is not None
        and content_length.isdigit()
        and int(content_length) > max_body_bytes
    ):
        raise too_large
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise Problem(400, "malformed-json", "The request body is empty; a JSON value is required.")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Problem(
            400, "malformed-json", f"The request body is not valid UTF-8 (byte {error.start})."
        ) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Problem(
            400,
            "malformed-json",
            f"The request body is not valid JSON (line {error.lineno}, column {error.colno}).",
        ) from None


def _check_content_type(value: str | None) -> None:
    unsupported = Problem(
        415,
        "unsupported-media-type",
        "The request body must be JSON, sent with Content-Type: application/json.",
    )
    if value is None:
        raise unsupported
    media_type, *parameters = value.split(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        raise unsupported
    for parameter in parameters:
        name, _, parameter_value = parameter.partition("=")
        charset = parameter_value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in JSON_CHARSETS:
            raise unsupported
