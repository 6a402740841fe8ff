"""Pure ASGI middleware: body drain, request context, access log, CORS, and the
last-resort 500.

Each class is ``__init__(app, ...)`` + ``async __call__(scope, receive, send)`` and
keeps no per-request state on ``self``. ``create_app`` stacks them, outermost
first: RequestBodyDrain → RequestContext → AccessLog → CORS → UnhandledError →
(auth) → routing. So every response, a CORS preflight and a 500 included, is
sent only once the request body is read, carries ``X-Request-ID`` and is logged
and counted, and preflights are answered before any auth runs.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpp import tracing
from dpp.config import Settings
from dpp.http.problems import (
    Problem,
    dependency_unavailable_problem,
    internal_error_problem,
    not_found_problem,
    problem_response,
)
from dpp.ids import random_base62
from dpp.logs import bind
from dpp.metrics import HTTP_METHODS, UNMATCHED_ROUTE, Metrics

__all__ = [
    "BODY_DRAIN_FACTOR",
    "AccessLogMiddleware",
    "CORSMiddleware",
    "RequestBodyDrainMiddleware",
    "RequestContextMiddleware",
    "Traceparent",
    "TracingMiddleware",
    "UnhandledErrorMiddleware",
    "cors_allowed_origins",
    "declared_length",
    "new_request_id",
    "new_trace_id",
    "parse_traceparent",
    "problem_from_http_exception",
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


class RequestBodyDrainMiddleware:
    """Read whatever the app left of the request body before its answer starts.

    An answer given before the body is read (a 413 by Content-Length, a 401, a
    404, a 400 for a bad header) would otherwise end with the server closing a
    connection the client is still writing to: the kernel then resets it, and
    the client may lose the answer ("server disconnected without sending a
    response"). Drained, the connection even stays usable (keep-alive). Bodies
    declared larger than ``BODY_DRAIN_FACTOR`` times the limit are not drained
    (closing early is allowed there), nor is any body past that many bytes, nor
    one whose sender stalls for ``BODY_DRAIN_S_MAX``.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        assert max_body_bytes > 0, max_body_bytes
        self.app = app
        self.drain_bytes_max = BODY_DRAIN_FACTOR * max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if "transfer-encoding" not in headers and declared in (None, "0"):
            await self.app(scope, receive, send)  # no body: nothing to drain
            return
        if declared is not None and declared_length(declared) > self.drain_bytes_max:
            await self.app(scope, receive, send)  # too large to drain: may close early
            return
        received_bytes = 0
        body_done = False

        async def receive_counting() -> Message:
            nonlocal received_bytes, body_done
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def send_after_draining(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                with anyio.move_on_after(BODY_DRAIN_S_MAX):
                    while not body_done and received_bytes <= self.drain_bytes_max:
                        await receive_counting()
            await send(message)

        await self.app(scope, receive_counting, send_after_draining)


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


class RequestContextMiddleware:
    """Request id and trace id: into ``scope["state"]``, the log context, and the response.

    An incoming ``X-Request-ID`` is echoed when it is exactly one header of 1-128
    characters from ``[A-Za-z0-9._-]``; otherwise a fresh id replaces it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.getlist("x-request-id")
        if len(incoming) == 1 and valid_request_id(incoming[0]):
            request_id = incoming[0]
        else:
            request_id = new_request_id()
        traceparents = headers.getlist("traceparent")
        traceparent = parse_traceparent(traceparents[0]) if len(traceparents) == 1 else None
        trace_id = traceparent.trace_id if traceparent else new_trace_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["trace_id"] = trace_id
        state["parent_span_id"] = traceparent.parent_id if traceparent else None
        # The caller's sampling decision (W3C flag 01), None without a caller.
        state["parent_sampled"] = int(traceparent.flags, 16) & 1 == 1 if traceparent else None

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        with bind(request_id=request_id, trace_id=trace_id):
            await self.app(scope, receive, send_with_request_id)


class TracingMiddleware:
    """One server span per request, in the trace its logs carry (``dpp.tracing``).

    Stacked inside ``RequestContextMiddleware`` (whose trace id and parent span
    it continues), and only when tracing is on: off, it is not there at all.
    The span is named by the route template, never the path.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        trace_id = state.get("trace_id") or new_trace_id()
        parent_id = state.get("parent_span_id")
        # Follow the caller's decision; a request without one is a root, sampled.
        sampled = state.get("parent_sampled") is not False
        method = scope["method"] if scope["method"] in HTTP_METHODS else "_OTHER"
        status = 0

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracing.server_span(method, trace_id, parent_id, sampled) as span:
            try:
                await self.app(scope, receive, send_recording_status)
            finally:
                if span is not None:
                    route = getattr(scope.get("route"), "path", None)
                    tracing.finish_server_span(span, method, route, status or STATUS_CLIENT_GONE)


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


class AccessLogMiddleware:
    """One ``dpp.access`` line per request, and the HTTP metrics.

    The path is logged without its query string (queries can carry secrets);
    metrics are labelled by route template, never by path.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        status: int | None = None
        bytes_sent = 0

        async def send_counting(message: Message) -> None:
            nonlocal status, bytes_sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                bytes_sent += len(message.get("body", b""))
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_counting)
        except BaseException:
            failed = True
            raise
        finally:
            final_status = status or (500 if failed else STATUS_CLIENT_GONE)
            self._record(scope, final_status, time.perf_counter() - started_s, bytes_sent)

    def _record(self, scope: Scope, status: int, duration_s: float, bytes_sent: int) -> None:
        route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
        method = scope["method"]
        path = logged_path(scope["path"])
        if self.metrics is not None:
            self.metrics.observe_http(method, route, status, duration_s)
        if status >= 500:
            level = logging.WARNING
        elif scope["path"] in PROBE_PATHS and status < 400:
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not access_log.isEnabledFor(level):
            return  # LOG_LEVEL above it: build nothing
        duration_ms = round(duration_s * 1000, 1)
        extra = {
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "bytes": bytes_sent,
        }
        tenant_id = scope.get("state", {}).get("tenant_id")
        if tenant_id:
            extra["tenant_id"] = tenant_id
        access_log.log(level, "%s %s %s %sms", method, path, status, duration_ms, extra=extra)


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


class CORSMiddleware:
    """SPEC §6 CORS, exactly: allowed origins echoed with credentials, never ``*``.

    A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
    is answered here, before auth and routing: ``204`` with the allow lists for an
    allowed origin, a ``403`` problem without any CORS header otherwise (the
    browser blocks the request either way; the problem tells a person why).
    Every response gets ``Vary: Origin``, since its CORS headers depend on it.
    """

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed_origins = frozenset(origin.lower() for origin in allowed_origins)
        assert "*" not in self.allowed_origins, "never '*' with credentials"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origins = headers.getlist("origin")
        origin = origins[0] if len(origins) == 1 else None
        allowed = origin is not None and origin.lower() in self.allowed_origins
        if (
            scope["method"] == "OPTIONS"
            and origin is not None
            and "access-control-request-method" in headers
        ):
            await self._preflight(scope, receive, send, origin if allowed else None)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                response_headers = MutableHeaders(scope=message)
                add_vary_origin(response_headers)
                if allowed:
                    assert origin is not None
                    response_headers["Access-Control-Allow-Origin"] = origin
                    response_headers["Access-Control-Allow-Credentials"] = "true"
                    response_headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, allowed_origin: str | None
    ) -> None:
        response: Response
        if allowed_origin is None:
            problem = Problem(
                403, "cors-origin-not-allowed", "This origin may not call the API from a browser."
            )
            response = problem_response(problem, scope["path"])
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
        await response(scope, receive, send)


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


def _no_dependency(error: BaseException) -> str | None:
    return None


class UnhandledErrorMiddleware:
    """Replaces starlette's ServerErrorMiddleware: anything raised becomes a problem.

    ``Problem`` and ``HTTPException`` (raised by middleware outside the routing
    layer, e.g. auth) are rendered as they are. An error that says a dependency
    is unavailable (``unavailable_dependency``, wired by the composition root
    from the adapters: a lost, refused or timed-out connection, a pool with no
    free connection) is the one place a 503 with ``Retry-After`` is made for
    it, whichever route or service it came through. Any other exception is
    logged with its traceback and the request id, and answered with a generic
    500 — never traceback text. After the response has started nothing can be
    sent, so the exception propagates and the server drops the connection.
    """

    def __init__(
        self, app: ASGIApp, unavailable_dependency: DependencyClassifier = _no_dependency
    ) -> None:
        self.app = app
        self.unavailable_dependency = unavailable_dependency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_tracking(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except ClientDisconnect:
            # Nobody is left to answer; not an error of ours.
            error_log.info("client disconnected while sending the request body")
        except Exception as error:
            problem = self._problem_for(scope, error, response_started)
            if response_started:
                raise
            await problem_response(problem, scope["path"])(scope, receive, send)

    def _problem_for(self, scope: Scope, error: Exception, response_started: bool) -> Problem:
        if isinstance(error, Problem) and not response_started:
            return error
        if isinstance(error, HTTPException) and not response_started:
            return problem_from_http_exception(error)
        dependency = self.unavailable_dependency(error)
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
