"""Request and response bodies: JSON in, JSON out, problems for everything else.

``read_json_body`` answers the parsed body or raises the problem SPEC §3 names
(415, 413, 400); ``body_object`` checks a body's shape (a JSON object with only
the accepted members, the required ones present) with one wording for every
route; ``json_response`` serializes with orjson.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from dpp.http.middleware import declared_length
from dpp.http.problems import Problem, field_problem
from dpp.packs import field_path

__all__ = ["JSON_MEDIA_TYPE", "body_object", "json_response", "read_json_body"]

JSON_MEDIA_TYPE = "application/json"
JSON_CHARSETS = frozenset({"utf-8", "utf8"})


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response serialized with orjson (datetimes as RFC 3339)."""
    return Response(
        orjson.dumps(data), status_code=status, media_type=JSON_MEDIA_TYPE, headers=headers
    )


async def read_json_body(request: Request, *, max_body_bytes: int | None = None) -> Any:
    """The request's JSON body, or a problem: 415 (not application/json), 413 (over
    ``settings.max_body_bytes``, by Content-Length or while streaming), 400
    (empty, not UTF-8, or not JSON)."""
    if max_body_bytes is None:
        max_body_bytes = request.app.state.context.settings.max_body_bytes
    assert max_body_bytes > 0, max_body_bytes
    _check_content_type(request.headers.get("content-type"))
    too_large = Problem(
        413, "content-too-large", f"The request body is larger than {max_body_bytes} bytes."
    )
    content_length = request.headers.get("content-length")
    if content_length is not None and declared_length(content_length) > max_body_bytes:
        raise too_large
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise Problem(400, "malformed-json", "The request body is empty; a JSON value is required.")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Problem(
            400, "malformed-json", f"The request body is not valid UTF-8 (byte {error.start})."
        ) from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise Problem(
            400,
            "malformed-json",
            f"The request body is not valid JSON (line {error.lineno}, column {error.colno}).",
        ) from None


def _check_content_type(value: str | None) -> None:
    unsupported = Problem(
        415,
        "unsupported-media-type",
        "The request body must be JSON, sent with Content-Type: application/json.",
    )
    if value is None:
        raise unsupported
    media_type, *parameters = value.split(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        raise unsupported
    for parameter in parameters:
        name, _, parameter_value = parameter.partition("=")
        charset = parameter_value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in JSON_CHARSETS:
            raise unsupported


def body_object(
    body: Any, allowed: Iterable[str], required: Iterable[str] = ()
) -> Mapping[str, Any]:
    """``body`` as a JSON object with only ``allowed`` members and all ``required``
    ones; otherwise the 422 that names the offending member. Of several unknown
    members the first in sorted order is named, so the answer does not depend on
    the order of a body's keys (which idempotency treats as the same body)."""
    if not isinstance(body, dict):
        raise field_problem("body", "The body must be a JSON object.")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        # as a path: a member may be named "" or "a.b"
        field = field_path(unknown[0], root="")
        raise field_problem(field, f"{field}: is not an accepted member.")
    for name in required:
        if name not in body:
            raise field_problem(name, f"{name}: is required.")
    return body
