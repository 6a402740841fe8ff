"""Why a run did not complete: typed failures, stored as the run's ``error``.

SPEC §3: a FAILED or EXPIRED run carries ``error``, a problem object (``type``,
``title``, ``status``, ``detail``). The run actor and the reconciler decide
*which* failure happened and say so with a ``RunFailure``; this module alone
knows the stored shape, so the actors build no problem documents themselves
and every reader (the run object, the console, the audit) sees one vocabulary.

``status`` inside a stored problem is the HTTP status that best names the
failure (a pack error is the server's 500, a timebox a gateway timeout); the
run itself is still served with 200.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dpp.ids import problem_type
from dpp.packs import PACK_ERROR_TYPE, PackError
from dpp.schemas import Schema, obj

RUN_ERROR = Schema(
    "RunError",
    obj(
        {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
        },
        required=("type", "title", "status", "detail"),
        closed=False,
        description="Why a run FAILED, EXPIRED or waits for an audit: a problem object.",
    ),
)


class FailureKind(enum.Enum):
    """Each kind: (problem type, status)."""

    PACK_ERROR = (PACK_ERROR_TYPE, 500)  # the pack's own failure, or a pack that broke
    TIMEBOX_EXCEEDED = (problem_type("timebox-exceeded"), 504)
    LEASE_EXPIRED = (problem_type("lease-expired"), 500)  # the reaper
    RESULT_MISSING = (problem_type("result-missing"), 500)  # reconcile rolled back
    AUDIT_REQUIRED = (problem_type("audit-required"), 500)  # set aside for an operator
    RESOLVED_BY_OPERATOR = (problem_type("resolved-by-operator"), 500)

    @property
    def type_uri(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class RunFailure:
    kind: FailureKind
    title: str
    detail: str

    def __post_init__(self) -> None:
        assert self.title, "a failure has a title"

    def document(self) -> dict[str, object]:
        """The stored problem object (SPEC §3 run ``error``)."""
        document: dict[str, object] = {
            "type": self.kind.type_uri,
            "title": self.title,
            "status": self.kind.status,
            "detail": self.detail,
        }
        assert document.keys() == RUN_ERROR.members
        return document

    # --- the failures there are ------------------------------------------------------

    @classmethod
    def pack_error(cls, error: PackError) -> RunFailure:
        """The pack's own, expected failure; its words are the tenant's to read."""
        return cls(FailureKind.PACK_ERROR, error.title, error.detail)

    @classmethod
    def pack_fault(cls, title: str, detail: str) -> RunFailure:
        """A pack that broke its contract or is not offered here: still a pack error to
        the tenant, worded without internals (exception text may hold secrets)."""
        return cls(FailureKind.PACK_ERROR, title, detail)

    @classmethod
    def timebox_exceeded(cls, timebox_sec: int) -> RunFailure:
        return cls(
            FailureKind.TIMEBOX_EXCEEDED,
            "Timebox exceeded",
            f"The pack did not finish within the run's timebox of {timebox_sec} s.",
        )

    @classmethod
    def lease_expired(cls) -> RunFailure:
        return cls(
            FailureKind.LEASE_EXPIRED,
            "Lease expired",
            "The worker running this run stopped renewing its lease.",
        )

    @classmethod
    def result_missing(cls) -> RunFailure:
        return cls(
            FailureKind.RESULT_MISSING,
            "Result not stored",
            "The run finished but its result was never stored.",
        )

    @classmethod
    def audit_required(cls, reason: str) -> RunFailure:
        return cls(FailureKind.AUDIT_REQUIRED, "Audit required", reason)

    @classmethod
    def resolved_by_operator(cls) -> RunFailure:
        return cls(
            FailureKind.RESOLVED_BY_OPERATOR,
            "Resolved by an operator",
            "An operator settled this run after an audit.",
        )
