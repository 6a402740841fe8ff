"""``/mcp``: the MCP server of SPEC §7 in a replica, on the SDK's streamable HTTP
transport in stateless mode.

The ``/v1`` gate (``dpp.http.auth.ApiGate``) guards ``/mcp`` too: a missing or bad
key is a ``401`` problem before the SDK sees the request, and the caller's
``Principal`` is in the scope. A request over the rate limit is let through
marked (``scope["state"]["rate_limited"]``), so that a tool call answers the
429 as an ``isError`` result an agent can act on.

No sticky routing: the SDK keeps no session (stateless mode), so any replica
serves any request. A tool call's idempotency key (``call_key``, hashed with
the API key id, so one key cannot reach another's calls) is the key the client
sent (``Idempotency-Key`` header or ``_meta`` ``dev.dpp/idempotencyKey``), else
(session id, JSON-RPC request id) when the request carries an
``Mcp-Session-Id``, so a client's retry of a call submits nothing new, on
whichever replica it lands. The session id this endpoint hands out (random, on
a response to a request that carried none, e.g. ``initialize``) serves only
that. A request without one (the 2026-07-28 protocol has no sessions) and
without a key of its own is never deduplicated: nothing in it tells a retry
from another client's call with the same request id.

Every call into DPP's services is in ``LocalBackend`` below (one small place).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from mcp.server import ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from dpp.context import AppContext
from dpp.http.auth import MCP_PATH
from dpp.http.mcp_tools import (
    RESULT_INLINE_BYTES_MAX,
    Backend,
    Refused,
    build_server,
    call_key,
)
from dpp.http.problems import Problem, problem_response
from dpp.http.routes.runs import api_base_url, budget_document, short_problem
from dpp.packs import FieldError
from dpp.runs.admission import (
    Admitted,
    BudgetShort,
    ConcurrencyLimit,
    KeyInFlight,
    KeyReused,
    KeySpendShort,
    KeyTakenOver,
    Replayed,
    ReservationInvalid,
    ReservationSuspended,
    ReservationUnavailable,
    SubmitOutcome,
)
from dpp.runs.service import RunGone, RunNotFound, RunView
from dpp.runs.submission import parse_submit
from dpp.tenancy.principal import Principal

__all__ = ["LocalBackend", "McpEndpoint"]

SESSION_HEADER = b"mcp-session-id"
IDEMPOTENCY_HEADER = b"idempotency-key"
SESSION_ID_CHARS_MAX = 128

log = logging.getLogger("dpp.mcp")


def _problem(
    status: int, slug: str, detail: str, extensions: dict[str, Any] | None = None
) -> Refused:
    return Refused(Problem(status, slug, detail, extensions=extensions).body(MCP_PATH))


def _field_errors(errors: list[FieldError]) -> Refused:
    first = errors[0]
    return _problem(
        422,
        "invalid-request",
        f"{first.field}: {first.message}",
        {
            "field": first.field,
            "errors": [{"field": e.field, "message": e.message} for e in errors],
        },
    )


class LocalBackend:
    """The tools' backend inside a replica: the services of the ``AppContext``,
    for one authenticated caller. Refusals are the problems ``/v1`` answers."""

    def __init__(
        self,
        context: AppContext,
        principal: Principal,
        trace_id: str | None,
        base_url: str | None = None,
    ) -> None:
        self._context = context
        self._principal = principal
        self._trace_id = trace_id
        # the download links' origin, as the caller reached this replica
        self._base_url = base_url
        # the view ``run`` answered last: ``result`` reads that run's stored result
        # without reading the run again (one backend serves one request)
        self._last_view: RunView | None = None

    async def catalog(self) -> list[dict[str, Any]]:
        return self._context.packs.catalog()

    async def submit(
        self, pack_type: str, inputs: Any, idempotency_key: str | None
    ) -> dict[str, Any] | Refused:
        body = {"pack_type": pack_type, "inputs": inputs}
        parsed = parse_submit(body, self._context.packs)
        if isinstance(parsed, list):
            return _field_errors(parsed)  # nothing reserved: admission never saw it
        admission = self._context.admission
        try:
            outcome = await admission.submit(
                self._principal.tenant_id,
                parsed,
                body=body,
                idempotency_key=idempotency_key,
                trace_id=self._trace_id,
                api_key_id=self._principal.key_id,
            )
        except ReservationSuspended as suspended:
            return _problem(
                503,
                "unavailable",
                "This tenant's budget is paused after repeated failures; nothing was reserved.",
                {"retry_after_s": suspended.retry_after_s},
            )
        except ReservationUnavailable:
            # the call's key was released: retrying the same call replays or proceeds
            return _problem(
                503,
                "unavailable",
                "The reservation could not be made or answered now; retry the same call.",
                {"retry_after_s": 1},
            )
        except ReservationInvalid:
            return _problem(
                422,
                "invalid-request",
                "inputs: holds a value that cannot be stored.",
                {"field": "inputs"},
            )
        return await self._answer(outcome)

    async def _answer(self, outcome: SubmitOutcome) -> dict[str, Any] | Refused:
        admission = self._context.admission
        match outcome:
            case Admitted(run_id=run_id, body=accepted):
                # a tool call's access line is the session's POST: name the run here
                log.info(
                    "run admitted",
                    extra={"run_id": run_id, "tenant_id": self._principal.tenant_id, "via": "mcp"},
                )
                document: dict[str, Any] = orjson.loads(accepted)
                return document
            case Replayed(status=status, body=stored):
                replayed: dict[str, Any] = orjson.loads(stored)
                return replayed if status < 300 else Refused(replayed)
            case KeyInFlight() | KeyTakenOver():
                return _problem(
                    409,
                    "idempotency-key-in-use",
                    "This call is still being processed (or was taken over by its retry);"
                    " nothing was reserved for this request. Retry the same call.",
                    {"retry_after_s": 1},
                )
            case KeyReused():
                return _problem(
                    422,
                    "idempotency-key-reused",
                    "This call's idempotency key was already used with other arguments"
                    " (the same JSON-RPC request id in this MCP session, or the same"
                    " idempotency key the client sent); send a new request id or key.",
                )
            case BudgetShort() | KeySpendShort():
                refused = Refused(short_problem(outcome).body(MCP_PATH))
                # stored for the key like a 402 of POST /v1/runs: a retry answers the same
                remembered = await admission.remember_refusal(
                    outcome, "application/problem+json", orjson.dumps(refused.problem)
                )
                if isinstance(remembered, KeyTakenOver):
                    return _problem(
                        409,
                        "idempotency-key-in-use",
                        "A retry of this call took it over; retry to get its outcome.",
                        {"retry_after_s": 1},
                    )
                if isinstance(remembered, BudgetShort | KeySpendShort):
                    return refused
                # the key was another call's after all: its answer is this one's
                return await self._answer(remembered)
            case ConcurrencyLimit(max_concurrent_runs=limit):
                return _problem(
                    429,
                    "concurrency-limit",
                    f"The plan allows {limit} runs queued or in progress at once.",
                    {"max_concurrent_runs": limit, "retry_after_s": 1},
                )
        raise AssertionError(f"unexpected admission outcome {outcome!r}")

    async def _view(self, run_id: str) -> RunView:
        """The caller's run, as ``GET /v1/runs/{run_id}`` reads it (the one call to it)."""
        return await self._context.runs.get(
            self._principal.tenant_id, run_id, base_url=self._base_url
        )

    async def run(self, run_id: str) -> dict[str, Any] | Refused:
        try:
            view = await self._view(run_id)
        except RunNotFound:
            return _problem(404, "not-found", "No run with this id.")
        except RunGone as gone:
            return _problem(
                410,
                "gone",
                "This run is past its retention period; its result was deleted.",
                {
                    "run_status": gone.status,
                    "charged_usd_micros": gone.charged_usd_micros,
                    "refunded_usd_micros": gone.refunded_usd_micros,
                },
            )
        self._last_view = view
        return view.document

    async def result(self, run: dict[str, Any]) -> Any:
        view = self._last_view
        if view is None or view.document is not run:
            # not the document ``run`` just answered (the tools always pass that one)
            view = await self._view(run["id"])
        if (view.row["result_bytes"] or 0) > RESULT_INLINE_BYTES_MAX:
            return None
        body = await self._context.runs.result_body(view.row)
        return None if body is None else orjson.loads(body)

    async def budget(self) -> dict[str, Any] | Refused:
        return await budget_document(self._context, self._principal)


def _state(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    request = ctx.request
    assert request is not None, "/mcp requests always carry their HTTP request"
    state: dict[str, Any] = request.scope.setdefault("state", {})
    return state


def _principal(ctx: ServerRequestContext[Any, Any]) -> Principal:
    principal = _state(ctx).get("principal")
    assert isinstance(principal, Principal), "the API gate must guard /mcp"
    return principal


class McpEndpoint:
    """The ASGI app at ``/mcp``. ``running()`` (the app's lifespan) owns the SDK's
    session manager; a fresh one each time, as the HTTP child may be restarted."""

    def __init__(self, context: AppContext) -> None:
        self._context = context
        self._manager: StreamableHTTPSessionManager | None = None

        def backend_of(ctx: ServerRequestContext[Any, Any]) -> Backend:
            trace_id = _state(ctx).get("trace_id")
            base_url = _state(ctx).get("base_url")
            return LocalBackend(
                context,
                _principal(ctx),
                trace_id if isinstance(trace_id, str) else None,
                base_url if isinstance(base_url, str) else None,
            )

        def key_of(ctx: ServerRequestContext[Any, Any]) -> str | Refused | None:
            state = _state(ctx)
            session_id = state.get("mcp_session_id")
            header = state.get("idempotency_key")
            return call_key(
                ctx,
                _principal(ctx).key_id,
                session_id if isinstance(session_id, str) else None,
                header=header if isinstance(header, str) else None,
            )

        def throttle_of(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any] | None:
            problem = _state(ctx).get("rate_limited")
            return problem if isinstance(problem, dict) else None

        self._server = build_server(
            "dpp",
            backend_of=backend_of,
            key_of=key_of,
            throttle_of=throttle_of,
            wait_sec=context.settings.mcp_wait_sec,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        manager = StreamableHTTPSessionManager(app=self._server, stateless=True, json_response=True)
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager = self._manager
        if manager is None:
            problem = Problem(
                503, "unavailable", "The MCP server is not running.", headers={"Retry-After": "1"}
            )
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        sessions = [v for k, v in scope["headers"] if k.lower() == SESSION_HEADER]
        session_id = sessions[0].decode("latin-1") if len(sessions) == 1 else None
        new_session = session_id is None or not 0 < len(session_id) <= SESSION_ID_CHARS_MAX
        state = scope.setdefault("state", {})
        if new_session:
            # A request without a (usable) session id starts one for the requests
            # after it; its own calls have no session (only a key the client sent
            # makes them idempotent), so none ever replays another call's run.
            session_id = secrets.token_hex(16)
        else:
            state["mcp_session_id"] = session_id
        assert session_id is not None
        keys = [v for k, v in scope["headers"] if k.lower() == IDEMPOTENCY_HEADER]
        if keys:
            # more than one header is no key: refused as malformed (empty)
            state["idempotency_key"] = keys[0].decode("latin-1") if len(keys) == 1 else ""
        state["base_url"] = api_base_url(Request(scope))
        session_header = (SESSION_HEADER, session_id.encode("latin-1"))

        async def send_with_session(message: Message) -> None:
            if new_session and message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != SESSION_HEADER
                ]
                headers.append(session_header)
                message = {**message, "headers": headers}
            await send(message)

        await manager.handle_request(scope, receive, send_with_session)
