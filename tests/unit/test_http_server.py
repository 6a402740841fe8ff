"""hypercorn's per-response headers, built once a second (``dpp.http.server``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from wsgiref.handlers import format_date_time

import pytest

from dpp.config import load_settings
from dpp.http import server
from dpp.http.server import hypercorn_config


@pytest.fixture
def bound() -> Iterator[socket.socket]:
    sock = socket.socket()
    yield sock
    sock.close()


def test_the_date_is_the_current_seconds_and_each_caller_gets_its_own_list(
    bound: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_800_000_000.25]
    monkeypatch.setattr(server.time, "time", lambda: now[0])
    monkeypatch.setattr("hypercorn.config.time", lambda: now[0])
    formatted: list[float] = []

    def format_counted(timestamp: float) -> str:
        formatted.append(timestamp)
        return format_date_time(timestamp)

    monkeypatch.setattr("hypercorn.config.format_date_time", format_counted)
    config = hypercorn_config(bound, load_settings({}))

    first = config.response_headers("h11")
    assert first == [(b"date", format_date_time(now[0]).encode("ascii"))]  # no server header
    first.append((b"x-appended", b"by a caller"))  # hypercorn extends what it gets
    now[0] += 0.5  # the same second: the same bytes, a fresh list
    assert config.response_headers("h11") == [(b"date", format_date_time(now[0]).encode())]

    assert len(formatted) == 1  # formatted once for the whole second

    now[0] += 1.0  # the next second: a new Date
    later = config.response_headers("h11")
    assert later == [(b"date", format_date_time(now[0]).encode("ascii"))]
    assert later != first[:1]
    assert len(formatted) == 2
