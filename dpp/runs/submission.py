"""A run submission (``POST /v1/runs``): parse and check it (SPEC §3, §6).

Pure. ``parse_submit`` answers the request a route may admit, or every field
error at once (a 422 names the first and lists them all). The limits come from
``dpp.limits``, the same names the OpenAPI document states them with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from dpp.limits import METADATA_BYTES_MAX, METADATA_KEYS_MAX, TIMEBOX_SEC_MAX, TIMEBOX_SEC_MIN
from dpp.money.rules import is_amount
from dpp.packs import FieldError, Pack, PackRegistry, validate_inputs

SUBMIT_MEMBERS = frozenset(
    {"pack_type", "inputs", "max_cost_usd_micros", "timebox_sec", "metadata"}
)


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    pack: Pack
    inputs: Any
    reserved_usd_micros: int
    minimum_fee_usd_micros: int
    timebox_sec: int
    metadata: dict[str, Any]


def parse_submit(body: Any, packs: PackRegistry) -> SubmitRequest | list[FieldError]:
    """Validate a ``POST /v1/runs`` body; a list of field errors means 422."""
    if not isinstance(body, dict):
        return [FieldError("body", "must be a JSON object")]
    unknown = sorted(set(body) - SUBMIT_MEMBERS)
    if unknown:
        return [FieldError(name, "is not a member of a run submission") for name in unknown]
    pack_type = body.get("pack_type")
    if not isinstance(pack_type, str) or not pack_type:
        return [FieldError("pack_type", "is required and must be a string")]
    pack = packs.get(pack_type)
    if pack is None:
        return [FieldError("pack_type", "unknown pack type; see GET /v1/packs")]
    if "inputs" not in body:
        return [FieldError("inputs", "is required")]
    errors: list[FieldError] = []
    reserved = body.get("max_cost_usd_micros", pack.default_reservation_usd_micros)
    if not is_amount(reserved):
        errors.append(FieldError("max_cost_usd_micros", "must be an integer of USD micros"))
    elif reserved < pack.minimum_fee_usd_micros or reserved <= 0:
        errors.append(
            FieldError(
                "max_cost_usd_micros",
                f"must be at least the minimum fee ({pack.minimum_fee_usd_micros}) and above 0",
            )
        )
    elif reserved > pack.max_reservation_usd_micros:
        errors.append(
            FieldError(
                "max_cost_usd_micros",
                f"must be at most the pack's cap ({pack.max_reservation_usd_micros})",
            )
        )
    timebox = body.get("timebox_sec", pack.default_timebox_sec)
    if not is_amount(timebox) or not TIMEBOX_SEC_MIN <= timebox <= TIMEBOX_SEC_MAX:
        errors.append(
            FieldError(
                "timebox_sec",
                f"must be an integer from {TIMEBOX_SEC_MIN} to {TIMEBOX_SEC_MAX}",
            )
        )
    metadata = body.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        errors.append(FieldError("metadata", "must be a JSON object"))
    elif len(metadata) > METADATA_KEYS_MAX:
        errors.append(FieldError("metadata", f"has more than {METADATA_KEYS_MAX} members"))
    elif len(orjson.dumps(metadata)) > METADATA_BYTES_MAX:
        errors.append(FieldError("metadata", f"is larger than {METADATA_BYTES_MAX} bytes"))
    errors.extend(validate_inputs(pack, body["inputs"]))
    if errors:
        return errors
    return SubmitRequest(
        pack=pack,
        inputs=body["inputs"],
        reserved_usd_micros=reserved,
        minimum_fee_usd_micros=pack.minimum_fee_usd_micros,
        timebox_sec=timebox,
        metadata=metadata,
    )
