"""Runs as clients see them: the run object, its cost headers, page cursors.

Pure: every function maps a stored run (a row) to the shapes SPEC §3 and §6
fix, member for member. The services of this package read and write; the HTTP
routes render what these functions return.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from dpp.money.rules import ALL_STATUSES, RunStatus


class RunRow(Protocol):
    """A stored run as the queries return it (a Record), or a dict of its columns."""

    def __getitem__(self, column: str, /) -> Any: ...


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``; ``None`` stays ``None``."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cost_headers(row: RunRow) -> dict[str, str]:
    headers = {
        "X-DPP-Cost-Reserved": str(row["reserved_usd_micros"]),
        "X-DPP-Cost-Minimum-Fee": str(row["minimum_fee_usd_micros"]),
    }
    if row["charged_usd_micros"] is not None:
        headers["X-DPP-Cost-Actual"] = str(row["charged_usd_micros"])
    return headers


def run_object(row: RunRow, result: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "status": RunStatus.QUEUED,
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
