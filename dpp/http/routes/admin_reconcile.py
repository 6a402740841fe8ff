"""``POST /admin/reconcile``: run one reconciliation pass now and report it.

For operators after an incident (and for tests): the same pass the reconciler
runs on its timers, serialized with them, answered with the counts of what it
did (SPEC §3 Admin API).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dpp.actors.reconciler import ReconcileReport, ReconcilerUnavailable
from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import json_response
from dpp.http.endpoints import ADMIN_TOKEN, Endpoint, Reply, problem
from dpp.http.problems import Problem


def _unavailable() -> Problem:
    return Problem(
        503,
        "reconciler-unavailable",
        "The reconciler is not running or did not answer in time; retry shortly.",
        headers={"Retry-After": "5"},
    )


async def reconcile(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    if context.reconciler is None:
        raise _unavailable()
    try:
        report = await context.reconciler.reconcile_once()
    except ReconcilerUnavailable:
        raise _unavailable() from None
    return json_response(report, headers={"Cache-Control": "no-store"})


ENDPOINTS = (
    Endpoint(
        "POST",
        "/admin/reconcile",
        reconcile,
        "reconcile",
        "Run one reconciliation pass",
        "admin",
        ADMIN_TOKEN,
        (
            Reply(200, "What the pass did.", ReconcileReport.schema()),
            problem(
                503,
                "The reconciler is not running or did not answer, or a dependency is "
                "unavailable; retry.",
                "Retry-After",
            ),
        ),
        name="admin_reconcile",
    ),
)
