"""The HTTP front's pure parts, on both backends, with no services behind them."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from dpp.config import load_settings
from dpp.http.auth import admin_problem
from dpp.http.front import HttpFront
from dpp.http.middleware import (
    DEVELOPMENT_ORIGINS,
    cors_allowed_origins,
    new_request_id,
    new_trace_id,
    parse_traceparent,
    valid_request_id,
)
from dpp.logs import bound_fields
from dpp.metrics import metrics_for, status_class

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def test_parse_traceparent() -> None:
    parsed = parse_traceparent(f"00-{TRACE}-{PARENT}-01")
    assert parsed is not None
    assert (parsed.trace_id, parsed.parent_id, parsed.flags) == (TRACE, PARENT, "01")
    assert parse_traceparent(f" 00-{TRACE}-{PARENT}-00 ") is not None
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01-future-fields") is not None
    for bad in [
        f"00-{TRACE}-{PARENT}-01-",
        f"00-{TRACE}-{PARENT}-1",
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"cc-{TRACE}-{PARENT}-01x",
        "",
    ]:
        assert parse_traceparent(bad) is None, bad


def test_ids() -> None:
    assert valid_request_id(new_request_id())
    assert len({new_request_id() for _ in range(100)}) == 100
    trace_id = new_trace_id()
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
    assert valid_request_id("a" * 128) and not valid_request_id("a" * 129)
    assert not valid_request_id("") and not valid_request_id("a b")


def test_cors_origins_by_setting() -> None:
    assert cors_allowed_origins(load_settings({})) == ()
    assert cors_allowed_origins(load_settings({"DPP_DEVELOPMENT": "1"})) == DEVELOPMENT_ORIGINS
    configured = load_settings(
        {
            "DPP_DEVELOPMENT": "1",
            "DPP_CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example/",
        }
    )
    assert cors_allowed_origins(configured) == ("https://a.example", "https://b.example")


def test_admin_problem() -> None:
    assert admin_problem(None, "Bearer x").status == 404
    assert admin_problem("", "Bearer x").status == 404
    assert admin_problem("t0ken-123456", None).status == 401
    assert admin_problem("t0ken-123456", "Bearer t0ken-12345").status == 401
    assert admin_problem("t0ken-123456", "Bearer  t0ken-123456 ") is None
    assert admin_problem("t0ken-123456", "BEARER t0ken-123456") is None
    assert admin_problem("t0ken-123456", "Bearer t\u00f6ken-123456").status == 401
    assert admin_problem("t0ken-123456", "Bearer " + "x" * 10_000).status == 401


def test_status_class() -> None:
    assert [status_class(s) for s in (200, 204, 301, 404, 499, 503)] == [
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
    ]


def test_metrics_for_is_one_per_registry() -> None:
    registry = CollectorRegistry()
    assert metrics_for(registry) is metrics_for(registry)
    assert metrics_for(CollectorRegistry()) is not metrics_for(registry)


def test_observe_http_counts_every_request_in_its_series() -> None:
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    for status in (200, 201, 404, 200):
        metrics.observe_http("GET", "/x", status, 0.01)
    metrics.observe_http("BREW", "/x", 200, 0.01)

    def count(method: str, status_class: str) -> float | None:
        labels = {"method": method, "route": "/x", "status_class": status_class}
        return registry.get_sample_value("dpp_http_requests_total", labels)

    assert (count("GET", "2xx"), count("GET", "4xx"), count("other", "2xx")) == (3, 1, 1)
    duration = {"method": "GET", "route": "/x"}
    assert registry.get_sample_value("dpp_http_request_duration_seconds_count", duration) == 4


async def inner_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reports what it saw: the bound log fields and the scope state."""
    if scope["path"] == "/boom":
        raise KeyError("secret-internal-detail")
    body = repr((dict(bound_fields()), scope["state"]["request_id"])).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"vary", b"Accept")]})
    await send({"type": "http.response.body", "body": body})


async def test_stack_without_starlette() -> None:
    registry = CollectorRegistry()
    app = HttpFront(
        inner_app,
        max_body_bytes=1024,
        metrics=metrics_for(registry),
        allowed_origins=["https://a.example"],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ok = await client.get(
            "/x",
            headers={
                "X-Request-ID": "rid",
                "traceparent": f"00-{TRACE}-{PARENT}-01",
                "Origin": "HTTPS://A.EXAMPLE",
            },
        )
        boom = await client.get("/boom")
    assert ok.text == repr(({"request_id": "rid", "trace_id": TRACE}, "rid"))
    assert ok.headers["x-request-id"] == "rid"
    assert ok.headers["vary"] == "Accept, Origin"
    assert ok.headers["access-control-allow-origin"] == "HTTPS://A.EXAMPLE"
    assert boom.status_code == 500
    assert boom.headers["content-type"] == "application/problem+json"
    assert "secret-internal-detail" not in boom.text and "KeyError" not in boom.text
    assert (
        registry.get_sample_value(
            "dpp_http_requests_total",
            {"method": "GET", "route": "unmatched", "status_class": "5xx"},
        )
        == 1.0
    )


class DependencyDown(Exception):
    """Stands for a driver's 'connection refused' (the classifier is injected)."""


def classify(error: BaseException) -> str | None:
    return "postgres" if isinstance(error, DependencyDown) else None


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/down":
        raise DependencyDown("connection refused")
    raise KeyError("a bug")


async def test_an_unavailable_dependency_is_a_503_with_retry_after_and_a_bug_stays_a_500() -> None:
    app = HttpFront(failing_app, max_body_bytes=1024, unavailable_dependency=classify)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        down = await client.get("/down")
        bug = await client.get("/bug")
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json"
    assert int(down.headers["retry-after"]) >= 1
    assert down.json()["dependency"] == "postgres"
    assert down.json()["type"].endswith("/unavailable")
    assert bug.status_code == 500 and "retry-after" not in bug.headers
