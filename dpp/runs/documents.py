"""Runs as clients see them: the run object, pages, usage, cost headers, cursors.

Pure: every function maps stored runs (rows) to the shapes SPEC §3 and §6
fix, member for member, and each shape's schema sits beside its function (the
OpenAPI document renders them; the renderers assert they stay within them).
The services of this package read and write; the HTTP routes send what these
functions return.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, Protocol

import orjson

from dpp import ids
from dpp.limits import RUNS_PAGE_LIMIT_MAX
from dpp.money.rules import ALL_STATUSES, RunStatus
from dpp.runs.failures import RUN_ERROR
from dpp.schemas import (
    COUNT,
    DATE,
    TIMESTAMP,
    TIMESTAMP_OR_NULL,
    USD_MICROS,
    USD_MICROS_OR_NULL,
    Schema,
    all_required,
    id_pattern,
    nullable,
)

RUN_RESULT = Schema(
    "RunResult",
    all_required(
        {
            "download_url": {"type": "string", "format": "uri"},
            "expires_at": TIMESTAMP,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "bytes": COUNT,
            "content_type": {"type": "string"},
        },
        description="Where a COMPLETED run's result can be downloaded, and what it is.",
    ),
)
RUN = Schema(
    "Run",
    all_required(
        {
            "id": id_pattern("run"),
            "status": {"enum": [status.value for status in RunStatus]},
            "pack_type": {"type": "string"},
            "created_at": TIMESTAMP,
            "started_at": TIMESTAMP_OR_NULL,
            "finished_at": TIMESTAMP_OR_NULL,
            "reserved_usd_micros": USD_MICROS,
            "minimum_fee_usd_micros": USD_MICROS,
            "charged_usd_micros": USD_MICROS_OR_NULL,
            "refunded_usd_micros": USD_MICROS_OR_NULL,
            "metadata": {"type": "object"},
            "result": nullable(RUN_RESULT),
            "error": nullable(RUN_ERROR),
            "retention_until": TIMESTAMP_OR_NULL,
        },
        description="Every member is always present; null until it applies (SPEC §6).",
    ),
)
RUN_PAGE = Schema(
    "RunList",
    all_required(
        {
            "data": {"type": "array", "items": RUN, "maxItems": RUNS_PAGE_LIMIT_MAX},
            "next_cursor": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        }
    ),
)
USAGE_DAY = Schema(
    "UsageDay",
    all_required(
        {
            "date": DATE,
            "pack_type": {"type": "string"},
            "runs": COUNT,
            "completed": COUNT,
            "failed": COUNT,
            "expired": COUNT,
            "canceled": COUNT,
            "charged_usd_micros": USD_MICROS,
            "refunded_usd_micros": USD_MICROS,
        }
    ),
)
USAGE = Schema(
    "Usage", all_required({"from": DATE, "to": DATE, "days": {"type": "array", "items": USAGE_DAY}})
)


class RunRow(Protocol):
    """A stored run as the queries return it (a Record), or a dict of its columns."""

    def __getitem__(self, column: str, /) -> Any: ...


# Rendered UTC instants kept (a polled run renders the same four each time).
TIMESTAMPS_CACHED = 4_096


def timestamp(value: datetime | None, *, cached: bool = True) -> str | None:
    """RFC 3339 in UTC with a ``Z``, always with microseconds; ``None`` stays ``None``.

    Postgres hands back ``timestamptz`` values in UTC, which skip ``astimezone``
    and ``replace`` (~3 % of a loaded ``GET /v1/runs/{id}``) and, unless
    ``cached=False`` (an instant made now, never rendered again), are kept:
    a polled run renders the same ones each time. Any other offset, or a
    naive value (local time, as ``astimezone`` reads it), is converted first.
    """
    if value is None:
        return None
    if value.tzinfo is UTC:
        return _utc_timestamp(value) if cached else _utc_text(value)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _utc_text(value: datetime) -> str:
    text = value.isoformat(timespec="microseconds")
    assert text.endswith("+00:00"), text
    return text[:-6] + "Z"


_utc_timestamp = functools.lru_cache(maxsize=TIMESTAMPS_CACHED)(_utc_text)


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
    document = {
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
    assert document.keys() == RUN.members
    return document


def page_document(
    documents: list[dict[str, Any]], next_cursor: str | None, has_more: bool
) -> dict[str, Any]:
    """A page of ``GET /v1/runs`` (SPEC §6 "Listing runs")."""
    assert len(documents) <= RUNS_PAGE_LIMIT_MAX
    assert (next_cursor is not None) == has_more
    return {"data": documents, "next_cursor": next_cursor, "has_more": has_more}


def usage_document(first: date, last: date, rows: Sequence[RunRow]) -> dict[str, Any]:
    """``GET /v1/usage``: per UTC creation date and pack (SPEC §6 "Usage")."""
    days = [
        {
            "date": row["day"].isoformat(),
            "pack_type": row["pack_type"],
            "runs": row["runs"],
            "completed": row["completed"],
            "failed": row["failed"],
            "expired": row["expired"],
            "canceled": row["canceled"],
            "charged_usd_micros": row["charged_usd_micros"],
            "refunded_usd_micros": row["refunded_usd_micros"],
        }
        for row in rows
    ]
    assert all(day.keys() == USAGE_DAY.members for day in days)
    return {"from": first.isoformat(), "to": last.isoformat(), "days": days}


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
    """The ``(created_at, run_id)`` of a cursor ``encode_cursor`` could have made,
    else None: a run id of the right shape (so no NUL reaches Postgres) and a
    UTC instant Postgres can hold (a year-1 or year-9999 time with an offset
    overflows once converted)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = orjson.loads(base64.urlsafe_b64decode(padded.encode()))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            return None
        when = when.astimezone(UTC)
    except (ValueError, TypeError, OverflowError):
        return None
    if not isinstance(run_id, str) or not ids.is_id(run_id, "run"):
        return None
    return when, run_id
