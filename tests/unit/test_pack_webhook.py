"""The webhook pack against a real local aiohttp server (asyncio only).

aiohttp runs on asyncio alone, so this module pins the anyio backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
import pytest
import trio
from aiohttp import web

from dpp.packs import PackConfigError, PackContext, PackError, validate_inputs
from dpp.packs import registry as registry_module
from dpp.packs import webhook as webhook_module
from dpp.packs.webhook import WebhookPack

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SECRET = "s3cr3t-token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def context(trace_id: str | None = TRACE_ID) -> PackContext:
    return PackContext(
        run_id="run_hook_1",
        tenant_id="ten_1",
        trace_id=trace_id,
        timebox_sec=30,
        reserved_usd_micros=100_000,
        minimum_fee_usd_micros=1_000,
    )


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """A real HTTP server on 127.0.0.1, an ephemeral port; yields its base URL."""
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def answer(document: Any, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(document), status=status)

    return handler


def raw_answer(body: bytes, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    return handler


async def test_success_forwards_inputs_and_prices_by_usage() -> None:
    seen: list[tuple[dict[str, str], bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        return web.json_response(
            {"result": {"answer": 42, "why": ["a"]}, "usage": {"cost_usd_micros": 4_321}}
        )

    inputs = {"task": "summarise", "items": [1, 2, {"x": None}]}
    async with serve(handler) as base:
        output = await WebhookPack(f"{base}/hook").execute(inputs, context())
    assert output.body == orjson.dumps({"answer": 42, "why": ["a"]})
    assert output.content_type == "application/json"
    assert output.actual_cost_usd_micros == 4_321
    [(headers, body)] = seen
    assert orjson.loads(body) == inputs
    assert headers["Content-Type"] == "application/json"
    assert headers["X-DPP-Run-ID"] == "run_hook_1"
    assert re.fullmatch(rf"00-{TRACE_ID}-[0-9a-f]{{16}}-01", headers["traceparent"])


@pytest.mark.parametrize("trace_id", [None, "not-a-trace-id", "0" * 32, TRACE_ID.upper()])
async def test_traceparent_only_for_a_valid_trace_id(trace_id: str | None) -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"result": None, "usage": {"cost_usd_micros": 0}})

    async with serve(handler) as base:
        output = await WebhookPack(f"{base}/hook").execute({}, context(trace_id))
    assert "traceparent" not in seen[0].headers
    assert output.body == b"null"
    assert output.actual_cost_usd_micros == 0


async def test_cost_above_the_reservation_is_reported_unclamped() -> None:
    """The settlement clamps to [M, R]; the pack reports what the upstream said."""
    handler = answer({"result": 1, "usage": {"cost_usd_micros": 50_000_000}})
    async with serve(handler) as base:
        output = await WebhookPack(f"{base}/hook").execute({}, context())
    assert output.actual_cost_usd_micros == 50_000_000


@pytest.mark.parametrize("status", [400, 404, 500, 503, 302])
async def test_non_2xx_is_a_pack_error(status: int) -> None:
    async def handler(request: web.Request) -> web.Response:
        headers = {"Location": "http://127.0.0.1:9/elsewhere"} if status == 302 else {}
        return web.json_response(
            {"result": 1, "usage": {"cost_usd_micros": 1}}, status=status, headers=headers
        )

    async with serve(handler) as base:
        with pytest.raises(PackError) as caught:
            await WebhookPack(f"{base}/hook").execute({}, context())
    assert caught.value.title == "Webhook upstream error"
    assert f"HTTP {status}" in caught.value.detail


@pytest.mark.parametrize(
    ("body", "title"),
    [
        (b"not json", "Webhook upstream answered invalid JSON"),
        (b"", "Webhook upstream answered invalid JSON"),
        (b"[1, 2]", "Webhook upstream answer malformed"),
        (b'{"usage": {"cost_usd_micros": 5}}', "Webhook upstream answer malformed"),
        (b'{"result": 1}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": 5}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": 1.0}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": 1.5}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": true}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": -1}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": "10"}}', "Webhook upstream usage invalid"),
        (b'{"result": 1, "usage": {"cost_usd_micros": null}}', "Webhook upstream usage invalid"),
        (
            b'{"result": 1, "usage": {"cost_usd_micros": 9223372036854775808}}',
            "Webhook upstream usage invalid",
        ),
        (
            b'{"result": 1, "usage": {"cost_usd_micros": 1e30}}',
            "Webhook upstream usage invalid",
        ),
        (
            b'{"result": ' + b"[" * 300 + b"]" * 300 + b', "usage": {"cost_usd_micros": 1}}',
            "Webhook upstream result not storable",
        ),
    ],
)
async def test_bad_answers_are_pack_errors(body: bytes, title: str) -> None:
    async with serve(raw_answer(body)) as base:
        with pytest.raises(PackError) as caught:
            await WebhookPack(f"{base}/hook").execute({}, context())
    assert caught.value.title == title


async def test_oversized_answer_is_a_pack_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook_module, "RESPONSE_BYTES_MAX", 64)
    document = {"result": "x" * 100, "usage": {"cost_usd_micros": 1}}
    async with serve(answer(document)) as base:
        with pytest.raises(PackError) as caught:
            await WebhookPack(f"{base}/hook").execute({}, context())
    assert caught.value.title == "Webhook upstream answer too large"

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: counted while reading
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"x" * 32)
        await response.write_eof()
        return response

    async with serve(chunked) as base:
        with pytest.raises(PackError) as caught:
            await WebhookPack(f"{base}/hook").execute({}, context())
    assert caught.value.title == "Webhook upstream answer too large"


async def test_slow_upstream_times_out_as_a_pack_error() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"result": 1, "usage": {"cost_usd_micros": 1}})

    async with serve(handler) as base:
        started = anyio.current_time()
        try:
            with pytest.raises(PackError) as caught:
                await WebhookPack(f"{base}/hook", timeout_sec=0.2).execute({}, context())
        finally:
            release.set()
    assert caught.value.title == "Webhook upstream timed out"
    assert "0.2 s" in caught.value.detail
    assert anyio.current_time() - started < 5


async def test_the_callers_timebox_cancels_rather_than_fails() -> None:
    """Cancellation must propagate: the run actor maps it to a timebox failure."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"result": 1, "usage": {"cost_usd_micros": 1}})

    async with serve(handler) as base:
        try:
            with pytest.raises(TimeoutError), anyio.fail_after(0.2):
                await WebhookPack(f"{base}/hook", timeout_sec=30).execute({}, context())
        finally:
            release.set()


async def test_unreachable_upstream_is_a_pack_error_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:{SECRET}@127.0.0.1:{port}/hook/{SECRET}?token={SECRET}"
    with caplog.at_level(logging.DEBUG, logger="dpp.packs"), pytest.raises(PackError) as caught:
        await WebhookPack(url, timeout_sec=5).execute({}, context())
    assert caught.value.title == "Webhook upstream unreachable"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert SECRET not in str(caught.value)
    assert SECRET not in caplog.text
    assert f"http://127.0.0.1:{port}" in caplog.text  # the origin helps the operator


async def test_error_texts_never_carry_the_url() -> None:
    async with serve(answer({"oops": 1}, status=500)) as base:
        url = base.replace("http://", f"http://user:{SECRET}@") + f"/hook?token={SECRET}"
        with pytest.raises(PackError) as caught:
            await WebhookPack(url).execute({}, context())
    assert SECRET not in caught.value.title + caught.value.detail
    assert SECRET not in repr(WebhookPack(url))


def test_refuses_to_run_on_trio() -> None:
    pack = WebhookPack("http://127.0.0.1:9/hook")
    with pytest.raises(RuntimeError, match="asyncio"):
        trio.run(pack.execute, {}, context())


# --- configuration and contract ---------------------------------------------


def test_unavailable_without_a_url() -> None:
    assert WebhookPack.from_environment({}) is None
    assert WebhookPack.from_environment({"DPP_WEBHOOK_URL": ""}) is None


def test_timeout_setting() -> None:
    pack = WebhookPack.from_environment({"DPP_WEBHOOK_URL": "https://hooks.example/run"})
    assert pack is not None and pack.timeout_sec == 10
    pack = WebhookPack.from_environment(
        {"DPP_WEBHOOK_URL": "https://hooks.example/run", "DPP_WEBHOOK_TIMEOUT_SEC": "2.5"}
    )
    assert pack is not None and pack.timeout_sec == 2.5


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DPP_WEBHOOK_URL": f"ftp://u:{SECRET}@hooks.example/"}, "DPP_WEBHOOK_URL"),
        ({"DPP_WEBHOOK_URL": f"hooks.example/{SECRET}"}, "DPP_WEBHOOK_URL"),
        ({"DPP_WEBHOOK_URL": f"https:///{SECRET}"}, "DPP_WEBHOOK_URL"),
        ({"DPP_WEBHOOK_URL": f"https://hooks.example:99999/{SECRET}"}, "DPP_WEBHOOK_URL"),
        ({"DPP_WEBHOOK_URL": f"http://[::1/{SECRET}"}, "DPP_WEBHOOK_URL"),
        ({"DPP_WEBHOOK_URL": "https://h.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "0"}, "TIMEOUT"),
        ({"DPP_WEBHOOK_URL": "https://h.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "-1"}, "TIMEOUT"),
        ({"DPP_WEBHOOK_URL": "https://h.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "nan"}, "TIMEOUT"),
        ({"DPP_WEBHOOK_URL": "https://h.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "3601"}, "TIMEOUT"),
        ({"DPP_WEBHOOK_URL": "https://h.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "ten"}, "TIMEOUT"),
    ],
)
def test_bad_settings_name_the_variable_not_the_value(env: dict[str, str], variable: str) -> None:
    with pytest.raises(PackConfigError, match=variable) as caught:
        WebhookPack.from_environment(env)
    assert SECRET not in str(caught.value)


def test_inputs_are_any_json_object() -> None:
    pack = WebhookPack("https://hooks.example/")
    assert validate_inputs(pack, {}) == []
    assert validate_inputs(pack, {"anything": [1, {"nested": None}]}) == []
    assert [e.field for e in validate_inputs(pack, [1])] == ["inputs"]
    assert [e.field for e in validate_inputs(pack, "text")] == ["inputs"]


def test_prices() -> None:
    pack = WebhookPack("https://hooks.example/")
    assert pack.minimum_fee_usd_micros == 1_000
    assert pack.default_reservation_usd_micros == 100_000
    assert pack.max_reservation_usd_micros == 10_000_000
    assert pack.default_timebox_sec == 30
    assert pack.estimate_cost_usd_micros({}) == 100_000
    assert registry_module.PackRegistry([pack]).catalog()[0]["pricing"]["model"] == "upstream_usage"
