"""The shapes DPP accepts and answers, as JSON Schema (2020-12) objects named once.

Each ``Schema`` lives beside the code that checks or renders that shape: the
run submission beside ``parse_submit``, the run object beside ``run_object``,
a plan beside ``Plan.document``. That code reads its member lists from the
schema (``members``, ``required``) and its bounds from ``dpp.limits``, as the
schema does; the OpenAPI document (``dpp.http.openapi``) is rendered from the
same objects, so the two cannot say different things. Tests hold the rest:
every response the suite provokes is validated against the document, and each
request schema is checked against its validator on boundary cases.

A schema body may hold other ``Schema`` objects anywhere a JSON Schema is
expected; ``Components.render`` turns them into ``$ref``s and collects their
bodies as components.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dpp.limits import USD_MICROS_MAX

COMPONENTS_PREFIX = "#/components/schemas/"


@dataclass(frozen=True, slots=True, eq=False)
class Schema:
    """A named JSON Schema: one component of the OpenAPI document."""

    name: str
    body: Mapping[str, Any]

    def __post_init__(self) -> None:
        assert self.name.isidentifier(), self.name
        if self.body.get("type") == "object":
            assert set(self.required) <= self.members, (self.name, self.required)

    @property
    def properties(self) -> Mapping[str, Any]:
        properties: Mapping[str, Any] = self.body.get("properties", {})
        return properties

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self.properties)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(self.body.get("required", ()))

    def ref(self) -> dict[str, str]:
        return {"$ref": COMPONENTS_PREFIX + self.name}


def obj(
    properties: Mapping[str, Any],
    *,
    required: Iterable[str] = (),
    closed: bool = True,
    **more: Any,
) -> dict[str, Any]:
    """An object schema; ``closed`` (the default) admits no other members."""
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(required),
        "additionalProperties": not closed,
        **more,
    }


def all_required(
    properties: Mapping[str, Any], *, closed: bool = True, **more: Any
) -> dict[str, Any]:
    """An object schema whose every member is always present (SPEC §6 run object)."""
    return obj(properties, required=properties.keys(), closed=closed, **more)


def nullable(schema: Any) -> dict[str, Any]:
    """``schema`` or ``null``."""
    return {"oneOf": [schema, {"type": "null"}]}


def integer(minimum: int, maximum: int, **more: Any) -> dict[str, Any]:
    assert minimum <= maximum
    return {"type": "integer", "minimum": minimum, "maximum": maximum, **more}


USD_MICROS: dict[str, Any] = integer(
    0, USD_MICROS_MAX, description="USD micros (1 USD = 1,000,000)."
)
USD_MICROS_OR_NULL: dict[str, Any] = {
    "type": ["integer", "null"],
    "minimum": 0,
    "maximum": USD_MICROS_MAX,
}
COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
TIMESTAMP: dict[str, Any] = {"type": "string", "format": "date-time"}
TIMESTAMP_OR_NULL: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
DATE: dict[str, Any] = {"type": "string", "format": "date"}


def id_pattern(prefix: str) -> dict[str, Any]:
    """The shape of a ``ten_``, ``key_`` or ``run_`` id (dpp.ids)."""
    return {"type": "string", "pattern": f"^{prefix}_[0-9A-Za-z]{{26}}$"}


class Components:
    """The schemas a rendered document refers to, by name (``#/components/schemas``)."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self._owners: dict[str, Schema] = {}

    def render(self, value: Any) -> Any:
        """``value`` as plain JSON: each ``Schema`` becomes a ``$ref`` and its body a
        component (rendered once; two different schemas may not share a name)."""
        if isinstance(value, Schema):
            owner = self._owners.get(value.name)
            if owner is None:
                self._owners[value.name] = value
                self.schemas[value.name] = {}  # a schema may refer to itself
                self.schemas[value.name] = self.render(value.body)
            else:
                assert owner is value, f"two schemas are named {value.name}"
            return value.ref()
        if isinstance(value, Mapping):
            return {key: self.render(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.render(item) for item in value]
        return value
