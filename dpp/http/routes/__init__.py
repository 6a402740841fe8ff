"""The route table: every endpoint of the HTTP front, as data.

Each module declares its ``ENDPOINTS`` (``dpp.http.endpoints``) beside its
handlers; each handler parses the request, calls one service of the
``AppContext`` and renders its answer, holding no SQL and reaching no adapter.
``ENDPOINTS`` here is all of them: what ``build_app`` routes and what
``openapi_document`` describes, the same objects.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.routing import BaseRoute

from dpp.http import openapi
from dpp.http.endpoints import Endpoint, routes_for
from dpp.http.routes import (
    admin_actors,
    admin_money,
    admin_reconcile,
    admin_tenancy,
    ops,
    results,
    runs,
)

# What every app built by ``create_app`` serves: probes, metrics, the OpenAPI
# document, and the supervision tree.
FRAME_ENDPOINTS: tuple[Endpoint, ...] = (*ops.ENDPOINTS, *admin_actors.ENDPOINTS)
# The tenant API and the rest of the admin API (``build_app`` adds them).
API_ENDPOINTS: tuple[Endpoint, ...] = (
    *runs.ENDPOINTS,
    *results.ENDPOINTS,
    *admin_tenancy.ENDPOINTS,
    *admin_money.ENDPOINTS,
    *admin_reconcile.ENDPOINTS,
)
ENDPOINTS: tuple[Endpoint, ...] = (*FRAME_ENDPOINTS, *API_ENDPOINTS)
# The paths most requests take, routed without Starlette's scan of every route
# (``dpp.http.hot_routes``): reading a run, submitting one, the liveness probe.
HOT_PATHS = ("/v1/runs/{run_id}", "/v1/runs", "/health")


def frame_routes() -> list[BaseRoute]:
    return routes_for(FRAME_ENDPOINTS)


def api_routes() -> list[BaseRoute]:
    return routes_for(API_ENDPOINTS)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint (a fresh dict each call)."""
    return openapi.document(ENDPOINTS)


@functools.cache
def openapi_body() -> bytes:
    """``/openapi.json``'s bytes: the endpoints never change while the process runs."""
    return orjson.dumps(openapi_document())
