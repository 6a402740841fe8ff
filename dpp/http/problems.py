"""RFC 9457 problem details: the only shape an error leaves DPP in.

Handlers raise ``Problem``; the app's exception handlers render it (and every
framework error) as ``application/problem+json``. ``type`` URIs live under
``PROBLEM_BASE`` and are stable: clients branch on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from dpp.ids import PROBLEM_TYPE_BASE
from dpp.schemas import Schema, obj

PROBLEM_BASE = PROBLEM_TYPE_BASE
PROBLEM_CONTENT_TYPE = "application/problem+json"

PROBLEM = Schema(
    "Problem",
    obj(
        {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
        },
        required=("type", "title", "status", "detail", "instance"),
        closed=False,
        description="RFC 9457 problem details; extension members vary by type.",
    ),
)

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(Exception):
    """An expected failure that becomes an RFC 9457 response.

    ``slug`` names the type (``https://dpp.dev/problems/<slug>``); ``extensions``
    are extra members (e.g. ``available_usd_micros``); ``headers`` are added to
    the response (e.g. ``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        instance: str | None = None,
    ) -> None:
        assert 400 <= status <= 599, status
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title or TITLES.get(status, "Error")
        self.detail = detail
        self.extensions = dict(extensions or {})
        self.headers = dict(headers or {})
        # overrides the request path as ``instance`` (see ``stealth_not_found``)
        self.instance = instance

    def body(self, instance: str) -> dict[str, Any]:
        document: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        for name, value in self.extensions.items():
            assert name not in document, f"extension {name} shadows a standard member"
            document[name] = value
        return document


def field_problem(
    field: str, detail: str, *, errors: list[dict[str, str]] | None = None
) -> Problem:
    """A 422 that names the offending field (and optionally lists all of them)."""
    extensions: dict[str, Any] = {"field": field}
    if errors:
        extensions["errors"] = errors
    return Problem(422, "invalid-request", detail, extensions=extensions)


def problem_response(problem: Problem, instance: str) -> Response:
    return Response(
        orjson.dumps(problem.body(problem.instance or instance)),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem.headers,
    )


def stealth_not_found(request_id: str | None, detail: str) -> Problem:
    """A 404 whose bytes are the same for "missing" and "someone else's" (SPEC §3):
    its ``instance`` names this request (``urn:dpp:request:<id>``), not the path,
    which would differ by the id asked for. Only the request id varies."""
    instance = f"urn:dpp:request:{request_id}" if request_id else "urn:dpp:request"
    return Problem(404, "not-found", detail, instance=instance)


def not_found_problem() -> Problem:
    """The one 404: an unknown path, another tenant's run and a disabled admin API
    all answer these same bytes (apart from ``instance``), so nothing leaks."""
    return Problem(404, "not-found", "There is no resource at this path.")


# How long a client waits after a dependency failed: outages worth a 503 are
# short (a failover, a restart); the client's own backoff takes over after that.
RETRY_AFTER_DEPENDENCY_S = 2


def dependency_unavailable_problem(dependency: str) -> Problem:
    """The 503 of a request that met a lost, refused or timed-out dependency.

    Nothing the request did committed partially: every write of DPP is one
    transaction (or a conditional step the reconciler finishes), so the client
    retries, with the same Idempotency-Key where it sent one.
    """
    return Problem(
        503,
        "unavailable",
        f"A service this request needs ({dependency}) is unavailable; retry shortly.",
        extensions={"dependency": dependency},
        headers={"Retry-After": str(RETRY_AFTER_DEPENDENCY_S)},
    )


def internal_error_problem(request_id: str | None) -> Problem:
    """The 500: a fixed, generic detail; the traceback goes to the log, never here."""
    extensions = {"request_id": request_id} if request_id else None
    return Problem(
        500,
        "internal-error",
        "An unexpected error occurred. Quote the request id when reporting it.",
        extensions=extensions,
    )
