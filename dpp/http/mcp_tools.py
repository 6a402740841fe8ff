"""The MCP tools of SPEC §7, whoever serves them: ``/mcp`` in a replica, or ``dpp mcp``.

One tool per offered pack (named by its ``pack_type``, ``inputSchema`` = the
pack's, the description states its prices), plus ``get_budget`` and
``get_run``. A pack's call submits a run with the pack's default reservation
under the call's idempotency key (``call_key``), waits up to ``wait_sec`` for a
terminal state and answers ``structuredContent`` ``{"run_id", "status",
"charged_usd_micros", "refunded_usd_micros", "result"}`` with the same JSON as
text. Refusals an agent can act on (402, 422, 429, 503, a FAILED or EXPIRED
run) are ``isError`` results carrying the problem document, never protocol
errors.

The tools reach DPP through a ``Backend``: in a replica the services of the
``AppContext`` (``dpp.http.mcp``), in ``dpp mcp`` a remote DPP's HTTP API
(``dpp.cli.mcp``). Both answer documents exactly as ``/v1`` renders them, or a
``Refused`` problem document.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import mcp_types as types
import orjson
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError

from dpp.money.rules import TERMINAL_STATUSES, RunStatus
from dpp.runs.idempotency import valid_key

__all__ = [
    "GET_BUDGET",
    "GET_RUN",
    "RESULT_INLINE_BYTES_MAX",
    "Backend",
    "Refused",
    "build_server",
    "call_key",
    "call_tool",
    "client_key",
    "idempotency_key",
    "list_tools",
]

GET_BUDGET = "get_budget"
GET_RUN = "get_run"
USD_MICROS = 1_000_000
# Polling a run while a tool call waits: start fast (echo finishes in milliseconds),
# back off to a bound so a long run costs one read per POLL_INTERVAL_MAX_S.
POLL_INTERVAL_MIN_S = 0.05
POLL_INTERVAL_MAX_S = 1.0
RUN_ID_CHARS_MAX = 64
# A result document larger than this is not inlined (``result`` is null; the run's
# download link still serves it): an agent's context is no place for it anyway.
RESULT_INLINE_BYTES_MAX = 4 * 1024 * 1024
FAILED_STATUSES = frozenset({RunStatus.FAILED, RunStatus.EXPIRED})
# Where a client names a tool call's idempotency key itself: a member of the
# call's ``_meta`` (MCP leaves non-reserved, prefixed keys to servers), or the
# ``Idempotency-Key`` header of the HTTP POST that carries it (``/mcp`` only).
IDEMPOTENCY_META_KEY = "dev.dpp/idempotencyKey"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True, slots=True)
class Refused:
    """The API's problem document (RFC 9457) instead of an answer."""

    problem: dict[str, Any]


class Backend(Protocol):
    """What the tools need from DPP, for one caller (one API key)."""

    async def catalog(self) -> list[dict[str, Any]]:
        """The ``GET /v1/packs`` members."""
        ...

    async def submit(
        self, pack_type: str, inputs: Any, idempotency_key: str | None
    ) -> dict[str, Any] | Refused:
        """``POST /v1/runs`` with the pack's default reservation: the run object."""
        ...

    async def run(self, run_id: str) -> dict[str, Any] | Refused:
        """``GET /v1/runs/{run_id}``: the run object."""
        ...

    async def result(self, run: dict[str, Any]) -> Any:
        """The result document of a COMPLETED run (its ``result`` link's body)."""
        ...

    async def budget(self) -> dict[str, Any] | Refused:
        """``GET /v1/budget``."""
        ...


def idempotency_key(api_key_id: str, session_id: str, request_id: str | int) -> str:
    """The Idempotency-Key of one tool call: a client's retry of the same JSON-RPC
    request in the same session submits nothing new, on whichever replica it lands.
    Hashed, so neither the session id nor the key id appears in storage; the
    request id's type is part of it (1 and "1" are different requests)."""
    material = orjson.dumps([api_key_id, session_id, type(request_id).__name__, request_id])
    return "mcp-" + hashlib.sha256(material).hexdigest()


def client_key(api_key_id: str, supplied: str) -> str:
    """The Idempotency-Key of a tool call whose client named its key: the same key
    from the same API key is the same call, whichever session or request id
    carries it. Hashed like ``idempotency_key`` (and never equal to one of its
    keys: the hashed material has another shape)."""
    material = orjson.dumps([api_key_id, "client", supplied])
    return "mcp-" + hashlib.sha256(material).hexdigest()


def _supplied_key(meta: Any, header: str | None) -> str | Refused | None:
    """The key the client sent (``_meta`` member or HTTP header), a refusal when it
    is malformed or the two disagree, ``None`` when it sent none."""
    from_meta = meta.get(IDEMPOTENCY_META_KEY) if isinstance(meta, dict) else None
    field = f"_meta.{IDEMPOTENCY_META_KEY}"
    if from_meta is not None and not (isinstance(from_meta, str) and valid_key(from_meta)):
        return _field_refusal(field, "must be 1-255 printable ASCII characters")
    if header is not None and not valid_key(header):
        return _field_refusal(IDEMPOTENCY_HEADER, "must be 1-255 printable ASCII characters")
    if from_meta is not None and header is not None and from_meta != header:
        return _field_refusal(field, f"differs from the {IDEMPOTENCY_HEADER} header")
    return from_meta if from_meta is not None else header


def call_key(
    ctx: ServerRequestContext[Any, Any],
    api_key_id: str,
    session_id: str | None,
    *,
    header: str | None,
) -> str | Refused | None:
    """The idempotency key of one ``tools/call`` (SPEC §7), or a refusal of the key
    the client sent.

    - The client named one (``_meta`` ``dev.dpp/idempotencyKey``, or the
      ``Idempotency-Key`` header): that key, for this API key.
    - Else, in a session (an ``Mcp-Session-Id`` the client sent back, or the
      stdio process): the session and the JSON-RPC request id, for this API key.
    - Else ``None``: a sessionless request (protocol 2026-07-28 has no sessions)
      repeats nothing that tells its retry from another call — SDK clients
      number requests 1, 2, 3 in every process — so it is never deduplicated
      rather than risk answering one call with another call's run.
    """
    supplied = _supplied_key(ctx.meta, header)
    if isinstance(supplied, Refused):
        return supplied
    if supplied is not None:
        return client_key(api_key_id, supplied)
    if session_id is None or ctx.request_id is None:
        return None
    return idempotency_key(api_key_id, session_id, ctx.request_id)


def _usd(micros: int) -> str:
    return f"{micros / USD_MICROS:.6f}".rstrip("0").rstrip(".") + " USD"


def _price(pricing: dict[str, Any]) -> str:
    """A pack's pricing in words: ``{"model": "fixed", "usd_micros_per_run": 1000}``
    is "fixed: 0.001 USD per run"."""
    parts = []
    for name, value in pricing.items():
        if name == "model":
            continue
        if isinstance(value, int) and not isinstance(value, bool) and "usd_micros" in name:
            if name.startswith("usd_micros_per_"):
                parts.append(f"{_usd(value)} per {name.removeprefix('usd_micros_per_')}")
            else:
                parts.append(f"{name.replace('_usd_micros', '')} {_usd(value)}")
        else:
            parts.append(f"{name} {value}")
    return f"{pricing.get('model', 'price')}: {', '.join(parts)}"


def _tool_description(pack: dict[str, Any]) -> str:
    return (
        f"{pack['description']} Runs the DPP pack {pack['pack_type']!r} and waits for its"
        f" result. Price ({_price(pack['pricing'])}); minimum fee"
        f" {_usd(pack['minimum_fee_usd_micros'])}; each call reserves"
        f" {_usd(pack['default_reservation_usd_micros'])} (the default reservation) and is"
        " charged the actual cost, the rest refunded."
    )


def list_tools(catalog: list[dict[str, Any]]) -> list[types.Tool]:
    tools = [
        types.Tool(
            name=pack["pack_type"],
            description=_tool_description(pack),
            input_schema=pack["input_schema"],
        )
        for pack in catalog
    ]
    tools.append(
        types.Tool(
            name=GET_BUDGET,
            description="The tenant's budget: balance, reserved and available USD micros,"
            " and the plan's limits.",
            input_schema={"type": "object", "properties": {}, "additionalProperties": False},
        )
    )
    tools.append(
        types.Tool(
            name=GET_RUN,
            description="A run's status, charged and refunded USD micros, and its result once"
            " COMPLETED (for a call that answered while its run was still running).",
            input_schema={
                "type": "object",
                "properties": {"run_id": {"type": "string", "maxLength": RUN_ID_CHARS_MAX}},
                "required": ["run_id"],
                "additionalProperties": False,
            },
        )
    )
    return tools


def _text(document: Any) -> list[types.ContentBlock]:
    return [types.TextContent(type="text", text=orjson.dumps(document).decode())]


def _hint(problem: dict[str, Any]) -> str:
    """What an agent can do about a refusal, in a sentence."""
    status = problem.get("status")
    if status == 402 and "available_usd_micros" in problem:
        return (
            f" Available: {problem['available_usd_micros']} USD micros; this call needs"
            f" {problem.get('required_usd_micros')}. The budget must be topped up first."
        )
    if status == 402:
        return " This API key's spend limit does not cover the call; ask its owner."
    retry_after = problem.get("retry_after_s")
    if retry_after is not None:
        return f" Retry after {retry_after} s."
    if status == 422 and isinstance(problem.get("field"), str):
        # a pack's arguments are the run's inputs: name the argument as the agent sent it
        field = problem["field"].removeprefix("inputs.")
        return f" Fix the argument {field!r} and call again."
    return ""


def refused_result(problem: dict[str, Any]) -> types.CallToolResult:
    detail = str(problem.get("detail", "")).rstrip(".")
    text = f"{problem.get('title', 'Error')}: {detail}.{_hint(problem)}"
    content: list[types.ContentBlock] = [types.TextContent(type="text", text=text), *_text(problem)]
    return types.CallToolResult(content=content, structured_content=problem, is_error=True)


def _field_refusal(field: str, detail: str) -> Refused:
    return Refused(
        {
            "type": "https://dpp.dev/problems/invalid-request",
            "title": "Unprocessable Content",
            "status": 422,
            "detail": f"{field}: {detail}",
            "field": field,
            "errors": [{"field": field, "message": detail}],
        }
    )


async def _run_result(backend: Backend, run: dict[str, Any]) -> types.CallToolResult:
    status = run["status"]
    result = await backend.result(run) if status == RunStatus.COMPLETED else None
    structured: dict[str, Any] = {
        "run_id": run["id"],
        "status": status,
        "charged_usd_micros": run["charged_usd_micros"],
        "refunded_usd_micros": run["refunded_usd_micros"],
        "result": result,
    }
    if status in FAILED_STATUSES:
        structured["error"] = run.get("error")
        detail = str((run.get("error") or {}).get("detail", "")).rstrip(".")
        text = (
            f"Run {run['id']} {status}: {detail}. Charged {run['charged_usd_micros']} USD"
            f" micros, refunded {run['refunded_usd_micros']}."
        )
        content: list[types.ContentBlock] = [
            types.TextContent(type="text", text=text),
            *_text(structured),
        ]
        return types.CallToolResult(content=content, structured_content=structured, is_error=True)
    return types.CallToolResult(content=_text(structured), structured_content=structured)


async def _wait_terminal(
    backend: Backend, run: dict[str, Any], wait_sec: float
) -> dict[str, Any] | Refused:
    """The run once terminal, or as it is when ``wait_sec`` ran out."""
    interval_s = POLL_INTERVAL_MIN_S
    with anyio.move_on_after(wait_sec):
        while run["status"] not in TERMINAL_STATUSES:
            await anyio.sleep(interval_s)
            interval_s = min(interval_s * 2, POLL_INTERVAL_MAX_S)
            answer = await backend.run(run["id"])
            if isinstance(answer, Refused):
                return answer
            run = answer
    return run


async def call_tool(
    backend: Backend,
    name: str,
    arguments: dict[str, Any] | None,
    *,
    idempotency_key: str | Refused | None,
    wait_sec: float,
) -> types.CallToolResult:
    """One ``tools/call``; unknown tool names are a JSON-RPC error (invalid params).
    ``idempotency_key`` is a pack call's key, or the refusal of the key the client
    sent (only a pack's call, which submits, answers it)."""
    assert wait_sec >= 0 and math.isfinite(wait_sec)
    arguments = arguments or {}
    answer: dict[str, Any] | Refused
    if name == GET_BUDGET:
        if arguments:
            answer = _field_refusal(sorted(arguments)[0], "get_budget takes no arguments")
        else:
            answer = await backend.budget()
        if isinstance(answer, Refused):
            return refused_result(answer.problem)
        return types.CallToolResult(content=_text(answer), structured_content=answer)
    if name == GET_RUN:
        run_id = arguments.get("run_id")
        if set(arguments) - {"run_id"}:
            answer = _field_refusal(sorted(set(arguments) - {"run_id"})[0], "is not an argument")
        elif not isinstance(run_id, str) or not 0 < len(run_id) <= RUN_ID_CHARS_MAX:
            answer = _field_refusal("run_id", "is required and must be a run id")
        else:
            answer = await backend.run(run_id)
        if isinstance(answer, Refused):
            return refused_result(answer.problem)
        return await _run_result(backend, answer)
    if name not in {pack["pack_type"] for pack in await backend.catalog()}:
        raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {name}")
    if isinstance(idempotency_key, Refused):
        return refused_result(idempotency_key.problem)  # nothing submitted
    answer = await backend.submit(name, arguments, idempotency_key)
    if not isinstance(answer, Refused):
        answer = await _wait_terminal(backend, answer, wait_sec)
    if isinstance(answer, Refused):
        return refused_result(answer.problem)
    return await _run_result(backend, answer)


BackendOf = Callable[[ServerRequestContext[Any, Any]], Backend]
KeyOf = Callable[[ServerRequestContext[Any, Any]], str | Refused | None]
ThrottleOf = Callable[[ServerRequestContext[Any, Any]], dict[str, Any] | None]
RATE_LIMITED_CODE = -32029  # a server-defined JSON-RPC error: over the rate limit


def _unthrottled(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any] | None:
    return None


def build_server(
    name: str,
    *,
    backend_of: BackendOf,
    key_of: KeyOf,
    wait_sec: float,
    throttle_of: ThrottleOf = _unthrottled,
    version: str = "",
) -> Server[Any]:
    """An MCP server whose tools are DPP's; ``backend_of`` answers the caller's
    backend for a request, ``key_of`` the idempotency key of a tools/call, and
    ``throttle_of`` the 429 problem of a request over the rate limit (a tools/call
    answers it as an ``isError`` result, other requests as a JSON-RPC error)."""

    async def on_list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        problem = throttle_of(ctx)
        if problem is not None:
            raise MCPError(RATE_LIMITED_CODE, problem["detail"], problem)
        return types.ListToolsResult(tools=list_tools(await backend_of(ctx).catalog()))

    async def on_call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        problem = throttle_of(ctx)
        if problem is not None:
            return refused_result(problem)
        return await call_tool(
            backend_of(ctx),
            params.name,
            params.arguments,
            idempotency_key=key_of(ctx),
            wait_sec=wait_sec,
        )

    return Server(
        name,
        version=version,
        instructions="DPP runs paid work packs against a prepaid USD budget. Each pack tool"
        " reserves its default reservation, charges the actual cost and refunds the rest;"
        " get_budget shows what is available.",
        on_list_tools=on_list_tools,
        on_call_tool=on_call_tool,
    )
