"""The ASGI app, built from an ``AppContext`` and nothing else.

``build_app(context)`` is the app a replica serves: every route of
``dpp.http.routes`` behind the ``/v1`` gate. ``create_app(context)`` is its
frame (the ops endpoints, ``/admin/actors`` and the ``/docs`` page), which tests fill with routes
and middleware of their own.

Layers, outermost first::

    HttpFront (dpp.http.front: body drain, request context, server span when
      tracing is on, access log, CORS, unhandled errors, the /v1 gate when
      ``api_gate``, the /admin gate — one ASGI layer)
      → inner_middleware (tests only) → HotRoutes (dpp.http.hot_routes: the
      hottest few routes straight to their endpoint) → Router

The front is the app's whole middleware stack: Starlette's own
ServerErrorMiddleware and ExceptionMiddleware are not built, since the front
already renders every exception (a route's ``Problem``, the router's 404 and
405 ``HTTPException``) as a problem.

Every error the stack can produce leaves as ``application/problem+json`` with
``instance`` = the request path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from dpp import tracing
from dpp.context import AppContext
from dpp.http import routes as route_table
from dpp.http.auth import MCP_PATH, ApiGate
from dpp.http.console import console_routes
from dpp.http.docs import docs_routes
from dpp.http.front import HttpFront
from dpp.http.hot_routes import HotRoutes
from dpp.http.mcp import McpEndpoint
from dpp.http.middleware import cors_allowed_origins
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
    app = Starlette(routes=routes, lifespan=lifespan)
    # "/health/" is an unknown path (404), not a redirect: one URL per resource.
    app.router.redirect_slashes = False
    app.state.context = context
    # /openapi.json: every endpoint of DPP (whatever this app mounts), rendered once
    app.state.openapi_body = route_table.openapi_body()
    # The front is the whole stack: it renders every error (Problem and
    # HTTPException included), so Starlette's ServerErrorMiddleware and
    # ExceptionMiddleware, two more layers of send closures, are not built.
    inner: ASGIApp = HotRoutes(app.router, route_table.HOT_PATHS)
    for cls, args, kwargs in reversed(inner_middleware):
        inner = cls(inner, *args, **kwargs)
    app.middleware_stack = HttpFront(
        inner,
        max_body_bytes=settings.max_body_bytes,
        metrics=metrics_for(context.metrics_registry),
        allowed_origins=cors_allowed_origins(settings),
        unavailable_dependency=context.unavailable_dependency,
        api_gate=ApiGate(context.tenancy, context.rate_limiter) if api_gate else None,
        admin_token=settings.admin_token,
        # a server span per request, only when tracing is on
        traced=tracing.enabled(),
    )
    return app
