"""The steps of the HTTP front, as plain functions and constants.

``dpp.http.front.HttpFront`` runs them all in one ASGI layer, in this order:
body drain → request context (ids, trace context) → server span → access log
and metrics → CORS → unhandled errors → (the gates of ``dpp.http.auth``) →
routing. They live here, apart from the layer, so each can be read, tested and
imported (``declared_length``, ``REQUEST_ID_PATTERN``...) on its own.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

from dpp.config import Settings
from dpp.http.problems import (
    Problem,
    dependency_unavailable_problem,
    internal_error_problem,
    not_found_problem,
    problem_response,
)
from dpp.ids import random_base62
from dpp.metrics import UNMATCHED_ROUTE, Metrics

__all__ = [
    "BODY_DRAIN_FACTOR",
    "DependencyClassifier",
    "Traceparent",
    "add_vary_origin",
    "cors_allowed_origins",
    "declared_length",
    "new_request_id",
    "new_trace_id",
    "no_dependency",
    "parse_traceparent",
    "preflight_response",
    "problem_for_error",
    "problem_from_http_exception",
    "record_access",
    "valid_request_id",
]

access_log = logging.getLogger("dpp.access")
error_log = logging.getLogger("dpp.http")

# --- the request body: read to its end before answering --------------------------------

# SPEC §6: up to this many times DPP_MAX_BODY_BYTES, a refused body is drained so
# the client reads its answer; past it the server may close early.
BODY_DRAIN_FACTOR = 16
# A client that stops sending mid-body is not waited for longer than this.
BODY_DRAIN_S_MAX = 10.0


CONTENT_LENGTH_PATTERN = re.compile(r"[0-9]{1,20}")


def declared_length(content_length: str) -> int:
    """A Content-Length header's value; -1 when it is not ASCII digits (``"²"`` is
    ``isdigit()`` but no ``int``; the server itself refuses such a request)."""
    if CONTENT_LENGTH_PATTERN.fullmatch(content_length.strip()) is None:
        return -1
    return int(content_length)


# --- request ids and trace context ----------------------------------------------------

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
REQUEST_ID_PREFIX = "req_"
REQUEST_ID_BODY_LENGTH = 24  # ~143 bits
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex only.
TRACEPARENT_PATTERN = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
TRACEPARENT_LENGTH = 55


@dataclass(frozen=True, slots=True)
class Traceparent:
    trace_id: str
    parent_id: str
    flags: str


def valid_request_id(value: str) -> bool:
    return REQUEST_ID_PATTERN.fullmatch(value) is not None


def new_request_id() -> str:
    return REQUEST_ID_PREFIX + random_base62(REQUEST_ID_BODY_LENGTH)


def new_trace_id() -> str:
    while True:
        trace_id = secrets.token_hex(16)
        if trace_id != "0" * 32:
            return trace_id


def parse_traceparent(value: str) -> Traceparent | None:
    """The W3C ``traceparent``, or None when it is malformed (it is then ignored).

    Version ``00`` is exactly 55 characters; a later version may append fields
    after a ``-`` (parsed as version 00, as the spec asks); ``ff`` is invalid, and
    so are all-zero trace or parent ids.
    """
    value = value.strip()
    match = TRACEPARENT_PATTERN.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == "ff":
        return None
    if version == "00" and len(value) != TRACEPARENT_LENGTH:
        return None
    if len(value) > TRACEPARENT_LENGTH and value[TRACEPARENT_LENGTH] != "-":
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return Traceparent(trace_id, parent_id, flags)


# --- access log and HTTP metrics ------------------------------------------------------

# Probes hit these every few seconds; a success is logged at DEBUG, a failure as usual.
PROBE_PATHS = frozenset({"/health", "/readyz", "/metrics"})
LOGGED_PATH_CHARS_MAX = 512
# Paths whose last segment is a credential (SPEC §5: a result link's signed
# token works without an API key): logged without it.
CREDENTIAL_PATH_PREFIXES = ("/v1/results/",)
REDACTED_SEGMENT = "<redacted>"


def logged_path(path: str) -> str:
    """``path`` as a log line may carry it: bounded, and with no credential in it."""
    for prefix in CREDENTIAL_PATH_PREFIXES:
        if path.startswith(prefix):
            return prefix + REDACTED_SEGMENT
    return path[:LOGGED_PATH_CHARS_MAX]


LOGGED_ERROR_CHARS_MAX = 200
STATUS_CLIENT_GONE = 499  # no response was sent: the client went away first
ACCESS_LOG_FORMAT = "%s %s %s %sms"  # method, path, status, duration


def record_access(
    metrics: Metrics | None, scope: Scope, status: int, duration_s: float, bytes_sent: int
) -> None:
    """One ``dpp.access`` line for a request, and its HTTP metrics.

    The path is logged without its query string (queries can carry secrets);
    metrics are labelled by route template, never by path. Probes that succeed
    are logged at DEBUG, a 5xx at WARNING.
    """
    route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
    method = scope["method"]
    if metrics is not None:
        metrics.observe_http(method, route, status, duration_s)
    if status >= 500:
        level = logging.WARNING
    elif scope["path"] in PROBE_PATHS and status < 400:
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not access_log.isEnabledFor(level):
        return  # LOG_LEVEL above it: build nothing
    path = logged_path(scope["path"])
    duration_ms = round(duration_s * 1000, 1)
    extra = {
        "method": method,
        "path": path,
        "route": route,
        "status": status,
        "duration_ms": duration_ms,
        "bytes": bytes_sent,
    }
    state = scope.get("state", {})
    tenant_id = state.get("tenant_id")
    if tenant_id:
        extra["tenant_id"] = tenant_id
    run_id = state.get("run_id")  # the run this request admitted (POST /v1/runs)
    if run_id:
        extra["run_id"] = run_id
    # Logger.log would walk the stack to find this frame (findCaller); the record
    # is the one it makes, handled by the same filters and handlers.
    frame = sys._getframe()
    record = access_log.makeRecord(
        access_log.name,
        level,
        frame.f_code.co_filename,
        frame.f_lineno,
        ACCESS_LOG_FORMAT,
        (method, path, status, duration_ms),
        None,
        frame.f_code.co_name,
        extra,
    )
    access_log.handle(record)


# --- CORS -----------------------------------------------------------------------------

DEVELOPMENT_ORIGINS = (
    "http://localhost:3000",
    "http://localhost:5173",
    "http://127.0.0.1:3000",
    "http://127.0.0.1:5173",
)
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, traceparent, X-Request-ID"
CORS_EXPOSE_HEADERS = (
    "X-Request-ID, X-DPP-Cost-Reserved, X-DPP-Cost-Actual, X-DPP-Cost-Minimum-Fee, "
    "RateLimit, RateLimit-Policy, Retry-After, Idempotent-Replayed, Location"
)
CORS_MAX_AGE_SEC = 600


def cors_allowed_origins(settings: Settings) -> tuple[str, ...]:
    """The configured origins; in development with none configured, the localhost list."""
    if settings.cors_allowed_origins:
        return settings.cors_allowed_origins
    return DEVELOPMENT_ORIGINS if settings.development else ()


def preflight_response(path: str, allowed_origin: str | None) -> Response:
    """The answer to a CORS preflight (SPEC §6), given before auth and routing:
    ``204`` with the allow lists for an allowed origin, a ``403`` problem without
    any CORS header otherwise (the browser blocks the request either way; the
    problem tells a person why). Both vary by ``Origin``."""
    response: Response
    if allowed_origin is None:
        problem = Problem(
            403, "cors-origin-not-allowed", "This origin may not call the API from a browser."
        )
        response = problem_response(problem, path)
    else:
        response = Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": allowed_origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_SEC),
            },
        )
    add_vary_origin(response.headers)
    return response


def add_vary_origin(headers: MutableHeaders) -> None:
    present = [
        item.strip().lower() for value in headers.getlist("vary") for item in value.split(",")
    ]
    if "origin" not in present and "*" not in present:
        headers.add_vary_header("Origin")


# --- errors ---------------------------------------------------------------------------

HTTP_EXCEPTION_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "content-too-large",
    415: "unsupported-media-type",
    422: "invalid-request",
    429: "too-many-requests",
    503: "unavailable",
}


def problem_from_http_exception(error: HTTPException) -> Problem:
    """Starlette's own errors (404, 405 with ``Allow``, ...) as problems."""
    if error.status_code == 404:
        return not_found_problem()
    status = error.status_code if 400 <= error.status_code <= 599 else 500
    if status == 405:
        detail = "This method is not allowed here; the Allow header lists those that are."
    else:
        detail = error.detail
    return Problem(
        status,
        HTTP_EXCEPTION_SLUGS.get(status, "error" if status < 500 else "internal-error"),
        detail,
        headers=error.headers,
    )


DependencyClassifier = Callable[[BaseException], str | None]


def no_dependency(error: BaseException) -> str | None:
    """The classifier of an app with no dependency to lose (tests)."""
    return None


def problem_for_error(
    scope: Scope,
    error: Exception,
    response_started: bool,
    unavailable_dependency: DependencyClassifier,
) -> Problem:
    """The problem that answers ``error`` raised while serving ``scope`` (the
    front sends it unless the response has started; then it only logs).

    ``Problem`` and ``HTTPException`` are rendered as they are. An error that
    says a dependency is unavailable (``unavailable_dependency``, wired by the
    composition root from the adapters: a lost, refused or timed-out
    connection, a pool with no free connection) is the one place a 503 with
    ``Retry-After`` is made for it, whichever route or service it came through.
    Any other exception is logged with its traceback (the request id is in the
    log context) and answered with a generic 500 — never traceback text.
    """
    if isinstance(error, Problem) and not response_started:
        return error
    if isinstance(error, HTTPException) and not response_started:
        return problem_from_http_exception(error)
    dependency = unavailable_dependency(error)
    if dependency is not None and not response_started:
        error_log.warning(
            "%s unavailable in %s %s; answering 503",
            dependency,
            scope["method"],
            logged_path(scope["path"]),
            extra={
                "dependency": dependency,
                "error_type": type(error).__name__,
                "error": str(error)[:LOGGED_ERROR_CHARS_MAX],
            },
        )
        return dependency_unavailable_problem(dependency)
    error_log.error(
        "unhandled %s in %s %s",
        type(error).__name__,
        scope["method"],
        logged_path(scope["path"]),
        exc_info=error,
        extra={"error_type": type(error).__name__, "response_started": response_started},
    )
    return internal_error_problem(scope.get("state", {}).get("request_id"))
