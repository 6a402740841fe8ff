"""``/docs``: the interactive API reference, rendered in the browser from ``/openapi.json``.

The page is Swagger UI, vendored from the npm registry under ``static/docs/``
(its README says which version and each file's sha256) and served by DPP
itself: no CDN, so it works offline and under a strict Content-Security-Policy
(no inline script; the start-up is our own ``docs-init.js``). Only the files
in ``ASSETS`` are served, read once into memory, so a path that is not one of
them (``..``, a README, anything else) is a 404.

Like ``/mcp``, the routes are plain ASGI apps (no ``methods`` of their own), so
``/docs`` stays out of the OpenAPI document as SPEC §6 says; like
``/openapi.json`` it needs no key.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "ASSETS",
    "ASSETS_PREFIX",
    "CONTENT_SECURITY_POLICY",
    "DOCS_PATH",
    "OPENAPI_URL",
    "docs_routes",
]

DOCS_PATH = "/docs"
ASSETS_PREFIX = "/docs/assets/"
OPENAPI_URL = "/openapi.json"
# name -> media type: the only files served (the rest of static/docs/ is provenance)
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "docs-init.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "LICENSE": "text/plain; charset=utf-8",
    "NOTICE": "text/plain; charset=utf-8",
    "swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
}
# Browsers revalidate after a day (the ETag makes that a 304); the page itself
# is revalidated every time, so an upgrade shows at the next visit.
ASSET_CACHE_CONTROL = "public, max-age=86400"
PAGE_CACHE_CONTROL = "no-cache"
# Nothing inline at all: Swagger UI 5 sets its styles through the DOM (which a
# CSP does not govern), and headless Chromium showed no violation loading the
# page, expanding every schema and executing a request under this policy.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
GZIP_MIN_BYTES = 1024

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>DPP API reference</title>
<link rel="stylesheet" href="{ASSETS_PREFIX}swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PREFIX}favicon-32x32.png">
</head>
<body>
<noscript><p>This page needs JavaScript. The API description it renders is
<a href="{OPENAPI_URL}">{OPENAPI_URL}</a> (OpenAPI 3.1).</p></noscript>
<div id="swagger-ui"></div>
<script src="{ASSETS_PREFIX}swagger-ui-bundle.js"></script>
<script src="{ASSETS_PREFIX}docs-init.js"></script>
</body>
</html>
""".encode()


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str
    gzipped: bytes | None  # text worth compressing, compressed once

    @classmethod
    def of(cls, body: bytes, media_type: str) -> Asset:
        compress = not media_type.startswith("image/") and len(body) >= GZIP_MIN_BYTES
        return cls(
            body=body,
            media_type=media_type,
            etag=f'"{hashlib.sha256(body).hexdigest()[:32]}"',
            gzipped=gzip.compress(body, compresslevel=9, mtime=0) if compress else None,
        )


@functools.cache
def load_asset(name: str) -> Asset:
    """One vendored file, read from the installed package once per process."""
    assert name in ASSETS, name
    body = importlib.resources.files("dpp.http").joinpath("static", "docs", name).read_bytes()
    return Asset.of(body, ASSETS[name])


@functools.cache
def page_asset() -> Asset:
    return Asset.of(PAGE, "text/html; charset=utf-8")


def _require_get(scope: Scope) -> None:
    if scope["method"] not in ("GET", "HEAD"):
        raise HTTPException(405, headers={"Allow": "GET, HEAD"})


def _accepts_gzip(headers: Headers) -> bool:
    accepted = headers.get("accept-encoding", "")
    return any(part.split(";")[0].strip() == "gzip" for part in accepted.split(","))


def _none_match(headers: Headers, etag: str) -> bool:
    sent = headers.get("if-none-match")
    if sent is None:
        return False
    return sent.strip() == "*" or etag in (tag.strip() for tag in sent.split(","))


def asset_response(asset: Asset, headers: Headers, cache_control: str) -> Response:
    """200 (gzipped when asked and worth it), or 304 for a matching ``If-None-Match``."""
    common = {
        **SECURITY_HEADERS,
        "Cache-Control": cache_control,
        "ETag": asset.etag,
        "Vary": "Accept-Encoding",
    }
    if _none_match(headers, asset.etag):
        return Response(status_code=304, headers=common)
    if asset.gzipped is not None and _accepts_gzip(headers):
        return Response(
            asset.gzipped,
            media_type=asset.media_type,
            headers={**common, "Content-Encoding": "gzip"},
        )
    return Response(asset.body, media_type=asset.media_type, headers=common)


class DocsPage:
    """``GET /docs``: the HTML shell; Swagger UI fills it from ``/openapi.json``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _require_get(scope)
        response = asset_response(page_asset(), Headers(scope=scope), PAGE_CACHE_CONTROL)
        await response(scope, receive, send)


class DocsAsset:
    """``GET /docs/assets/{name}``: one of ``ASSETS``, else 404."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path_params"]["name"]
        if name not in ASSETS:
            raise HTTPException(404)
        _require_get(scope)
        response = asset_response(load_asset(name), Headers(scope=scope), ASSET_CACHE_CONTROL)
        await response(scope, receive, send)


def docs_routes() -> list[Route]:
    """``/docs`` and its assets: ASGI apps, so the OpenAPI document leaves them out."""
    return [
        Route(DOCS_PATH, DocsPage(), name="docs"),
        Route(ASSETS_PREFIX + "{name}", DocsAsset(), name="docs_asset"),
    ]
