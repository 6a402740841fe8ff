"""dpp.logs: the line format, context binding on both backends, and redaction."""

from __future__ import annotations

import datetime
import io
import logging
import re
import zlib
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import orjson
import pytest

from dpp.config import load_settings
from dpp.logs import (
    REDACTED,
    JsonFormatter,
    RedactingFilter,
    bind,
    bound_fields,
    configure_logging,
    redact,
    redact_text,
    register_secret,
)

BODY = "dpp_live_" + "aB3" * 10 + "xy"
API_KEY = f"{BODY}_{zlib.crc32(BODY.encode()):08x}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class Capture:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines()]

    def text(self) -> str:
        return self.stream.getvalue()


def _capture(json_logs: bool) -> Iterator[Capture]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    env = {"DPP_JSON_LOGS": "true" if json_logs else "false", "LOG_LEVEL": "DEBUG"}
    env["DPP_ADMIN_TOKEN"] = "unit-admin-token-abcdefgh"
    handler = configure_logging(load_settings(env), stream=stream)
    try:
        yield Capture(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def capture() -> Iterator[Capture]:
    yield from _capture(json_logs=True)


@pytest.fixture
def text_capture() -> Iterator[Capture]:
    yield from _capture(json_logs=False)


log = logging.getLogger("dpp.unit")


@pytest.mark.parametrize(
    "created",
    [
        1796322357.0,
        1796322357.5566,  # truncated to milliseconds
        1796322357.9999,  # never .1000
        1796322357.9999999,  # rounds up into the next second, as datetime does
        1796322358.001,  # not 0.000999... seconds: .001
        1796322357.25,  # an earlier second after a later one
    ],
)
def test_timestamps_are_utc_milliseconds(
    capture: Capture, monkeypatch: pytest.MonkeyPatch, created: float
) -> None:
    monkeypatch.setattr("time.time", lambda: created)
    monkeypatch.setattr("time.time_ns", lambda: int(created * 1_000_000_000))
    log.info("tick")
    [line] = capture.lines()
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    assert line["ts"] == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert re.fullmatch(r"2026-12-03T18:2[56]:\d\d\.\d{3}Z", line["ts"])


def test_one_json_object_per_line(capture: Capture) -> None:
    log.info("hello %s", "world", extra={"attempt": 2, "when": object})
    log.debug("second\nline")
    first, second = capture.lines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "INFO"
    assert first["logger"] == "dpp.unit"
    assert first["msg"] == "hello world"
    assert first["attempt"] == 2
    assert first["when"] == "<class 'object'>"
    assert second["msg"] == "second\nline"  # escaped: still one physical line
    assert len(capture.text().splitlines()) == 2


def test_bound_fields_appear_and_unbind(capture: Capture) -> None:
    with bind(request_id="req_1", trace_id="t" * 32):
        with bind(tenant_id="ten_x", run_id="run_y"):
            log.info("inner")
            assert bound_fields() == {
                "request_id": "req_1",
                "trace_id": "t" * 32,
                "tenant_id": "ten_x",
                "run_id": "run_y",
            }
        log.info("outer")
    log.info("none")
    inner, outer, none = capture.lines()
    assert inner["tenant_id"] == "ten_x" and inner["run_id"] == "run_y"
    assert inner["request_id"] == "req_1"
    assert outer["request_id"] == "req_1" and "tenant_id" not in outer
    assert "request_id" not in none and "trace_id" not in none


def test_an_extra_field_wins_over_a_bound_one(capture: Capture) -> None:
    with bind(run_id="run_bound"):
        log.info("x", extra={"run_id": "run_explicit"})
    assert capture.lines()[0]["run_id"] == "run_explicit"


async def test_binding_is_per_task(capture: Capture) -> None:
    """Concurrent tasks keep their own fields; children inherit the parent's."""
    seen: dict[str, dict] = {}

    async def request(name: str) -> None:
        with bind(request_id=name):
            await anyio.sleep(0.01)
            async with anyio.create_task_group() as group:
                group.start_soon(child, name)
            log.info("done %s", name)

    async def child(name: str) -> None:
        await anyio.lowlevel.checkpoint()
        seen[name] = dict(bound_fields())

    with bind(trace_id="shared"):
        async with anyio.create_task_group() as group:
            for name in ("a", "b", "c"):
                group.start_soon(request, name)
    assert seen == {name: {"trace_id": "shared", "request_id": name} for name in "abc"}
    by_msg = {line["msg"]: line for line in capture.lines()}
    assert {by_msg[f"done {n}"]["request_id"] for n in "abc"} == {"a", "b", "c"}
    assert bound_fields() == {}


def test_api_keys_are_scrubbed_everywhere(capture: Capture) -> None:
    log.info("key %s", API_KEY)
    log.info(f"inline {API_KEY} and again {API_KEY}")
    log.info("extras", extra={"header": f"Bearer {API_KEY}", "nested": {"list": [API_KEY]}})
    log.info("truncated key %s", API_KEY[:20])
    try:
        raise ValueError(f"bad key {API_KEY}")
    except ValueError:
        log.exception("failed")
    text = capture.text()
    assert API_KEY not in text
    assert API_KEY[9:20] not in text
    assert text.count(REDACTED) >= 6
    [*_, failure] = capture.lines()
    assert "ValueError: bad key [REDACTED]" in failure["exc"]


def test_sensitive_field_names_are_scrubbed(capture: Capture) -> None:
    log.info(
        "fields",
        extra={
            "authorization": "anything at all",
            "X-Api-Key": "k1",
            "lease_token": "t1",
            "db_password": "p1",
            "client_secret": "s1",
            "headers": {"Authorization": "Basic Zm9vOmJhcg==", "Cookie": "c1", "Accept": "*/*"},
            "api-key": "k2",
        },
    )
    line = capture.lines()[0]
    for name in ("authorization", "lease_token", "db_password", "client_secret", "api-key"):
        assert line[name] == REDACTED
    assert line["X-Api-Key"] == REDACTED
    assert line["headers"] == {"Authorization": REDACTED, "Cookie": REDACTED, "Accept": "*/*"}
    for value in ("anything at all", "t1", "p1", "s1", "k1", "k2", "c1", "Zm9vOmJhcg"):
        assert value not in capture.text()


def test_bearer_urls_queries_and_registered_secrets(capture: Capture) -> None:
    log.info("Authorization: Bearer abc.def-ghi")
    log.info("connecting to postgresql://dpp:s3cr3t-pw@db:5432/dpp")
    log.info("GET https://hooks.example.com/x?access_token=q1q1q1&page=2")
    log.info("the admin token is unit-admin-token-abcdefgh")
    text = capture.text()
    for secret in ("abc.def-ghi", "s3cr3t-pw", "q1q1q1", "unit-admin-token-abcdefgh"):
        assert secret not in text
    assert "postgresql://dpp:[REDACTED]@db:5432/dpp" in text
    assert "page=2" in text
    for line in capture.lines():  # still valid JSON after the last pass
        assert line["msg"]


def test_json_stays_valid_when_a_bearer_value_holds_quotes(capture: Capture) -> None:
    log.info('auth "Bearer to"k\\en" end', extra={"raw": 'Bearer "quoted"'})
    [line] = capture.lines()
    assert line["msg"] == 'auth "Bearer [REDACTED] end'
    assert line["raw"] == "Bearer [REDACTED]"


def test_text_format(text_capture: Capture) -> None:
    with bind(request_id="req_t"):
        log.warning("plain %s", API_KEY, extra={"status": 500, "note": "two words"})
    text = text_capture.text()
    assert "WARNING" in text and "dpp.unit: plain [REDACTED]" in text
    assert "request_id=req_t" in text and "status=500" in text and 'note="two words"' in text
    assert API_KEY not in text


def test_filter_never_drops_and_survives_bad_formats(capture: Capture) -> None:
    log.info("%d items", "not a number")
    log.info("huge", extra={"big": 2**70})
    first, second = capture.lines()
    assert "unformattable" in first["msg"]
    assert second["msg"] == "huge"
    assert second["big"] == str(2**70)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m %s", (API_KEY,), None)
    assert RedactingFilter().filter(record) is True
    assert record.getMessage() == f"m {REDACTED}"


def test_formatter_redacts_even_without_the_filter() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m %s", (API_KEY,), None)
    record.__dict__["password"] = "pw-value"
    line = JsonFormatter().format(record)
    assert API_KEY not in line and "pw-value" not in line


def test_redact_helpers() -> None:
    assert redact_text(f"x {API_KEY} y") == f"x {REDACTED} y"
    assert redact_text("dpp_live_ alone") == "dpp_live_ alone"
    assert redact({"token": 1, "ok": [f"Bearer {API_KEY}"]}) == {
        "token": REDACTED,
        "ok": [f"Bearer {REDACTED}"],
    }
    register_secret("short")  # too short to register: it would scrub ordinary words
    assert redact_text("a short word") == "a short word"


def test_bind_only_forgets_the_callers_fields() -> None:
    from dpp.logs import bind, bind_only, bound_fields

    with bind(request_id="req_1", trace_id="t" * 32):
        with bind_only(tenant_id="ten_1"):
            assert dict(bound_fields()) == {"tenant_id": "ten_1"}
        assert bound_fields()["request_id"] == "req_1"


def test_bind_returns_the_merged_fields_and_restores_them_on_error() -> None:
    with bind(request_id="req_1") as outer:
        assert dict(outer) == {"request_id": "req_1"}
        with pytest.raises(RuntimeError), bind(tenant_id="ten_1") as inner:
            assert dict(inner) == {"request_id": "req_1", "tenant_id": "ten_1"}
            raise RuntimeError("boom")
        assert dict(bound_fields()) == {"request_id": "req_1"}
    assert dict(bound_fields()) == {}


def test_redact_keeps_scalars_and_converts_containers() -> None:
    class Flag(int):
        pass

    assert redact(True) is True and redact(3) == 3 and redact(1.5) == 1.5
    assert redact(None) is None and redact(Flag(2)) == 2
    assert redact((1, "x", frozenset({2}))) == [1, "x", [2]]
    assert redact(b"Bearer abc") == f"Bearer {REDACTED}"
    assert redact(bytearray(API_KEY.encode())) == REDACTED
    assert redact({"nested": {"api_key": "v", 1: API_KEY}}) == {
        "nested": {"api_key": REDACTED, "1": REDACTED}
    }


def test_an_access_line_names_its_caller_and_is_scrubbed(capture: Capture) -> None:
    from starlette.routing import Route

    from dpp.http import middleware

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger("dpp.access").addHandler(keep)
    try:
        scope = {
            "method": "GET",
            "path": f"/v1/things/{API_KEY}",
            "route": Route("/v1/things/{thing}", lambda request: None),
            "state": {"tenant_id": "ten_1"},
        }
        with bind(request_id="req_1"):
            middleware.record_access(None, scope, 200, 0.0015, 12)
    finally:
        logging.getLogger("dpp.access").removeHandler(keep)
    (line,) = capture.lines()
    assert API_KEY not in capture.text()
    assert line["msg"] == f"GET /v1/things/{REDACTED} 200 1.5ms"
    assert line["path"] == f"/v1/things/{REDACTED}"
    assert line["route"] == "/v1/things/{thing}" and line["status"] == 200
    assert line["tenant_id"] == "ten_1" and line["request_id"] == "req_1"
    assert (line["duration_ms"], line["bytes"], line["level"]) == (1.5, 12, "INFO")
    # the record findCaller would have made: the caller is record_access
    (record,) = seen
    assert record.funcName == "record_access"
    assert record.pathname == middleware.__file__ and record.lineno > 0
