"""`echo`: returns its payload after a delay, or fails on request (SPEC §4).

It exists for smoke and fault tests: `delay_ms` lets a test outlive a lease
or a timebox, `fail` exercises the pack-error path, and the fixed price makes
the expected settlement trivial to compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from dpp.packs.base import (
    TIMEBOX_SEC_MAX,
    FieldError,
    PackContext,
    PackError,
    PackOutput,
)

__all__ = ["EchoPack"]

# The timebox caps a run; a longer delay could never finish.
_DELAY_MS_MAX = TIMEBOX_SEC_MAX * 1_000
_ACTUAL_COST_USD_MICROS = 1_000


class EchoPack:
    """Fixed-price echo. Runs on any anyio backend (asyncio or trio)."""

    pack_type = "echo"
    description = (
        'Returns {"payload": <payload>} after delay_ms milliseconds, or fails as a pack '
        "error when fail is true. Fixed price; meant for smoke and fault tests."
    )
    input_schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "payload": {"description": "Any JSON value; returned unchanged."},
            "delay_ms": {
                "type": "integer",
                "minimum": 0,
                "maximum": _DELAY_MS_MAX,
                "description": "Sleep this long before answering (bounded by the timebox).",
            },
            "fail": {"type": "boolean", "description": "Fail as a pack error after the delay."},
        },
        "required": ["payload"],
        "additionalProperties": False,
    }
    minimum_fee_usd_micros = 100
    default_reservation_usd_micros = 1_000
    max_reservation_usd_micros = 1_000_000
    default_timebox_sec = 60
    pricing: dict[str, Any] = {"model": "fixed", "usd_micros_per_run": _ACTUAL_COST_USD_MICROS}

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> EchoPack:
        """Always available: echo needs no settings."""
        return cls()

    def validate(self, inputs: Any) -> list[FieldError]:
        return []  # the schema says everything there is to say

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        return _ACTUAL_COST_USD_MICROS

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        """Sleep `delay_ms` (the caller's timebox cancels it), then echo or fail."""
        assert isinstance(inputs, dict) and "payload" in inputs, "inputs were validated"
        delay_ms = inputs.get("delay_ms", 0)
        assert isinstance(delay_ms, int) and 0 <= delay_ms <= _DELAY_MS_MAX, delay_ms
        if delay_ms:
            await anyio.sleep(delay_ms / 1000)
        else:
            await anyio.lowlevel.checkpoint()  # still a cancellation point
        if inputs.get("fail", False) is True:
            raise PackError(
                "Echo failure requested",
                "The inputs set fail: true, so the echo pack failed on purpose.",
            )
        body = orjson.dumps({"payload": inputs["payload"]})
        return PackOutput(
            body=body,
            content_type="application/json",
            actual_cost_usd_micros=_ACTUAL_COST_USD_MICROS,
        )
