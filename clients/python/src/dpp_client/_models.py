"""Typed views of DPP's JSON documents (SPEC §3, §6): frozen dataclasses.

Money is ``int`` USD micros, times are aware ``datetime`` in UTC, dates are
``date``. Members the client does not know yet are ignored, so a newer server
does not break an older client; a member the contract promises that is missing
or of the wrong type raises ``ValueError`` (a broken answer, not a guess).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELED"})
FAILED_STATUSES = frozenset({"FAILED", "EXPIRED"})


def _member(document: Mapping[str, Any], name: str) -> Any:
    if name not in document:
        raise ValueError(f"DPP answered without the member {name!r}")
    return document[name]


def _int(document: Mapping[str, Any], name: str) -> int:
    value = _member(document, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"DPP answered {name}={value!r}, not an integer")
    return value


def _int_or_none(document: Mapping[str, Any], name: str) -> int | None:
    return None if document.get(name) is None else _int(document, name)


def _str(document: Mapping[str, Any], name: str) -> str:
    value = _member(document, name)
    if not isinstance(value, str):
        raise ValueError(f"DPP answered {name}={value!r}, not a string")
    return value


def _object(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = _member(document, name)
    if not isinstance(value, dict):
        raise ValueError(f"DPP answered {name}={value!r}, not an object")
    return value


def parse_timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"DPP answered a timestamp without a zone: {value!r}")
    return parsed


def _time(document: Mapping[str, Any], name: str) -> datetime:
    return parse_timestamp(_str(document, name))


def _time_or_none(document: Mapping[str, Any], name: str) -> datetime | None:
    return None if document.get(name) is None else _time(document, name)


@dataclass(frozen=True, slots=True)
class RunResult:
    """Where a COMPLETED run's result is, and what it must be."""

    download_url: str
    expires_at: datetime
    sha256: str
    bytes: int
    content_type: str

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RunResult:
        return cls(
            download_url=_str(document, "download_url"),
            expires_at=_time(document, "expires_at"),
            sha256=_str(document, "sha256").lower(),
            bytes=_int(document, "bytes"),
            content_type=_str(document, "content_type"),
        )


@dataclass(frozen=True, slots=True)
class Run:
    """A run object (SPEC §3): every member present, ``None`` until it applies."""

    id: str
    status: str
    pack_type: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    reserved_usd_micros: int
    minimum_fee_usd_micros: int
    charged_usd_micros: int | None
    refunded_usd_micros: int | None
    metadata: dict[str, Any]
    result: RunResult | None
    error: dict[str, Any] | None
    retention_until: datetime | None

    @property
    def terminal(self) -> bool:
        """COMPLETED, FAILED, EXPIRED or CANCELED: the run will not change any more."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Run:
        result = document.get("result")
        error = document.get("error")
        return cls(
            id=_str(document, "id"),
            status=_str(document, "status"),
            pack_type=_str(document, "pack_type"),
            created_at=_time(document, "created_at"),
            started_at=_time_or_none(document, "started_at"),
            finished_at=_time_or_none(document, "finished_at"),
            reserved_usd_micros=_int(document, "reserved_usd_micros"),
            minimum_fee_usd_micros=_int(document, "minimum_fee_usd_micros"),
            charged_usd_micros=_int_or_none(document, "charged_usd_micros"),
            refunded_usd_micros=_int_or_none(document, "refunded_usd_micros"),
            metadata=_object(document, "metadata"),
            result=None if result is None else RunResult.from_json(_object(document, "result")),
            error=None if error is None else _object(document, "error"),
            retention_until=_time_or_none(document, "retention_until"),
        )


@dataclass(frozen=True, slots=True)
class RunPage:
    """One page of ``GET /v1/runs``; ``client.runs.list`` follows the cursors."""

    data: tuple[Run, ...]
    next_cursor: str | None
    has_more: bool

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> RunPage:
        data = _member(document, "data")
        if not isinstance(data, list):
            raise ValueError("DPP answered a run page whose data is not a list")
        cursor = document.get("next_cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError(f"DPP answered next_cursor={cursor!r}")
        has_more = _member(document, "has_more")
        if not isinstance(has_more, bool):
            raise ValueError(f"DPP answered has_more={has_more!r}")
        return cls(tuple(Run.from_json(item) for item in data), cursor, has_more)


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    requests_per_minute: int
    max_concurrent_runs: int
    retention_days: int

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Plan:
        return cls(
            id=_str(document, "id"),
            requests_per_minute=_int(document, "requests_per_minute"),
            max_concurrent_runs=_int(document, "max_concurrent_runs"),
            retention_days=_int(document, "retention_days"),
        )


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """The calling key's own spend (SPEC §7); ``spend_limit_usd_micros`` ``None``: no limit."""

    id: str
    spend_limit_usd_micros: int | None
    spent_usd_micros: int
    available_usd_micros: int

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> KeyBudget:
        return cls(
            id=_str(document, "id"),
            spend_limit_usd_micros=_int_or_none(document, "spend_limit_usd_micros"),
            spent_usd_micros=_int(document, "spent_usd_micros"),
            available_usd_micros=_int(document, "available_usd_micros"),
        )


@dataclass(frozen=True, slots=True)
class Budget:
    """``GET /v1/budget``: the tenant's money, its plan and (when served) the key's spend."""

    balance_usd_micros: int
    reserved_usd_micros: int
    available_usd_micros: int
    plan: Plan
    key: KeyBudget | None

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Budget:
        key = document.get("key")
        return cls(
            balance_usd_micros=_int(document, "balance_usd_micros"),
            reserved_usd_micros=_int(document, "reserved_usd_micros"),
            available_usd_micros=_int(document, "available_usd_micros"),
            plan=Plan.from_json(_object(document, "plan")),
            key=None if key is None else KeyBudget.from_json(_object(document, "key")),
        )


@dataclass(frozen=True, slots=True)
class UsageDay:
    date: date
    pack_type: str
    runs: int
    completed: int
    failed: int
    expired: int
    canceled: int
    charged_usd_micros: int
    refunded_usd_micros: int

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> UsageDay:
        return cls(
            date=date.fromisoformat(_str(document, "date")),
            pack_type=_str(document, "pack_type"),
            runs=_int(document, "runs"),
            completed=_int(document, "completed"),
            failed=_int(document, "failed"),
            expired=_int(document, "expired"),
            canceled=_int(document, "canceled"),
            charged_usd_micros=_int(document, "charged_usd_micros"),
            refunded_usd_micros=_int(document, "refunded_usd_micros"),
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """``GET /v1/usage``; ``from_`` because ``from`` is a Python keyword."""

    from_: date
    to: date
    days: tuple[UsageDay, ...]

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Usage:
        days = _member(document, "days")
        if not isinstance(days, list):
            raise ValueError("DPP answered usage whose days is not a list")
        return cls(
            from_=date.fromisoformat(_str(document, "from")),
            to=date.fromisoformat(_str(document, "to")),
            days=tuple(UsageDay.from_json(day) for day in days),
        )


@dataclass(frozen=True, slots=True)
class Pack:
    """One entry of the pack catalog: read prices from here, never hard-code them."""

    pack_type: str
    description: str
    input_schema: dict[str, Any]
    minimum_fee_usd_micros: int
    default_reservation_usd_micros: int
    max_reservation_usd_micros: int
    default_timebox_sec: int
    pricing: dict[str, Any]

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Pack:
        return cls(
            pack_type=_str(document, "pack_type"),
            description=_str(document, "description"),
            input_schema=_object(document, "input_schema"),
            minimum_fee_usd_micros=_int(document, "minimum_fee_usd_micros"),
            default_reservation_usd_micros=_int(document, "default_reservation_usd_micros"),
            max_reservation_usd_micros=_int(document, "max_reservation_usd_micros"),
            default_timebox_sec=_int(document, "default_timebox_sec"),
            pricing=_object(document, "pricing"),
        )


def packs_from_json(document: Mapping[str, Any]) -> tuple[Pack, ...]:
    packs = _member(document, "packs")
    if not isinstance(packs, list):
        raise ValueError("DPP answered a catalog whose packs is not a list")
    return tuple(Pack.from_json(pack) for pack in packs)
