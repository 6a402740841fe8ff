"""The client's logic without I/O: building requests, deciding retries, parsing answers.

``Client`` and ``AsyncClient`` differ only in how they send a ``Request`` and
how they sleep; everything else is here, once, and pure (time and randomness
come in as arguments), so both clients behave byte for byte alike.

- A ``Request`` is built once per call and sent unchanged on every retry: a
  submit's body bytes and its ``Idempotency-Key`` never change between
  attempts, so the server replays the run it made instead of making a second.
- ``RetryPolicy`` says whether, and after how long, an attempt is retried
  (SPEC §7): connection errors, ``429``, ``503`` and ``409``
  idempotency-key-in-use; ``Retry-After`` (capped) or exponential backoff with
  jitter. Nothing else is retried.
- ``raise_for_problem`` maps an error answer to the exception of SPEC §7.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from dpp_client._errors import (
    DPPError,
    ResultIntegrityError,
    RunFailed,
    client_problem,
    error_from_problem,
)
from dpp_client._models import FAILED_STATUSES, Run, RunResult

VERSION = "0.1.0"
USER_AGENT = f"dpp-client/{VERSION}"
IDEMPOTENCY_HEADER = "Idempotency-Key"
KEY_IN_USE_TYPE_SUFFIX = "/idempotency-key-in-use"
RETRY_STATUSES = frozenset({429, 503})
RETRY_AFTER_MAX_S = 60.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0
MAX_RETRIES_LIMIT = 100
# wait(): the first poll comes soon (most runs are short), later ones back off.
POLL_FIRST_S = 0.1
POLL_FACTOR = 1.5
POLL_MAX_S = 2.0
# a download link this close to expiring is fetched afresh before use
LINK_MARGIN = timedelta(seconds=5)
ERROR_BODY_PREVIEW_CHARS = 200


@dataclass(frozen=True, slots=True)
class Settings:
    base_url: str
    api_key: str = field(repr=False)  # a secret: never in a repr, a log line or a traceback
    max_retries: int = 3


def resolve_settings(
    base_url: str | None,
    api_key: str | None,
    max_retries: int,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The constructor's arguments, defaulting to ``DPP_URL`` and ``DPP_API_KEY``."""
    env = os.environ if environ is None else environ
    url = base_url or env.get("DPP_URL", "").strip()
    key = api_key or env.get("DPP_API_KEY", "").strip()
    if not url:
        raise ValueError("no DPP URL: pass base_url or set DPP_URL")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, not {url!r}")
    if not key:
        raise ValueError("no API key: pass api_key or set DPP_API_KEY")
    if not 0 <= max_retries <= MAX_RETRIES_LIMIT:
        raise ValueError(f"max_retries must be 0 to {MAX_RETRIES_LIMIT}, not {max_retries}")
    return Settings(url.rstrip("/"), key, max_retries)


@dataclass(frozen=True, slots=True)
class Request:
    """One API call, exactly as every attempt of it is sent.

    ``url`` is a path under the base URL, or an absolute URL (a result
    download) that is sent without the API key.
    """

    method: str
    url: str
    params: tuple[tuple[str, str], ...] = ()
    content: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    authenticated: bool = True

    def header_map(self, api_key: str) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, **dict(self.headers)}
        if self.authenticated:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers


@dataclass(frozen=True, slots=True)
class Response:
    """What an attempt got back (headers: a case-insensitive mapping, e.g. httpx's)."""

    status: int
    headers: Mapping[str, str]
    content: bytes


def _json_body(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _run_path(run_id: str, suffix: str = "") -> str:
    if not run_id:
        raise ValueError("run_id must not be empty")
    return f"/v1/runs/{quote(run_id, safe='')}{suffix}"


def new_idempotency_key() -> str:
    """A fresh key: 1-255 printable ASCII (SPEC §3), unguessable."""
    return f"dppc_{secrets.token_urlsafe(24)}"


def build_create(
    pack_type: str,
    inputs: Any,
    *,
    max_cost_usd_micros: int | None = None,
    timebox_sec: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Request:
    """``POST /v1/runs``; the key (given, or fresh) rides on every retry."""
    body: dict[str, Any] = {"pack_type": pack_type, "inputs": inputs}
    if max_cost_usd_micros is not None:
        body["max_cost_usd_micros"] = max_cost_usd_micros
    if timebox_sec is not None:
        body["timebox_sec"] = timebox_sec
    if metadata is not None:
        body["metadata"] = dict(metadata)
    key = new_idempotency_key() if idempotency_key is None else idempotency_key
    return Request(
        "POST",
        "/v1/runs",
        content=_json_body(body),
        headers=(("Content-Type", "application/json"), (IDEMPOTENCY_HEADER, key)),
    )


def build_get(run_id: str) -> Request:
    return Request("GET", _run_path(run_id))


def build_cancel(run_id: str) -> Request:
    return Request("POST", _run_path(run_id, "/cancel"))


def build_list(
    *, status: str | Iterable[str] | None, limit: int | None, cursor: str | None
) -> Request:
    params: list[tuple[str, str]] = []
    if limit is not None:
        params.append(("limit", str(limit)))
    if status is not None:
        params.append(("status", status if isinstance(status, str) else ",".join(status)))
    if cursor is not None:
        params.append(("cursor", cursor))
    return Request("GET", "/v1/runs", params=tuple(params))


def build_budget() -> Request:
    return Request("GET", "/v1/budget")


def build_usage(from_: date | str | None, to: date | str | None) -> Request:
    params: list[tuple[str, str]] = []
    for name, value in (("from", from_), ("to", to)):
        if value is not None:
            params.append((name, value if isinstance(value, str) else value.isoformat()))
    return Request("GET", "/v1/usage", params=tuple(params))


def build_packs() -> Request:
    return Request("GET", "/v1/packs")


def build_download(result: RunResult) -> Request:
    # A presigned (or signed-token) link is its own credential: the API key is
    # never sent to it, since it may name another host (the object store).
    return Request("GET", result.download_url, authenticated=False)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), ``None`` if absent or bad."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _problem_document(response: Response) -> dict[str, Any]:
    try:
        document = json.loads(response.content)
    except ValueError:
        document = None
    if isinstance(document, dict):
        return document
    preview = response.content[:ERROR_BODY_PREVIEW_CHARS].decode("utf-8", "replace")
    return {"type": "about:blank", "title": f"HTTP {response.status}", "detail": preview}


def error_for(response: Response, now: datetime) -> DPPError:
    """The exception for an error answer (``status >= 400``)."""
    assert response.status >= 400, response.status
    return error_from_problem(
        response.status,
        _problem_document(response),
        request_id=response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after"), now),
    )


def _retryable(response: Response) -> bool:
    if response.status in RETRY_STATUSES:
        return True
    if response.status == 409:
        # only the key-in-use conflict: a retry gets the first request's outcome
        kind = _problem_document(response).get("type")
        return isinstance(kind, str) and kind.endswith(KEY_IN_USE_TYPE_SUFFIX)
    return False


@dataclass(slots=True)
class RetryPolicy:
    """Whether, and after how many seconds, to try a request again (SPEC §7)."""

    max_retries: int
    uniform: Callable[[], float] = field(default=random.random)
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_max_s: float = BACKOFF_MAX_S
    retry_after_max_s: float = RETRY_AFTER_MAX_S

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter: a random point in the upper half."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0**attempt)
        return ceiling * (0.5 + 0.5 * self.uniform())

    def after_error(self, attempt: int) -> float | None:
        """After a connection error on attempt ``attempt`` (0 = the first)."""
        if attempt >= self.max_retries:
            return None
        return self.backoff_s(attempt)

    def after_response(self, attempt: int, response: Response, now: datetime) -> float | None:
        if attempt >= self.max_retries or not _retryable(response):
            return None
        asked = parse_retry_after(response.headers.get("retry-after"), now)
        if asked is not None:
            return min(asked, self.retry_after_max_s)
        return self.backoff_s(attempt)


def parse_json(response: Response, now: datetime) -> Any:
    """The answer's JSON document, or the error it stands for."""
    if response.status >= 400:
        raise error_for(response, now)
    try:
        return json.loads(response.content)
    except ValueError as error:
        raise ValueError(f"DPP answered {response.status} with a body that is not JSON") from error


@dataclass(slots=True)
class PollSchedule:
    """``wait``'s polling: growing delays, never past the deadline."""

    run_id: str
    timeout_s: float
    started_s: float
    next_delay_s: float = POLL_FIRST_S

    def delay_s(self, run: Run, now_s: float) -> float:
        """How long to sleep before the next poll; ``TimeoutError`` past the deadline."""
        remaining_s = self.started_s + self.timeout_s - now_s
        if remaining_s <= 0:
            raise TimeoutError(
                f"run {self.run_id} is still {run.status} after {self.timeout_s:g} s"
            )
        delay = min(self.next_delay_s, remaining_s)
        self.next_delay_s = min(self.next_delay_s * POLL_FACTOR, POLL_MAX_S)
        return delay


def needs_fresh_link(run: Run, now: datetime) -> bool:
    """Whether ``result`` must fetch the run again before downloading."""
    if run.result is None:
        return True
    return run.result.expires_at - LINK_MARGIN <= now


def result_link(run: Run) -> RunResult:
    """The run's download link, or why there is none."""
    if run.status in FAILED_STATUSES:
        raise RunFailed(run)
    if run.status != "COMPLETED" or run.result is None:
        raise ValueError(f"run {run.id} is {run.status}: it has no result (wait for it first)")
    return run.result


def parse_result(run_id: str, link: RunResult, response: Response, now: datetime) -> Any:
    """The downloaded result, once its size and ``sha256`` match the run's."""
    if response.status >= 400:
        raise error_for(response, now)
    body = response.content
    digest = hashlib.sha256(body).hexdigest()
    if len(body) != link.bytes or digest != link.sha256:
        raise ResultIntegrityError(
            None,
            client_problem(
                "result-integrity",
                "Result integrity check failed",
                f"run {run_id}: downloaded {len(body)} bytes with sha256 {digest}; the run"
                f" promises {link.bytes} bytes with sha256 {link.sha256}",
            ),
        )
    content_type = link.content_type.split(";", 1)[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        return json.loads(body)
    return body
