"""The echo pack: payload round trip, delay under a timebox, requested failure."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest

from dpp.packs import PACK_ERROR_TYPE, FieldError, PackContext, PackError, validate_inputs
from dpp.packs.echo import EchoPack


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def context(timebox_sec: int = 60) -> PackContext:
    return PackContext(
        run_id="run_echo",
        tenant_id="ten_1",
        trace_id=None,
        timebox_sec=timebox_sec,
        reserved_usd_micros=1_000,
        minimum_fee_usd_micros=100,
    )


@pytest.mark.parametrize(
    "payload",
    [None, 0, -1.5, "text", "", [], {}, {"nested": [1, {"deep": True}], "é": "ü"}, 2**64 - 1],
)
async def test_returns_the_payload_at_a_fixed_price(anyio_backend: str, payload: Any) -> None:
    output = await EchoPack().execute({"payload": payload}, context())
    assert output.body == orjson.dumps({"payload": payload})
    assert orjson.loads(output.body) == {"payload": payload}
    assert output.content_type == "application/json"
    assert output.actual_cost_usd_micros == 1_000


async def test_fail_raises_a_pack_error(anyio_backend: str) -> None:
    with pytest.raises(PackError) as caught:
        await EchoPack().execute({"payload": 1, "fail": True}, context())
    assert caught.value.title == "Echo failure requested"
    assert "fail: true" in caught.value.detail
    assert caught.value.problem() == {
        "type": PACK_ERROR_TYPE,
        "title": caught.value.title,
        "detail": caught.value.detail,
    }


async def test_fail_false_echoes(anyio_backend: str) -> None:
    output = await EchoPack().execute({"payload": "ok", "fail": False}, context())
    assert orjson.loads(output.body) == {"payload": "ok"}


async def test_waits_for_the_delay(anyio_backend: str) -> None:
    started = anyio.current_time()
    await EchoPack().execute({"payload": 1, "delay_ms": 30}, context())
    assert anyio.current_time() - started >= 0.025


async def test_fails_after_the_delay(anyio_backend: str) -> None:
    started = anyio.current_time()
    with pytest.raises(PackError):
        await EchoPack().execute({"payload": 1, "delay_ms": 30, "fail": True}, context())
    assert anyio.current_time() - started >= 0.025


async def test_the_callers_timebox_cancels_the_delay(anyio_backend: str) -> None:
    started = anyio.current_time()
    with pytest.raises(TimeoutError), anyio.fail_after(0.05):
        await EchoPack().execute({"payload": 1, "delay_ms": 3_600_000}, context(timebox_sec=1))
    assert anyio.current_time() - started < 5


async def test_zero_delay_is_still_a_cancellation_point(anyio_backend: str) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await EchoPack().execute({"payload": 1}, context())
        pytest.fail("execute should have been cancelled")
    assert scope.cancelled_caught


def test_valid_inputs() -> None:
    pack = EchoPack()
    assert validate_inputs(pack, {"payload": None}) == []
    assert validate_inputs(pack, {"payload": 1, "delay_ms": 0, "fail": False}) == []
    assert validate_inputs(pack, {"payload": 1, "delay_ms": 3_600_000}) == []


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({}, [FieldError("inputs.payload", "is required")]),
        ([], [FieldError("inputs", "must be of type object")]),
        ({"payload": 1, "delay_ms": -1}, [FieldError("inputs.delay_ms", "must be >= 0")]),
        (
            {"payload": 1, "delay_ms": 3_600_001},
            [FieldError("inputs.delay_ms", "must be <= 3600000")],
        ),
        (
            {"payload": 1, "delay_ms": 1.5},
            [FieldError("inputs.delay_ms", "must be of type integer")],
        ),
        (
            {"payload": 1, "delay_ms": True},
            [FieldError("inputs.delay_ms", "must be of type integer")],
        ),
        ({"payload": 1, "fail": "yes"}, [FieldError("inputs.fail", "must be of type boolean")]),
        (
            {"payload": 1, "extra": 2},
            [
                FieldError(
                    "inputs", "Additional properties are not allowed ('extra' was unexpected)"
                )
            ],
        ),
    ],
)
def test_invalid_inputs_name_the_field(inputs: Any, expected: list[FieldError]) -> None:
    assert validate_inputs(EchoPack(), inputs) == expected


def test_prices_and_metadata() -> None:
    pack = EchoPack.from_environment({})
    assert pack.pack_type == "echo"
    assert pack.minimum_fee_usd_micros == 100
    assert pack.default_reservation_usd_micros == 1_000
    assert pack.max_reservation_usd_micros == 1_000_000
    assert pack.default_timebox_sec == 60
    assert pack.estimate_cost_usd_micros({"payload": 1}) == 1_000
    assert pack.pricing == {"model": "fixed", "usd_micros_per_run": 1_000}
