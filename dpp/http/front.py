"""The HTTP front: every step a request takes before routing, in one ASGI layer.

The steps, outermost first (each is described where its pieces live,
``dpp.http.middleware`` and ``dpp.http.auth``)::

    body drain → request context → (server span, when tracing is on)
      → access log + metrics → CORS → unhandled errors
      → the /v1 + /mcp API-key gate (when the app has one) → the /admin gate → app

So every response, a CORS preflight and a 500 included, is sent only once the
request body is read, carries ``X-Request-ID`` and is logged and counted, and
preflights are answered before any gate runs.

They were separate middlewares; fused, a request costs one pass over its
headers (collecting what every step reads), one ``send`` wrapper (which adds
every response header at once, counts the bytes and drains the body) and one
frame, instead of a ``Headers`` parse, a ``send`` closure and a
``MutableHeaders`` rewrite per step — the HTTP front's share of a small
request's CPU (issue 11).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import anyio
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dpp import tracing
from dpp.http.auth import Admission, ApiGate, admin_problem, is_admin_path
from dpp.http.middleware import (
    BODY_DRAIN_FACTOR,
    BODY_DRAIN_S_MAX,
    CORS_EXPOSE_HEADERS,
    STATUS_CLIENT_GONE,
    DependencyClassifier,
    add_vary_origin,
    declared_length,
    new_request_id,
    new_trace_id,
    no_dependency,
    parse_traceparent,
    preflight_response,
    problem_for_error,
    record_access,
    valid_request_id,
)
from dpp.http.problems import Problem, problem_response
from dpp.logs import bind
from dpp.metrics import HTTP_METHODS, Metrics

__all__ = ["HttpFront"]

error_log = logging.getLogger("dpp.http")

# The request headers any step reads; every other one is skipped in one look-up.
# Names are compared as ASGI servers deliver them, lowercased (Starlette's
# Headers relies on the same).
READ_HEADERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"x-request-id",
        b"traceparent",
        b"origin",
        b"access-control-request-method",
        b"authorization",
    }
)
# The response headers the front sets. A response that already has one of them
# (rare: a route's own Vary, say) is merged field by field, as each step did
# alone; any other gets the front's headers appended in one go.
SET_HEADERS = frozenset(
    {
        b"x-request-id",
        b"vary",
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"ratelimit",
        b"ratelimit-policy",
        b"retry-after",
    }
)
VARY_ORIGIN = (b"vary", b"Origin")
ALLOW_ORIGIN = b"access-control-allow-origin"
CORS_ALLOWED_TAIL = (
    (b"access-control-allow-credentials", b"true"),
    (b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode("latin-1")),
)
X_REQUEST_ID = b"x-request-id"


def _decoded(values: list[bytes] | None) -> str | None:
    """A header sent exactly once, as text; none or several (ambiguous) are None."""
    if values is None or len(values) != 1:
        return None
    return values[0].decode("latin-1")


class HttpFront:
    """The fused front layer (see the module docstring); ``app`` is routing.

    ``api_gate`` is the /v1 + /mcp gate (``build_app`` passes one; a bare test
    app has none). ``traced``: whether each request gets a server span (decided
    once, when the app is built: ``dpp.tracing.enabled()``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: Metrics | None = None,
        allowed_origins: Iterable[str] = (),
        unavailable_dependency: DependencyClassifier = no_dependency,
        api_gate: ApiGate | None = None,
        admin_token: str | None = None,
        traced: bool = False,
    ) -> None:
        assert max_body_bytes > 0, max_body_bytes
        self.app = app
        self.drain_bytes_max = BODY_DRAIN_FACTOR * max_body_bytes
        self.metrics = metrics
        self.allowed_origins = frozenset(origin.lower() for origin in allowed_origins)
        assert "*" not in self.allowed_origins, "never '*' with credentials"
        self.unavailable_dependency = unavailable_dependency
        self.api_gate = api_gate
        self.admin_token = admin_token or None
        self.traced = traced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            if name in READ_HEADERS:
                values = found.get(name)
                if values is None:
                    found[name] = [value]
                else:
                    values.append(value)
        exchange = _Exchange(self, scope, receive, send, found)
        with bind(request_id=exchange.request_id, trace_id=exchange.trace_id):
            if self.traced:
                await exchange.traced()
            else:
                await exchange.logged()


class _Exchange:
    """One request through the front: what its steps read, and its ``send``."""

    __slots__ = (
        "admission",
        "allow_origin",
        "authorization",
        "body_done",
        "bytes_sent",
        "found",
        "front",
        "receive",
        "receive_in",
        "received_bytes",
        "request_id",
        "scope",
        "send_out",
        "started",
        "status",
        "tail",
        "trace_id",
        "vary",
    )

    def __init__(
        self,
        front: HttpFront,
        scope: Scope,
        receive: Receive,
        send: Send,
        found: dict[bytes, list[bytes]],
    ) -> None:
        self.front = front
        self.scope = scope
        self.send_out = send
        self.found = found
        self.status = 0  # of the response start, once sent
        self.bytes_sent = 0
        self.started = False
        self.admission: Admission | None = None  # set by the API gate
        # body drain: a request that may have a body small enough to drain gets
        # its receive counted, and its answer waits for the body's end
        self.receive_in = receive
        self.receive: Receive = receive
        self.body_done = True
        self.received_bytes = 0
        lengths = found.get(b"content-length")
        declared = lengths[0].decode("latin-1") if lengths else None
        if (b"transfer-encoding" in found or declared not in (None, "0")) and (
            declared is None or declared_length(declared) <= front.drain_bytes_max
        ):
            self.body_done = False
            self.receive = self.receive_counting
        # request context. An incoming X-Request-ID is echoed when it is exactly
        # one header of 1-128 characters from [A-Za-z0-9._-]; otherwise a fresh
        # id replaces it. A malformed traceparent is ignored.
        incoming = _decoded(found.get(b"x-request-id"))
        if incoming is not None and valid_request_id(incoming):
            self.request_id = incoming
        else:
            self.request_id = new_request_id()
        traceparent_value = _decoded(found.get(b"traceparent"))
        traceparent = (
            parse_traceparent(traceparent_value) if traceparent_value is not None else None
        )
        self.trace_id = traceparent.trace_id if traceparent else new_trace_id()
        state = scope.setdefault("state", {})
        state["request_id"] = self.request_id
        state["trace_id"] = self.trace_id
        state["parent_span_id"] = traceparent.parent_id if traceparent else None
        # The caller's sampling decision (W3C flag 01), None without a caller.
        state["parent_sampled"] = int(traceparent.flags, 16) & 1 == 1 if traceparent else None
        self.authorization = _decoded(found.get(b"authorization"))
        # what every response gets (CORS fills in its part): see ``send``
        self.vary = False
        self.allow_origin: str | None = None
        self.tail = [(X_REQUEST_ID, self.request_id.encode("latin-1"))]

    # --- server span, access log and metrics -----------------------------------------

    async def traced(self) -> None:
        """One server span per request, in the trace its logs carry, named by
        the route template (never the path)."""
        scope = self.scope
        state = scope["state"]
        method = scope["method"] if scope["method"] in HTTP_METHODS else "_OTHER"
        # Follow the caller's decision; a request without one is a root, sampled.
        sampled = state["parent_sampled"] is not False
        with tracing.server_span(method, self.trace_id, state["parent_span_id"], sampled) as span:
            try:
                await self.logged()
            finally:
                if span is not None:
                    route = getattr(scope.get("route"), "path", None)
                    status = self.status or STATUS_CLIENT_GONE
                    tracing.finish_server_span(span, method, route, status)

    async def logged(self) -> None:
        """The access log line and the HTTP metrics, whatever happens below."""
        started_s = time.perf_counter()
        failed = False
        try:
            await self.cors()
        except BaseException:
            failed = True
            raise
        finally:
            status = self.status or (500 if failed else STATUS_CLIENT_GONE)
            duration_s = time.perf_counter() - started_s
            record_access(self.front.metrics, self.scope, status, duration_s, self.bytes_sent)

    # --- CORS ---------------------------------------------------------------------------

    async def cors(self) -> None:
        """SPEC §6 CORS, exactly: an allowed origin (one ``Origin`` header) is
        echoed with credentials, never ``*``; a preflight is answered here;
        every other response gets ``Vary: Origin``, since its CORS headers
        depend on it."""
        scope = self.scope
        found = self.found
        origins = found.get(b"origin")
        origin = origins[0].decode("latin-1") if origins is not None and len(origins) == 1 else None
        allowed = origin is not None and origin.lower() in self.front.allowed_origins
        preflight = scope["method"] == "OPTIONS" and origin is not None
        if preflight and b"access-control-request-method" in found:
            response = preflight_response(scope["path"], origin if allowed else None)
            await response(scope, self.receive, self.send)
            return
        self.vary = True
        if allowed:
            assert origins is not None and origin is not None
            self.allow_origin = origin
            self.tail = [VARY_ORIGIN, (ALLOW_ORIGIN, origins[0]), *CORS_ALLOWED_TAIL, *self.tail]
        else:
            self.tail = [VARY_ORIGIN, *self.tail]
        await self.guarded()

    # --- unhandled errors ---------------------------------------------------------------

    async def guarded(self) -> None:
        """Anything raised below becomes a problem (``problem_for_error``).
        After the response has started nothing can be sent, so the exception
        propagates and the server drops the connection."""
        scope = self.scope
        try:
            await self.gated()
        except ClientDisconnect:
            # Nobody is left to answer; not an error of ours.
            error_log.info("client disconnected while sending the request body")
        except Exception as error:
            problem = problem_for_error(
                scope, error, self.started, self.front.unavailable_dependency
            )
            if self.started:
                raise
            if not isinstance(error, Problem | HTTPException):
                # A Problem (a route's) or HTTPException (the router's 404, 405)
                # is the app's answer and keeps the RateLimit fields; a failure's
                # answer does not carry them.
                self.admission = None
            await problem_response(problem, scope["path"])(scope, self.receive, self.send)

    # --- the gates ----------------------------------------------------------------------

    async def gated(self) -> None:
        """The API gate on /v1 and /mcp, the admin gate on /admin, then the app."""
        scope = self.scope
        front = self.front
        path: str = scope["path"]
        gate = front.api_gate
        if gate is not None and gate.guards(scope["method"], path) and not self.preflight():
            outcome = await gate.admit(scope, self.authorization)
            if isinstance(outcome, Problem):
                await problem_response(outcome, path)(scope, self.receive, self.send)
                return
            self.admission = outcome
            with bind(tenant_id=outcome.tenant_id):
                await front.app(scope, self.receive, self.send)
            return
        if is_admin_path(path):
            problem = admin_problem(front.admin_token, self.authorization)
            if problem is not None:
                await problem_response(problem, path)(scope, self.receive, self.send)
                return
        await front.app(scope, self.receive, self.send)

    def preflight(self) -> bool:
        """A CORS preflight by its headers (CORS answered those with one Origin)."""
        found = self.found
        return (
            self.scope["method"] == "OPTIONS"
            and b"origin" in found
            and b"access-control-request-method" in found
        )

    # --- receive and send ---------------------------------------------------------------

    async def receive_counting(self) -> Message:
        message = await self.receive_in()
        if message["type"] == "http.request":
            self.received_bytes += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        """Every step's part of a response: the start gets all the front's
        headers at once (after the body is drained), the body is counted."""
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            headers = list(message.get("headers", ()))
            for name, _ in headers:
                if name.lower() in SET_HEADERS:
                    message["headers"] = self.merged(headers)
                    break
            else:
                admission = self.admission
                if admission is not None:
                    headers.extend(admission.rate_limit_headers)
                headers.extend(self.tail)
                message["headers"] = headers
            if not self.body_done:
                with anyio.move_on_after(BODY_DRAIN_S_MAX):
                    while not self.body_done and self.received_bytes <= self.front.drain_bytes_max:
                        await self.receive_counting()
        elif message["type"] == "http.response.body":
            self.bytes_sent += len(message.get("body", b""))
        await self.send_out(message)

    def merged(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The front's headers merged into a response that has one of them
        already: each step's edit in turn, as each used to make it alone."""
        admission = self.admission
        if admission is not None:
            present = {name.lower() for name, _ in headers}
            headers.extend(item for item in admission.rate_limit_headers if item[0] not in present)
        mutable = MutableHeaders(raw=headers)
        if self.vary:
            add_vary_origin(mutable)
            if self.allow_origin is not None:
                mutable["Access-Control-Allow-Origin"] = self.allow_origin
                mutable["Access-Control-Allow-Credentials"] = "true"
                mutable["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        mutable["X-Request-ID"] = self.request_id
        return mutable.raw
