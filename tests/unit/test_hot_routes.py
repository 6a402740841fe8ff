"""Hot routes answer exactly as Starlette's router does, on both backends."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Message, Receive, Scope, Send

from dpp.http import routes as route_table
from dpp.http.docs import docs_routes
from dpp.http.hot_routes import HotRoutes, hot_routes, may_overlap


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


async def describe(request: Request) -> Response:
    """Echoes what routing gave the endpoint."""
    route = request.scope["route"]
    return JSONResponse(
        {
            "route": route.path,
            "endpoint": request.scope["endpoint"].__name__,
            "params": request.path_params,
            "method": request.method,
            "router": request.scope["router"] is not None,
        },
        headers={"X-Seen": "1"},
    )


async def other(request: Request) -> Response:
    return JSONResponse({"other": request.path_params})


async def fails(request: Request) -> Response:
    raise RuntimeError("boom")


class AsgiApp:
    """An ASGI app as a route's endpoint (Route calls it as it is)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Response(b"asgi", 200)(scope, receive, send)


asgi_app = AsgiApp()


def routes() -> list[BaseRoute]:
    return [
        Route("/health", describe, methods=["GET"]),
        Route("/docs/{name}", other),  # any method
        Route("/v1/runs", describe, methods=["GET", "POST"]),
        Route("/v1/runs/{run_id}", describe, methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", other, methods=["POST"]),
        Route("/v1/fails", fails, methods=["GET"]),
        Route("/mcp", asgi_app, methods=["GET"]),
    ]


HOT = ("/v1/runs/{run_id}", "/v1/runs", "/health", "/v1/fails", "/mcp")


async def answer(app: Any, method: str, path: str, root_path: str = "") -> Any:
    """What ``app`` sends for a request (or the exception it raises), and the scope."""
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "server": ("test", 80),
        "app": object(),  # as Starlette.__call__ sets it: a 405 is then raised
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except HTTPException as error:
        return ("raised", error.status_code, error.headers), None
    except RuntimeError as error:
        return ("raised", str(error)), None
    routed = {key: scope.get(key) for key in ("route", "endpoint", "path_params")}
    routed["router"] = scope.get("router") is not None
    return sent, routed


CASES = [
    ("GET", "/v1/runs/run_abc"),
    ("HEAD", "/v1/runs/run_abc"),
    ("POST", "/v1/runs/run_abc"),  # 405, Allow: GET, HEAD
    ("DELETE", "/v1/runs/run_abc"),
    ("GET", "/v1/runs/run_abc/"),  # trailing slash: 404, no redirect
    ("GET", "/v1/runs/"),
    ("GET", "/v1/runs//"),
    ("GET", "/v1/runs/run_abc/cancel"),
    ("POST", "/v1/runs/run_abc/cancel"),
    ("GET", "/v1/runs"),
    ("POST", "/v1/runs"),
    ("PATCH", "/v1/runs"),
    ("GET", "/v1/runs/"),
    ("GET", "/health"),
    ("HEAD", "/health"),
    ("DELETE", "/health"),
    ("GET", "/health/"),
    ("GET", "/healthz"),
    ("GET", "/docs/x"),
    ("GET", "/nope"),
    ("GET", "/v1/fails"),
    ("GET", "/mcp"),
    ("GET", "/v1/runs/caf%C3%A9"),
    ("GET", "/v1/runs/café"),
]


@pytest.mark.parametrize(("method", "path"), CASES)
async def test_hot_routes_answer_as_the_router(method: str, path: str) -> None:
    for redirect_slashes in (False, True):
        router = Router(routes(), redirect_slashes=redirect_slashes)
        hot = HotRoutes(router, HOT)
        hot_paths = [route.path for route, _ in hot.hot]
        assert hot_paths == ["/v1/runs/{run_id}", "/v1/runs", "/health", "/v1/fails"]
        assert await answer(hot, method, path) == await answer(router, method, path)


async def test_root_path_is_stripped_as_the_router_does() -> None:
    router = Router(routes(), redirect_slashes=False)
    hot = HotRoutes(router, HOT)
    for path in ("/api/v1/runs/run_abc", "/api/health", "/v1/runs/run_abc", "/api"):
        assert await answer(hot, "GET", path, "/api") == await answer(router, "GET", path, "/api")


async def test_a_hot_route_gets_the_scope_the_router_gives() -> None:
    router = Router(routes(), redirect_slashes=False)
    sent, routed = await answer(HotRoutes(router, HOT), "GET", "/v1/runs/run_abc")
    assert sent[0]["status"] == 200
    assert routed["route"].path == "/v1/runs/{run_id}"
    assert routed["endpoint"] is describe
    assert routed["path_params"] == {"run_id": "run_abc"}
    assert routed["router"]


async def test_a_router_with_exception_handlers_in_scope_is_left_alone() -> None:
    router = Router(routes(), redirect_slashes=False)
    seen: list[str] = []

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await Router.__call__(router, scope, receive, send)

    hot = HotRoutes(router, HOT)
    hot.router = spy  # type: ignore[assignment]
    scope_extra = {"starlette.exception_handlers": ({}, {})}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope.update(scope_extra)
        await hot(scope, receive, send)

    await answer(app, "GET", "/v1/runs/run_abc")
    assert seen == ["/v1/runs/run_abc"]


def test_may_overlap() -> None:
    assert may_overlap("/v1/runs/{run_id}", "/v1/runs/{id}")
    assert may_overlap("/v1/runs/{run_id}", "/v1/runs/latest")
    assert may_overlap("/v1/{kind}/x", "/v1/runs/{run_id}")
    assert may_overlap("/v1/run-{n}", "/v1/runs")
    assert may_overlap("/static/{rest:path}", "/v1/runs")
    assert not may_overlap("/v1/runs", "/v1/runs/{run_id}")
    assert not may_overlap("/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}")
    assert not may_overlap("/docs/assets/{name}", "/v1/runs/{run_id}")
    assert not may_overlap("/health", "/v1/runs")


def test_a_shadowed_or_unplain_route_is_not_hot() -> None:
    shadowing = [Route("/v1/runs/latest", other), *routes()]
    assert "/v1/runs/{run_id}" in [route.path for route in hot_routes(routes(), HOT)]
    assert "/v1/runs/{run_id}" not in [route.path for route in hot_routes(shadowing, HOT)]
    mounted: list[BaseRoute] = [Mount("/static", app=asgi_app), *routes()]
    assert hot_routes(mounted, HOT) == []
    # an ASGI app as endpoint is not a request handler
    assert "/mcp" not in [route.path for route in hot_routes(routes(), HOT)]
    # only the first route of a path answers, so only it may be hot
    twice = [*routes(), Route("/v1/runs/{run_id}", other, methods=["DELETE"])]
    assert [route.endpoint for route in hot_routes(twice, HOT)] == [describe] * 3 + [fails]


def test_every_hot_path_of_dpp_is_hot() -> None:
    """``build_app``'s routes, up to the API's (the MCP and console routes come after)."""
    table = [*route_table.frame_routes(), *docs_routes(), *route_table.api_routes()]
    hot = hot_routes(table, route_table.HOT_PATHS)
    assert [route.path for route in hot] == list(route_table.HOT_PATHS)
