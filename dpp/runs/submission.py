"""A run submission (``POST /v1/runs``): parse and check it (SPEC §3, §6).

Pure. ``parse_submit`` answers the request a route may admit, or every field
error at once (a 422 names the first and lists them all). ``SUBMISSION`` is the
body's schema: ``parse_submit`` takes its member list from it and its limits
from ``dpp.limits``, as the schema does, and the OpenAPI document renders it.
What no static schema can say (the pack's own input schema, its minimum fee
and cap) is checked here and described there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from dpp.limits import (
    METADATA_BYTES_MAX,
    METADATA_KEYS_MAX,
    TIMEBOX_SEC_MAX,
    TIMEBOX_SEC_MIN,
    USD_MICROS_MAX,
)
from dpp.money.rules import is_amount
from dpp.packs import (
    FIELD_ERRORS_MAX,
    FieldError,
    Pack,
    PackRegistry,
    field_path,
    json_value_errors,
    validate_inputs,
)
from dpp.schemas import Schema, integer, obj

SUBMISSION = Schema(
    "RunSubmission",
    obj(
        {
            "pack_type": {
                "type": "string",
                "minLength": 1,
                "description": "A pack of the catalog (GET /v1/packs).",
            },
            "inputs": {"description": "Checked against the pack's input_schema."},
            "max_cost_usd_micros": integer(
                1,
                USD_MICROS_MAX,
                description=(
                    "The reservation in USD micros: at least the pack's minimum fee, at most "
                    "its max_reservation_usd_micros; the pack's default when omitted."
                ),
            ),
            "timebox_sec": integer(
                TIMEBOX_SEC_MIN,
                TIMEBOX_SEC_MAX,
                description="Counted from the claim; the pack's default when omitted.",
            ),
            "metadata": {
                "type": ["object", "null"],
                "maxProperties": METADATA_KEYS_MAX,
                "description": (
                    f"Stored and echoed; {{}} when omitted or null; at most "
                    f"{METADATA_BYTES_MAX} bytes as JSON."
                ),
            },
        },
        required=("pack_type", "inputs"),
    ),
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
    unknown = sorted(set(body) - SUBMISSION.members)
    if unknown:
        # named as a path: a member may be called "" or "a.b" (the field stays readable)
        return [
            FieldError(field_path(name, root=""), "is not a member of a run submission")
            for name in unknown[:FIELD_ERRORS_MAX]
        ]
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
    else:
        # before encoding it: what Postgres cannot store, or orjson cannot encode
        unstorable = json_value_errors(metadata, root="metadata")
        if unstorable:
            errors.extend(unstorable)
        elif len(orjson.dumps(metadata)) > METADATA_BYTES_MAX:
            errors.append(FieldError("metadata", f"is larger than {METADATA_BYTES_MAX} bytes"))
    errors.extend(validate_inputs(pack, body["inputs"]))
    if errors:
        return errors[:FIELD_ERRORS_MAX]
    return SubmitRequest(
        pack=pack,
        inputs=body["inputs"],
        reserved_usd_micros=reserved,
        minimum_fee_usd_micros=pack.minimum_fee_usd_micros,
        timebox_sec=timebox,
        metadata=metadata,
    )
