"""The tenant API's money-bearing routes: runs, budget, usage, packs (SPEC §3, §6).

Each handler parses the request, calls one service (``context.admission``,
``context.runs``, ``context.accounts``, ``context.packs``) and renders its answer;
typed refusals become problems here and nowhere else.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp.context import AppContext
from dpp.http.auth import principal_of
from dpp.http.bodies import json_response, read_json_body
from dpp.http.problems import Problem, problem_response, stealth_not_found
from dpp.limits import (
    RUNS_PAGE_LIMIT_DEFAULT,
    RUNS_PAGE_LIMIT_MAX,
    USAGE_DAYS_DEFAULT,
    USAGE_DAYS_MAX,
)
from dpp.money.rules import ALL_STATUSES, RunStatus
from dpp.packs import FieldError
from dpp.runs import idempotency
from dpp.runs.admission import (
    Admitted,
    BudgetShort,
    ConcurrencyLimit,
    KeyInFlight,
    KeyReused,
    Replayed,
    ReservationBusy,
    ReservationOutcomeUnknown,
    ReservationTimedOut,
)
from dpp.runs.documents import cost_headers, decode_cursor, run_object
from dpp.runs.service import RunGone, RunNotCancelable, RunNotFound
from dpp.runs.submission import parse_submit

DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TRACE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


def _not_found(request: Request) -> Problem:
    # One body for "no such run" and "another tenant's run": existence never leaks.
    return stealth_not_found(
        request.scope.get("state", {}).get("request_id"), "No run with this id."
    )


def _busy(detail: str) -> Problem:
    return Problem(503, "unavailable", detail, headers={"Retry-After": "1"})


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
        )
    except ReservationBusy:
        raise _busy("This tenant's budget is busy; retry shortly.") from None
    except ReservationTimedOut:
        raise _busy("The reservation did not answer in time; retry with the same key.") from None
    except ReservationOutcomeUnknown:
        raise _busy("The reservation's outcome is unknown; retry with the same key.") from None
    match outcome:
        case Admitted(body=accepted_body, headers=headers):
            return Response(accepted_body, 202, headers=headers, media_type="application/json")
        case Replayed(status=status, headers=headers, body=stored, media_type=media_type):
            replay_headers = {**headers, idempotency.REPLAYED_HEADER: "true"}
            return Response(stored, status, headers=replay_headers, media_type=media_type)
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
        case BudgetShort(available_usd_micros=available, required_usd_micros=required):
            problem = Problem(
                402,
                "insufficient-budget",
                f"This run needs {required} USD micros reserved; {available} are available.",
                extensions={"available_usd_micros": available, "required_usd_micros": required},
            )
            response = problem_response(problem, request.url.path)
            await context.admission.remember_refusal(
                outcome, "application/problem+json", bytes(response.body)
            )
            return response
        case ConcurrencyLimit(max_concurrent_runs=limit):
            raise Problem(
                429,
                "concurrency-limit",
                f"The plan allows {limit} runs queued or in progress at once.",
                extensions={"max_concurrent_runs": limit},
                headers={"Retry-After": "1"},
            )
    raise AssertionError(f"unexpected admission outcome {outcome!r}")


async def get_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    try:
        view = await context.runs.get(principal.tenant_id, request.path_params["run_id"])
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
    page = await context.runs.page(principal.tenant_id, statuses=statuses, after=after, limit=limit)
    return json_response(
        {"data": page.documents, "next_cursor": page.next_cursor, "has_more": page.has_more}
    )


async def cancel_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    try:
        row = await context.runs.cancel(principal.tenant_id, request.path_params["run_id"])
    except RunNotFound:
        raise _not_found(request) from None
    except RunNotCancelable as refused:
        raise _not_cancelable(refused.status) from None
    return json_response(run_object(row), headers=cost_headers(row))


async def get_budget(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    row = await context.accounts.budget(principal.tenant_id)
    return json_response(
        {
            "balance_usd_micros": row["balance_usd_micros"],
            "reserved_usd_micros": row["reserved_usd_micros"],
            "available_usd_micros": row["balance_usd_micros"] - row["reserved_usd_micros"],
            "plan": {
                "id": row["plan_id"],
                "requests_per_minute": row["requests_per_minute"],
                "max_concurrent_runs": row["max_concurrent_runs"],
                "retention_days": row["retention_days"],
            },
        }
    )


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
    from_date = (
        _parse_date("from", raw_from)
        if raw_from is not None
        else to_date - timedelta(days=USAGE_DAYS_DEFAULT - 1)
    )
    if from_date > to_date:
        raise _query_problem("from", "from must not be after to.")
    if (to_date - from_date).days + 1 > USAGE_DAYS_MAX:
        raise _query_problem("from", f"a usage range covers at most {USAGE_DAYS_MAX} dates.")
    rows = await context.runs.usage(principal.tenant_id, from_date, to_date)
    days = [
        {
            "date": row["day"].isoformat(),
            "pack_type": row["pack_type"],
            "runs": row["runs"],
            "completed": row["completed"],
            "failed": row["failed"],
            "expired": row["expired"],
            "canceled": row["canceled"],
            "charged_usd_micros": row["charged_usd_micros"],
            "refunded_usd_micros": row["refunded_usd_micros"],
        }
        for row in rows
    ]
    return json_response({"from": from_date.isoformat(), "to": to_date.isoformat(), "days": days})


async def list_packs(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal_of(request)
    return json_response({"packs": context.packs.catalog()})


async def runs_collection(request: Request) -> Response:
    # one route per path, so a wrong method's 405 lists every allowed one
    if request.method == "POST":
        return await submit_run(request)
    return await list_runs(request)


def routes(context: AppContext) -> list[BaseRoute]:
    return [
        Route("/v1/runs", runs_collection, methods=["GET", "POST"]),
        Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/v1/budget", get_budget, methods=["GET"]),
        Route("/v1/usage", get_usage, methods=["GET"]),
        Route("/v1/packs", list_packs, methods=["GET"]),
    ]
