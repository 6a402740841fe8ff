"""``POST /admin/reconcile``: run one reconciliation pass now and report it.

For operators after an incident (and for tests): the same pass the reconciler
runs on its timers, serialized with them, answered with the counts of what it
did (SPEC §3 Admin API).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp.actors.reconciler import ReconcilerUnavailable
from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import json_response
from dpp.http.problems import Problem


def _unavailable() -> Problem:
    return Problem(
        503,
        "reconciler-unavailable",
        "The reconciler is not running or did not answer in time; retry shortly.",
        headers={"Retry-After": "5"},
    )


def routes(context: AppContext) -> list[BaseRoute]:
    async def reconcile(request: Request) -> Response:
        require_admin(request)
        reconciler = context.reconciler
        if reconciler is None:
            raise _unavailable()
        try:
            report = await reconciler.reconcile_once()
        except ReconcilerUnavailable:
            raise _unavailable() from None
        return json_response(report, headers={"Cache-Control": "no-store"})

    return [Route("/admin/reconcile", reconcile, methods=["POST"], name="admin_reconcile")]
