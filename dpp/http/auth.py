"""The two gates before routing: API keys (and rate limits) on ``/v1``, the
admin token on ``/admin``.

``dpp.http.front.HttpFront`` runs both, after CORS and before routing.
``ApiGate`` (``build_app`` installs it; tests may install it on a bare
``create_app(..., api_gate=True)``). For every path under ``/v1`` and for
``/mcp`` (SPEC §6 "Routing"):

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

The admin gate (``admin_problem``): ``Authorization: Bearer <DPP_ADMIN_TOKEN>``, compared
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
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from dpp.http.problems import Problem, not_found_problem
from dpp.tenancy.principal import Principal, TenancyUnavailable
from dpp.tenancy.ratelimit import RateLimiter, RateLimitUnavailable
from dpp.tenancy.service import Tenancy

__all__ = [
    "ADMIN_PREFIX",
    "API_PREFIX",
    "Admission",
    "ApiGate",
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


def is_mcp_path(path: str) -> bool:
    return path == MCP_PATH


def principal_of(request: Request) -> Principal:
    """The authenticated principal of a ``/v1`` request.

    Only the API gate (``ApiGate``) sets it; a route under ``/v1`` without one
    means the gate is not installed — a programming error, not a client's.
    """
    principal = request.scope.get("state", {}).get("principal")
    assert isinstance(principal, Principal), "the API gate must guard /v1 routes"
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


@dataclass(frozen=True, slots=True)
class Admission:
    """A request the API gate lets through: its tenant, and the RateLimit fields
    (encoded, lowercase names) every response to it carries."""

    tenant_id: str
    rate_limit_headers: list[tuple[bytes, bytes]]


class ApiGate:
    """Authenticates and rate-limits ``/v1`` and ``/mcp``; stateless across requests.

    ``dpp.http.front.HttpFront`` asks ``guards`` and then ``admit`` for each
    request, after CORS (so no preflight needs a key) and before routing.
    """

    def __init__(self, tenancy: Tenancy, rate_limiter: RateLimiter) -> None:
        self.tenancy = tenancy
        self.rate_limiter = rate_limiter

    @staticmethod
    def guards(method: str, path: str) -> bool:
        """Whether a request (not a CORS preflight) must pass the gate."""
        if not is_api_path(path) and not is_mcp_path(path):
            return False
        # a result link's signed token is its credential
        return not (
            method in ("GET", "HEAD")
            and path.startswith(RESULT_DOWNLOAD_PREFIX)
            and "/" not in path[len(RESULT_DOWNLOAD_PREFIX) :]
        )

    async def admit(self, scope: Scope, authorization: str | None) -> Admission | Problem:
        """The request's admission, or the problem that answers it (401, 429, 503).

        Sets ``tenant_id`` (the access log reads it, 429s included) and
        ``principal`` in ``scope["state"]``; an MCP request over its limit is
        admitted with ``rate_limited`` set, for the MCP server to answer inside
        the protocol.
        """
        path: str = scope["path"]
        try:
            principal = await self.tenancy.authenticate(authorization)
        except TenancyUnavailable as error:
            log.warning("api key lookup failed; answering 503", extra={"error": str(error)})
            return unavailable_problem()
        if principal is None:
            return unauthorized_problem()
        state = scope["state"]
        state["tenant_id"] = principal.tenant_id
        try:
            decision = await self.rate_limiter.check(principal)
        except RateLimitUnavailable as error:
            log.warning(
                "rate limiter failed; answering 503",
                extra={"error": str(error), "tenant_id": principal.tenant_id},
            )
            return unavailable_problem()
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
                return problem
            # MCP answers it inside the protocol: an isError result an agent can act on
            state["rate_limited"] = problem.body(path)
        state["principal"] = principal
        return Admission(principal.tenant_id, rate_limit_headers)


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
