"""``/console``: the operator web console, server-rendered in the same app and process.

Signed in with the admin token (``pages.sign_in``; a session cookie keyed by
it, ``session``), every page and action calls the same services the admin API
calls (``pages``), behind one gate (``gate``). HTML comes from Jinja2
templates shipped in this package, with autoescape on and a strict CSP
(``render``); the usage chart is SVG drawn on the server (``chart``).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from dpp.http.console import pages
from dpp.http.console.gate import PREFIX, console_endpoint

__all__ = ["PREFIX", "console_routes"]


def console_routes() -> list[BaseRoute]:
    gated = console_endpoint
    return [
        Route(f"{PREFIX}/sign-in", pages.sign_in_form, methods=["GET"]),
        Route(f"{PREFIX}/sign-in", pages.sign_in, methods=["POST"]),
        Route(f"{PREFIX}/static/{{name}}", pages.static_file, methods=["GET"]),
        Route(f"{PREFIX}/sign-out", gated(pages.sign_out), methods=["POST"]),
        Route(PREFIX, gated(pages.overview), methods=["GET"]),
        Route(f"{PREFIX}/reconcile", gated(pages.reconcile), methods=["POST"]),
        Route(f"{PREFIX}/tenants", gated(pages.tenants), methods=["GET"]),
        Route(f"{PREFIX}/tenants/{{tenant_id}}", gated(pages.tenant), methods=["GET"]),
        Route(f"{PREFIX}/tenants/{{tenant_id}}/credits", gated(pages.credit), methods=["POST"]),
        Route(f"{PREFIX}/runs", gated(pages.runs), methods=["GET"]),
        Route(f"{PREFIX}/runs/{{run_id}}", gated(pages.run), methods=["GET"]),
        Route(f"{PREFIX}/runs/{{run_id}}/resolve", gated(pages.resolve), methods=["POST"]),
        Route(f"{PREFIX}/audit-required", gated(pages.audit_queue), methods=["GET"]),
        Route(f"{PREFIX}/usage", gated(pages.usage), methods=["GET"]),
    ]
