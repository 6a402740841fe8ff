"""``GET /admin/actors``: the live supervision tree (SPEC §3 Admin API)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from dpp.actors.supervisor import ACTOR_NODE
from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import json_response
from dpp.http.endpoints import ADMIN_TOKEN, Endpoint, Reply


async def actors(request: Request) -> Response:
    require_admin(request)
    context: AppContext = request.app.state.context
    return json_response(context.actors_tree(), headers={"Cache-Control": "no-store"})


ENDPOINTS = (
    Endpoint(
        "GET",
        "/admin/actors",
        actors,
        "getActors",
        "The supervision tree",
        "admin",
        ADMIN_TOKEN,
        (Reply(200, "The root supervisor node.", ACTOR_NODE),),
        name="admin_actors",
    ),
)
