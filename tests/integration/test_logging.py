"""Logs as the process writes them: context per request, trace ids, no secrets."""

from __future__ import annotations

import io
import logging
import re
import zlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dpp.config import Settings
from dpp.context import AppContext
from dpp.http.app import create_app
from dpp.http.bodies import json_response, read_json_body
from dpp.ids import BASE62
from dpp.logs import bound_fields, configure_logging
from tests.integration.conftest import ADMIN_TOKEN, CapturedLogs

log = logging.getLogger("dpp.test")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def make_api_key() -> str:
    body = "dpp_live_" + "".join(BASE62[(i * 7 + 3) % 62] for i in range(32))
    return f"{body}_{zlib.crc32(body.encode()):08x}"


API_KEY = make_api_key()


async def inside(request: Request) -> Response:
    log.info("inside the handler")
    return json_response({"ok": True})


async def leaky(request: Request) -> Response:
    """Does every careless thing a handler could do with a credential."""
    authorization = request.headers.get("authorization", "")
    log.info("authorization was %s", authorization)
    log.info(f"key in an f-string: {authorization.removeprefix('Bearer ')}")
    log.warning(
        "request headers",
        extra={
            "headers": dict(request.headers),
            "api_key": API_KEY,
            "credentials": {"Authorization": authorization, "nested": [authorization]},
            "query": str(request.query_params),
        },
    )
    raise RuntimeError(f"could not use {authorization} ({authorization.split()[-1]})")


async def echo(request: Request) -> Response:
    return json_response(await read_json_body(request))


ROUTES = [
    Route("/test/inside", inside, methods=["GET"]),
    Route("/test/leaky", leaky, methods=["GET", "POST"]),
    Route("/test/echo", echo, methods=["POST"]),
]


@pytest.fixture
def app(context: AppContext) -> Starlette:
    return create_app(context, extra_routes=ROUTES)


async def test_traceparent_trace_id_is_bound_in_every_line(
    client: httpx.AsyncClient, captured_logs: CapturedLogs
) -> None:
    response = await client.get(
        "/test/inside?x=1", headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-trace-1"}
    )
    assert response.status_code == 200
    lines = [line for line in captured_logs.lines() if line.get("request_id") == "req-trace-1"]
    assert {line["logger"] for line in lines} == {"dpp.test", "dpp.access"}
    assert all(line["trace_id"] == TRACE_ID for line in lines)
    assert bound_fields() == {}  # nothing leaks out of the request


@pytest.mark.parametrize(
    "traceparent",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # uppercase
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 is exact
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        "garbage",
        "",
    ],
)
async def test_invalid_traceparent_gets_a_new_trace_id(
    client: httpx.AsyncClient, captured_logs: CapturedLogs, traceparent: str
) -> None:
    await client.get("/test/inside", headers={"traceparent": traceparent, "X-Request-ID": "r1"})
    [line] = [line for line in captured_logs.lines() if line["logger"] == "dpp.test"]
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert line["trace_id"] != TRACE_ID and line["trace_id"] != "0" * 32


async def test_future_traceparent_version_is_accepted(
    client: httpx.AsyncClient, captured_logs: CapturedLogs
) -> None:
    await client.get(
        "/test/inside", headers={"traceparent": f"01-{TRACE_ID}-00f067aa0ba902b7-01-x"}
    )
    [line] = [line for line in captured_logs.lines() if line["logger"] == "dpp.test"]
    assert line["trace_id"] == TRACE_ID


async def test_access_line(client: httpx.AsyncClient, captured_logs: CapturedLogs) -> None:
    await client.get("/test/inside?token=hunter2hunter2", headers={"X-Request-ID": "req-a"})
    await client.get("/nowhere/ten_abc", headers={"X-Request-ID": "req-b"})
    await client.get("/health", headers={"X-Request-ID": "req-c"})
    access = {
        line["request_id"]: line for line in captured_logs.lines() if line["logger"] == "dpp.access"
    }
    first = access["req-a"]
    assert first["level"] == "INFO"
    assert first["method"] == "GET"
    assert first["path"] == "/test/inside"
    assert first["route"] == "/test/inside"
    assert first["status"] == 200
    assert first["bytes"] == len(b'{"ok":true}')
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    # ours omits the query string; httpx's own line has its token scrubbed
    assert "hunter2" not in captured_logs.text()
    assert access["req-b"]["route"] == "unmatched" and access["req-b"]["status"] == 404
    assert access["req-c"]["level"] == "DEBUG"  # probes stay quiet


async def test_secrets_never_reach_the_logs(
    client: httpx.AsyncClient,
    captured_logs: CapturedLogs,
    admin_headers: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert admin_headers["Authorization"] == f"Bearer {ADMIN_TOKEN}"
    key_headers = {"Authorization": f"Bearer {API_KEY}"}
    responses = [
        await client.get("/v1/runs", headers=key_headers),
        await client.get("/test/leaky", headers=key_headers),
        await client.get(f"/test/leaky?api_key={API_KEY}", headers=key_headers),
        await client.post("/test/leaky", headers=admin_headers),
        await client.get("/test/leaky", headers={"Authorization": f"Token {ADMIN_TOKEN}"}),
        await client.get("/admin/actors", headers=admin_headers),
        await client.post("/admin/actors", headers=admin_headers),
        await client.get("/admin/actors", headers={"Authorization": f"Bearer {API_KEY}"}),
        await client.get(f"/v1/runs/{API_KEY}", headers=key_headers),
        await client.get("/health", headers={"X-Request-ID": API_KEY}),
        await client.post(
            "/test/echo",
            content=f'{{"api_key": "{API_KEY}", '.encode(),
            headers={"Content-Type": "application/json", **key_headers},
        ),
    ]
    assert [r.status_code for r in responses] == [
        404,
        500,
        500,
        500,
        500,
        200,
        405,
        401,
        404,
        200,
        400,
    ]
    text = captured_logs.text()
    assert len(captured_logs.lines()) >= 20
    assert "[REDACTED]" in text  # the handler really did try to log them
    assert "Traceback" in text
    errors = capsys.readouterr().err
    assert "Logging error" not in errors
    secret_body = API_KEY.split("_")[2]
    for secret in (API_KEY, secret_body, ADMIN_TOKEN):
        assert secret not in text
        assert secret not in errors
    for response in responses:
        if API_KEY not in response.request.url.path:  # `instance` echoes the caller's path
            assert API_KEY not in response.text and ADMIN_TOKEN not in response.text


async def test_secrets_never_reach_text_logs(client: httpx.AsyncClient, settings: Settings) -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging(settings.with_overrides(json_logs=False), stream=stream)
    try:
        await client.get("/test/leaky", headers={"Authorization": f"Bearer {API_KEY}"})
        await client.get("/test/leaky", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = stream.getvalue()
    assert "dpp.access" in text and "Traceback" in text and "[REDACTED]" in text
    assert API_KEY not in text and ADMIN_TOKEN not in text
    assert API_KEY.split("_")[2] not in text
