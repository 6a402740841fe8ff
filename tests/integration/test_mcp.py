"""The MCP server (SPEC §7) end to end: the SDK's own client against real `dpp serve`
processes — over streamable HTTP at /mcp (one replica, then two with the client's
requests alternating between them), and `dpp mcp` over stdio against a replica;
sessionless calls (protocol 2026-07-28, or no initialize) dedupe only by a key
the client sends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import httpx
import httpx2
import pytest
from dpp_client import AsyncClient
from mcp.client import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from dpp.cli.mcp_remote import RemoteBackend
from dpp.http.mcp_tools import IDEMPOTENCY_META_KEY, call_tool
from tests.replica import Replica
from tests.services import store_env
from tests.tcp_proxy import TcpProxy

ADMIN_TOKEN = "mcp-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ECHO_RESERVATION = 1_000  # echo's default reservation (dpp/packs/echo.py)
PROTOCOL_VERSION = "2025-11-25"
MODERN_PROTOCOL_VERSION = "2026-07-28"  # no initialize, no session: every POST stands alone


@pytest.fixture
def env(services, database_url, redis_prefix) -> dict[str, str]:
    return {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DPP_MCP_WAIT_SEC": "20",
        "DPP_WORKER_CONCURRENCY": "4",
        "LOG_LEVEL": "WARNING",
    }


@asynccontextmanager
async def replicas(env: dict[str, str], tmp_path, count: int) -> AsyncIterator[list[Replica]]:
    started = [Replica(env, tmp_path / f"replica-{n}.log") for n in range(count)]
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            for replica in started:
                await replica.wait_ready(client)
        yield started
    finally:
        for replica in started:
            replica.close()


async def tenant_key(
    url: str, credits_usd_micros: int, key_body: dict[str, Any] | None = None
) -> str:
    """A fresh tenant with this much credit, and an API key of it."""
    async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=10.0) as client:
        tenant = (await client.post("/admin/tenants", json={"name": "agent"})).json()["id"]
        key = (await client.post(f"/admin/tenants/{tenant}/api-keys", json=key_body or {})).json()
        if credits_usd_micros:
            credited = await client.post(
                f"/admin/tenants/{tenant}/credits",
                json={"amount_usd_micros": credits_usd_micros},
                headers={"Idempotency-Key": "seed"},
            )
            assert credited.status_code == 201, credited.text
    return str(key["api_key"])


async def run_count(url: str, api_key: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        page = await client.get(
            "/v1/runs", params={"limit": 100}, headers={"Authorization": f"Bearer {api_key}"}
        )
    assert page.status_code == 200, page.text
    return len(page.json()["data"])


class Alternating(httpx2.AsyncBaseTransport):
    """Sends each request to the next replica in turn (no sticky routing)."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._next = 0
        self._inner = httpx2.AsyncHTTPTransport()
        self.sent_to: list[int] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = self._ports[self._next % len(self._ports)]
        self._next += 1
        self.sent_to.append(port)
        request.url = request.url.copy_with(port=port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def mcp_session(
    url: str, api_key: str, transport: httpx2.AsyncBaseTransport | None = None
) -> AsyncIterator[tuple[ClientSession, httpx2.AsyncClient]]:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60.0, transport=transport) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session, http


def structured(result: Any) -> dict[str, Any]:
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


async def raw_session(http: httpx2.AsyncClient, url: str) -> str:
    """Initialize as a client does; answer the session id the server handed out."""
    response = await http.post(
        f"{url}/mcp",
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "retrying-agent", "version": "1"},
            },
        },
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert response.status_code == 200, response.text
    session_id = response.headers.get("mcp-session-id")
    assert session_id, "the server hands out an Mcp-Session-Id"
    return str(session_id)


async def raw_call(
    http: httpx2.AsyncClient, url: str, session_id: str, request_id: int, arguments: dict[str, Any]
) -> dict[str, Any]:
    """One tools/call POSTed as a client's retry sends it: same session, same id."""
    response = await http.post(
        f"{url}/mcp",
        json={
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": arguments},
        },
        headers={
            "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": PROTOCOL_VERSION,
            "Accept": "application/json, text/event-stream",
        },
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def sessionless_call(
    http: httpx2.AsyncClient,
    url: str,
    request_id: int,
    arguments: dict[str, Any],
    *,
    key_header: str | None = None,
    meta_key: str | None = None,
    modern: bool = True,
) -> dict[str, Any]:
    """One tools/call POSTed with no initialize before it and no Mcp-Session-Id: as a
    2026-07-28 client sends it (the per-request ``_meta`` envelope), or an older
    client that skipped initialize. The client's own key goes in the
    ``Idempotency-Key`` header or the ``_meta`` member, when given."""
    meta: dict[str, Any] = {}
    headers = {"Accept": "application/json, text/event-stream"}
    if modern:
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN_PROTOCOL_VERSION,
            "io.modelcontextprotocol/clientInfo": {"name": "retrying-agent", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        headers |= {
            "MCP-Protocol-Version": MODERN_PROTOCOL_VERSION,
            "Mcp-Method": "tools/call",
            "Mcp-Name": "echo",
        }
    if meta_key is not None:
        meta[IDEMPOTENCY_META_KEY] = meta_key
    if key_header is not None:
        headers["Idempotency-Key"] = key_header
    params: dict[str, Any] = {"name": "echo", "arguments": arguments}
    if meta:
        params["_meta"] = meta
    response = await http.post(
        f"{url}/mcp",
        json={"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params},
        headers=headers,
    )
    assert response.status_code == 200, response.text
    assert "mcp-session-id" not in {k.lower() for k in response.request.headers}
    answer: dict[str, Any] = response.json()
    assert "result" in answer, answer
    return answer


def run_of(answer: dict[str, Any]) -> str:
    content = answer["result"]["structuredContent"]
    assert not answer["result"].get("isError"), content
    return str(content["run_id"])


def problem_of(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["result"].get("isError"), answer
    problem: dict[str, Any] = answer["result"]["structuredContent"]
    return problem


async def all_runs(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM runs"))
    finally:
        await connection.close()


async def test_mcp_over_http_against_a_real_replica(env, database_url, tmp_path) -> None:
    async with replicas(env, tmp_path, 1) as [replica]:
        url = replica.url
        api_key = await tenant_key(url, 10 * ECHO_RESERVATION)

        # Missing or invalid key: a 401 problem before MCP, with WWW-Authenticate.
        async with httpx2.AsyncClient(timeout=10.0) as anonymous:
            for headers in ({}, {"Authorization": "Bearer dpp_live_nope"}):
                refused = await anonymous.post(
                    f"{url}/mcp",
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    headers={**headers, "Accept": "application/json, text/event-stream"},
                )
                assert refused.status_code == 401, refused.text
                assert refused.headers["www-authenticate"] == "Bearer"
                assert refused.headers["content-type"] == "application/problem+json"

        async with mcp_session(url, api_key) as (session, http):
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert {"echo", "decision", "get_budget", "get_run"} <= set(tools)
            packs = (await http.get(f"{url}/v1/packs")).json()["packs"]
            assert set(tools) == {p["pack_type"] for p in packs} | {"get_budget", "get_run"}
            echo = next(p for p in packs if p["pack_type"] == "echo")
            assert tools["echo"].input_schema == echo["input_schema"]
            assert "0.001 USD" in (tools["echo"].description or "")  # default reservation

            before = structured(await session.call_tool("get_budget", {}))
            assert before["available_usd_micros"] == 10 * ECHO_RESERVATION

            called = await session.call_tool("echo", {"payload": {"hello": "agent"}})
            assert not called.is_error, called
            run = structured(called)
            assert run["status"] == "COMPLETED"
            assert run["result"] == {"payload": {"hello": "agent"}}
            assert run["run_id"].startswith("run_")
            charged = run["charged_usd_micros"]
            assert charged is not None and charged > 0
            assert run["charged_usd_micros"] + run["refunded_usd_micros"] == ECHO_RESERVATION
            assert any(run["run_id"] in getattr(c, "text", "") for c in called.content)

            fetched = structured(await session.call_tool("get_run", {"run_id": run["run_id"]}))
            assert fetched == run
            unknown = await session.call_tool("get_run", {"run_id": "run_nope"})
            assert unknown.is_error and structured(unknown)["status"] == 404

            # A FAILED run is an isError result naming what was charged.
            failed = await session.call_tool("echo", {"payload": 1, "fail": True})
            assert failed.is_error
            assert structured(failed)["status"] == "FAILED"
            assert structured(failed)["charged_usd_micros"] is not None

            # Arguments failing the pack's schema: isError naming the field, nothing reserved.
            middle = structured(await session.call_tool("get_budget", {}))
            bad = await session.call_tool("echo", {"payload": 1, "delay_ms": "soon"})
            assert bad.is_error
            assert structured(bad)["status"] == 422
            assert "delay_ms" in structured(bad)["field"]
            assert structured(await session.call_tool("get_budget", {})) == middle

            # An unknown tool is a JSON-RPC error (invalid params), not a 500.
            with pytest.raises(MCPError, match="Unknown tool"):
                await session.call_tool("no_such_pack", {})

            # The same JSON-RPC request id in the same session, retried: one run.
            session_id = await raw_session(http, url)
            runs_before = await run_count(url, api_key)
            first = await raw_call(http, url, session_id, 9_001, {"payload": "once"})
            again = await raw_call(http, url, session_id, 9_001, {"payload": "once"})
            assert (
                first["result"]["structuredContent"]["run_id"]
                == (again["result"]["structuredContent"]["run_id"])
            )
            assert await run_count(url, api_key) == runs_before + 1
            # ... and another session's id 9001 is another call.
            other = await raw_call(http, url, "another-session", 9_001, {"payload": "once"})
            assert (
                other["result"]["structuredContent"]["run_id"]
                != (first["result"]["structuredContent"]["run_id"])
            )

        # Budget exhausted: a 402 isError with available/required, nothing reserved.
        broke_key = await tenant_key(url, 0)
        async with mcp_session(url, broke_key) as (session, _):
            short = await session.call_tool("echo", {"payload": 1})
            assert short.is_error
            problem = structured(short)
            assert problem["status"] == 402
            assert problem["available_usd_micros"] == 0
            assert problem["required_usd_micros"] == ECHO_RESERVATION
            assert structured(await session.call_tool("get_budget", {}))["reserved_usd_micros"] == 0
        assert await run_count(url, broke_key) == 0

        # A key's own spend limit (SPEC §7): room for one reservation, then an
        # isError 402 of type key-spend-limit; get_budget shows the key's share.
        capped_key = await tenant_key(
            url, 10 * ECHO_RESERVATION, {"spend_limit_usd_micros": ECHO_RESERVATION}
        )
        async with mcp_session(url, capped_key) as (session, _):
            first_run = await session.call_tool("echo", {"payload": 1})
            assert not first_run.is_error, first_run
            capped = await session.call_tool("echo", {"payload": 2})
            assert capped.is_error
            problem = structured(capped)
            assert problem["status"] == 402
            assert problem["type"].endswith("/key-spend-limit")
            assert problem["spend_limit_usd_micros"] == ECHO_RESERVATION
            key_share = structured(await session.call_tool("get_budget", {}))["key"]
            assert key_share["spend_limit_usd_micros"] == ECHO_RESERVATION
            assert 0 < key_share["spent_usd_micros"] <= ECHO_RESERVATION
        assert await run_count(url, capped_key) == 1

        # Over the key's rate limit: the call is an isError 429 with the retry delay.
        slow_key = await tenant_key(url, 10 * ECHO_RESERVATION, {"requests_per_minute": 5})
        runs_before = await all_runs(database_url)
        async with mcp_session(url, slow_key) as (session, _):
            answers = [await session.call_tool("echo", {"payload": n}) for n in range(6)]
        limited = [structured(a) for a in answers if a.is_error]
        assert limited, "a sixth request within the minute is over the limit"
        assert all(p["status"] == 429 and p["retry_after_s"] > 0 for p in limited)
        # (the /v1 count would be rate-limited too: ask the database)
        assert await all_runs(database_url) - runs_before == len(answers) - len(limited)


async def test_mcp_sessions_need_no_sticky_routing(env, tmp_path) -> None:
    # A short wait, so that a slow run answers still running and get_run picks it up.
    async with replicas({**env, "DPP_MCP_WAIT_SEC": "1"}, tmp_path, 2) as pair:
        url = pair[0].url
        api_key = await tenant_key(url, 10 * ECHO_RESERVATION)
        transport = Alternating([pair[0].port, pair[1].port])
        async with mcp_session(url, api_key, transport) as (session, http):
            tools = (await session.list_tools()).tools
            assert "echo" in {tool.name for tool in tools}
            run = structured(await session.call_tool("echo", {"payload": "anywhere"}))
            assert run["status"] == "COMPLETED" and run["result"] == {"payload": "anywhere"}
            fetched = structured(await session.call_tool("get_run", {"run_id": run["run_id"]}))
            assert fetched["run_id"] == run["run_id"]

            # Still running at the wait limit: not an error; get_run continues.
            slow = await session.call_tool("echo", {"payload": "slow", "delay_ms": 2_500})
            assert not slow.is_error, slow
            assert structured(slow)["status"] in ("QUEUED", "PROCESSING")
            assert structured(slow)["result"] is None
            with anyio.fail_after(30):
                while True:
                    later = await session.call_tool(
                        "get_run", {"run_id": structured(slow)["run_id"]}
                    )
                    if structured(later)["status"] == "COMPLETED":
                        break
                    await anyio.sleep(0.2)
            assert structured(later)["result"] == {"payload": "slow"}

            # A retry of one call lands on each replica in turn: still one run.
            session_id = await raw_session(http, url)
            before = await run_count(url, api_key)
            answers = [
                await raw_call(http, url, session_id, 77, {"payload": "retry"}) for _ in range(2)
            ]
            ids = {answer["result"]["structuredContent"]["run_id"] for answer in answers}
            assert len(ids) == 1
            assert await run_count(url, api_key) == before + 1
        assert {pair[0].port, pair[1].port} <= set(transport.sent_to)

        # The SDK's high-level client negotiates the newest protocol (no initialize
        # handshake); it too is served by either replica.
        transport = Alternating([pair[1].port, pair[0].port])
        headers = {"Authorization": f"Bearer {api_key}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60.0, transport=transport) as http,
            Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
        ):
            assert {"echo", "get_budget"} <= {t.name for t in (await client.list_tools()).tools}
            run = structured(await client.call_tool("echo", {"payload": "modern"}))
            assert run["status"] == "COMPLETED" and run["result"] == {"payload": "modern"}
            # its retry, with the client's key, on the other replica: the same run
            before = await run_count(url, api_key)
            meta = {IDEMPOTENCY_META_KEY: "modern-retry"}
            keyed = [
                structured(await client.call_tool("echo", {"payload": "once"}, meta=meta))
                for _ in range(2)
            ]
            assert keyed[0]["run_id"] == keyed[1]["run_id"]
            assert await run_count(url, api_key) == before + 1
        assert {pair[0].port, pair[1].port} <= set(transport.sent_to)


async def test_dpp_mcp_over_stdio_against_a_real_replica(env, tmp_path) -> None:
    async with replicas(env, tmp_path, 1) as [replica]:
        api_key = await tenant_key(
            replica.url, 10 * ECHO_RESERVATION, {"spend_limit_usd_micros": 2 * ECHO_RESERVATION}
        )
        parameters = StdioServerParameters(
            command=sys.executable,
            args=["-m", "dpp.cli", "mcp", "--url", replica.url],
            env={**os.environ, "DPP_API_KEY": api_key, "DPP_MCP_WAIT_SEC": "20"},
        )
        async with (
            stdio_client(parameters) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert {"echo", "get_budget", "get_run"} <= names
            run = structured(await session.call_tool("echo", {"payload": [1, 2]}))
            assert run["status"] == "COMPLETED" and run["result"] == {"payload": [1, 2]}
            budget = structured(await session.call_tool("get_budget", {}))
            assert (
                budget["available_usd_micros"] == 10 * ECHO_RESERVATION - run["charged_usd_micros"]
            )
            bad = await session.call_tool("echo", {"payload": 1, "delay_ms": "soon"})
            assert bad.is_error and structured(bad)["status"] == 422
            keyed = structured(
                await session.call_tool("echo", {"payload": 3}, meta={IDEMPOTENCY_META_KEY: "k1"})
            )
            fetched = structured(await session.call_tool("get_run", {"run_id": keyed["run_id"]}))
            assert fetched == keyed

        # A retry with the client's key from a new `dpp mcp` process: the same run,
        # nothing reserved again; then the key's spend limit refuses a new call.
        async with (
            stdio_client(parameters) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            again = await session.call_tool(
                "echo", {"payload": 3}, meta={IDEMPOTENCY_META_KEY: "k1"}
            )
            assert structured(again) == keyed
            capped = await session.call_tool("echo", {"payload": 4})
            assert capped.is_error
            problem = structured(capped)
            assert problem["status"] == 402 and problem["type"].endswith("/key-spend-limit")
            assert problem["spend_limit_usd_micros"] == 2 * ECHO_RESERVATION
        assert await run_count(replica.url, api_key) == 2

        # A tenant without money: the 402 insufficient-budget isError, with the figures.
        broke_key = await tenant_key(replica.url, 0)
        parameters.env = {**(parameters.env or {}), "DPP_API_KEY": broke_key}
        async with (
            stdio_client(parameters) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            short = await session.call_tool("echo", {"payload": 1})
            assert short.is_error
            assert structured(short)["status"] == 402
            assert structured(short)["available_usd_micros"] == 0
            assert structured(short)["required_usd_micros"] == ECHO_RESERVATION


async def test_mcp_sessionless_calls_dedupe_by_the_clients_key_only(env, tmp_path) -> None:
    async with replicas(env, tmp_path, 1) as [replica]:
        url = replica.url
        api_key = await tenant_key(url, 100 * ECHO_RESERVATION)
        other_key = await tenant_key(url, 100 * ECHO_RESERVATION)
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60.0) as http:
            # Without a session or a key of its own, nothing tells a retry from
            # another client's call: every SDK client numbers its requests 1, 2, 3.
            # So two such calls, even alike, are two calls (never one run for both).
            for modern in (True, False):
                alike = [
                    await sessionless_call(http, url, 1, {"payload": "alike"}, modern=modern)
                    for _ in range(2)
                ]
                assert run_of(alike[0]) != run_of(alike[1])
            assert await run_count(url, api_key) == 4

            # The client's key in the Idempotency-Key header: a retry (even under
            # another request id) is the same call, one run.
            first = await sessionless_call(http, url, 1, {"payload": 1}, key_header="call-a")
            retry = await sessionless_call(http, url, 2, {"payload": 1}, key_header="call-a")
            assert run_of(retry) == run_of(first)
            # ... or in the call's _meta, from a client that skipped initialize too.
            meta_first = await sessionless_call(http, url, 1, {"payload": 1}, meta_key="call-b")
            meta_retry = await sessionless_call(
                http, url, 1, {"payload": 1}, meta_key="call-b", modern=False
            )
            assert run_of(meta_retry) == run_of(meta_first) != run_of(first)
            # both at once, agreeing: the same call again
            both = await sessionless_call(
                http, url, 3, {"payload": 1}, key_header="call-b", meta_key="call-b"
            )
            assert run_of(both) == run_of(meta_first)
            assert await run_count(url, api_key) == 6

            # Another key with the same arguments is another call.
            another = await sessionless_call(http, url, 1, {"payload": 1}, key_header="call-c")
            assert run_of(another) not in {run_of(first), run_of(meta_first)}
            assert await run_count(url, api_key) == 7

            # The same key with other arguments is a mistake, not a retry: refused,
            # nothing reserved; so are malformed or disagreeing keys.
            budget_before = (await http.get(f"{url}/v1/budget")).json()
            reused = problem_of(
                await sessionless_call(http, url, 4, {"payload": 2}, key_header="call-a")
            )
            assert reused["status"] == 422 and reused["type"].endswith("/idempotency-key-reused")
            too_long = problem_of(
                await sessionless_call(http, url, 5, {"payload": 1}, key_header="k" * 256)
            )
            assert too_long["status"] == 422 and too_long["field"] == "Idempotency-Key"
            not_text = problem_of(
                await sessionless_call(http, url, 6, {"payload": 1}, meta_key="caf\u00e9")
            )
            assert not_text["status"] == 422
            assert not_text["field"] == f"_meta.{IDEMPOTENCY_META_KEY}"
            disagree = problem_of(
                await sessionless_call(
                    http, url, 7, {"payload": 1}, key_header="call-a", meta_key="call-b"
                )
            )
            assert disagree["status"] == 422
            assert (await http.get(f"{url}/v1/budget")).json() == budget_before
            assert await run_count(url, api_key) == 7

        # Keys are the API key's own: another key's "call-a" is another call.
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {other_key}"}, timeout=60.0
        ) as http:
            theirs = await sessionless_call(http, url, 1, {"payload": 1}, key_header="call-a")
            assert run_of(theirs) != run_of(first)

        # The SDK's own high-level client (2026-07-28: no initialize, no session)
        # retrying a call with its key in _meta: one run.
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60.0) as http,
            Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client,
        ):
            meta = {IDEMPOTENCY_META_KEY: "sdk-call-1"}
            answers = [
                structured(await client.call_tool("echo", {"payload": "sdk"}, meta=meta))
                for _ in range(2)
            ]
            assert answers[0]["run_id"] == answers[1]["run_id"]
            assert answers[0]["result"] == {"payload": "sdk"}
            plain = structured(await client.call_tool("echo", {"payload": "sdk"}))
            assert plain["run_id"] != answers[0]["run_id"]
        assert await run_count(url, api_key) == 9


async def test_dpp_mcp_backend_retries_a_lost_submit_through_the_client(env, tmp_path) -> None:
    """`dpp mcp`'s backend is the Python client: its retry of a submit whose answer
    was lost reuses the call's key, so the tool call still makes one run."""
    async with replicas(env, tmp_path, 1) as [replica]:
        api_key = await tenant_key(replica.url, 10 * ECHO_RESERVATION)
        proxy = TcpProxy("127.0.0.1", replica.port)
        await proxy.start()
        try:
            async with AsyncClient(f"http://{proxy.address}", api_key) as client:
                backend = RemoteBackend(client)
                assert "echo" in {pack["pack_type"] for pack in await backend.catalog()}
                proxy.drop_answers(1)  # the submit reaches DPP; its answer does not
                called = await call_tool(
                    backend, "echo", {"payload": "once"}, idempotency_key="mcp-lost", wait_sec=20
                )
                assert proxy.answers_dropped_total == 1
                run = structured(called)
                assert not called.is_error and run["result"] == {"payload": "once"}
        finally:
            await proxy.close()
        assert await run_count(replica.url, api_key) == 1
