"""Every in-process HTTP exchange a test makes must conform to the OpenAPI document.

The tests talk to the app through ``httpx.ASGITransport``; an autouse fixture wraps
its ``handle_async_request`` for the length of each test, checks every response
against the served document (``dpp.http.routes.openapi_document()``, with
``tests.openapi_contract``) and fails the test at teardown, listing each distinct
violation once. Undocumented paths and
methods are not checked, so test-only routes need nothing; a test that breaks the
contract on purpose says so with ``@pytest.mark.openapi_exempt``. An app a test
builds with only some routes is held to the operations it routes: a documented
path it does not mount (a 404 there) is the test's choice, not a broken contract.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from dpp.http.openapi import routed_operations
from dpp.http.routes import openapi_document
from tests.openapi_contract import Contract

EXEMPT_MARKER = "openapi_exempt"


_ROUTED: dict[int, frozenset[tuple[str, str]]] = {}


def _routed(app: object, routes: list[Any]) -> frozenset[tuple[str, str]]:
    """The operations an app routes, computed once per app object."""
    key = id(app)
    if key not in _ROUTED:
        _ROUTED[key] = frozenset(
            routed_operations(route for route in routes if isinstance(route, Route))
        )
    return _ROUTED[key]


@pytest.fixture(scope="session")
def openapi_contract() -> Contract:
    """The document is fixed for a process: its checks are built once."""
    return Contract(openapi_document())


@pytest.fixture(autouse=True)
def openapi_contract_check(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, openapi_contract: Contract
) -> Iterator[None]:
    if request.node.get_closest_marker(EXEMPT_MARKER) is not None:
        yield
        return
    violations: Counter[str] = Counter()
    handle = httpx.ASGITransport.handle_async_request

    async def checked(self: httpx.ASGITransport, sent: httpx.Request) -> httpx.Response:
        response = await handle(self, sent)
        template = openapi_contract.template(sent.method, sent.url.path)
        routes = getattr(self.app, "routes", None)
        if template is not None and routes is not None:
            served = {(method, path) for method, path in _routed(self.app, routes)}
            if (sent.method.upper(), template) not in served:
                return response  # this app does not mount that operation
        # ASGITransport buffers the whole body; read it and hand the test a fresh stream.
        assert isinstance(response.stream, httpx.AsyncByteStream)
        raw = b"".join([chunk async for chunk in response.stream])
        response.stream = httpx.ByteStream(raw)
        # A throwaway response undoes any Content-Encoding, as the test's client will.
        body = httpx.Response(response.status_code, headers=response.headers, content=raw).content
        violations.update(
            openapi_contract.violations(
                sent.method, sent.url.path, response.status_code, response.headers, body
            )
        )
        return response

    monkeypatch.setattr(httpx.ASGITransport, "handle_async_request", checked)
    yield
    if violations:
        lines = [
            f"- {violation}" + (f"  (x{count})" if count > 1 else "")
            for violation, count in violations.items()
        ]
        pytest.fail(
            "responses that do not conform to the OpenAPI document"
            " (mark the test openapi_exempt if that is on purpose):\n" + "\n".join(lines),
            pytrace=False,
        )
