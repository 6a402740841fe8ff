"""The tenant API's money-bearing routes: runs, budget, usage, packs (SPEC §3, §6).

Each handler parses the request, calls one service (``context.admission``,
``context.runs``, ``context.accounts``, ``context.packs``) and renders its answer;
typed refusals become problems here and nowhere else.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import Response

from dpp.context import AppContext
from dpp.http.auth import principal_of
from dpp.http.bodies import json_response, read_json_body
from dpp.http.endpoints import (
    API_KEY,
    IDEMPOTENCY_KEY,
    RUN_ID,
    Endpoint,
    Parameter,
    Reply,
    problem,
)
from dpp.http.problems import Problem, problem_response, stealth_not_found
from dpp.limits import (
    RUNS_PAGE_LIMIT_DEFAULT,
    RUNS_PAGE_LIMIT_MAX,
    USAGE_DAYS_DEFAULT,
    USAGE_DAYS_MAX,
)
from dpp.money.accounts import BUDGET_VIEW, KEY_BUDGET, budget_view, key_budget
from dpp.money.rules import ALL_STATUSES, RunStatus
from dpp.packs import PACK_CATALOG, FieldError
from dpp.runs import idempotency
from dpp.runs.admission import (
    Admitted,
    BudgetShort,
    ConcurrencyLimit,
    KeyInFlight,
    KeyReused,
    KeySpendShort,
    KeyTakenOver,
    Replayed,
    ReservationBusy,
    ReservationExpired,
    ReservationInvalid,
    ReservationOutcomeUnknown,
    ReservationSuspended,
    ReservationTimedOut,
)
from dpp.runs.documents import (
    RUN,
    RUN_PAGE,
    USAGE,
    cost_headers,
    decode_cursor,
    page_document,
    run_object,
    usage_document,
)
from dpp.runs.service import RunGone, RunNotCancelable, RunNotFound, SettlementUnavailable
from dpp.runs.submission import SUBMISSION, parse_submit
from dpp.schemas import DATE, Schema, all_required, integer
from dpp.tenancy.principal import PLAN_LIMITS, Principal, plan_limits

DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TRACE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
# Distinct (scheme, server, Host, root path) whose base URL is kept: the Host
# header is the client's, so the cache is bounded.
BASE_URL_CACHE_SIZE = 256


def _not_found(request: Request) -> Problem:
    # One body for "no such run" and "another tenant's run": existence never leaks.
    return stealth_not_found(
        request.scope.get("state", {}).get("request_id"), "No run with this id."
    )


def _busy(detail: str, retry_after_s: int = 1) -> Problem:
    return Problem(503, "unavailable", detail, headers={"Retry-After": str(retry_after_s)})


def _key_taken_over() -> Problem:
    return Problem(
        409,
        "idempotency-key-in-use",
        "This request held its Idempotency-Key past the lock and another request with"
        " the key took it over; nothing was reserved for this one. Retry to get that"
        " request's outcome.",
        headers={"Retry-After": "1"},
    )


def _unknown_outcome(what: str, keyed: bool) -> Problem:
    """503 for a reservation that may have been made: only a client that sent a key
    can safely retry with it (the key's record was released, so a retry replays
    the run if it was made and proceeds if not)."""
    if keyed:
        return _busy(f"{what}; retry with the same Idempotency-Key.")
    return _busy(
        f"{what}, and it may have been made: list your runs before retrying, or send"
        " an Idempotency-Key so that a retry cannot create a second run."
    )


def _field_errors_problem(errors: list[FieldError]) -> Problem:
    first = errors[0]
    return Problem(
        422,
        "invalid-request",
        f"{first.field}: {first.message}",
        extensions={
            "field": first.field,
            "errors": [{"field": e.field, "message": e.message} for e in errors],
        },
    )


def _trace_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("trace_id")
    return value if isinstance(value, str) and TRACE_ID_PATTERN.fullmatch(value) else None


def _not_cancelable(status: str) -> Problem:
    return Problem(
        409,
        "run-not-cancelable",
        f"Only a QUEUED run can be canceled; this one is {status}.",
        extensions={"run_status": status},
    )


async def submit_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    raw_key = request.headers.get("idempotency-key")
    if raw_key is not None and not idempotency.valid_key(raw_key):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Idempotency-Key must be 1-255 printable ASCII characters.",
        )
    body = await read_json_body(request)
    parsed = parse_submit(body, context.packs)
    if isinstance(parsed, list):
        raise _field_errors_problem(parsed)
    try:
        outcome = await context.admission.submit(
            principal.tenant_id,
            parsed,
            body=body,
            idempotency_key=raw_key,
            trace_id=_trace_id(request),
            api_key_id=principal.key_id,
        )
    except ReservationBusy:
        raise _busy("This tenant's budget is busy; nothing was reserved. Retry shortly.") from None
    except ReservationSuspended as suspended:
        raise _busy(
            "This tenant's budget is paused after repeated failures; nothing was reserved. "
            "Retry later.",
            suspended.retry_after_s,
        ) from None
    except ReservationExpired:
        raise _busy(
            "The reservation did not answer in time; nothing was reserved. Retry."
        ) from None
    except ReservationInvalid:
        # The checks above let through a value Postgres refused: still the body's fault.
        raise Problem(
            422,
            "invalid-request",
            "body: holds a value that cannot be stored.",
            extensions={"field": "body"},
        ) from None
    except ReservationTimedOut:
        keyed = raw_key is not None
        raise _unknown_outcome("The reservation did not answer in time", keyed) from None
    except ReservationOutcomeUnknown:
        keyed = raw_key is not None
        raise _unknown_outcome("The reservation's outcome is unknown", keyed) from None
    match outcome:
        case Admitted(run_id=run_id, body=accepted_body, headers=headers):
            # the request's access line names the run: it is the run's "admitted" line
            request.state.run_id = run_id
            return Response(accepted_body, 202, headers=headers, media_type="application/json")
        case Replayed() | KeyTakenOver() | KeyInFlight() | KeyReused():
            return _keyed_answer(outcome)
        case BudgetShort() | KeySpendShort():
            return await _stored_refusal(context, request, outcome, short_problem(outcome))
        case ConcurrencyLimit(max_concurrent_runs=limit):
            raise Problem(
                429,
                "concurrency-limit",
                f"The plan allows {limit} runs queued or in progress at once.",
                extensions={"max_concurrent_runs": limit},
                headers={"Retry-After": "1"},
            )
    raise AssertionError(f"unexpected admission outcome {outcome!r}")


def _keyed_answer(outcome: Replayed | KeyTakenOver | KeyInFlight | KeyReused) -> Response:
    """The answer decided by the request's Idempotency-Key (SPEC §6)."""
    match outcome:
        case Replayed(status=status, headers=headers, body=stored, media_type=media_type):
            replay_headers = {**headers, idempotency.REPLAYED_HEADER: "true"}
            return Response(stored, status, headers=replay_headers, media_type=media_type)
        case KeyTakenOver():
            raise _key_taken_over()
        case KeyInFlight():
            raise Problem(
                409,
                "idempotency-key-in-use",
                "A request with this Idempotency-Key is still being processed.",
                headers={"Retry-After": "1"},
            )
        case KeyReused():
            raise Problem(
                422,
                "idempotency-key-reused",
                "This Idempotency-Key was used with a different request body.",
                extensions={"field": "Idempotency-Key"},
            )


def short_problem(outcome: BudgetShort | KeySpendShort) -> Problem:
    """The 402 of a refused reservation: the tenant's budget or the key's spend
    limit (SPEC §3, §7). ``POST /v1/runs`` and the MCP tools answer the same."""
    match outcome:
        case BudgetShort(available_usd_micros=available, required_usd_micros=required):
            return Problem(
                402,
                "insufficient-budget",
                f"This run needs {required} USD micros reserved; {available} are available.",
                extensions={"available_usd_micros": available, "required_usd_micros": required},
            )
        case KeySpendShort(
            spend_limit_usd_micros=limit, spent_usd_micros=spent, required_usd_micros=required
        ):
            return Problem(
                402,
                "key-spend-limit",
                f"This run needs {required} USD micros reserved; this API key has spent"
                f" {spent} of its {limit} USD micros limit.",
                extensions={
                    "spend_limit_usd_micros": limit,
                    "spent_usd_micros": spent,
                    "required_usd_micros": required,
                },
            )


async def _stored_refusal(
    context: AppContext, request: Request, outcome: BudgetShort | KeySpendShort, problem: Problem
) -> Response:
    """A 402, stored for the request's Idempotency-Key so a retry replays it (SPEC §6)."""
    response = problem_response(problem, request.url.path)
    remembered = await context.admission.remember_refusal(
        outcome, "application/problem+json", bytes(response.body)
    )
    if isinstance(remembered, BudgetShort | KeySpendShort):
        return response
    # the key was another request's after all: its answer is this one's
    return _keyed_answer(remembered)


async def get_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    try:
        view = await context.runs.get(
            principal.tenant_id, request.path_params["run_id"], base_url=api_base_url(request)
        )
    except RunNotFound:
        raise _not_found(request) from None
    except RunGone as gone:
        raise Problem(
            410,
            "gone",
            "This run is past its retention period; its result was deleted.",
            extensions={
                "run_status": gone.status,
                "charged_usd_micros": gone.charged_usd_micros,
                "refunded_usd_micros": gone.refunded_usd_micros,
            },
        ) from None
    return json_response(view.document, headers=cost_headers(view.row))


def api_base_url(request: Request) -> str:
    """Where the client reached this API (scheme, host, root path), for links to it."""
    scope = request.scope
    host = next((value for name, value in scope["headers"] if name == b"host"), None)
    server = scope.get("server")
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    return _base_url(
        scope.get("scheme", "http"), None if server is None else tuple(server), host, root_path
    )


@functools.lru_cache(maxsize=BASE_URL_CACHE_SIZE)
def _base_url(
    scheme: str, server: tuple[str, int] | None, host: bytes | None, root_path: str
) -> str:
    """Starlette's ``request.base_url``, built from what it is built from, and
    cached: building it was ~5 % of a loaded ``GET /v1/runs/{id}``'s CPU."""
    path = root_path if root_path.endswith("/") else root_path + "/"
    headers = [] if host is None else [(b"host", host)]
    scope = {
        "scheme": scheme,
        "server": server,
        "path": path,
        "query_string": b"",
        "headers": headers,
    }
    return str(URL(scope=scope)).rstrip("/")


def _query_problem(name: str, detail: str) -> Problem:
    return Problem(422, "invalid-query", detail, extensions={"field": name})


async def list_runs(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    params = request.query_params
    raw_limit = params.get("limit")
    limit = RUNS_PAGE_LIMIT_DEFAULT
    if raw_limit is not None:
        if (
            not re.fullmatch(r"[0-9]{1,3}", raw_limit)
            or not 1 <= int(raw_limit) <= RUNS_PAGE_LIMIT_MAX
        ):
            raise _query_problem(
                "limit", f"limit must be an integer from 1 to {RUNS_PAGE_LIMIT_MAX}."
            )
        limit = int(raw_limit)
    statuses = None
    raw_status = params.get("status")
    if raw_status is not None:
        parts = [part.strip() for part in raw_status.split(",")]
        if not parts or any(part not in ALL_STATUSES for part in parts):
            raise _query_problem(
                "status", f"status must be one of {', '.join(sorted(ALL_STATUSES))}."
            )
        statuses = [RunStatus(part) for part in parts]
    after = None
    raw_cursor = params.get("cursor")
    if raw_cursor is not None:
        after = decode_cursor(raw_cursor)
        if after is None:
            raise _query_problem("cursor", "cursor is not one this API returned.")
    page = await context.runs.page(
        principal.tenant_id,
        statuses=statuses,
        after=after,
        limit=limit,
        base_url=api_base_url(request),
    )
    return json_response(page_document(page.documents, page.next_cursor, page.has_more))


async def cancel_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    try:
        row = await context.runs.cancel(principal.tenant_id, request.path_params["run_id"])
    except RunNotFound:
        raise _not_found(request) from None
    except RunNotCancelable as refused:
        raise _not_cancelable(refused.status) from None
    except SettlementUnavailable as busy:
        # a cancel is idempotent (SPEC §6): retrying it is always safe
        raise _busy(
            "This tenant's budget could not cancel it now; retry.", busy.retry_after_s
        ) from None
    return json_response(run_object(row), headers=cost_headers(row))


async def get_budget(request: Request) -> Response:
    context: AppContext = request.app.state.context
    return json_response(await budget_document(context, principal_of(request)))


async def budget_document(context: AppContext, principal: Principal) -> dict[str, Any]:
    """``GET /v1/budget``'s document for the calling key (the MCP get_budget tool too)."""
    row, spend = await context.accounts.key_budget(principal.tenant_id, principal.key_id)
    plan = plan_limits(
        row["plan_id"],
        row["requests_per_minute"],
        row["max_concurrent_runs"],
        row["retention_days"],
    )
    view = budget_view(row["balance_usd_micros"], row["reserved_usd_micros"])
    document = {
        **view,
        "plan": plan,
        "key": key_budget(principal.key_id, spend, view["available_usd_micros"]),
    }
    assert document.keys() == BUDGET.members
    return document


def _parse_date(name: str, value: str) -> date:
    if not DATE_PATTERN.fullmatch(value):
        raise _query_problem(name, f"{name} must be a date like 2026-01-31.")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _query_problem(name, f"{name} is not a real date.") from None


async def get_usage(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    today = datetime.now(UTC).date()
    raw_from, raw_to = request.query_params.get("from"), request.query_params.get("to")
    to_date = _parse_date("to", raw_to) if raw_to is not None else today
    if raw_from is not None:
        from_date = _parse_date("from", raw_from)
    else:
        # the default range, cut at the first date there is (to=0001-01-01)
        default_days = min(USAGE_DAYS_DEFAULT - 1, (to_date - date.min).days)
        from_date = to_date - timedelta(days=default_days)
    if from_date > to_date:
        raise _query_problem("from", "from must not be after to.")
    if (to_date - from_date).days + 1 > USAGE_DAYS_MAX:
        raise _query_problem("from", f"a usage range covers at most {USAGE_DAYS_MAX} dates.")
    rows = await context.runs.usage(principal.tenant_id, from_date, to_date)
    return json_response(usage_document(from_date, to_date, rows))


async def list_packs(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal_of(request)
    return json_response({"packs": context.packs.catalog()})


BUDGET = Schema(
    "Budget",
    all_required({**BUDGET_VIEW.properties, "plan": PLAN_LIMITS, "key": KEY_BUDGET}),
)
_STATUS_NAMES = "|".join(status.value for status in RunStatus)
LIMIT = Parameter(
    "limit",
    "query",
    integer(1, RUNS_PAGE_LIMIT_MAX, default=RUNS_PAGE_LIMIT_DEFAULT),
    "Page size.",
)
CURSOR = Parameter("cursor", "query", {"type": "string"}, "next_cursor of the previous page.")
STATUS = Parameter(
    "status",
    "query",
    {"type": "string", "pattern": f"^ *({_STATUS_NAMES}) *(, *({_STATUS_NAMES}) *)*$"},
    "Only runs in these states: one status, or several separated by commas.",
)
FROM = Parameter(
    "from", "query", DATE, f"First UTC date (default: {USAGE_DAYS_DEFAULT - 1} days before to)."
)
TO = Parameter(
    "to", "query", DATE, f"Last UTC date (default today); at most {USAGE_DAYS_MAX} dates."
)
RUN_COSTS = ("X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee")

ENDPOINTS = (
    Endpoint(
        "POST",
        "/v1/runs",
        submit_run,
        "submitRun",
        "Submit a run",
        "runs",
        API_KEY,
        (
            Reply(
                202,
                "Accepted: the maximum cost is reserved.",
                RUN,
                ("Location", *RUN_COSTS, "Idempotent-Replayed"),
            ),
            problem(
                402,
                "Budget short (insufficient-budget: available/required members), or the"
                " calling key's spend limit short (key-spend-limit: spend_limit, spent and"
                " required members): nothing reserved.",
            ),
            problem(
                409,
                "The same Idempotency-Key is being processed concurrently, or another"
                " request took it over after this one's lock expired (nothing reserved).",
                "Retry-After",
            ),
            problem(
                422, "Unknown pack, invalid inputs or reservation, or key reuse with another body."
            ),
            problem(
                429,
                "Over the rate limit or the plan's concurrent-run limit.",
                "Retry-After",
            ),
            problem(
                503,
                "Overloaded (a mailbox is full), the reservation did not answer, the "
                "tenant's budget is paused after repeated failures, or a dependency "
                "(Postgres, Redis) is unavailable; retry after Retry-After.",
                "Retry-After",
            ),
        ),
        parameters=(IDEMPOTENCY_KEY,),
        request=SUBMISSION,
    ),
    Endpoint(
        "GET",
        "/v1/runs",
        list_runs,
        "listRuns",
        "List the tenant's runs, newest first",
        "runs",
        API_KEY,
        (
            Reply(200, "A page of runs.", RUN_PAGE),
            problem(422, "An invalid limit, cursor or status."),
        ),
        parameters=(LIMIT, CURSOR, STATUS),
    ),
    Endpoint(
        "GET",
        "/v1/runs/{run_id}",
        get_run,
        "getRun",
        "A run's state, costs and result link",
        "runs",
        API_KEY,
        (
            Reply(200, "The run.", RUN, (*RUN_COSTS, "X-DPP-Cost-Actual")),
            problem(404, "No such run for this tenant (the same bytes either way)."),
            problem(410, "Past retention (run_status, charged and refunded members)."),
        ),
        parameters=(RUN_ID,),
    ),
    Endpoint(
        "POST",
        "/v1/runs/{run_id}/cancel",
        cancel_run,
        "cancelRun",
        "Cancel a QUEUED run (full refund)",
        "runs",
        API_KEY,
        (
            Reply(
                200,
                "The canceled run (also when it was already canceled).",
                RUN,
                (*RUN_COSTS, "X-DPP-Cost-Actual"),
            ),
            problem(404, "No such run for this tenant."),
            problem(409, "The run is not QUEUED."),
            problem(503, "The tenant's budget could not settle it now; retry.", "Retry-After"),
        ),
        parameters=(RUN_ID,),
    ),
    Endpoint(
        "GET",
        "/v1/budget",
        get_budget,
        "getBudget",
        "Balance, reserved, available, plan limits and the calling key's spend",
        "budget",
        API_KEY,
        (Reply(200, "The tenant's budget.", BUDGET),),
    ),
    Endpoint(
        "GET",
        "/v1/usage",
        get_usage,
        "getUsage",
        "Per-day, per-pack counts and money",
        "usage",
        API_KEY,
        (
            Reply(200, "Usage by UTC date of creation.", USAGE),
            problem(422, f"A bad date, from after to, or more than {USAGE_DAYS_MAX} dates."),
        ),
        parameters=(FROM, TO),
    ),
    Endpoint(
        "GET",
        "/v1/packs",
        list_packs,
        "listPacks",
        "The pack catalog: input schemas and prices",
        "packs",
        API_KEY,
        (Reply(200, "Every pack this deployment offers.", PACK_CATALOG),),
    ),
)
