"""The route table: one module per group of endpoints, each ``routes(context)``.

Each handler parses the request, calls one service of the ``AppContext`` and
renders its answer; none holds SQL or reaches an adapter.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from dpp.context import AppContext
from dpp.http.routes import (
    admin_actors,
    admin_money,
    admin_reconcile,
    admin_tenancy,
    ops,
    runs,
)


def frame_routes(context: AppContext) -> list[BaseRoute]:
    """What every app built by ``create_app`` serves: probes, metrics, the
    OpenAPI document, and the supervision tree."""
    return [*ops.routes(context), *admin_actors.routes(context)]


def api_routes(context: AppContext) -> list[BaseRoute]:
    """The tenant API and the rest of the admin API."""
    return [
        *runs.routes(context),
        *admin_tenancy.routes(context),
        *admin_money.routes(context),
        *admin_reconcile.routes(context),
    ]
