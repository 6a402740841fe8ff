"""The tenant API's money-bearing routes: runs, budget, usage, packs (SPEC §3, §6)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp import ids
from dpp.actors.budget import ConcurrencyLimited, InsufficientBudget, Reserved
from dpp.actors.kernel import ActorCrashed, AskTimeout, MailboxFull
from dpp.adapters.queue.base import QueuedRun
from dpp.context import AppContext
from dpp.http.app import json_response, read_json_body
from dpp.http.auth import principal_of
from dpp.http.problems import Problem, problem_response, stealth_not_found
from dpp.metrics import metrics_for
from dpp.money import ledger
from dpp.money.rules import ALL_STATUSES, TERMINAL_STATUSES, Outcome, RunStatus
from dpp.runs import idempotency
from dpp.runs.documents import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    cost_headers,
    decode_cursor,
    encode_cursor,
    parse_submit,
    queued_row,
    run_object,
    timestamp,
)

log = logging.getLogger("dpp.runs")

STORED_HEADERS = ("Location", "X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee", "Content-Type")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
USAGE_DAYS_MAX = 366
USAGE_DAYS_DEFAULT = 30


def _not_found(request: Request) -> Problem:
    # One body for "no such run" and "another tenant's run": existence never leaks.
    return stealth_not_found(
        request.scope.get("state", {}).get("request_id"), "No run with this id."
    )


def _busy(detail: str) -> Problem:
    return Problem(503, "unavailable", detail, headers={"Retry-After": "1"})


def _field_errors_problem(errors: list[Any]) -> Problem:
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
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) else None


async def submit_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    tenant_id = principal.tenant_id
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

    scope = None
    if raw_key is not None:
        scope = idempotency.Scope(tenant_id, "POST", "/v1/runs", raw_key)
        begun = await idempotency.begin(
            context.pool, context.queries, scope, idempotency.request_fingerprint(body)
        )
        match begun:
            case idempotency.Replay(status=status, headers=headers, body=stored):
                replay_headers = {**headers, idempotency.REPLAYED_HEADER: "true"}
                media_type = replay_headers.pop("Content-Type", "application/json")
                return Response(stored, status, headers=replay_headers, media_type=media_type)
            case idempotency.InFlight():
                raise Problem(
                    409,
                    "idempotency-key-in-use",
                    "A request with this Idempotency-Key is still being processed.",
                    headers={"Retry-After": "1"},
                )
            case idempotency.Mismatch():
                raise Problem(
                    422,
                    "idempotency-key-reused",
                    "This Idempotency-Key was used with a different request body.",
                    extensions={"field": "Idempotency-Key"},
                )
            case idempotency.Proceed():
                pass

    run_id = ids.new_id("run")
    created_at = datetime.now(UTC)
    row = queued_row(
        run_id=run_id,
        pack_type=parsed.pack.pack_type,
        reserved_usd_micros=parsed.reserved_usd_micros,
        minimum_fee_usd_micros=parsed.minimum_fee_usd_micros,
        metadata=parsed.metadata,
        created_at=created_at,
    )
    accepted_body = orjson.dumps(run_object(row))
    accepted_headers = {"Location": f"/v1/runs/{run_id}", **cost_headers(row)}
    completion = None
    if scope is not None:
        completion = ledger.IdempotencyCompletion(
            "POST",
            "/v1/runs",
            scope.key,
            202,
            {**accepted_headers, "Content-Type": "application/json"},
            accepted_body,
        )
    draft = ledger.RunDraft(
        run_id=run_id,
        pack_type=parsed.pack.pack_type,
        inputs=parsed.inputs,
        metadata=parsed.metadata,
        reserved_usd_micros=parsed.reserved_usd_micros,
        minimum_fee_usd_micros=parsed.minimum_fee_usd_micros,
        timebox_sec=parsed.timebox_sec,
        trace_id=_trace_id(request),
        created_at=created_at,
        idempotency=completion,
    )
    metrics = metrics_for(context.metrics_registry)
    try:
        outcome = await context.money.reserve(tenant_id, draft)
    except MailboxFull:
        metrics.mailbox_full_rejections.labels("budget").inc()
        if scope is not None:
            await idempotency.abandon(context.pool, context.queries, scope)
        raise _busy("This tenant's budget is busy; retry shortly.") from None
    except AskTimeout:
        # The reservation may still commit; its idempotency record then says so.
        raise _busy("The reservation did not answer in time; retry with the same key.") from None
    except ActorCrashed:
        # The budget actor died mid-batch (it is being restarted). Whether this
        # reservation committed is unknown to us: keep the idempotency record, whose
        # state the reservation's own transaction decides, so a retry with the same
        # key replays the run if it exists and proceeds once the lock expires if not.
        log.error("budget actor crashed during a reservation", extra={"run_id": run_id})
        raise _busy("The reservation's outcome is unknown; retry with the same key.") from None
    except Exception:
        if scope is not None:
            await idempotency.abandon(context.pool, context.queries, scope)
        raise

    match outcome:
        case Reserved():
            metrics.reservations.labels("reserved").inc()
            metrics.runs_submitted.labels(parsed.pack.pack_type).inc()
            if context.queue is not None:
                try:
                    await context.queue.enqueue(
                        [
                            QueuedRun(
                                run_id, tenant_id, parsed.pack.pack_type, draft.trace_id, created_at
                            )
                        ]
                    )
                except Exception:
                    # The run is durable and QUEUED; the queue's backstop finds it.
                    log.warning(
                        "enqueue failed after admission", extra={"run_id": run_id}, exc_info=True
                    )
            log.info("run admitted", extra={"run_id": run_id, "tenant_id": tenant_id})
            return Response(
                accepted_body, 202, headers=accepted_headers, media_type="application/json"
            )
        case InsufficientBudget(available_usd_micros=available, required_usd_micros=required):
            metrics.reservations.labels("insufficient").inc()
            problem = Problem(
                402,
                "insufficient-budget",
                f"This run needs {required} USD micros reserved; {available} are available.",
                extensions={"available_usd_micros": available, "required_usd_micros": required},
            )
            response = problem_response(problem, request.url.path)
            if scope is not None:
                await idempotency.complete(
                    context.pool,
                    context.queries,
                    scope,
                    402,
                    {"Content-Type": "application/problem+json"},
                    bytes(response.body),
                )
            return response
        case ConcurrencyLimited(max_concurrent_runs=limit):
            metrics.reservations.labels("rejected").inc()
            if scope is not None:
                await idempotency.abandon(context.pool, context.queries, scope)
            raise Problem(
                429,
                "concurrency-limit",
                f"The plan allows {limit} runs queued or in progress at once.",
                extensions={"max_concurrent_runs": limit},
                headers={"Retry-After": "1"},
            )
    raise AssertionError(f"unexpected reservation outcome {outcome!r}")


async def _owned_run(request: Request, tenant_id: str, run_id: str) -> Any:
    context: AppContext = request.app.state.context
    if not ids.is_id(run_id, "run"):
        raise _not_found(request)
    row = await context.pool.fetchrow(context.queries["get_run"], run_id, tenant_id)
    if row is None:
        raise _not_found(request)
    return row


async def _result_link(context: AppContext, row: Any) -> dict[str, Any] | None:
    if row["status"] != "COMPLETED" or row["result_key"] is None or row["result_deleted_at"]:
        return None
    expires_at = datetime.now(UTC) + timedelta(seconds=context.blobs.presign_expiry_sec)
    return {
        "download_url": await context.blobs.presigned_get(row["result_key"]),
        "expires_at": timestamp(expires_at),
        "sha256": row["result_sha256"],
        "bytes": row["result_bytes"],
        "content_type": row["result_content_type"],
    }


def _gone_if_past_retention(row: Any) -> None:
    retention = row["retention_until"]
    if (
        row["status"] in TERMINAL_STATUSES
        and retention is not None
        and retention <= datetime.now(UTC)
    ):
        raise Problem(
            410,
            "gone",
            "This run is past its retention period; its result was deleted.",
            extensions={
                "run_status": row["status"],
                "charged_usd_micros": row["charged_usd_micros"],
                "refunded_usd_micros": row["refunded_usd_micros"],
            },
        )


async def get_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    row = await _owned_run(request, principal.tenant_id, request.path_params["run_id"])
    _gone_if_past_retention(row)
    document = run_object(row, await _result_link(context, row))
    return json_response(document, headers=cost_headers(row))


def _query_problem(name: str, detail: str) -> Problem:
    return Problem(422, "invalid-query", detail, extensions={"field": name})


async def list_runs(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    params = request.query_params
    raw_limit = params.get("limit")
    limit = LIST_LIMIT_DEFAULT
    if raw_limit is not None:
        if not re.fullmatch(r"[0-9]{1,3}", raw_limit) or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX:
            raise _query_problem("limit", f"limit must be an integer from 1 to {LIST_LIMIT_MAX}.")
        limit = int(raw_limit)
    statuses = None
    raw_status = params.get("status")
    if raw_status is not None:
        statuses = [part.strip() for part in raw_status.split(",")]
        if not statuses or any(status not in ALL_STATUSES for status in statuses):
            raise _query_problem(
                "status", f"status must be one of {', '.join(sorted(ALL_STATUSES))}."
            )
    after_created, after_id = None, None
    raw_cursor = params.get("cursor")
    if raw_cursor is not None:
        decoded = decode_cursor(raw_cursor)
        if decoded is None:
            raise _query_problem("cursor", "cursor is not one this API returned.")
        after_created, after_id = decoded
    rows = await context.pool.fetch(
        context.queries["list_runs"],
        principal.tenant_id,
        statuses,
        after_created,
        after_id,
        limit + 1,
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    data = [run_object(row, await _result_link(context, row)) for row in rows]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_more else None
    return json_response({"data": data, "next_cursor": next_cursor, "has_more": has_more})


async def cancel_run(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    row = await _owned_run(request, principal.tenant_id, request.path_params["run_id"])
    if row["status"] not in ("QUEUED", "CANCELED"):
        raise Problem(
            409,
            "run-not-cancelable",
            f"Only a QUEUED run can be canceled; this one is {row['status']}.",
            extensions={"run_status": row["status"]},
        )
    try:
        await context.money.settle(
            principal.tenant_id,
            ledger.SettleRequest(
                row["id"], Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
            ),
        )
    except ledger.SettleRefused as refused:
        raise Problem(
            409,
            "run-not-cancelable",
            f"Only a QUEUED run can be canceled; this one is {refused.status}.",
            extensions={"run_status": refused.status},
        ) from None
    row = await _owned_run(request, principal.tenant_id, row["id"])
    return json_response(run_object(row), headers=cost_headers(row))


async def get_budget(request: Request) -> Response:
    context: AppContext = request.app.state.context
    principal = principal_of(request)
    row = await context.money.budget(principal.tenant_id)
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
    rows = await context.pool.fetch(
        context.queries["usage_by_day"], principal.tenant_id, from_date, to_date
    )
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
