"""`webhook`: POSTs the inputs to an operator-configured URL (SPEC §4).

The upstream does the work and prices it: a 2xx JSON answer
``{"result": any, "usage": {"cost_usd_micros": int}}``. The result document
stored for the run is ``result`` re-encoded; the actual cost is the reported
integer (the settlement clamps it to ``[M, R]``, so an upstream can never
charge a tenant more than the reservation it agreed to).

**asyncio only**: this module uses aiohttp, which runs on asyncio and not on
trio. The pack refuses to execute on another event loop.

Anything the upstream gets wrong becomes a `PackError` whose text names the
failure (status code, timeout, bad JSON, bad usage) but never the URL: webhook
URLs routinely carry credentials in the userinfo, query string or path.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from dpp.packs.base import (
    TIMEBOX_SEC_MAX,
    USD_MICROS_MAX,
    FieldError,
    PackConfigError,
    PackContext,
    PackError,
    PackOutput,
)

__all__ = ["WebhookPack"]

URL_ENV = "DPP_WEBHOOK_URL"
TIMEOUT_ENV = "DPP_WEBHOOK_TIMEOUT_SEC"
TIMEOUT_SEC_DEFAULT = 10.0
TIMEOUT_SEC_MAX = float(TIMEBOX_SEC_MAX)  # no run may outlive the largest timebox anyway
TIMEOUT_RANGE_MESSAGE = f"{TIMEOUT_ENV} must be a number of seconds in (0, {TIMEBOX_SEC_MAX}]"
# The answer is buffered, then stored as the run's result object.
RESPONSE_BYTES_MAX = 8 * 1024 * 1024
_READ_CHUNK_BYTES = 64 * 1024

_TRACE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

logger = logging.getLogger("dpp.packs")


class WebhookPack:
    """Delegates a run to an upstream HTTP service, priced by its reported usage."""

    pack_type = "webhook"
    description = (
        "POSTs the inputs as JSON to the operator's upstream service, which does the work "
        "and reports its cost; the run is charged that cost, clamped to the reservation."
    )
    input_schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "description": "Any JSON object; forwarded to the upstream unchanged.",
    }
    minimum_fee_usd_micros = 1_000
    default_reservation_usd_micros = 100_000
    max_reservation_usd_micros = 10_000_000
    default_timebox_sec = 30
    pricing: dict[str, Any] = {
        "model": "upstream_usage",
        "usage_member": "usage.cost_usd_micros",
        "note": "Actual cost is reported by the upstream per run.",
    }

    def __init__(self, url: str, *, timeout_sec: float = TIMEOUT_SEC_DEFAULT) -> None:
        bad_url = PackConfigError(f"{URL_ENV} must be an absolute http:// or https:// URL")
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError on a malformed port
        except ValueError:
            raise bad_url from None  # the message never repeats the URL: it may hold secrets
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_url
        if not (math.isfinite(timeout_sec) and 0 < timeout_sec <= TIMEOUT_SEC_MAX):
            raise PackConfigError(TIMEOUT_RANGE_MESSAGE)
        self._url = url
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        # Safe to log: no userinfo, path, query or fragment.
        self._origin = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
        self.timeout_sec = float(timeout_sec)

    def __repr__(self) -> str:
        return f"WebhookPack(origin={self._origin!r}, timeout_sec={self.timeout_sec})"

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> WebhookPack | None:
        """Available only when the operator configured an upstream URL (SPEC §6)."""
        url = env.get(URL_ENV, "").strip()
        if not url:
            return None
        timeout_text = env.get(TIMEOUT_ENV, "").strip()
        if not timeout_text:
            return cls(url)
        try:
            timeout_sec = float(timeout_text)
        except ValueError:
            raise PackConfigError(TIMEOUT_RANGE_MESSAGE) from None
        return cls(url, timeout_sec=timeout_sec)

    def validate(self, inputs: Any) -> list[FieldError]:
        return []  # any JSON object; the upstream judges its own inputs

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        """Unknown until the upstream answers; assume the default reservation."""
        return self.default_reservation_usd_micros

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        """POST the inputs and turn the upstream's answer into a result and a cost.

        Cancellation (the caller's timebox) propagates untouched; only
        aiohttp's own timeout becomes a pack error.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("the webhook pack uses aiohttp and needs asyncio") from None
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-DPP-Run-ID": ctx.run_id,
        }
        traceparent = _traceparent(ctx.trace_id)
        if traceparent is not None:
            headers["traceparent"] = traceparent
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout_sec)
                ) as session,
                session.post(
                    self._url,
                    data=orjson.dumps(inputs),
                    headers=headers,
                    allow_redirects=False,  # a redirect could carry the inputs elsewhere
                ) as response,
            ):
                if not 200 <= response.status < 300:
                    raise self._fail(
                        ctx,
                        "Webhook upstream error",
                        f"The upstream answered HTTP {response.status}; a 2xx answer was expected.",
                    )
                payload = await self._read_bounded(ctx, response)
        except TimeoutError:
            raise self._fail(
                ctx,
                "Webhook upstream timed out",
                f"The upstream gave no complete answer within {self.timeout_sec:g} s.",
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            # The class name only: aiohttp messages may embed the full URL.
            raise self._fail(
                ctx,
                "Webhook upstream unreachable",
                f"The request to the upstream failed ({type(error).__name__}).",
            ) from None
        result, cost_usd_micros = self._parse(ctx, payload)
        return PackOutput(
            body=result, content_type="application/json", actual_cost_usd_micros=cost_usd_micros
        )

    async def _read_bounded(self, ctx: PackContext, response: aiohttp.ClientResponse) -> bytes:
        too_large = (
            "Webhook upstream answer too large",
            f"The upstream's answer exceeds {RESPONSE_BYTES_MAX} bytes.",
        )
        if response.content_length is not None and response.content_length > RESPONSE_BYTES_MAX:
            raise self._fail(ctx, *too_large)
        chunks: list[bytes] = []
        size_bytes = 0
        async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
            size_bytes += len(chunk)
            if size_bytes > RESPONSE_BYTES_MAX:
                raise self._fail(ctx, *too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, ctx: PackContext, payload: bytes) -> tuple[bytes, int]:
        """(result document, actual cost) from a 2xx answer, or a PackError."""
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise self._fail(
                ctx, "Webhook upstream answered invalid JSON", "The 2xx answer is not valid JSON."
            ) from None
        if not isinstance(document, dict) or "result" not in document:
            raise self._fail(
                ctx,
                "Webhook upstream answer malformed",
                'The answer must be a JSON object with "result" and "usage" members.',
            )
        usage = document.get("usage")
        cost = usage.get("cost_usd_micros") if isinstance(usage, dict) else None
        # type() is int: rejects bools and floats (1.0 is not an amount of micros).
        if type(cost) is not int or not 0 <= cost <= USD_MICROS_MAX:
            raise self._fail(
                ctx,
                "Webhook upstream usage invalid",
                "usage.cost_usd_micros must be a non-negative integer number of USD micros.",
            )
        try:
            result = orjson.dumps(document["result"])
        except orjson.JSONEncodeError:
            raise self._fail(
                ctx, "Webhook upstream result not storable", "The result nests too deeply."
            ) from None
        return result, cost

    def _fail(self, ctx: PackContext, title: str, detail: str) -> PackError:
        """Log for the operator (origin only) and build the tenant-facing error."""
        logger.warning(
            "webhook run %s failed against %s: %s: %s", ctx.run_id, self._origin, title, detail
        )
        return PackError(title, detail)


def _traceparent(trace_id: str | None) -> str | None:
    """A W3C traceparent continuing the run's trace, with a fresh span id."""
    if trace_id is None or _TRACE_ID_PATTERN.fullmatch(trace_id) is None:
        return None
    if trace_id == "0" * 32:
        return None  # invalid per W3C Trace Context
    parent_id = secrets.token_hex(8)
    if parent_id == "0" * 16:
        parent_id = "0" * 15 + "1"
    # Sampled: the run's logs already carry this trace id.
    return f"00-{trace_id}-{parent_id}-01"
