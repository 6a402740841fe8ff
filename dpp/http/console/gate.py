"""The console's gate: admin token configured, a valid session, CSRF on every POST.

``console_endpoint`` wraps each page handler. In order: no admin token
configured → the same 404 problem as an unknown path (as ``/admin``); no valid
session cookie (missing, forged, expired, or signed with a rotated token) →
303 to the sign-in page; a POST whose form lacks this session's CSRF token →
a 403 page. The handler then runs; a refusal it raises (``PageError``)
becomes its page, and a dependency that failed becomes a 503 page with
Retry-After (the context's classifier says which), never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from dpp.context import AppContext
from dpp.http.console.render import error_page
from dpp.http.console.session import (
    SESSION_COOKIE,
    csrf_token,
    session_key,
    verify_csrf,
    verify_session,
)
from dpp.http.problems import RETRY_AFTER_DEPENDENCY_S, not_found_problem
from dpp.tenancy.ratelimit import RateLimitUnavailable

__all__ = ["PREFIX", "Call", "PageError", "console_endpoint", "read_form", "signing_key"]

log = logging.getLogger("dpp.http.console")

PREFIX: Final = "/console"
FORM_FIELDS_MAX: Final = 20
FORM_BYTES_MAX: Final = 16 * 1024


class PageError(Exception):
    """A refusal a handler answers as a page: 404 for an unknown tenant or run, 409
    or 422 for an action refused, 503 (with ``retry_after_s``) when busy."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Call:
    """One signed-in request: the context, this session's CSRF token, the form."""

    request: Request
    context: AppContext
    csrf: str
    form: dict[str, str] = field(default_factory=dict)

    def query(self, name: str) -> str:
        return self.request.query_params.get(name, "").strip()


def signing_key(request: Request) -> bytes | None:
    """The session key of this replica's admin token; None when none is configured."""
    context: AppContext = request.app.state.context
    token = context.settings.admin_token
    return session_key(token) if token else None


async def read_form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind the console's forms send); the last
    value of a repeated name wins; a body over 16 KiB or 20 fields is empty."""
    body = await request.body()
    if len(body) > FORM_BYTES_MAX:
        return {}
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=FORM_FIELDS_MAX
        )
    except (UnicodeDecodeError, ValueError):
        return {}
    return dict(pairs)


Handler = Callable[[Call], Awaitable[Response]]


def console_endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        context: AppContext = request.app.state.context
        key = signing_key(request)
        if key is None:
            raise not_found_problem()
        session = verify_session(key, request.cookies.get(SESSION_COOKIE))
        if session is None:
            return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        csrf = csrf_token(key, session)
        form: dict[str, str] = {}
        if request.method == "POST":
            form = await read_form(request)
            if not verify_csrf(csrf, form.get("csrf")):
                log.warning("console: a form without a valid CSRF token was refused")
                return error_page(
                    403, "This form's CSRF token is missing or wrong; reload the page and retry."
                )
        try:
            return await handler(Call(request, context, csrf, form))
        except PageError as refused:
            return error_page(refused.status, refused.detail, retry_after_s=refused.retry_after_s)
        except RateLimitUnavailable:
            return dependency_page("redis")
        except Exception as error:
            dependency = context.unavailable_dependency(error)
            if dependency is None:
                raise
            log.warning(
                "console: %s unavailable; answering 503",
                dependency,
                extra={"dependency": dependency, "error_type": type(error).__name__},
            )
            return dependency_page(dependency)

    return endpoint


def dependency_page(dependency: str) -> Response:
    return error_page(
        503,
        f"A dependency ({dependency}) is unavailable right now; retry shortly.",
        retry_after_s=RETRY_AFTER_DEPENDENCY_S,
    )
