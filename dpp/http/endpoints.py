"""Endpoints as data: what is routed is what is documented.

Each route module declares its ``Endpoint``s beside its handlers: method, path,
handler, the request schema, the parameters it reads and every answer it can
give (``Reply``). ``routes_for`` turns them into Starlette routes, and
``dpp.http.openapi`` renders the OpenAPI document from the very same objects,
so a route cannot ship undocumented and a documented answer cannot point at a
shape the code does not produce (the schemas live beside the code that checks
or renders them, ``dpp.schemas``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from dpp.http.middleware import REQUEST_ID_PATTERN
from dpp.http.problems import PROBLEM, PROBLEM_CONTENT_TYPE
from dpp.runs.idempotency import KEY_PATTERN
from dpp.schemas import Schema

Handler = Callable[[Request], Awaitable[Response]]
Security = Literal["apiKey", "adminToken"]
API_KEY: Security = "apiKey"
ADMIN_TOKEN: Security = "adminToken"
JSON_MEDIA_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer an endpoint gives: status, meaning, body shape, headers."""

    status: int
    description: str
    schema: Schema | None = None
    headers: tuple[str, ...] = ()  # names of dpp.http.openapi.HEADERS
    media_type: str = JSON_MEDIA_TYPE

    def __post_init__(self) -> None:
        assert 100 <= self.status <= 599, self.status


def problem(status: int, description: str, *headers: str) -> Reply:
    """An RFC 9457 answer (SPEC §3: every error is a problem)."""
    assert 400 <= status <= 599, status
    return Reply(status, description, PROBLEM, headers, PROBLEM_CONTENT_TYPE)


@dataclass(frozen=True, slots=True)
class Parameter:
    """A query, header or path parameter an endpoint reads."""

    name: str
    location: Literal["query", "header", "path"]
    schema: Mapping[str, Any]
    description: str
    required: bool = False

    def __post_init__(self) -> None:
        assert self.location != "path" or self.required, "path parameters are required"

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "in": self.location,
            "schema": dict(self.schema),
            "description": self.description,
        }
        if self.required:
            document["required"] = True
        return document


# Parameters several endpoints read. An id of the wrong shape is simply "not
# found" (never a 400), so the path schemas are plain strings.
RUN_ID = Parameter("run_id", "path", {"type": "string"}, "A run id (run_...).", required=True)
TENANT_ID = Parameter(
    "tenant_id", "path", {"type": "string"}, "A tenant id (ten_...).", required=True
)
KEY_ID = Parameter("key_id", "path", {"type": "string"}, "An API key id (key_...).", required=True)
_IDEMPOTENCY_KEY_SCHEMA = {"type": "string", "pattern": KEY_PATTERN.pattern}
IDEMPOTENCY_KEY = Parameter(
    "Idempotency-Key",
    "header",
    _IDEMPOTENCY_KEY_SCHEMA,
    "Replays the stored outcome of an earlier request with the same key (kept 24 h or more).",
)
IDEMPOTENCY_KEY_REQUIRED = Parameter(
    "Idempotency-Key",
    "header",
    _IDEMPOTENCY_KEY_SCHEMA,
    "Required: a replay adds nothing and answers 200 with the original body.",
    required=True,
)
# Every endpoint reads these two.
TRACEPARENT = Parameter(
    "traceparent", "header", {"type": "string"}, "W3C trace context; its trace id is logged."
)
X_REQUEST_ID = Parameter(
    "X-Request-ID",
    "header",
    {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN.pattern}$"},
    "Echoed when valid; replaced by a generated id otherwise.",
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    security: Security | None  # None: no credentials (the ops endpoints)
    replies: tuple[Reply, ...]
    parameters: tuple[Parameter, ...] = ()
    request: Schema | None = None
    request_required: bool = True
    description: str | None = None
    # routing only: Starlette's route name (url_for), when one is needed
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        assert self.method in ("GET", "POST", "PATCH", "DELETE"), self.method
        assert self.path.startswith("/"), self.path
        statuses = [reply.status for reply in self.replies]
        assert len(statuses) == len(set(statuses)), f"{self.operation_id}: a status twice"
        for parameter in self.parameters:
            if parameter.location == "path":
                assert "{" + parameter.name + "}" in self.path, (self.path, parameter.name)


def routes_for(endpoints: Iterable[Endpoint]) -> list[BaseRoute]:
    """One Starlette route per path (so a wrong method's 405 names every allowed
    one), dispatching on the method when a path has several endpoints."""
    by_path: dict[str, dict[str, Endpoint]] = {}
    for endpoint in endpoints:
        methods = by_path.setdefault(endpoint.path, {})
        assert endpoint.method not in methods, f"{endpoint.method} {endpoint.path} twice"
        methods[endpoint.method] = endpoint
    routes: list[BaseRoute] = []
    for path, methods in by_path.items():
        names = [endpoint.name for endpoint in methods.values() if endpoint.name]
        if len(methods) == 1:
            (endpoint,) = methods.values()
            handler = endpoint.handler
        else:
            handler = _dispatch({method: e.handler for method, e in methods.items()})
        routes.append(Route(path, handler, methods=list(methods), name=names[0] if names else None))
    return routes


def _dispatch(handlers: Mapping[str, Handler]) -> Handler:
    async def by_method(request: Request) -> Response:
        # Starlette answered 405 already for any other method (HEAD goes with GET).
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return by_method
