"""The pure parts of the MCP tools (dpp/http/mcp_tools.py): idempotency keys,
tool descriptions, refusals. The tools end to end: tests/integration/test_mcp.py."""

from __future__ import annotations

import sys

import pytest

from dpp.cli.common import EXIT_CONFIG
from dpp.cli.main import main
from dpp.http.mcp_tools import (
    GET_BUDGET,
    GET_RUN,
    client_key,
    idempotency_key,
    list_tools,
    refused_result,
)
from dpp.packs import PackRegistry
from dpp.runs.idempotency import valid_key


def test_idempotency_keys_are_valid_keys_and_tell_every_part_apart() -> None:
    base = idempotency_key("key_a", "session-1", 1)
    assert valid_key(base)
    assert base == idempotency_key("key_a", "session-1", 1)  # a retry: the same key
    others = {
        idempotency_key("key_b", "session-1", 1),  # another API key
        idempotency_key("key_a", "session-2", 1),  # another session
        idempotency_key("key_a", "session-1", 2),  # another request
        idempotency_key("key_a", "session-1", "1"),  # 1 and "1" are different ids
    }
    assert base not in others and len(others) == 4
    # the parts are not concatenated: no shifting of characters between them
    assert idempotency_key("key_a", "s1", 11) != idempotency_key("key_a", "s11", 1)
    assert "session-1" not in base and "key_a" not in base


def test_a_clients_own_key_is_scoped_to_the_api_key_and_never_a_session_key() -> None:
    key = client_key("key_a", "call-1")
    assert valid_key(key) and "call-1" not in key
    assert key == client_key("key_a", "call-1")  # its retry, in any session
    assert key != client_key("key_b", "call-1")  # another API key's call-1
    assert key != client_key("key_a", "call-2")
    # a client cannot pick a key that lands on a session-derived one
    assert client_key("key_a", "session-1") != idempotency_key("key_a", "session-1", "call-1")
    assert client_key("key_a", "1") != idempotency_key("key_a", "client", "1")


def test_one_tool_per_pack_with_its_schema_and_prices_plus_budget_and_run() -> None:
    catalog = PackRegistry.load({}).catalog()  # the built-in packs
    tools = list_tools(catalog)
    assert [tool.name for tool in tools] == [p["pack_type"] for p in catalog] + [
        GET_BUDGET,
        GET_RUN,
    ]
    for tool, pack in zip(tools, catalog, strict=False):
        assert tool.input_schema == pack["input_schema"]
        description = tool.description or ""
        minimum = pack["minimum_fee_usd_micros"] / 1_000_000
        reservation = pack["default_reservation_usd_micros"] / 1_000_000
        assert f"minimum fee {minimum:g} USD" in description
        assert f"reserves {reservation:g} USD" in description


def test_a_refusal_is_an_error_result_with_the_problem_and_what_to_do() -> None:
    problem = {
        "type": "https://dpp.dev/problems/insufficient-budget",
        "title": "Payment Required",
        "status": 402,
        "detail": "This run needs 1000 USD micros reserved; 0 are available.",
        "available_usd_micros": 0,
        "required_usd_micros": 1_000,
    }
    result = refused_result(problem)
    assert result.is_error is True
    assert result.structured_content == problem
    text = " ".join(getattr(block, "text", "") for block in result.content)
    assert "Available: 0" in text and "needs 1000" in text
    throttled = refused_result({"status": 429, "detail": "Slow down.", "retry_after_s": 7})
    assert "Retry after 7 s." in getattr(throttled.content[0], "text", "")
    invalid = refused_result({"status": 422, "detail": "bad", "field": "inputs.delay_ms"})
    assert "'delay_ms'" in getattr(invalid.content[0], "text", "")


def test_dpp_mcp_without_the_python_client_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "dpp_client", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "dpp.cli.mcp_remote", raising=False)
    monkeypatch.setenv("DPP_API_KEY", "dpp_live_x")
    assert main(["mcp", "--url", "http://127.0.0.1:9"]) == EXIT_CONFIG
    assert "pip install ./clients/python" in capsys.readouterr().err
