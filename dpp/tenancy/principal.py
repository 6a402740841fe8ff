"""Who a request acts for: tenancy's records, errors and validators (pure).

Plans, tenants and API keys as stored; the ``Principal`` an authenticated
request carries; the typed errors that the HTTP layer maps to problems and
the CLI to one line; and the validators that both doors share, so the admin
API and `dpp plan|tenant|key` refuse the same values with the same words.
Nothing here touches storage (``dpp.tenancy.service`` does).
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

from dpp.limits import (
    MAX_CONCURRENT_RUNS_MAX,
    NAME_CHARS_MAX,
    PLAN_ID_CHARS_MAX,
    REQUESTS_PER_MINUTE_MAX,
    RETENTION_DAYS_MAX,
    SPEND_LIMIT_USD_MICROS_MAX,
    USD_MICROS_MAX,
)
from dpp.schemas import TIMESTAMP, TIMESTAMP_OR_NULL, Schema, all_required, id_pattern, integer, obj
from dpp.tenancy.keys import KEY_HINT_LENGTH, KEY_PATTERN

DEFAULT_PLAN_ID: Final = "default"
# the plans.id CHECK
PLAN_ID_PATTERN = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{PLAN_ID_CHARS_MAX - 1}}}")
KEY_HINT_PATTERN = f"^[0-9A-Za-z]{{{KEY_HINT_LENGTH}}}$"

# --- the shapes (dpp.schemas): bodies the admin API takes, documents it answers ----------

PLAN_ID: dict[str, Any] = {"type": "string", "pattern": f"^{PLAN_ID_PATTERN.pattern}$"}
NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": NAME_CHARS_MAX,
    # not blank (some non-space character), no control character (check_name)
    "pattern": r"^(?=[\s\S]*\S)[^\x00-\x1f\x7f-\x9f]*$",
    "description": "Not blank; no control characters.",
}
REQUESTS_PER_MINUTE = integer(1, REQUESTS_PER_MINUTE_MAX)
_PLAN_LIMITS: dict[str, Any] = {
    "id": PLAN_ID,
    "requests_per_minute": REQUESTS_PER_MINUTE,
    "max_concurrent_runs": integer(1, MAX_CONCURRENT_RUNS_MAX),
    "retention_days": integer(1, RETENTION_DAYS_MAX),
}
PLAN_CREATE = Schema("PlanCreate", all_required(_PLAN_LIMITS))
PLAN_LIMITS = Schema(
    "PlanLimits",
    all_required(_PLAN_LIMITS, description="The limits of the tenant's plan (SPEC §6)."),
)
PLAN = Schema(
    "Plan", all_required({**_PLAN_LIMITS, "created_at": TIMESTAMP, "updated_at": TIMESTAMP})
)
TENANT_CREATE = Schema(
    "TenantCreate",
    obj(
        {
            "name": NAME,
            "plan_id": {**PLAN_ID, "type": ["string", "null"], "description": "default plan"},
        },
        required=("name",),
    ),
)
TENANT = Schema(
    "Tenant",
    all_required(
        {
            "id": id_pattern("ten"),
            "name": {"type": "string"},
            "plan_id": PLAN_ID,
            "created_at": TIMESTAMP,
            "plan": PLAN,
        }
    ),
)
SPEND_LIMIT: dict[str, Any] = {
    **integer(1, SPEND_LIMIT_USD_MICROS_MAX),
    "type": ["integer", "null"],
    "description": "What runs submitted with this key may spend over its life, in USD"
    " micros (reserved while open, charged once settled); null: no limit beyond the"
    " tenant's budget (SPEC §7).",
}
API_KEY_CREATE = Schema(
    "ApiKeyCreate",
    obj(
        {
            "name": {**NAME, "type": ["string", "null"]},
            "requests_per_minute": {
                **REQUESTS_PER_MINUTE,
                "type": ["integer", "null"],
                "description": "The key's own limit; binds below the plan's (policy \"key\").",
            },
            "spend_limit_usd_micros": SPEND_LIMIT,
        }
    ),
)
API_KEY_UPDATE = Schema(
    "ApiKeyUpdate",
    obj({"spend_limit_usd_micros": SPEND_LIMIT}, required=("spend_limit_usd_micros",)),
)
_API_KEY: dict[str, Any] = {
    "id": id_pattern("key"),
    "tenant_id": id_pattern("ten"),
    "name": {"type": "string"},
    "key_hint": {
        "type": "string",
        "pattern": KEY_HINT_PATTERN,
        "description": "The last characters of the key, to tell keys apart.",
    },
    "requests_per_minute": {**REQUESTS_PER_MINUTE, "type": ["integer", "null"]},
    "spend_limit_usd_micros": SPEND_LIMIT,
    "spent_usd_micros": {
        **integer(0, USD_MICROS_MAX),
        "description": "R of the key's open runs + charged of its settled runs (SPEC §7);"
        " may exceed a limit lowered below it.",
    },
    "created_at": TIMESTAMP,
    "last_used_at": TIMESTAMP_OR_NULL,
    "revoked_at": TIMESTAMP_OR_NULL,
}
API_KEY = Schema("ApiKey", all_required(_API_KEY))
API_KEY_CREATED = Schema(
    "ApiKeyCreated",
    all_required(
        {
            **_API_KEY,
            "api_key": {
                "type": "string",
                "pattern": f"^{KEY_PATTERN.pattern}$",
                "description": "Shown only in this response; only its SHA-256 is stored.",
            },
        }
    ),
)


# --- errors ----------------------------------------------------------------------------


class TenancyError(Exception):
    """An expected tenancy failure; ``str(error)`` is one line, safe to show."""


class InvalidField(TenancyError):
    """A value is malformed or out of range; ``field`` names it (HTTP 422)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class PlanExists(TenancyError):
    """A plan with this id exists already (HTTP 409)."""


class PlanNotFound(TenancyError):
    """No plan with this id (HTTP 422 when named in a body)."""


class TenantNotFound(TenancyError):
    """No tenant with this id (HTTP 404)."""


class ApiKeyNotFound(TenancyError):
    """No API key with this id (HTTP 404)."""


class TenancyUnavailable(TenancyError):
    """Postgres did not answer an authentication lookup (HTTP 503, fail closed)."""


class InvalidationNotBroadcast(TenancyError):
    """The change is stored, but telling the other replicas failed (HTTP 503).

    Retrying is safe (revocation is idempotent) and broadcasts again; until
    then other replicas refuse the key once their cache entry ages out.
    """


# --- validation (shared by the admin API and the CLI) ----------------------------------


def check_whole_number(value: object, field: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) within ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, f"expected a whole number from {low} to {high}")
    if not low <= value <= high:
        raise InvalidField(field, f"expected a whole number from {low} to {high}, got {value}")
    return value


def check_plan_id(value: object, field: str = "id") -> str:
    if not isinstance(value, str) or PLAN_ID_PATTERN.fullmatch(value) is None:
        raise InvalidField(
            field, "expected 1-63 of [a-z0-9_-], starting with a lowercase letter or digit"
        )
    return value


def check_name(value: object, field: str = "name") -> str:
    """A display name: 1-200 characters, not blank, no control characters."""
    if not isinstance(value, str):
        raise InvalidField(field, "expected a string")
    if not 1 <= len(value) <= NAME_CHARS_MAX:
        raise InvalidField(field, f"expected 1 to {NAME_CHARS_MAX} characters")
    if not value.strip():
        raise InvalidField(field, "must not be blank")
    if any(unicodedata.category(character) in ("Cc", "Cs") for character in value):
        raise InvalidField(field, "must not contain control characters")
    return value


def check_requests_per_minute(value: object, field: str = "requests_per_minute") -> int:
    return check_whole_number(value, field, 1, REQUESTS_PER_MINUTE_MAX)


def check_spend_limit(value: object, field: str = "spend_limit_usd_micros") -> int | None:
    """A key's spend limit: a whole number of USD micros 1..10^13, or None (no limit)."""
    if value is None:
        return None
    return check_whole_number(value, field, 1, SPEND_LIMIT_USD_MICROS_MAX)


# --- records ---------------------------------------------------------------------------


def timestamp_text(moment: datetime.datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, as every DPP document writes times."""
    if moment is None:
        return None
    assert moment.tzinfo is not None, "timestamps are timezone-aware"
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def plan_limits(
    plan_id: str, requests_per_minute: int, max_concurrent_runs: int, retention_days: int
) -> dict[str, Any]:
    """A plan's limits as documents carry them (``PLAN_LIMITS``)."""
    return {
        "id": plan_id,
        "requests_per_minute": requests_per_minute,
        "max_concurrent_runs": max_concurrent_runs,
        "retention_days": retention_days,
    }


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    requests_per_minute: int
    max_concurrent_runs: int
    retention_days: int
    created_at: datetime.datetime
    updated_at: datetime.datetime

    def document(self) -> dict[str, Any]:
        document = {
            **plan_limits(
                self.id, self.requests_per_minute, self.max_concurrent_runs, self.retention_days
            ),
            "created_at": timestamp_text(self.created_at),
            "updated_at": timestamp_text(self.updated_at),
        }
        assert document.keys() == PLAN.members
        return document


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    name: str
    plan: Plan
    created_at: datetime.datetime

    @property
    def plan_id(self) -> str:
        return self.plan.id

    def document(self) -> dict[str, Any]:
        document = {
            "id": self.id,
            "name": self.name,
            "plan_id": self.plan.id,
            "created_at": timestamp_text(self.created_at),
            "plan": self.plan.document(),
        }
        assert document.keys() == TENANT.members
        return document


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's stored facts; never the key itself (only its hash is stored)."""

    id: str
    tenant_id: str
    name: str
    key_hint: str
    requests_per_minute: int | None
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None
    revoked_at: datetime.datetime | None
    spend_limit_usd_micros: int | None = None
    spent_usd_micros: int = 0

    def document(self) -> dict[str, Any]:
        """The key view (SPEC §7), with the key's hint and last use besides."""
        assert self.spent_usd_micros >= 0
        document = {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "key_hint": self.key_hint,
            "requests_per_minute": self.requests_per_minute,
            "spend_limit_usd_micros": self.spend_limit_usd_micros,
            "spent_usd_micros": self.spent_usd_micros,
            "created_at": timestamp_text(self.created_at),
            "last_used_at": timestamp_text(self.last_used_at),
            "revoked_at": timestamp_text(self.revoked_at),
        }
        assert document.keys() == API_KEY.members
        return document


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an authenticated request acts for, and the limits that apply to it."""

    tenant_id: str
    key_id: str
    plan_id: str
    requests_per_minute: int
    max_concurrent_runs: int
    retention_days: int
    key_requests_per_minute: int | None

    def __post_init__(self) -> None:
        # prefixes only: the columns' CHECKs allow 20-40 characters after them
        assert self.tenant_id.startswith("ten_") and self.key_id.startswith("key_")
        assert 1 <= self.requests_per_minute <= REQUESTS_PER_MINUTE_MAX
        assert self.key_requests_per_minute is None or (
            1 <= self.key_requests_per_minute <= REQUESTS_PER_MINUTE_MAX
        )

    def plan_document(self) -> dict[str, Any]:
        """The ``plan`` member of ``GET /v1/budget`` (SPEC §6 "Plan limits")."""
        return plan_limits(
            self.plan_id, self.requests_per_minute, self.max_concurrent_runs, self.retention_days
        )
