"""The console's session cookie, CSRF tokens, amounts and chart, without a server."""

from __future__ import annotations

from datetime import date

import pytest

from dpp.http.console.chart import UsagePoint, usage_chart
from dpp.http.console.pages import parse_usd
from dpp.http.console.render import usd
from dpp.http.console.session import (
    SESSION_TTL_S,
    Session,
    csrf_token,
    issue_session,
    session_key,
    sign_in_csrf,
    verify_csrf,
    verify_session,
)

KEY = session_key("admin-token-one")
NOW = 1_800_000_000.0


def test_a_session_verifies_until_it_expires() -> None:
    cookie = issue_session(KEY, now=NOW)
    session = verify_session(KEY, cookie, now=NOW + 1)
    assert session is not None and session.expires_at == int(NOW) + SESSION_TTL_S
    assert verify_session(KEY, cookie, now=NOW + SESSION_TTL_S - 1) == session
    assert verify_session(KEY, cookie, now=NOW + SESSION_TTL_S) is None


def test_rotating_the_admin_token_ends_every_session() -> None:
    cookie = issue_session(KEY, now=NOW)
    assert verify_session(session_key("admin-token-two"), cookie, now=NOW) is None
    # the same token gives the same key on every replica
    assert verify_session(session_key("admin-token-one"), cookie, now=NOW) is not None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v, e, n, m: f"{v}.{int(e) + 3600}.{n}.{m}",  # a later expiry
        lambda v, e, n, m: f"{v}.{e}.{n}x.{m}",  # another nonce
        lambda v, e, n, m: f"{v}.{e}.{n}.{m[:-1]}A" if m[-1] != "A" else f"{v}.{e}.{n}.{m[:-1]}B",
        lambda v, e, n, m: f"v2.{e}.{n}.{m}",
        lambda v, e, n, m: f"{v}.{e}.{n}",
        lambda v, e, n, m: "",
        lambda v, e, n, m: "x" * 500,
        lambda v, e, n, m: f"{v}.-1.{n}.{m}",
    ],
)
def test_a_forged_cookie_is_no_session(tamper: object) -> None:
    parts = issue_session(KEY, now=NOW).split(".")
    forged = tamper(*parts)  # type: ignore[operator]
    assert verify_session(KEY, forged, now=NOW) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    first = verify_session(KEY, issue_session(KEY, now=NOW), now=NOW)
    second = verify_session(KEY, issue_session(KEY, now=NOW), now=NOW)
    assert first is not None and second is not None and first.nonce != second.nonce
    token = csrf_token(KEY, first)
    assert verify_csrf(token, token)
    assert not verify_csrf(token, csrf_token(KEY, second))
    assert not verify_csrf(token, csrf_token(session_key("other"), first))
    assert not verify_csrf(token, None) and not verify_csrf(token, "")
    assert not verify_csrf(token, "é" * 10)
    assert sign_in_csrf(KEY, "pre-a") != sign_in_csrf(KEY, "pre-b")
    assert csrf_token(KEY, Session("n", 1)) != sign_in_csrf(KEY, "n")  # labels differ


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("12.5", 12_500_000),
        ("$1,000", 1_000_000_000),
        ("0.000001", 1),
        (" 3 ", 3_000_000),
        ("0", None),
        ("-1", None),
        ("1.0000001", None),
        ("NaN", None),
        ("Infinity", None),
        ("1e400", None),
        ("abc", None),
        ("", None),
        ("10000001", None),  # above CREDIT_USD_MICROS_MAX
    ],
)
def test_amounts_parse_exactly_or_not_at_all(text: str, micros: int | None) -> None:
    assert parse_usd(text) == micros


def test_usd_prints_micros_exactly() -> None:
    assert usd(0) == "$0.00"
    assert usd(1) == "$0.000001"
    assert usd(12_500_000) == "$12.50"
    assert usd(1_234_567_890_123) == "$1,234,567.890123"
    assert usd(-2_000_000) == "-$2.00"
    assert usd(None) == "—"


def test_the_usage_chart_scales_bars_to_the_largest_amount() -> None:
    points = [
        UsagePoint(date(2026, 1, 1), "echo", 4_000_000, 1_000_000),
        UsagePoint(date(2026, 1, 2), "echo", 2_000_000, 0),
        UsagePoint(date(2026, 1, 2), "decision", 1_000_000, 500_000),
    ]
    chart = usage_chart(points, date(2026, 1, 1), date(2026, 1, 3))
    assert [label for label, _ in chart.legend] == ["decision", "echo"]
    assert len(chart.bars) == 6  # charged and refunded of each (day, pack) point
    tallest = max(chart.bars, key=lambda bar: bar.height)
    assert tallest.title == "2026-01-01 echo charged $4.00"
    plot_height = chart.plot_bottom - 16
    assert tallest.height == pytest.approx(plot_height * 4 / 5)  # scale tops at $5
    assert chart.y_ticks[-1].label == "$5.00"
    assert [tick.label for tick in chart.x_ticks] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    year = usage_chart(points, date(2025, 1, 3), date(2026, 1, 2))  # a quiet year
    assert len(year.x_ticks) <= 8 and len(year.bars) == 6
    for bar in chart.bars:
        assert chart.plot_left <= bar.x and bar.x + bar.width <= chart.plot_right
        assert bar.y + bar.height == pytest.approx(chart.plot_bottom)
