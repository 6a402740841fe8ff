"""A run's stored ``error``: the problem objects clients branch on (SPEC §3)."""

from __future__ import annotations

import pytest

from dpp.packs import PackError
from dpp.runs.failures import FailureKind, RunFailure

BASE = "https://dpp.dev/problems/"


@pytest.mark.parametrize(
    ("failure", "document"),
    [
        (
            RunFailure.pack_error(PackError("Upstream refused", "HTTP 400 from the upstream.")),
            {
                "type": BASE + "pack-error",
                "title": "Upstream refused",
                "status": 500,
                "detail": "HTTP 400 from the upstream.",
            },
        ),
        (
            RunFailure.timebox_exceeded(30),
            {
                "type": BASE + "timebox-exceeded",
                "title": "Timebox exceeded",
                "status": 504,
                "detail": "The pack did not finish within the run's timebox of 30 s.",
            },
        ),
        (
            RunFailure.lease_expired(),
            {
                "type": BASE + "lease-expired",
                "title": "Lease expired",
                "status": 500,
                "detail": "The worker running this run stopped renewing its lease.",
            },
        ),
        (
            RunFailure.result_missing(),
            {
                "type": BASE + "result-missing",
                "title": "Result not stored",
                "status": 500,
                "detail": "The run finished but its result was never stored.",
            },
        ),
        (
            RunFailure.audit_required("reserve entry missing"),
            {
                "type": BASE + "audit-required",
                "title": "Audit required",
                "status": 500,
                "detail": "reserve entry missing",
            },
        ),
        (
            RunFailure.resolved_by_operator(),
            {
                "type": BASE + "resolved-by-operator",
                "title": "Resolved by an operator",
                "status": 500,
                "detail": "An operator settled this run after an audit.",
            },
        ),
    ],
)
def test_each_failure_is_stored_as_its_problem_object(failure, document) -> None:
    assert failure.document() == document


def test_every_kind_has_a_distinct_type() -> None:
    types = [kind.type_uri for kind in FailureKind]
    assert len(set(types)) == len(types)
    assert all(uri.startswith(BASE) for uri in types)
