"""The few hottest routes, dispatched without Starlette's route scan.

A request through ``Router`` tries every route in order (a regex each) and
then goes through ``request_response``'s two closures and
``wrap_app_handling_exceptions``' ``send`` wrapper. DPP builds no exception
handlers (the front renders every error, ``dpp.http.app``), so those
wrappers only re-raise; on ``GET /v1/runs/{id}`` the scan and the wrappers
were ~5 % of a loaded server's CPU.

``HotRoutes`` sits in front of the router. A request that one of its routes
matches in full (path *and* method) is handed to that route's endpoint
directly, with the scope the router would have given it (``router``,
``route``, ``endpoint``, ``path_params``). Everything else (another path, a
method the route does not allow, so 405 with ``Allow``, a trailing slash, so
404) goes to the router unchanged, so the answers are the router's.

A route is only taken hot when that cannot change which route answers: it
must be a plain ``Route`` whose endpoint is an ``async def f(request)``, and
no route before it in the router's list may match any path it matches
(``may_overlap``, a conservative segment-by-segment test). Otherwise the path
is simply left to the router.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

from dpp.http.endpoints import Handler

__all__ = ["HotRoutes", "hot_routes", "may_overlap"]

# ExceptionMiddleware would put its handlers here; with handlers, the route's
# wrappers are no longer a pass-through, so the router must run them.
EXCEPTION_HANDLERS_KEY = "starlette.exception_handlers"
HOT_ROUTES_MAX = 8  # each costs a regex on every request that misses it


def _segments(path: str) -> list[str] | None:
    """A route template's segments; None when a parameter may span several
    (``{name:path}``), so no segment-wise comparison holds."""
    if ":path}" in path:
        return None
    return path.split("/")


def may_overlap(first: str, second: str) -> bool:
    """Whether some request path could match both route templates.

    Conservative: a segment holding a parameter matches any segment, and a
    ``path`` parameter matches anything at all.
    """
    first_segments, second_segments = _segments(first), _segments(second)
    if first_segments is None or second_segments is None:
        return True
    if len(first_segments) != len(second_segments):
        return False
    return all(
        a == b or "{" in a or "{" in b for a, b in zip(first_segments, second_segments, strict=True)
    )


def _is_request_handler(endpoint: object) -> bool:
    """An ``async def f(request)`` that ``Route`` wraps in ``request_response``
    (a class instance or a partial is an ASGI app or wrapped otherwise)."""
    return (
        inspect.isfunction(endpoint) or inspect.ismethod(endpoint)
    ) and inspect.iscoroutinefunction(endpoint)


def hot_routes(routes: Sequence[BaseRoute], paths: Iterable[str]) -> list[Route]:
    """The routes of ``paths`` that can safely skip the scan (module docstring)."""
    chosen: list[Route] = []
    order = {path: index for index, path in enumerate(paths)}
    wanted = set(order)
    for index, route in enumerate(routes):
        if not isinstance(route, Route) or route.path not in wanted:
            continue
        wanted.discard(route.path)  # the first route of a path is the one that answers
        if type(route) is not Route or not _is_request_handler(route.endpoint):
            continue
        earlier = routes[:index]
        if any(
            type(other) is not Route or may_overlap(other.path, route.path) for other in earlier
        ):
            continue
        chosen.append(route)
    assert len(chosen) <= HOT_ROUTES_MAX, len(chosen)
    # No two overlap (each was checked against all before it), so trying them
    # in the caller's order, hottest first, answers as the router's order would.
    return sorted(chosen, key=lambda route: order[route.path])


class HotRoutes:
    """The router, with ``paths`` dispatched directly (module docstring)."""

    def __init__(self, router: Router, paths: Iterable[str]) -> None:
        self.router = router
        # A router with middleware of its own must run it: nothing is hot then.
        plain = router.middleware_stack == router.app
        self.hot: tuple[tuple[Route, Handler], ...] = (
            tuple((route, route.endpoint) for route in hot_routes(router.routes, paths))
            if plain
            else ()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and EXCEPTION_HANDLERS_KEY not in scope:
            for route, endpoint in self.hot:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    # what Router.app and Route.handle would have set, then
                    # request_response without its pass-through wrappers
                    if "router" not in scope:
                        scope["router"] = self.router
                    scope["route"] = route
                    scope.update(child_scope)
                    response = await endpoint(Request(scope, receive, send))
                    await response(scope, receive, send)
                    return
        await self.router(scope, receive, send)
