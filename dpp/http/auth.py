"""The two gates before routing: API keys (and rate limits) on ``/v1``, the
admin token on ``/admin``.

Both are pure ASGI middleware. ``ApiAuthMiddleware`` (``build_app`` installs
it; tests may install it on a bare ``create_app``). For every path under
``/v1`` (SPEC §6 "Routing"):

* a CORS preflight passes (the CORS layer answers it; none reaches here);
* ``GET /v1/results/{token}`` passes: its signed token is its credential (§5);
* no key, a malformed or revoked key → ``401`` + ``WWW-Authenticate: Bearer``
  and no rate-limit fields, whether or not the path exists — so an unknown
  path says nothing to a stranger;
* over the limit → ``429`` with ``Retry-After`` and the RateLimit fields;
* Postgres or Redis unable to answer → ``503`` (fail closed: never an
  unauthenticated or unlimited request);
* otherwise the request goes on with ``scope["state"]["principal"]`` set,
  ``tenant_id`` bound into the log context, and ``RateLimit-Policy`` /
  ``RateLimit`` added to whatever response it gets (404 and 405 included).

``AdminAuthMiddleware``: ``Authorization: Bearer <DPP_ADMIN_TOKEN>``, compared
in constant time. With no token configured (unset or empty) the whole
``/admin`` tree answers the same 404 as an unknown path, so a replica without
admin access does not even reveal that it has an admin API. A missing or
wrong token is ``401`` with ``WWW-Authenticate: Bearer``. It guards every
``/admin`` path before routing (so a wrong method or an unknown admin path is
not answered to strangers either); ``require_admin`` is the same check for a
handler to call as well.
"""

from __future__ import annotations

import hmac
import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpp.http.problems import Problem, not_found_problem, problem_response
from dpp.logs import bind
from dpp.tenancy.principal import Principal, TenancyUnavailable
from dpp.tenancy.ratelimit import RateLimiter, RateLimitUnavailable
from dpp.tenancy.service import Tenancy

__all__ = [
    "ADMIN_PREFIX",
    "API_PREFIX",
    "AdminAuthMiddleware",
    "ApiAuthMiddleware",
    "admin_problem",
    "is_admin_path",
    "is_api_path",
    "is_mcp_path",
    "principal_of",
    "require_admin",
]

log = logging.getLogger("dpp.http.auth")

API_PREFIX = "/v1"
MCP_PATH = "/mcp"  # the MCP server (dpp.http.mcp): the same keys and limits as /v1
RETRY_AFTER_UNAVAILABLE_S = 1


def is_api_path(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


# A result link (SPEC §5, §6 Routing): its signed token is the credential.
RESULT_DOWNLOAD_PREFIX = API_PREFIX + "/results/"


def _is_result_download(scope: Scope) -> bool:
    path: str = scope["path"]
    return (
        scope["method"] in ("GET", "HEAD")
        and path.startswith(RESULT_DOWNLOAD_PREFIX)
        and "/" not in path[len(RESULT_DOWNLOAD_PREFIX) :]
    )


def is_mcp_path(path: str) -> bool:
    return path == MCP_PATH


def principal_of(request: Request) -> Principal:
    """The authenticated principal of a ``/v1`` request.

    Only ``ApiAuthMiddleware`` sets it; a route under ``/v1`` without one means
    the middleware is not installed — a programming error, not a client's.
    """
    principal = request.scope.get("state", {}).get("principal")
    assert isinstance(principal, Principal), "ApiAuthMiddleware must guard /v1 routes"
    return principal


def unauthorized_problem() -> Problem:
    # One answer for missing, malformed, unknown and revoked keys: nothing to probe.
    return Problem(
        401,
        "unauthorized",
        "A valid API key is required (Authorization: Bearer <api key>).",
        headers={"WWW-Authenticate": "Bearer"},
    )


def unavailable_problem() -> Problem:
    return Problem(
        503,
        "unavailable",
        "Authentication or rate limiting is temporarily unavailable; retry shortly.",
        headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
    )


def _is_preflight(scope: Scope) -> bool:
    if scope["method"] != "OPTIONS":
        return False
    names = {name.lower() for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def _authorization(scope: Scope) -> str | None:
    """The single Authorization value; two of them are ambiguous, so none."""
    values = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
    if len(values) != 1:
        return None
    value: str = values[0].decode("latin-1")
    return value


class ApiAuthMiddleware:
    """Authenticates and rate-limits ``/v1``; stateless across requests."""

    def __init__(self, app: ASGIApp, tenancy: Tenancy, rate_limiter: RateLimiter) -> None:
        self.app = app
        self.tenancy = tenancy
        self.rate_limiter = rate_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_preflight(scope) or _is_result_download(scope):
            await self.app(scope, receive, send)
            return
        if not is_api_path(scope["path"]) and not is_mcp_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            principal = await self.tenancy.authenticate(_authorization(scope))
        except TenancyUnavailable as error:
            log.warning("api key lookup failed; answering 503", extra={"error": str(error)})
            await problem_response(unavailable_problem(), path)(scope, receive, send)
            return
        if principal is None:
            await problem_response(unauthorized_problem(), path)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant_id"] = principal.tenant_id  # the access log reads it, 429s included
        try:
            decision = await self.rate_limiter.check(principal)
        except RateLimitUnavailable as error:
            log.warning(
                "rate limiter failed; answering 503",
                extra={"error": str(error), "tenant_id": principal.tenant_id},
            )
            await problem_response(unavailable_problem(), path)(scope, receive, send)
            return
        rate_limit_headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in decision.headers()
        ]
        if not decision.allowed:
            assert decision.retry_after_s is not None
            problem = Problem(
                429,
                "rate-limited",
                f"Over the {decision.policy} rate limit of {decision.quota} requests per "
                f"{decision.window_s} s; retry after {decision.retry_after_s} s.",
                extensions={"policy": decision.policy, "retry_after_s": decision.retry_after_s},
                headers=dict(decision.headers()),
            )
            if not is_mcp_path(path):
                with bind(tenant_id=principal.tenant_id):
                    await problem_response(problem, path)(scope, receive, send)
                return
            # MCP answers it inside the protocol: an isError result an agent can act on
            state["rate_limited"] = problem.body(path)
        state["principal"] = principal

        async def send_with_rate_limit(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in rate_limit_headers if item[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        with bind(tenant_id=principal.tenant_id):
            await self.app(scope, receive, send_with_rate_limit)


# --- the admin gate ---------------------------------------------------------------------

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
            problem = admin_problem(self.admin_token, _authorization(scope))
            if problem is not None:
                await problem_response(problem, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
