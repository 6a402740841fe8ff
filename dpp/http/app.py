"""The ASGI app, built from an ``AppContext`` and nothing else.

``build_app(context)`` is the app a replica serves: every route of
``dpp.http.routes`` behind the ``/v1`` gate. ``create_app(context)`` is its
frame (the ops endpoints, ``/admin/actors`` and the ``/docs`` page), which tests fill with routes
and middleware of their own.

Layers, outermost first::

    HttpFront (dpp.http.front: body drain, request context, server span when
      tracing is on, access log, CORS, unhandled errors, the /v1 gate when
      ``api_gate``, the /admin gate — one ASGI layer)
      → inner_middleware (tests only) → ExceptionMiddleware (Problem, HTTPException) → Router

Every error the stack can produce leaves as ``application/problem+json`` with
``instance`` = the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp import tracing
from dpp.context import AppContext
from dpp.http import routes as route_table
from dpp.http.auth import MCP_PATH, ApiGate
from dpp.http.console import console_routes
from dpp.http.docs import docs_routes
from dpp.http.front import HttpFront
from dpp.http.mcp import McpEndpoint
from dpp.http.middleware import cors_allowed_origins, problem_from_http_exception
from dpp.http.problems import Problem, internal_error_problem, problem_response
from dpp.metrics import metrics_for

__all__ = ["build_app", "create_app"]


def build_app(context: AppContext) -> Starlette:
    """The whole HTTP front of a replica (SPEC §3): every route, the /v1 gate, the
    MCP server at /mcp (SPEC §7) behind the same gate, and the operator console
    at /console (its own sign-in; 404 without an admin token, like /admin)."""
    mcp = McpEndpoint(context)
    return create_app(
        context,
        extra_routes=[*route_table.api_routes(), Route(MCP_PATH, mcp), *console_routes()],
        lifespan=lambda app: mcp.running(),
        api_gate=True,
    )


def create_app(
    context: AppContext,
    *,
    extra_routes: Sequence[BaseRoute] = (),
    api_gate: bool = False,
    inner_middleware: Sequence[Middleware] = (),
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The frame of the HTTP front: ops routes and ``/admin/actors``, plus
    ``extra_routes``. ``api_gate``: the /v1 and /mcp API-key gate with rate
    limits (``context.tenancy``, ``context.rate_limiter``) runs in the front.
    ``inner_middleware`` runs after the whole front, before routing (a test's
    stand-in for a gate)."""
    settings = context.settings
    # /docs renders /openapi.json in the browser: both belong to every app
    routes = [*route_table.frame_routes(), *docs_routes(), *extra_routes]
    middleware = [
        Middleware(
            HttpFront,
            max_body_bytes=settings.max_body_bytes,
            metrics=metrics_for(context.metrics_registry),
            allowed_origins=cors_allowed_origins(settings),
            unavailable_dependency=context.unavailable_dependency,
            api_gate=ApiGate(context.tenancy, context.rate_limiter) if api_gate else None,
            admin_token=settings.admin_token,
            # a server span per request, only when tracing is on
            traced=tracing.enabled(),
        ),
        *inner_middleware,
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            Problem: _problem_handler,
            HTTPException: _http_exception_handler,
            # Starlette's own outermost ServerErrorMiddleware: unreachable while
            # HttpFront is in place, but it too must speak problem+json.
            Exception: _last_resort_handler,
        },
    )
    # "/health/" is an unknown path (404), not a redirect: one URL per resource.
    app.router.redirect_slashes = False
    app.state.context = context
    # /openapi.json: every endpoint of DPP (whatever this app mounts), rendered once
    app.state.openapi_body = route_table.openapi_body()
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
