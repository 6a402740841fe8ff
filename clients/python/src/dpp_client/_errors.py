"""The exceptions of the DPP client (SPEC §7 "Python client").

Every error the API answers is an RFC 9457 problem; ``error_from_problem``
maps it to the most specific class by HTTP status (and, for 402, by problem
type), keeping the whole document in ``problem``. Errors the client finds
itself (a result whose digest does not match, a run that failed, a server it
cannot reach) are ``DPPError`` too, with ``status`` ``None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpp_client._models import Run

PROBLEM_TYPE_BASE = "https://dpp.dev/problems/"
CLIENT_TYPE_BASE = "urn:dpp-client:"


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class DPPError(Exception):
    """Base of every error this client raises about DPP."""

    def __init__(
        self,
        status: int | None,
        problem: dict[str, Any],
        *,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.problem = problem
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        self.request_id = request_id
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"{self.status} {self.title}" if self.status is not None else self.title
        text = f"{head}: {self.detail}" if self.detail else head
        return f"{text} (request {self.request_id})" if self.request_id else text


class AuthenticationError(DPPError):
    """401: the API key is missing, malformed or revoked."""


class PaymentRequired(DPPError):
    """402: the run cannot be paid for; nothing was reserved."""

    @property
    def required_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("required_usd_micros"))


class InsufficientBudget(PaymentRequired):
    """402: the tenant's available budget is short."""

    @property
    def available_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("available_usd_micros"))


class KeySpendLimitExceeded(PaymentRequired):
    """402 ``…/key-spend-limit``: this API key's own spend limit is reached."""

    @property
    def spend_limit_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("spend_limit_usd_micros"))

    @property
    def spent_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("spent_usd_micros"))


class NotFound(DPPError):
    """404: no such resource (or another tenant's run: the API does not say which)."""


class Conflict(DPPError):
    """409: e.g. cancelling a run that is no longer QUEUED."""


class Gone(DPPError):
    """410: the run is past its retention; its result was deleted."""

    @property
    def run_status(self) -> str | None:
        value = self.problem.get("run_status")
        return value if isinstance(value, str) else None

    @property
    def charged_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("charged_usd_micros"))

    @property
    def refunded_usd_micros(self) -> int | None:
        return _int_or_none(self.problem.get("refunded_usd_micros"))


class InvalidRequest(DPPError):
    """422: the request names a field the API refuses (``errors`` lists them)."""

    @property
    def field(self) -> str | None:
        value = self.problem.get("field")
        return value if isinstance(value, str) else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        value = self.problem.get("errors")
        if isinstance(value, list):
            return [item for item in value if isinstance(item, dict)]
        field = self.field
        return [{"field": field, "message": self.detail}] if field else []


class RateLimited(DPPError):
    """429: over a rate limit or the plan's concurrent-run limit."""

    def __init__(
        self,
        status: int | None,
        problem: dict[str, Any],
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, problem, request_id=request_id)
        #: seconds the server asked to wait (``Retry-After``), when it said
        self.retry_after = retry_after


class ServiceUnavailable(DPPError):
    """503: a dependency is down or busy; nothing was reserved, retrying is safe."""


class ConnectionFailed(DPPError):
    """The server could not be reached (or the answer was lost) on every attempt."""


class ResultIntegrityError(DPPError):
    """The downloaded result's ``sha256`` or size differs from the run's."""


class RunFailed(DPPError):
    """``client.run`` ended FAILED or EXPIRED; ``run`` says what was charged."""

    def __init__(self, run: Run) -> None:
        self.run = run
        # the run's own error (a problem document) says why; type/title/detail are its
        problem = dict(run.error or {})
        problem.setdefault("type", CLIENT_TYPE_BASE + "run-failed")
        problem.setdefault("title", f"Run {run.status}")
        problem.setdefault("detail", "")
        super().__init__(None, problem)

    def _message(self) -> str:
        charged = self.run.charged_usd_micros
        text = f"run {self.run.id} ended {self.run.status} (charged {charged} USD micros)"
        return f"{text}: {self.detail}" if self.detail else text


BY_STATUS: dict[int, type[DPPError]] = {
    401: AuthenticationError,
    402: InsufficientBudget,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: InvalidRequest,
    429: RateLimited,
    503: ServiceUnavailable,
}


def client_problem(slug: str, title: str, detail: str) -> dict[str, Any]:
    """A problem document for an error the client itself found."""
    return {"type": CLIENT_TYPE_BASE + slug, "title": title, "detail": detail}


def error_from_problem(
    status: int,
    problem: dict[str, Any],
    *,
    request_id: str | None,
    retry_after: float | None,
) -> DPPError:
    """The exception for one error answer."""
    if status == 402 and str(problem.get("type", "")).endswith("/key-spend-limit"):
        return KeySpendLimitExceeded(status, problem, request_id=request_id)
    if status == 429:
        return RateLimited(status, problem, request_id=request_id, retry_after=retry_after)
    cls = BY_STATUS.get(status, DPPError)
    return cls(status, problem, request_id=request_id)
