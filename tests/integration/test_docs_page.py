"""``/docs``: the API reference page, served whole by DPP (no CDN, strict CSP)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.types import ASGIApp

from dpp.app import Runtime
from dpp.http.docs import ASSETS, CONTENT_SECURITY_POLICY
from dpp.http.routes import openapi_document
from tests.asgi import http_scope

SWAGGER_VERSION = "5.35.0"


class _Links(HTMLParser):
    """Every URL the page makes the browser load, and whether any script is inline."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.links: list[str] = []
        self.inline_scripts = 0
        self.inline_handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.inline_handlers += [name for name in attributes if name.startswith("on")]
        if tag == "script":
            self._in_script = True
            if attributes.get("src"):
                self.scripts.append(str(attributes["src"]))
        if tag == "link" and attributes.get("href"):
            self.links.append(str(attributes["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def _csp(header: str) -> dict[str, list[str]]:
    directives = (part.strip().split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in directives}


async def test_docs_is_a_page_whose_every_asset_dpp_serves(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")  # no key, like /openapi.json
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "<title>DPP API reference</title>" in page.text
    parsed = _Links()
    parsed.feed(page.text)
    assert parsed.inline_scripts == 0 and parsed.inline_handlers == []
    assert len(parsed.scripts) == 2 and len(parsed.links) == 2
    for url in parsed.scripts + parsed.links:
        split = urlsplit(url)
        assert not split.scheme and not split.netloc, f"{url} is not same-origin"
        assert url.startswith("/docs/assets/")
        served = await http.get(url)
        assert served.status_code == 200, url
        assert served.headers["cache-control"] == "public, max-age=86400"
        assert served.headers["etag"]
        assert served.headers["x-content-type-options"] == "nosniff"
        expected_type = {
            ".js": "text/javascript; charset=utf-8",
            ".css": "text/css; charset=utf-8",
            ".png": "image/png",
        }[url[url.rindex(".") :]]
        assert served.headers["content-type"] == expected_type
        # byte for byte the vendored file
        name = url.removeprefix("/docs/assets/")
        vendored = importlib.resources.files("dpp.http").joinpath("static", "docs", name)
        assert served.content == vendored.read_bytes()


async def test_the_page_runs_under_a_strict_content_security_policy(
    http: httpx.AsyncClient,
) -> None:
    page = await http.get("/docs")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = _csp(page.headers["content-security-policy"])
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]  # no inline script, no eval, no CDN
    assert policy["connect-src"] == ["'self'"]  # it fetches /openapi.json and nothing else
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
    assert policy["style-src"] == ["'self'"]  # nothing inline, styles included
    for values in policy.values():
        assert not any(value.startswith(("http:", "https:")) for value in values)


async def test_the_init_script_loads_this_replicas_openapi_document(
    http: httpx.AsyncClient,
) -> None:
    init = await http.get("/docs/assets/docs-init.js")
    assert init.status_code == 200
    assert re.search(r'url:\s*"/openapi\.json"', init.text)
    assert "SwaggerUIBundle(" in init.text
    assert 'dom_id: "#swagger-ui"' in init.text
    assert 'id="swagger-ui"' in (await http.get("/docs")).text
    assert "validatorUrl: null" in init.text  # no call to the public validator
    document = await http.get("/openapi.json")
    assert document.status_code == 200
    assert document.json()["openapi"].startswith("3.1")


async def test_the_vendored_bundle_is_the_named_release_with_its_licence(
    http: httpx.AsyncClient,
) -> None:
    bundle = await http.get("/docs/assets/swagger-ui-bundle.js")
    readme = (
        importlib.resources.files("dpp.http").joinpath("static", "docs", "README.md").read_text()
    )
    assert f"swagger-ui-dist@{SWAGGER_VERSION}" in readme
    assert hashlib.sha256(bundle.content).hexdigest() in readme
    licence = await http.get("/docs/assets/LICENSE")
    assert licence.status_code == 200 and "Apache License" in licence.text
    notice = await http.get("/docs/assets/NOTICE")
    assert "SmartBear" in notice.text
    # minified and without its source map: a sensible size to ship
    assert len(bundle.content) < 2_500_000
    assert "sourceMappingURL" not in bundle.text


async def test_assets_are_compressed_and_revalidated(http: httpx.AsyncClient) -> None:
    raw = await http.get("/docs/assets/swagger-ui-bundle.js", headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert "Accept-Encoding" in raw.headers["vary"]
    plain = await http.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"Accept-Encoding": "identity"}
    )
    assert "content-encoding" not in plain.headers
    assert raw.content == plain.content  # httpx undid the gzip
    assert int(raw.headers["content-length"]) < len(plain.content) // 2
    assert gzip.decompress(gzip.compress(plain.content)) == plain.content
    again = await http.get(
        "/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": plain.headers["etag"]}
    )
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == plain.headers["etag"]
    changed = await http.get("/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": '"x"'})
    assert changed.status_code == 200


async def _raw_get(app: ASGIApp, raw_path: bytes) -> tuple[int, dict[str, str]]:
    """GET exactly ``raw_path`` (an HTTP client would normalise the dot segments away;
    a hostile one sends them as they are): the status and headers."""
    scope = http_scope("GET", raw_path)
    started: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)

    await app(scope, receive, send)
    headers = {name.decode().lower(): value.decode() for name, value in started["headers"]}
    return started["status"], headers


async def test_only_the_listed_files_are_served(runtime: Runtime) -> None:
    for raw_path in (
        b"/docs/assets/README.md",  # in the folder, not in ASSETS
        b"/docs/assets/..",
        b"/docs/assets/%2E%2E",
        b"/docs/assets/..%2F..%2Fapp.py",
        b"/docs/assets/..%2f__init__.py",
        b"/docs/assets/../../app.py",
        b"/docs/assets/../docs.py",
        b"/docs/assets/%2e%2e%2f%2e%2e%2fdocs.py",
        b"/docs/assets/..%5C..%5Capp.py",
        b"/docs/assets/%00",
        b"/docs/assets/swagger-ui-bundle.js.map",
        b"/docs/assets/",
        b"/docs/",
        b"/docs/assets/static/docs/LICENSE",
    ):
        status, headers = await _raw_get(runtime.app, raw_path)
        assert status == 404, raw_path
        assert headers["content-type"] == "application/problem+json", raw_path
    status, _ = await _raw_get(runtime.app, b"/docs/assets/LICENSE")
    assert status == 200
    assert set(ASSETS) >= {"swagger-ui-bundle.js", "swagger-ui.css", "docs-init.js"}


async def test_docs_takes_only_get(http: httpx.AsyncClient) -> None:
    answer = await http.post("/docs")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"
    head = await http.head("/docs/assets/swagger-ui.css")
    assert head.status_code == 200


def test_docs_is_not_in_the_openapi_document() -> None:
    paths = openapi_document()["paths"]
    assert not [path for path in paths if path.startswith("/docs")]  # SPEC §6
