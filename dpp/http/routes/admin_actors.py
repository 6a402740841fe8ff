"""``GET /admin/actors``: the live supervision tree (SPEC §3 Admin API)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp.context import AppContext
from dpp.http.auth import require_admin
from dpp.http.bodies import json_response


def routes(context: AppContext) -> list[BaseRoute]:
    async def actors(request: Request) -> Response:
        require_admin(request)
        return json_response(context.actors_tree(), headers={"Cache-Control": "no-store"})

    return [Route("/admin/actors", actors, methods=["GET"], name="admin_actors")]
