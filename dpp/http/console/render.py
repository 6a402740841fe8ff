"""The console's HTML: one Jinja2 environment (autoescape on, always) and its responses.

Every page leaves with a strict Content-Security-Policy (nothing but this
origin's own stylesheet; no script at all, no frames, forms only to here),
``no-store`` (pages show balances and tokens of forms) and the usual hardening
headers. Error pages (404, 403, 429, 503) are pages too, never a stack trace.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Final

import jinja2
from starlette.responses import HTMLResponse, Response

__all__ = ["CSP", "SECURITY_HEADERS", "error_page", "page", "usd"]

CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def usd(micros: int | None) -> str:
    """USD micros as dollars, exact: at least two decimals, up to six."""
    if micros is None:
        return "—"
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    decimals = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole:,}.{decimals}"


def when(value: datetime.datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def as_json(value: Any) -> str:
    """A JSON value (metadata, an error) pretty-printed; escaped by the template."""
    if isinstance(value, str):
        text: str = value
        try:
            value = json.loads(text)
        except ValueError:
            return text
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("dpp.http.console", "templates"),
    autoescape=True,  # every template, whatever its name: nothing renders unescaped
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters["usd"] = usd
_ENVIRONMENT.filters["when"] = when
_ENVIRONMENT.filters["as_json"] = as_json


def page(
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    html = _ENVIRONMENT.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


ERROR_TITLES: Final = {
    400: "Bad request",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    422: "Cannot do that",
    429: "Too many attempts",
    503: "Unavailable",
}


def error_page(
    status: int,
    detail: str,
    *,
    signed_in: bool = True,
    retry_after_s: int | None = None,
) -> Response:
    headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return page(
        "error.html",
        {
            "title": ERROR_TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
            "signed_in": signed_in,
            "csrf": None,
            "nav": None,
        },
        status=status,
        headers=headers,
    )
