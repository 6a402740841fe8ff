"""dpp_client's sans-IO core: the decisions both clients share, without a server."""

from __future__ import annotations

import inspect
import json
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import dpp_client
import httpx
import pytest
from dpp_client import _core
from dpp_client._errors import (
    Conflict,
    DPPError,
    Gone,
    InsufficientBudget,
    KeySpendLimitExceeded,
    RateLimited,
    ServiceUnavailable,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _response(
    status: int, problem: dict[str, object] | None = None, **headers: str
) -> _core.Response:
    body = json.dumps(problem).encode() if problem is not None else b""
    return _core.Response(status, httpx.Headers(headers), body)


def _problem(slug: str, status: int, **members: object) -> dict[str, object]:
    return {
        "type": f"https://dpp.dev/problems/{slug}",
        "title": "t",
        "status": status,
        "detail": "d",
        "instance": "/v1/runs",
        **members,
    }


def test_a_create_request_carries_one_fresh_key_and_fixed_bytes() -> None:
    first = _core.build_create("echo", {"payload": 1})
    second = _core.build_create("echo", {"payload": 1})
    key = dict(first.headers)["Idempotency-Key"]
    assert key != dict(second.headers)["Idempotency-Key"]
    assert 1 <= len(key) <= 255 and key.isascii() and key.isprintable()
    # the same Request object is what every retry sends: bytes and key cannot drift
    assert first.content == second.content == b'{"pack_type":"echo","inputs":{"payload":1}}'
    given = _core.build_create("echo", {}, idempotency_key="mine", timebox_sec=5, metadata={})
    assert dict(given.headers)["Idempotency-Key"] == "mine"
    assert json.loads(given.content or b"") == {
        "pack_type": "echo",
        "inputs": {},
        "timebox_sec": 5,
        "metadata": {},
    }


def test_the_api_key_is_never_sent_to_a_download_link() -> None:
    assert "Authorization" in _core.build_budget().header_map("dpp_live_x")
    result = dpp_client.RunResult("https://s3.example/b/k?sig=1", NOW, "0" * 64, 0, "x")
    assert "Authorization" not in _core.build_download(result).header_map("dpp_live_x")


def test_run_ids_cannot_escape_their_path() -> None:
    assert _core.build_get("../budget").url == "/v1/runs/..%2Fbudget"
    with pytest.raises(ValueError):
        _core.build_cancel("")


@pytest.mark.parametrize(
    ("response", "retried"),
    [
        (_response(429, _problem("rate-limited", 429)), True),
        (_response(503, _problem("unavailable", 503)), True),
        (_response(409, _problem("idempotency-key-in-use", 409)), True),
        (_response(409, _problem("run-not-cancelable", 409)), False),
        (_response(500, _problem("internal", 500)), False),
        (_response(502), False),
        (_response(402, _problem("insufficient-budget", 402)), False),
        (_response(422, _problem("invalid-request", 422)), False),
        (_response(200), False),
    ],
)
def test_only_what_spec_7_names_is_retried(response: _core.Response, retried: bool) -> None:
    policy = _core.RetryPolicy(3, uniform=lambda: 0.0)
    assert (policy.after_response(0, response, NOW) is not None) is retried


def test_retry_after_is_honoured_capped_and_backoff_grows_with_jitter() -> None:
    policy = _core.RetryPolicy(3, uniform=lambda: 1.0)
    assert policy.after_response(0, _response(429, {}, **{"Retry-After": "7"}), NOW) == 7.0
    assert policy.after_response(0, _response(503, {}, **{"Retry-After": "600"}), NOW) == 60.0
    date = format_datetime(NOW + timedelta(seconds=12), usegmt=True)
    assert policy.after_response(1, _response(429, {}, **{"Retry-After": date}), NOW) == 12.0
    assert [policy.after_error(n) for n in range(4)] == [0.5, 1.0, 2.0, None]
    low = _core.RetryPolicy(3, uniform=lambda: 0.0)
    assert [low.after_error(n) for n in range(3)] == [0.25, 0.5, 1.0]
    assert _core.RetryPolicy(20, uniform=lambda: 1.0).backoff_s(19) == _core.BACKOFF_MAX_S
    # attempts are capped: the last one's answer is the caller's
    assert policy.after_response(3, _response(429, {}, **{"Retry-After": "1"}), NOW) is None
    assert _core.RetryPolicy(0).after_error(0) is None
    assert _core.parse_retry_after("soon", NOW) is None


def test_problems_map_to_the_classes_of_spec_7() -> None:
    def error(status: int, slug: str, **members: object) -> DPPError:
        return _core.error_for(
            _response(status, _problem(slug, status, **members), **{"X-Request-ID": "r1"}), NOW
        )

    short = error(402, "insufficient-budget", available_usd_micros=5, required_usd_micros=9)
    assert isinstance(short, InsufficientBudget)
    assert (short.available_usd_micros, short.required_usd_micros, short.request_id) == (5, 9, "r1")
    capped = error(
        402, "key-spend-limit", spend_limit_usd_micros=10, spent_usd_micros=8, required_usd_micros=5
    )
    assert isinstance(capped, KeySpendLimitExceeded) and not isinstance(capped, InsufficientBudget)
    assert (capped.spend_limit_usd_micros, capped.spent_usd_micros) == (10, 8)
    gone = error(410, "gone", run_status="COMPLETED", charged_usd_micros=3, refunded_usd_micros=4)
    assert isinstance(gone, Gone) and gone.run_status == "COMPLETED"
    assert (gone.charged_usd_micros, gone.refunded_usd_micros) == (3, 4)
    assert isinstance(error(409, "run-not-cancelable"), Conflict)
    assert isinstance(error(503, "unavailable"), ServiceUnavailable)
    limited = _core.error_for(_response(429, _problem("x", 429), **{"Retry-After": "3"}), NOW)
    assert isinstance(limited, RateLimited) and limited.retry_after == 3.0
    # a non-JSON error body (a proxy's page) is still a DPPError, never a crash
    html = _core.error_for(_core.Response(502, httpx.Headers(), b"<html>bad gateway"), NOW)
    assert type(html) is DPPError and html.status == 502 and "bad gateway" in html.detail


def test_wait_polls_sooner_first_and_never_past_its_deadline() -> None:
    run = dpp_client.Run.from_json(
        {
            "id": "run_x",
            "status": "QUEUED",
            "pack_type": "echo",
            "created_at": "2026-12-01T12:00:00.000000Z",
            "started_at": None,
            "finished_at": None,
            "reserved_usd_micros": 1,
            "minimum_fee_usd_micros": 1,
            "charged_usd_micros": None,
            "refunded_usd_micros": None,
            "metadata": {},
            "result": None,
            "error": None,
            "retention_until": None,
        }
    )
    assert run.created_at == NOW and not run.terminal
    schedule = _core.PollSchedule("run_x", 1.0, started_s=100.0)
    delays = [schedule.delay_s(run, 100.0) for _ in range(6)]
    assert delays[0] == _core.POLL_FIRST_S and delays == sorted(delays)
    assert max(delays) <= _core.POLL_MAX_S
    assert schedule.delay_s(run, 100.9) == pytest.approx(0.1)
    with pytest.raises(TimeoutError, match="still QUEUED"):
        schedule.delay_s(run, 101.0)


def test_settings_come_from_the_environment_and_are_checked() -> None:
    env = {"DPP_URL": "http://dpp.example/", "DPP_API_KEY": "dpp_live_k"}
    settings = _core.resolve_settings(None, None, 3, env)
    assert (settings.base_url, settings.api_key) == ("http://dpp.example", "dpp_live_k")
    assert "dpp_live_k" not in repr(settings)
    with pytest.raises(ValueError, match="DPP_API_KEY"):
        _core.resolve_settings("http://x", None, 3, {})
    with pytest.raises(ValueError, match="DPP_URL"):
        _core.resolve_settings(None, "k", 3, {})
    with pytest.raises(ValueError, match="max_retries"):
        _core.resolve_settings("http://x", "k", -1, {})


def test_the_async_client_mirrors_the_sync_one() -> None:
    for sync, asynchronous in (
        (dpp_client.Client, dpp_client.AsyncClient),
        (dpp_client.Runs, dpp_client.AsyncRuns),
    ):
        names = {name for name in vars(sync) if not name.startswith("_")} - {"close"}
        async_names = {name for name in vars(asynchronous) if not name.startswith("_")}
        assert names == async_names - {"aclose"}
        for name in names - {"close", "base_url"}:
            expected = inspect.signature(getattr(sync, name)).parameters.keys()
            assert inspect.signature(getattr(asynchronous, name)).parameters.keys() == expected


def test_a_failed_run_names_its_charge_and_its_error() -> None:
    document = {
        "id": "run_f",
        "status": "FAILED",
        "pack_type": "echo",
        "created_at": "2026-12-01T12:00:00Z",
        "started_at": "2026-12-01T12:00:01Z",
        "finished_at": "2026-12-01T12:00:02Z",
        "reserved_usd_micros": 1000,
        "minimum_fee_usd_micros": 100,
        "charged_usd_micros": 100,
        "refunded_usd_micros": 900,
        "metadata": {},
        "result": None,
        "error": _problem("pack-error", 500, detail="the pack said no"),
        "retention_until": "2026-12-31T12:00:02Z",
    }
    run = dpp_client.Run.from_json(document)
    failed = dpp_client.RunFailed(run)
    assert failed.run is run and failed.status is None
    assert failed.type.endswith("/pack-error") and failed.detail == "the pack said no"
    assert str(failed) == "run run_f ended FAILED (charged 100 USD micros): the pack said no"
    with pytest.raises(dpp_client.RunFailed):
        _core.result_link(run)
    with pytest.raises(ValueError, match="not an integer"):
        dpp_client.Run.from_json({**document, "charged_usd_micros": 1.5})


def test_an_unreachable_server_is_a_connection_failed_after_the_retries() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        dpp_client.Client(f"http://127.0.0.1:{port}", "dpp_live_k", max_retries=1) as dpp,
        pytest.raises(dpp_client.ConnectionFailed) as failed,
    ):
        dpp.budget()
    assert "after 2 attempt(s)" in failed.value.detail
    assert isinstance(failed.value.__cause__, httpx.ConnectError)
