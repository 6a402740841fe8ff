"""Runs as clients see them: submit validation and the run object (SPEC §3, §6).

Pure apart from ``render_run`` presigning the result link. The HTTP routes
(`dpp/http/routes_runs.py`) orchestrate; this module decides shapes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from dpp.money.rules import ALL_STATUSES, is_amount
from dpp.packs import FieldError, Pack, PackRegistry, validate_inputs

SUBMIT_MEMBERS = frozenset(
    {"pack_type", "inputs", "max_cost_usd_micros", "timebox_sec", "metadata"}
)
METADATA_BYTES_MAX = 16_384
METADATA_KEYS_MAX = 50
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``; ``None`` stays ``None``."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
    if not is_amount(timebox) or not 1 <= timebox <= 3600:
        errors.append(FieldError("timebox_sec", "must be an integer from 1 to 3600"))
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


def cost_headers(row: Any) -> dict[str, str]:
    headers = {
        "X-DPP-Cost-Reserved": str(row["reserved_usd_micros"]),
        "X-DPP-Cost-Minimum-Fee": str(row["minimum_fee_usd_micros"]),
    }
    if row["charged_usd_micros"] is not None:
        headers["X-DPP-Cost-Actual"] = str(row["charged_usd_micros"])
    return headers


def run_object(row: Any, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run object: every member always present, ``null`` until it applies."""
    assert row["status"] in ALL_STATUSES
    return {
        "id": row["id"],
        "status": row["status"],
        "pack_type": row["pack_type"],
        "created_at": timestamp(row["created_at"]),
        "started_at": timestamp(row["started_at"]),
        "finished_at": timestamp(row["finished_at"]),
        "reserved_usd_micros": row["reserved_usd_micros"],
        "minimum_fee_usd_micros": row["minimum_fee_usd_micros"],
        "charged_usd_micros": row["charged_usd_micros"],
        "refunded_usd_micros": row["refunded_usd_micros"],
        "metadata": row["metadata"],
        "result": result,
        "error": row["error"],
        "retention_until": timestamp(row["retention_until"]),
    }


def queued_row(
    *,
    run_id: str,
    pack_type: str,
    reserved_usd_micros: int,
    minimum_fee_usd_micros: int,
    metadata: dict[str, Any],
    created_at: datetime,
) -> dict[str, Any]:
    """The row a run has the moment it is admitted (the 202 body renders it)."""
    return {
        "id": run_id,
        "status": "QUEUED",
        "pack_type": pack_type,
        "created_at": created_at,
        "started_at": None,
        "finished_at": None,
        "reserved_usd_micros": reserved_usd_micros,
        "minimum_fee_usd_micros": minimum_fee_usd_micros,
        "charged_usd_micros": None,
        "refunded_usd_micros": None,
        "metadata": metadata,
        "error": None,
        "retention_until": None,
    }


def encode_cursor(created_at: datetime, run_id: str) -> str:
    raw = orjson.dumps([created_at.astimezone(UTC).isoformat(), run_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
        when = datetime.fromisoformat(created)
    except (ValueError, TypeError):
        return None
    if not isinstance(run_id, str) or when.tzinfo is None:
        return None
    return when, run_id
