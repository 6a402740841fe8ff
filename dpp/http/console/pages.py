"""The console's pages and actions: each calls the context's services, as the admin API does.

No SQL and no adapter here: tenants and keys through ``Tenancy``, budgets and
the audit through ``Accounts``, runs and resolving through ``Runs``, credits
through ``Budgets`` (the one door money moves through) and a reconciliation
pass through the ``Reconciler``. A top-up carries an idempotency id generated
into its form, so submitting the same form twice adds once.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from dpp.actors.budgets import CreditUnavailable
from dpp.actors.reconciler import ReconcilerUnavailable
from dpp.context import AppContext
from dpp.http.console.chart import UsagePoint, usage_chart
from dpp.http.console.gate import PREFIX, Call, PageError, read_form, signing_key
from dpp.http.console.render import error_page, page
from dpp.http.console.session import (
    SESSION_COOKIE,
    SESSION_TTL_S,
    SIGN_IN_COOKIE,
    SIGN_IN_TTL_S,
    issue_session,
    sign_in_csrf,
    verify_csrf,
)
from dpp.http.problems import not_found_problem
from dpp.http.routes.ops import READINESS_TIMEOUT_S, check_readiness
from dpp.limits import CREDIT_USD_MICROS_MAX, USAGE_DAYS_MAX
from dpp.money import ledger
from dpp.money.accounts import key_budget
from dpp.money.rules import KeySpend, Outcome, RunStatus
from dpp.runs import idempotency
from dpp.runs.documents import decode_cursor, encode_cursor
from dpp.runs.service import (
    ChargeAboveReservation,
    RunNotAuditRequired,
    RunNotFound,
    SettlementUnavailable,
)
from dpp.tenancy.principal import TenantNotFound

log = logging.getLogger("dpp.http.console")

SIGN_IN_ATTEMPTS: Final = 5  # per client address per window, across every replica
SIGN_IN_WINDOW_S: Final = 60
TOPUP_ID_PREFIX: Final = "console-"
USAGE_DEFAULT_DAYS: Final = 30
RUNS_PER_PAGE: Final = 100
# each carries its ledger entries (a query) and a resolve form
AUDIT_ITEMS_PER_PAGE: Final = 50
# the console's own assets, read once: (bytes, media type) by file name
STATIC: Final = {
    name: ((Path(__file__).parent / "static" / name).read_bytes(), media_type)
    for name, media_type in (("console.css", "text/css"), ("favicon.svg", "image/svg+xml"))
}


def _base(call: Call, nav: str, title: str, **values: Any) -> dict[str, Any]:
    return {"csrf": call.csrf, "nav": nav, "title": title, "signed_in": True, **values}


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


# --- signing in and out -------------------------------------------------------------------


def _sign_in_page(request: Request, key: bytes, message: str | None, status: int) -> Response:
    pre_session = request.cookies.get(SIGN_IN_COOKIE) or ""
    fresh = len(pre_session) < 16 or len(pre_session) > 64
    if fresh:
        pre_session = secrets.token_urlsafe(24)
    response = page(
        "sign_in.html",
        {
            "title": "Sign in",
            "nav": None,
            "signed_in": False,
            "csrf": sign_in_csrf(key, pre_session),
            "message": message,
        },
        status=status,
    )
    if fresh:
        response.set_cookie(
            SIGN_IN_COOKIE,
            pre_session,
            max_age=SIGN_IN_TTL_S,
            path=PREFIX,
            secure=_secure(request),
            httponly=True,
            samesite="strict",
        )
    return response


async def sign_in_form(request: Request) -> Response:
    key = signing_key(request)
    if key is None:
        raise not_found_problem()
    return _sign_in_page(request, key, None, 200)


async def sign_in(request: Request) -> Response:
    context: AppContext = request.app.state.context
    key = signing_key(request)
    token = context.settings.admin_token
    if key is None or not token:
        raise not_found_problem()
    form = await read_form(request)
    pre_session = request.cookies.get(SIGN_IN_COOKIE)
    if not pre_session or not verify_csrf(sign_in_csrf(key, pre_session), form.get("csrf")):
        return error_page(
            403, "This form's CSRF token is missing or wrong; reload the page.", signed_in=False
        )
    address = request.client.host if request.client is not None else "unknown"
    try:
        wait_s = await context.rate_limiter.attempt(
            f"console-sign-in:{address}", SIGN_IN_ATTEMPTS, SIGN_IN_WINDOW_S
        )
    except Exception as error:
        dependency = context.unavailable_dependency(error) or "redis"
        log.warning("console sign-in: rate limiter unavailable", extra={"dependency": dependency})
        return error_page(
            503,
            "The sign-in limiter is unavailable; retry shortly.",
            signed_in=False,
            retry_after_s=2,
        )
    if wait_s is not None:
        log.warning("console sign-in: too many attempts", extra={"client": address})
        return error_page(
            429,
            f"Too many sign-in attempts from this address; wait {wait_s} s.",
            signed_in=False,
            retry_after_s=wait_s,
        )
    presented = form.get("token", "").encode("utf-8")
    if not hmac.compare_digest(presented, token.encode("utf-8")):
        log.warning("console sign-in refused: wrong admin token", extra={"client": address})
        return _sign_in_page(request, key, "That is not this deployment's admin token.", 401)
    log.info("console sign-in", extra={"client": address})
    response = RedirectResponse(PREFIX, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        issue_session(key),
        max_age=SESSION_TTL_S,
        path=PREFIX,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=PREFIX)
    return response


async def sign_out(call: Call) -> Response:
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE, path=PREFIX, secure=_secure(call.request), httponly=True, samesite="strict"
    )
    return response


async def static_file(request: Request) -> Response:
    found = STATIC.get(request.path_params["name"])
    if signing_key(request) is None or found is None:
        raise not_found_problem()
    body, media_type = found
    return Response(
        body,
        media_type=media_type,
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )


# --- overview -------------------------------------------------------------------------------


def _tree_rows(node: dict[str, Any], depth: int = 0) -> list[dict[str, Any]]:
    rows = [{**node, "depth": depth, "indent": min(depth, 6)}]
    for child in node.get("children", []):
        rows.extend(_tree_rows(child, depth + 1))
    return rows


async def overview(call: Call) -> Response:
    context = call.context
    readiness = await check_readiness(context.readiness, READINESS_TIMEOUT_S)
    report = await context.accounts.audit()
    return page(
        "overview.html",
        _base(
            call,
            "overview",
            "Overview",
            readiness=readiness,
            tree=_tree_rows(context.actors_tree()),
            audit=report.as_json(),
            can_reconcile=context.reconciler is not None,
        ),
    )


async def reconcile(call: Call) -> Response:
    reconciler = call.context.reconciler
    if reconciler is None:
        raise PageError(503, "The reconciler is not running on this replica.", 5)
    try:
        report = await reconciler.reconcile_once()
    except ReconcilerUnavailable:
        raise PageError(503, "The reconciler did not answer in time; retry shortly.", 5) from None
    log.info("console: reconciliation pass run")
    document = dict(report)
    errors = list(document.pop("errors", []))
    return page(
        "reconciled.html",
        _base(call, "overview", "Reconciliation pass", report=document, errors=errors),
    )


# --- tenants --------------------------------------------------------------------------------


async def tenants(call: Call) -> Response:
    text = call.query("q")[:200]
    found = await call.context.tenancy.search_tenants(text, limit=100)
    return page("tenants.html", _base(call, "tenants", "Tenants", q=text, tenants=found))


async def _tenant_or_404(call: Call, tenant_id: str) -> Any:
    try:
        return await call.context.tenancy.get_tenant(tenant_id)
    except TenantNotFound:
        raise PageError(404, "No tenant with this id.") from None


async def tenant(call: Call) -> Response:
    tenant_id = call.request.path_params["tenant_id"]
    found = await _tenant_or_404(call, tenant_id)
    context = call.context
    try:
        both = await context.accounts.both_stores(tenant_id)
    except ledger.TenantNotFound:
        raise PageError(404, "No tenant with this id.") from None
    available = both.postgres.balance_usd_micros - both.postgres.reserved_usd_micros
    keys = [
        (
            key,
            key_budget(
                key.id, KeySpend(key.spend_limit_usd_micros, key.spent_usd_micros), available
            ),
        )
        for key in await context.tenancy.tenant_keys(tenant_id)
    ]
    notice = {
        "added": "Credit added.",
        "replayed": "This top-up was already applied; nothing was added again.",
    }.get(call.query("topup"))
    return page(
        "tenant.html",
        _base(
            call,
            "tenants",
            f"Tenant {found.name}",
            tenant=found,
            both=both,
            keys=keys,
            notice=notice,
            topup_id=TOPUP_ID_PREFIX + secrets.token_hex(16),
        ),
    )


def parse_usd(text: str) -> int | None:
    """A positive USD amount with at most six decimals, as micros (exact)."""
    try:
        amount = Decimal(text.strip().removeprefix("$").replace(",", ""))
    except InvalidOperation:
        return None
    if not amount.is_finite():
        return None
    micros = amount * 1_000_000
    if micros != micros.to_integral_value() or not 0 < micros <= CREDIT_USD_MICROS_MAX:
        return None
    return int(micros)


async def credit(call: Call) -> Response:
    tenant_id = call.request.path_params["tenant_id"]
    await _tenant_or_404(call, tenant_id)
    topup_id = call.form.get("topup_id", "")
    if not topup_id.startswith(TOPUP_ID_PREFIX) or not idempotency.valid_key(topup_id):
        raise PageError(400, "This form has no valid top-up id; reload the tenant's page.")
    amount = parse_usd(call.form.get("amount_usd", ""))
    if amount is None:
        limit = CREDIT_USD_MICROS_MAX // 1_000_000
        raise PageError(
            422,
            f"The amount must be a positive number of USD (at most six decimals, {limit:,} max).",
        )
    try:
        result = await call.context.budgets.credit(
            tenant_id, amount, f"credit:{tenant_id}:{topup_id}"
        )
    except CreditUnavailable as busy:
        raise PageError(
            503, "This tenant's budget is busy; submit the same form again.", busy.retry_after_s
        ) from None
    except ledger.TenantNotFound:
        raise PageError(404, "No tenant with this id.") from None
    except ledger.CreditConflict:
        raise PageError(422, "This top-up id was used with another amount.") from None
    outcome = "replayed" if result.replayed else "added"
    log.info(
        "console: credit %s",
        outcome,
        extra={"tenant_id": tenant_id, "amount_usd_micros": amount},
    )
    return RedirectResponse(f"{PREFIX}/tenants/{tenant_id}?topup={outcome}", status_code=303)


# --- runs -----------------------------------------------------------------------------------


def _status_filter(text: str) -> RunStatus | None:
    if not text:
        return None
    try:
        return RunStatus(text)
    except ValueError:
        raise PageError(400, "Unknown run status.") from None


def _older_page(
    rows: list[Any], per_page: int, link: Callable[[str], str]
) -> tuple[list[Any], str | None]:
    """A page of ``rows`` read one row past ``per_page`` (newest first): the rows
    to show, and the link to the older page (``link`` of its cursor), or None
    when this page is the last."""
    if len(rows) <= per_page:
        return rows, None
    shown = rows[:per_page]
    return shown, link(encode_cursor(shown[-1]["created_at"], shown[-1]["id"]))


def _page_cursor(text: str) -> tuple[datetime, str] | None:
    if not text:
        return None
    after = decode_cursor(text)
    if after is None:
        raise PageError(400, "Unknown page of runs.")
    return after


async def runs(call: Call) -> Response:
    tenant_id = call.query("tenant")
    status = _status_filter(call.query("status"))
    after = _page_cursor(call.query("after"))
    # one row more than shown says whether an older page exists
    rows = await call.context.runs.operator_page(
        tenant_id or None, None if status is None else [status], RUNS_PER_PAGE + 1, after
    )
    status_text = status.value if status else ""

    def link(cursor: str = "") -> str:
        """This list with the same filters, after ``cursor`` (none: the newest)."""
        query = {"tenant": tenant_id, "status": status_text, "after": cursor}
        return f"{PREFIX}/runs?" + urlencode({k: v for k, v in query.items() if v})

    rows, older = _older_page(rows, RUNS_PER_PAGE, link)
    return page(
        "runs.html",
        _base(
            call,
            "runs",
            "Runs",
            rows=rows,
            tenant_id=tenant_id,
            status=status_text,
            statuses=[s.value for s in RunStatus],
            older=older,
            newest=None if after is None else link(),
            per_page=RUNS_PER_PAGE,
        ),
    )


def _timeline(row: Any, entries: list[Any]) -> list[tuple[str, datetime | None, str]]:
    """What is recorded of a run's life, in order: (event, when, note)."""
    settled = next((entry["created_at"] for entry in entries if entry["kind"] == "charge"), None)
    events: list[tuple[str, datetime | None, str]] = [
        ("created", row["created_at"], "reserved and queued"),
        ("started", row["started_at"], f"claimed by a worker (attempts: {row['attempts']})"),
    ]
    if row["lease_expires_at"] is not None:
        events.append(("lease", row["lease_expires_at"], "the lease, renewed by heartbeats, ends"))
    events += [
        ("claimed", row["claimed_at"], "finalize claimed it"),
        ("finished", row["finished_at"], "the outcome recorded"),
        ("settled", settled, "charge and refund written to the ledger"),
    ]
    return events


async def run(call: Call) -> Response:
    run_id = call.request.path_params["run_id"]
    try:
        row, entries = await call.context.runs.operator_get(run_id)
    except RunNotFound:
        raise PageError(404, "No run with this id.") from None
    notice = "Resolved." if call.query("resolved") == "1" else None
    return page(
        "run.html",
        _base(
            call,
            "runs",
            f"Run {run_id}",
            run=row,
            entries=entries,
            timeline=_timeline(row, entries),
            held=_held(entries),
            notice=notice,
        ),
    )


def _held(entries: list[Any]) -> int:
    """What the ledger still holds for the run: its reservation less charge and refund."""
    return sum(
        entry["amount_usd_micros"] if entry["kind"] == "reserve" else -entry["amount_usd_micros"]
        for entry in entries
        if entry["kind"] in ("reserve", "charge", "refund")
    )


async def audit_queue(call: Call) -> Response:
    """The runs waiting for an operator, newest first, a page at a time (each
    with its ledger entries and its resolve form): none is out of reach."""
    after = _page_cursor(call.query("after"))
    rows = await call.context.runs.operator_page(
        None, [RunStatus.AUDIT_REQUIRED], AUDIT_ITEMS_PER_PAGE + 1, after
    )
    path = f"{PREFIX}/audit-required"
    rows, older = _older_page(
        rows, AUDIT_ITEMS_PER_PAGE, lambda cursor: f"{path}?" + urlencode({"after": cursor})
    )
    # one read for the whole page's entries, not one per run
    entries = await call.context.runs.operator_entries([row["id"] for row in rows])
    items = [
        {"run": row, "entries": entries[row["id"]], "held": _held(entries[row["id"]])}
        for row in rows
    ]
    return page(
        "audit.html",
        _base(
            call,
            "audit",
            "AUDIT_REQUIRED",
            items=items,
            older=older,
            newest=None if after is None else path,
            per_page=AUDIT_ITEMS_PER_PAGE,
        ),
    )


async def resolve(call: Call) -> Response:
    run_id = call.request.path_params["run_id"]
    outcome_text = call.form.get("outcome", "")
    if outcome_text not in (Outcome.COMPLETED.value, Outcome.FAILED.value):
        raise PageError(422, "The outcome must be COMPLETED or FAILED.")
    charged_text = call.form.get("charged_usd_micros", "").strip()
    if not charged_text.isdigit() or len(charged_text) > 16:
        raise PageError(422, "charged_usd_micros must be a non-negative whole number.")
    try:
        settlement = await call.context.runs.resolve(
            run_id, Outcome(outcome_text), int(charged_text)
        )
    except RunNotFound:
        raise PageError(404, "No run with this id.") from None
    except RunNotAuditRequired as refused:
        raise PageError(
            409, f"Only an AUDIT_REQUIRED run can be resolved; this one is {refused.status}."
        ) from None
    except ChargeAboveReservation as above:
        raise PageError(
            422,
            f"charged_usd_micros must be at most the reservation ({above.reserved_usd_micros}).",
        ) from None
    except SettlementUnavailable as busy:
        raise PageError(
            503, "The tenant's budget could not settle it now; retry.", busy.retry_after_s
        ) from None
    log.info(
        "console: run resolved",
        extra={
            "run_id": run_id,
            "outcome": outcome_text,
            "charged_usd_micros": settlement.charged_usd_micros,
        },
    )
    return RedirectResponse(f"{PREFIX}/runs/{run_id}?resolved=1", status_code=303)


# --- usage ----------------------------------------------------------------------------------


def _date(text: str, default: date) -> date:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise PageError(400, "Dates are YYYY-MM-DD.") from None


async def usage(call: Call) -> Response:
    today = datetime.now(UTC).date()
    last = _date(call.query("to"), today)
    first = _date(call.query("from"), last - timedelta(days=USAGE_DAYS_MAX_DEFAULT))
    if first > last or (last - first).days >= USAGE_DAYS_MAX:
        raise PageError(
            400, f"from must not be after to, and a range covers at most {USAGE_DAYS_MAX} dates."
        )
    tenant_id = call.query("tenant")
    if tenant_id:
        await _tenant_or_404(call, tenant_id)
        rows = await call.context.runs.usage(tenant_id, first, last)
    else:
        rows = await call.context.runs.usage_all(first, last)
    points = [
        UsagePoint(
            row["day"], row["pack_type"], row["charged_usd_micros"], row["refunded_usd_micros"]
        )
        for row in rows
    ]
    return page(
        "usage.html",
        _base(
            call,
            "usage",
            "Usage",
            tenant_id=tenant_id,
            first=first.isoformat(),
            last=last.isoformat(),
            rows=rows,
            chart=usage_chart(points, first, last) if points else None,
            total_charged=sum(p.charged_usd_micros for p in points),
            total_refunded=sum(p.refunded_usd_micros for p in points),
        ),
    )


USAGE_DAYS_MAX_DEFAULT: Final = USAGE_DEFAULT_DAYS - 1
