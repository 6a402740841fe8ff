"""The HTTP front's contract: problems for every error, request ids, body limits,
CORS, readiness, metrics and admin auth (SPEC §3, §6)."""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dpp.app import open_context
from dpp.config import ConfigError, Settings, load_settings
from dpp.context import AppContext, ReadinessCheck
from dpp.http.app import create_app
from dpp.http.bodies import json_response, read_json_body
from dpp.http.middleware import BODY_DRAIN_FACTOR
from dpp.http.problems import PROBLEM_BASE, Problem, field_problem, problem_response
from dpp.http.routes import ops
from tests.asgi import http_scope
from tests.integration.conftest import BASE_URL, CapturedLogs

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def assert_problem(response: httpx.Response, status: int, path: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with every standard member."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].startswith(PROBLEM_BASE)
    assert isinstance(body["title"], str) and body["title"]
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["instance"] == path
    assert REQUEST_ID.match(response.headers["x-request-id"])
    return body


async def echo_json(request: Request) -> Response:
    return json_response({"received": await read_json_body(request)})


async def explode(request: Request) -> Response:
    raise RuntimeError("kaboom: internal state that must stay private")


async def unprocessable(request: Request) -> Response:
    raise field_problem("inputs.payload", "payload is required")


async def thing(request: Request) -> Response:
    return json_response({"id": request.path_params["thing_id"]})


TEST_ROUTES: list[BaseRoute] = [
    Route("/test/echo", echo_json, methods=["POST"]),
    Route("/test/explode", explode, methods=["GET", "POST"]),
    Route("/test/unprocessable", unprocessable, methods=["POST"]),
    Route("/test/things/{thing_id}", thing, methods=["GET"]),
]


@pytest.fixture
def app(context: AppContext) -> Starlette:
    return create_app(context, extra_routes=TEST_ROUTES)


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)


# --- every error is a problem ---------------------------------------------------------


async def test_unknown_path_is_a_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/no/such/path?token=abc")
    body = assert_problem(response, 404, "/no/such/path")
    assert body["type"] == PROBLEM_BASE + "not-found"


async def test_trailing_slash_is_not_redirected(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/health/"), 404, "/health/")


async def test_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/health")
    assert_problem(response, 405, "/health")
    allowed = {method.strip() for method in response.headers["allow"].split(",")}
    assert "GET" in allowed and "DELETE" not in allowed


async def test_head_is_answered_for_get_routes(client: httpx.AsyncClient) -> None:
    response = await client.head("/health")
    assert response.status_code == 200
    assert response.content == b""


async def test_json_body_round_trips(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/test/echo",
        content='{"a": [1, 2, {"b": "é"}]}'.encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200
    assert response.json() == {"received": {"a": [1, 2, {"b": "é"}]}}


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post("/test/echo", content=b'{"a": 1}', headers=headers)
    assert_problem(response, 415, "/test/echo")


@pytest.mark.parametrize(
    "body",
    [b'{"a": ', b"", b"{'a': 1}", b'{"a": 1} trailing', b'{"a": "\xff\xfe"}', b"\xef\xbb\xbf{}"],
    ids=["truncated", "empty", "single-quotes", "trailing", "invalid-utf8", "bom"],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/test/echo", content=body, headers={"Content-Type": "application/json"}
    )
    problem = assert_problem(response, 400, "/test/echo")
    assert problem["type"] == PROBLEM_BASE + "malformed-json"


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient, settings: Settings) -> None:
    body = b'{"a": "' + b"x" * settings.max_body_bytes + b'"}'
    response = await client.post(
        "/test/echo", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413, "/test/echo")


async def test_body_at_the_limit_is_read(client: httpx.AsyncClient, settings: Settings) -> None:
    filler = settings.max_body_bytes - len(b'{"a": ""}')
    body = b'{"a": "' + b"x" * filler + b'"}'
    assert len(body) == settings.max_body_bytes
    response = await client.post(
        "/test/echo", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200


async def test_chunked_body_over_the_limit_is_413_without_reading_past_16x(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Drained up to 16 times the limit (SPEC §6), so the client reads the 413;
    not beyond it."""
    chunk = b" " * 65_536
    chunks_total = 20 * settings.max_body_bytes // len(chunk)
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(chunks_total):
            sent += 1
            yield chunk

    response = await client.post(
        "/test/echo", content=stream(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413, "/test/echo")
    drained_max = BODY_DRAIN_FACTOR * settings.max_body_bytes
    assert drained_max // len(chunk) <= sent <= drained_max // len(chunk) + 2  # stopped there


async def test_content_length_past_16x_the_limit_is_413_before_reading(
    app: Starlette, settings: Settings
) -> None:
    """A declared Content-Length past 16 times the limit is refused without a single
    receive() (SPEC §6: closing early is allowed there)."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = http_scope(
        "POST",
        b"/test/echo",
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(BODY_DRAIN_FACTOR * settings.max_body_bytes + 1).encode()),
        ],
    )
    await app(scope, receive, send)
    assert messages[0]["type"] == "http.response.start"
    assert messages[0]["status"] == 413
    body = orjson.loads(b"".join(m.get("body", b"") for m in messages[1:]))
    assert body["status"] == 413 and body["instance"] == "/test/echo"


async def test_a_content_length_that_is_not_ascii_digits_is_never_a_500(
    app: Starlette, settings: Settings
) -> None:
    """ "\u00b2" is ``str.isdigit()`` but no ``int``: it once raised inside the body
    checks. (hypercorn refuses it at the door; an in-process caller need not.)"""
    messages: list[dict[str, Any]] = []
    body = b'{"a": 1}'
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = http_scope(
        "POST",
        b"/test/echo",
        [(b"content-type", b"application/json"), (b"content-length", "\u00b2".encode("latin-1"))],
    )
    await app(scope, receive, send)
    assert messages[0]["type"] == "http.response.start"
    assert messages[0]["status"] == 200


async def test_field_problem_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/test/unprocessable")
    body = assert_problem(response, 422, "/test/unprocessable")
    assert body["field"] == "inputs.payload"


async def test_unhandled_exception_is_a_generic_500(client: httpx.AsyncClient) -> None:
    response = await client.get("/test/explode", headers={"X-Request-ID": "req-500-check"})
    body = assert_problem(response, 500, "/test/explode")
    assert response.headers["x-request-id"] == "req-500-check"
    assert body["request_id"] == "req-500-check"
    assert "kaboom" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    assert ".py" not in response.text


async def test_500_is_logged_with_traceback_and_request_id(
    client: httpx.AsyncClient, captured_logs: CapturedLogs
) -> None:
    await client.get("/test/explode", headers={"X-Request-ID": "req-log-500"})
    [line] = [line for line in captured_logs.lines() if line["logger"] == "dpp.http"]
    assert line["level"] == "ERROR"
    assert line["request_id"] == "req-log-500"
    assert "Traceback" in line["exc"] and "RuntimeError: kaboom" in line["exc"]
    [access] = [line for line in captured_logs.lines() if line["logger"] == "dpp.access"]
    assert access["status"] == 500 and access["request_id"] == "req-log-500"


async def test_problem_raised_in_inner_middleware_is_rendered(context: AppContext) -> None:
    class Deny:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/v1"):
                raise Problem(401, "unauthorized", "no", headers={"WWW-Authenticate": "Bearer"})
            await self.app(scope, receive, send)

    app = create_app(context, inner_middleware=[Middleware(Deny)])
    async with client_for(app) as client:
        response = await client.get("/v1/anything")
        assert_problem(response, 401, "/v1/anything")
        assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/health")).status_code == 200


# --- request ids ------------------------------------------------------------------------


async def test_valid_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    for request_id in ["a", "abc-DEF_123.xyz", "x" * 128]:
        response = await client.get("/health", headers={"X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["x" * 129, "has space", "slash/inside", "semi;colon", "ünïcode".encode(), 'quote"d', ""],
)
async def test_invalid_request_id_is_replaced(
    client: httpx.AsyncClient, request_id: str | bytes
) -> None:
    response = await client.get("/health", headers={"X-Request-ID": request_id})
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9A-Za-z]{24}", generated)


async def test_generated_request_ids_differ(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_every_error_carries_a_request_id(client: httpx.AsyncClient) -> None:
    responses = [
        await client.get("/nope"),
        await client.post("/health"),
        await client.post("/test/echo", content=b"x"),
        await client.get("/test/explode"),
        await client.get("/admin/actors"),
    ]
    assert all(REQUEST_ID.match(r.headers["x-request-id"]) for r in responses)


# --- CORS ---------------------------------------------------------------------------------

ALLOWED = "https://app.example.com"


def app_with(context: AppContext, **changes: Any) -> Starlette:
    settings = context.settings.with_overrides(**changes)
    return create_app(dataclasses.replace(context, settings=settings), extra_routes=TEST_ROUTES)


async def test_cors_allowed_origin_is_echoed_with_credentials(context: AppContext) -> None:
    async with client_for(app_with(context, cors_allowed_origins=(ALLOWED,))) as client:
        response = await client.get("/health", headers={"Origin": ALLOWED})
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "origin" in response.headers["vary"].lower()
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert exposed == {
        "X-Request-ID",
        "X-DPP-Cost-Reserved",
        "X-DPP-Cost-Actual",
        "X-DPP-Cost-Minimum-Fee",
        "RateLimit",
        "RateLimit-Policy",
        "Retry-After",
        "Idempotent-Replayed",
        "Location",
    }


async def test_cors_headers_on_errors_too(context: AppContext) -> None:
    async with client_for(app_with(context, cors_allowed_origins=(ALLOWED,))) as client:
        for response in [
            await client.get("/nope", headers={"Origin": ALLOWED}),
            await client.get("/test/explode", headers={"Origin": ALLOWED}),
        ]:
            assert response.status_code >= 400
            assert response.headers["access-control-allow-origin"] == ALLOWED


async def test_cors_preflight_from_an_allowed_origin(context: AppContext) -> None:
    async with client_for(app_with(context, cors_allowed_origins=(ALLOWED,))) as client:
        response = await client.options(
            "/v1/runs",
            headers={
                "Origin": ALLOWED,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
    assert response.headers["access-control-allow-headers"] == (
        "Authorization, Content-Type, Idempotency-Key, traceparent, X-Request-ID"
    )
    assert response.headers["access-control-max-age"] == "600"
    assert "origin" in response.headers["vary"].lower()
    assert REQUEST_ID.match(response.headers["x-request-id"])


async def test_cors_preflight_is_answered_before_auth(context: AppContext) -> None:
    class DenyAll:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            response = problem_response(Problem(401, "unauthorized", "no key"), scope["path"])
            await response(scope, receive, send)

    settings = context.settings.with_overrides(cors_allowed_origins=(ALLOWED,))
    app = create_app(
        dataclasses.replace(context, settings=settings), inner_middleware=[Middleware(DenyAll)]
    )
    async with client_for(app) as client:
        preflight = await client.options(
            "/v1/runs", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"}
        )
        actual = await client.post("/v1/runs", headers={"Origin": ALLOWED})
    assert preflight.status_code == 204
    assert actual.status_code == 401
    assert actual.headers["access-control-allow-origin"] == ALLOWED  # the browser can read it


async def test_cors_disallowed_origin_gets_no_cors_headers(context: AppContext) -> None:
    async with client_for(app_with(context, cors_allowed_origins=(ALLOWED,))) as client:
        simple = await client.get("/health", headers={"Origin": "https://evil.example.com"})
        preflight = await client.options(
            "/v1/runs",
            headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"},
        )
    assert simple.status_code == 200
    assert_problem(preflight, 403, "/v1/runs")
    for response in (simple, preflight):
        assert not [name for name in response.headers if name.startswith("access-control-")]


async def test_cors_never_uses_a_wildcard(context: AppContext) -> None:
    async with client_for(app_with(context, cors_allowed_origins=(ALLOWED,))) as client:
        response = await client.get("/health", headers={"Origin": "null"})
    assert "access-control-allow-origin" not in response.headers
    with pytest.raises(ConfigError, match="not allowed"):
        load_settings({"DPP_CORS_ALLOWED_ORIGINS": "*"})


@pytest.mark.parametrize(
    ("development", "configured", "origin", "allowed"),
    [
        (True, (), "http://localhost:3000", True),
        (True, (), "http://localhost:5173", True),
        (True, (), "http://127.0.0.1:3000", True),
        (True, (), "http://127.0.0.1:5173", True),
        (True, (), "http://localhost:8080", False),
        (True, (), "https://localhost:3000", False),
        (False, (), "http://localhost:3000", False),
        (True, (ALLOWED,), "http://localhost:3000", False),
        (True, (ALLOWED,), ALLOWED, True),
    ],
)
async def test_cors_localhost_list_is_for_development_only(
    context: AppContext,
    development: bool,
    configured: tuple[str, ...],
    origin: str,
    allowed: bool,
) -> None:
    app = app_with(context, development=development, cors_allowed_origins=configured)
    async with client_for(app) as client:
        response = await client.options(
            "/health", headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
        )
    assert response.status_code == (204 if allowed else 403)
    assert (response.headers.get("access-control-allow-origin") == origin) is allowed


# --- ops ----------------------------------------------------------------------------------


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_real_services(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert {"postgres", "redis", "object_storage"} <= set(body["checks"])
    assert set(body["checks"].values()) == {"ok"}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_readyz_names_a_dead_redis(settings_env: dict[str, str]) -> None:
    env = {**settings_env, "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}
    async with (
        open_context(load_settings(env), environment=env) as context,
        client_for(create_app(context)) as client,
    ):
        response = await client.get("/readyz")
    body = assert_problem(response, 503, "/readyz")
    assert body["type"] == PROBLEM_BASE + "not-ready"
    assert body["checks"]["redis"] == "down"
    assert {name for name, state in body["checks"].items() if state == "down"} == {"redis"}
    assert "redis" in body["detail"] and "postgres" not in body["detail"]


async def test_readyz_bounds_a_hanging_check(
    context: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hangs() -> None:
        await anyio.sleep_forever()

    async def raises() -> None:
        raise ConnectionError("queue unreachable")

    monkeypatch.setattr(ops, "READINESS_TIMEOUT_S", 0.2)
    checks = (*context.readiness, ReadinessCheck("sqs", hangs), ReadinessCheck("extra", raises))
    async with client_for(create_app(dataclasses.replace(context, readiness=checks))) as client:
        with anyio.fail_after(5):
            response = await client.get("/readyz")
    body = assert_problem(response, 503, "/readyz")
    assert body["checks"]["sqs"] == "down" and body["checks"]["extra"] == "down"
    assert body["checks"]["postgres"] == "ok"
    assert "sqs" in body["detail"] and "extra" in body["detail"]


async def test_metrics_exposition(client: httpx.AsyncClient) -> None:
    await client.get("/health")
    await client.get("/test/things/ten_0123456789abcdefABCDEFGHIJ")
    await client.get("/v1/runs/run_secretlookingid", headers={"Authorization": "Bearer x"})
    await client.request("BREW", "/health")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    requests = families["dpp_http_requests"]
    samples = [s for s in requests.samples if s.name == "dpp_http_requests_total"]
    routes = {s.labels["route"] for s in samples}
    assert {"/health", "/test/things/{thing_id}", "unmatched"} <= routes
    assert {s.labels["method"] for s in samples} <= {"GET", "HEAD", "POST", "DELETE", "other"}
    assert {s.labels["status_class"] for s in samples} <= {"2xx", "3xx", "4xx", "5xx"}
    assert "dpp_http_request_duration_seconds" in families
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert "ten_" not in value and "run_" not in value and "dpp_live" not in value
                assert "Bearer" not in value


# --- admin --------------------------------------------------------------------------------

TREE = {
    "name": "root",
    "kind": "supervisor",
    "state": "running",
    "mailbox_depth": 0,
    "restarts": 0,
    "children": [
        {
            "name": "http",
            "kind": "http",
            "state": "running",
            "mailbox_depth": 0,
            "restarts": 1,
            "children": [],
        }
    ],
}


def admin_app(context: AppContext, token: str | None, tree: Callable[[], Any] = lambda: TREE):
    settings = context.settings.with_overrides(admin_token=token)
    return create_app(dataclasses.replace(context, settings=settings, actors_tree=tree))


@pytest.mark.parametrize("token", [None, ""])
async def test_admin_is_404_without_a_configured_token(
    context: AppContext, token: str | None
) -> None:
    async with client_for(admin_app(context, token)) as client:
        admin = await client.get(
            "/admin/actors", headers={"Authorization": f"Bearer {context.settings.admin_token}"}
        )
        wrong_method = await client.delete("/admin/actors")
        unknown = await client.get("/admin/nothing-here")
        plain_404 = await client.get("/nothing-here")
    for response, path in [
        (admin, "/admin/actors"),
        (wrong_method, "/admin/actors"),
        (unknown, "/admin/nothing-here"),
    ]:
        body = assert_problem(response, 404, path)
        assert "www-authenticate" not in response.headers
        expected = {**plain_404.json(), "instance": path}
        assert body == expected  # the same bytes as any unknown path


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        "Basic dGVzdDp0ZXN0",
        "Bearer test-admin-token-012345678",  # one character short
        "Bearer test-admin-token-0123456789x",
        "test-admin-token-0123456789",
    ],
)
async def test_admin_wrong_or_missing_token_is_401(
    client: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.get("/admin/actors", headers=headers)
    assert_problem(response, 401, "/admin/actors")
    assert response.headers["www-authenticate"] == "Bearer"


async def test_admin_actors_with_the_token(
    context: AppContext, admin_headers: dict[str, str]
) -> None:
    async with client_for(admin_app(context, context.settings.admin_token)) as client:
        response = await client.get("/admin/actors", headers=admin_headers)
        lowercase_scheme = await client.get(
            "/admin/actors",
            headers={"Authorization": admin_headers["Authorization"].replace("Bearer", "bearer")},
        )
    assert response.status_code == 200
    assert response.json() == TREE
    assert lowercase_scheme.status_code == 200


async def test_admin_wrong_method_with_the_token_is_405(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.post("/admin/actors", headers=admin_headers)
    assert_problem(response, 405, "/admin/actors")
    assert "GET" in response.headers["allow"]
