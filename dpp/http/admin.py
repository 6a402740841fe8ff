"""Admin API auth and the endpoints that need nothing but the context.

``Authorization: Bearer <DPP_ADMIN_TOKEN>``, compared in constant time. With no
token configured (unset or empty) the whole ``/admin`` tree answers the same
404 as an unknown path, so a replica without admin access does not even reveal
that it has an admin API. A missing or wrong token is ``401`` with
``WWW-Authenticate: Bearer``.

``AdminAuthMiddleware`` guards every ``/admin`` path before routing (so a wrong
method or an unknown admin path is not answered to strangers either);
``require_admin`` is the same check for a handler to call as well.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dpp.context import AppContext
from dpp.http.app import json_response
from dpp.http.problems import Problem, not_found_problem, problem_response

__all__ = ["ADMIN_PREFIX", "AdminAuthMiddleware", "admin_problem", "require_admin", "routes"]

ADMIN_PREFIX = "/admin"
AUTHORIZATION_CHARS_MAX = 4_096  # far above any token; bounds the comparison


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def admin_problem(admin_token: str | None, authorization: str | None) -> Problem | None:
    """Why this Authorization value may not use the admin API (None when it may)."""
    if not admin_token:
        return not_found_problem()
    unauthorized = Problem(
        401,
        "unauthorized",
        "A valid admin token is required (Authorization: Bearer <token>).",
        headers={"WWW-Authenticate": "Bearer"},
    )
    if not authorization or len(authorization) > AUTHORIZATION_CHARS_MAX:
        return unauthorized
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return unauthorized
    # header values arrive latin-1 decoded: encoding back gives the bytes as sent
    presented = credentials.strip().encode("latin-1", "replace")
    if not hmac.compare_digest(presented, admin_token.encode("utf-8")):
        return unauthorized
    return None


def require_admin(request: Request) -> None:
    """Raise the 404 or 401 problem unless the request carries the admin token."""
    admin_token = request.app.state.context.settings.admin_token
    problem = admin_problem(admin_token, request.headers.get("authorization"))
    if problem is not None:
        raise problem


class AdminAuthMiddleware:
    """Answers every ``/admin`` request that lacks the admin token, before routing."""

    def __init__(self, app: ASGIApp, admin_token: str | None) -> None:
        self.app = app
        self.admin_token = admin_token or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_admin_path(scope["path"]):
            authorizations = [
                value for name, value in scope["headers"] if name.lower() == b"authorization"
            ]
            authorization = (
                authorizations[0].decode("latin-1") if len(authorizations) == 1 else None
            )
            problem = admin_problem(self.admin_token, authorization)
            if problem is not None:
                await problem_response(problem, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def routes(context: AppContext) -> list[BaseRoute]:
    async def actors(request: Request) -> Response:
        require_admin(request)
        return json_response(context.actors_tree(), headers={"Cache-Control": "no-store"})

    return [Route("/admin/actors", actors, methods=["GET"], name="admin_actors")]
