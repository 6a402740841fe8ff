"""Does one HTTP response conform to the OpenAPI 3.1 document?

``Contract(document).violations(method, path, status, headers, body)`` answers with
human-readable violations, ``[]`` when the response conforms. Only documented
operations are checked: a path no template matches, or a method its path item does
not list, is not this module's business.

A documented response is checked aspect by aspect: ``RESPONSE_CHECKS`` lists one
function per aspect (media type, JSON body), each given the ``Exchange`` and the
``DocumentedResponse``; checking the documented headers is one more such function.

Bodies are validated with ``Draft202012Validator`` and the format checker (so
``date-time`` and ``date`` are asserted; ``uri`` only when ``rfc3987`` is
installed), against a ``referencing.Registry`` that holds the whole document, so
``#/components/...`` references resolve. The validators are built once per
documented body schema and reused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["RESPONSE_CHECKS", "Contract", "DocumentedResponse", "Exchange", "response_violations"]

DOCUMENT_URI = "urn:dpp:openapi"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
MESSAGE_LIMIT = 400
_TEMPLATE_PARAMETER = re.compile(r"(\{[^{}/]+\})")


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request (method and path) and the response it got."""

    method: str
    path: str
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    @property
    def media_type(self) -> str | None:
        value = self.headers.get("content-type")
        return _media_type(value) if value else None


@dataclass(frozen=True, slots=True)
class DocumentedResponse:
    """The response object the document gives for an operation and status."""

    operation: str  # "GET /v1/runs/{run_id}"
    status_key: str  # "200", "4XX" or "default"
    response: Mapping[str, Any]
    pointer: str  # JSON pointer to ``response`` in the document


Check = Callable[["Contract", Exchange, DocumentedResponse], list[str]]


@dataclass(frozen=True, slots=True)
class _Template:
    template: str
    pattern: re.Pattern[str]
    parameters: int


class Contract:
    """The checks one OpenAPI document implies; build once, use for every response."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
        templates = [_compile_template(template) for template in document.get("paths", {})]
        # Concrete paths before templated ones (OpenAPI 3.1 "Path Templating Matching").
        self._templates = sorted(templates, key=lambda t: (t.parameters, t.template))
        self._validators: dict[str, Draft202012Validator] = {}

    def violations(
        self, method: str, path: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> list[str]:
        exchange = Exchange(
            method.upper(), path, status, {k.lower(): v for k, v in headers.items()}, body
        )
        found = self._operation(exchange.method, path)
        if found is None:
            return []
        template, operation = found
        label = f"{exchange.method} {template}"
        responses: Mapping[str, Any] = operation.get("responses", {})
        status_key = next(
            (key for key in (str(status), f"{status // 100}XX", "default") if key in responses),
            None,
        )
        if status_key is None:
            documented = ", ".join(sorted(responses))
            return [f"{label} -> {status}: undocumented status (documented: {documented})"]
        pointer = "/".join(
            ["", "paths", _escape(template), exchange.method.lower(), "responses", status_key]
        )
        response, pointer = self._follow(responses[status_key], pointer)
        documented_response = DocumentedResponse(label, status_key, response, pointer)
        return [
            f"{label} -> {status}: {problem}"
            for check in RESPONSE_CHECKS
            for problem in check(self, exchange, documented_response)
        ]

    def validator(self, pointer: str) -> Draft202012Validator:
        """A validator for the schema at ``pointer`` in the document (cached)."""
        validator = self._validators.get(pointer)
        if validator is None:
            validator = Draft202012Validator(
                {"$ref": f"{DOCUMENT_URI}#{quote(pointer)}"},
                registry=self._registry,
                format_checker=Draft202012Validator.FORMAT_CHECKER,
            )
            self._validators[pointer] = validator
        return validator

    def template(self, method: str, path: str) -> str | None:
        """The documented path template ``method path`` is an operation of, if any."""
        found = self._operation(method.upper(), path)
        return None if found is None else found[0]

    def _operation(self, method: str, path: str) -> tuple[str, Mapping[str, Any]] | None:
        verb = method.lower()
        if verb not in HTTP_METHODS:
            return None
        paths: Mapping[str, Any] = self.document.get("paths", {})
        for template in self._templates:
            if template.pattern.fullmatch(path) and verb in paths[template.template]:
                return template.template, paths[template.template][verb]
        return None

    def _follow(self, node: Mapping[str, Any], pointer: str) -> tuple[Mapping[str, Any], str]:
        """A response object, following local ``$ref``s (``#/components/responses/...``)."""
        while isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            pointer = node["$ref"][1:]
            node = self.document
            for part in pointer.split("/")[1:]:
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, pointer


def response_violations(
    document: Mapping[str, Any],
    method: str,
    path: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
) -> list[str]:
    """``Contract(document).violations(...)`` for a single response."""
    return Contract(document).violations(method, path, status, headers, body)


# --- the checks, one per aspect of a documented response -----------------------------------


def check_media_type(
    contract: Contract, exchange: Exchange, documented: DocumentedResponse
) -> list[str]:
    """The Content-Type is a documented one; no body where none is documented."""
    content: Mapping[str, Any] = documented.response.get("content", {})
    media_type = exchange.media_type
    if not content:
        if exchange.body:
            kind = media_type or "no Content-Type"
            return [f"no body documented, but the response has {len(exchange.body)} bytes ({kind})"]
        return []
    if media_type is None:
        return [f"no Content-Type; documented: {', '.join(content)}"]
    if _documented_media_type(media_type, content) is None:
        return [f"Content-Type is {media_type}; documented: {', '.join(content)}"]
    return []


def check_json_body(
    contract: Contract, exchange: Exchange, documented: DocumentedResponse
) -> list[str]:
    """A documented JSON body schema: the body parses and validates against it."""
    content: Mapping[str, Any] = documented.response.get("content", {})
    media_type = exchange.media_type
    if media_type is not None and not _is_json(media_type):
        return []  # check_media_type reports it; a non-JSON body has no JSON schema to meet
    key = _documented_media_type(media_type, content) if media_type else None
    if key is None:
        key = next((name for name in content if _is_json(name)), None)
    if key is None or not _is_json(key) or "schema" not in content[key]:
        return []
    try:
        instance = json.loads(exchange.body)
    except ValueError as error:
        return [f"body is not JSON ({error}): {_shorten(repr(exchange.body))}"]
    pointer = f"{documented.pointer}/content/{_escape(key)}/schema"
    errors = contract.validator(pointer).iter_errors(instance)
    return [f"body {_describe(error)}" for error in sorted(errors, key=lambda e: e.json_path)]


RESPONSE_CHECKS: tuple[Check, ...] = (check_media_type, check_json_body)


# --- helpers ------------------------------------------------------------------------------


def _compile_template(template: str) -> _Template:
    parts = _TEMPLATE_PARAMETER.split(template)
    pattern = "".join("[^/]+" if index % 2 else re.escape(part) for index, part in enumerate(parts))
    return _Template(template, re.compile(pattern), len(parts) // 2)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _documented_media_type(media_type: str, content: Mapping[str, Any]) -> str | None:
    """The key of ``content`` that covers ``media_type``: exact, then type/*, then */*."""
    by_range = {_media_type(key): key for key in content}
    major = media_type.split("/", 1)[0]
    for candidate in (media_type, f"{major}/*", "*/*"):
        if candidate in by_range:
            return by_range[candidate]
    return None


def _describe(error: ValidationError) -> str:
    message = f"{error.json_path}: {_shorten(error.message)}"
    if error.context:  # oneOf / anyOf: why each alternative of the instance's type failed
        # An alternative of another type altogether ("is not of type 'null'") says nothing.
        reasons = [e for e in error.context if e.validator != "type" or e.relative_path]
        message += " [" + "; ".join(_describe(e) for e in reasons or error.context) + "]"
    return message


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _shorten(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
