"""The pack contract: what a unit of metered work declares and returns.

A pack is pure policy about *work*; it never touches money. It states its
prices (minimum fee, default and maximum reservation, how the actual cost
follows from the work) and reports the actual cost of one execution as an
`int` of USD micros. The run actor and the settlement (``dpp.money.rules``) do the
clamping to ``[M, R]`` and every ledger write, so a buggy pack can at worst
mis-price a run inside the reservation the tenant agreed to; it can never move
money on its own.

Third-party packs implement `Pack` (structurally; no base class needed) and are
published through the ``dpp.packs`` entry-point group; see ``docs/packs.md``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

# SPEC §6 "Timebox" and the BIGINT money columns: a pack declares nothing beyond
# them. Re-exported here for pack authors; defined once in dpp.limits.
from dpp.ids import problem_type
from dpp.limits import TIMEBOX_SEC_MAX, TIMEBOX_SEC_MIN, USD_MICROS_MAX

__all__ = [
    "PACK_ERROR_TYPE",
    "PACK_TYPE_PATTERN",
    "TIMEBOX_SEC_MAX",
    "TIMEBOX_SEC_MIN",
    "USD_MICROS_MAX",
    "FieldError",
    "Pack",
    "PackConfigError",
    "PackContext",
    "PackDefinitionError",
    "PackError",
    "PackFactory",
    "PackOutput",
    "check_pack",
    "field_path",
    "storable_text",
]

# The problem type a run's `error` carries when its pack failed (SPEC §3).
PACK_ERROR_TYPE = problem_type("pack-error")

# Pack types appear in URLs, metrics labels and log lines: keep them boring.
PACK_TYPE_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

# A key that reads well after a dot; anything else is rendered as ["..."].
_PLAIN_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SURROGATE_PATTERN = re.compile("[\ud800-\udfff]")
_DESCRIPTION_CHARS_MAX = 1_000
_PROBLEM_TEXT_CHARS_MAX = 1_000


@dataclass(frozen=True, slots=True)
class FieldError:
    """One reason the inputs were rejected, naming where (for a `422` problem).

    `field` is a JSON-pointer-ish path rooted at ``inputs``, such as
    ``inputs.options[2].scores.cost``, so a client can point at the culprit.
    """

    field: str
    message: str

    def __post_init__(self) -> None:
        assert isinstance(self.field, str) and self.field, "a field error names the field"
        assert isinstance(self.message, str) and self.message, "a field error says why"


def field_path(*segments: str | int, root: str = "inputs") -> str:
    """Render a location inside a request member: ``field_path("a", 0, "b") ==
    "inputs.a[0].b"``; ``root`` names the member (``metadata``), or is empty for
    a member of the body itself (``field_path("", root="") == '[""]'``).

    Keys that would be ambiguous after a dot (empty, dotted, spaced, ...) are
    rendered as JSON strings in brackets, so every path reads back exactly.
    """
    parts = [root]
    for segment in segments:
        if isinstance(segment, int):
            assert not isinstance(segment, bool), segment
            parts.append(f"[{segment}]")
        elif _PLAIN_KEY_PATTERN.fullmatch(segment):
            parts.append(f".{segment}" if any(parts) else segment)
        else:
            # json (not orjson): it escapes lone surrogates instead of failing.
            parts.append(f"[{json.dumps(segment)}]")
    path = "".join(parts)
    assert path, "a path names something"
    return path


def storable_text(text: str) -> str:
    """``text`` with what Postgres cannot store (NUL, unpaired surrogates) replaced
    by U+FFFD: for texts DPP stores that no client can be asked to fix."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = _SURROGATE_PATTERN.sub("\ufffd", text)
    return text


class PackError(Exception):
    """A pack's own, expected failure: the run ends FAILED and is charged `M`.

    `title` and `detail` become the run's `error` problem (type
    `PACK_ERROR_TYPE`) and are shown to the tenant, so they must never carry
    secrets (credentials, upstream URLs with tokens, internal hostnames).
    """

    title: str
    detail: str

    def __init__(self, title: str, detail: str) -> None:
        assert isinstance(title, str) and title, "a pack error needs a title"
        assert isinstance(detail, str), detail
        # Bounded: the text is stored on the run and served on every GET.
        # Stored on the run (Postgres refuses NUL and unpaired surrogates).
        self.title = storable_text(title[:_PROBLEM_TEXT_CHARS_MAX])
        self.detail = storable_text(detail[:_PROBLEM_TEXT_CHARS_MAX])
        super().__init__(title, detail)

    def __str__(self) -> str:
        return f"{self.title}: {self.detail}" if self.detail else self.title

    def problem(self) -> dict[str, str]:
        """The RFC 9457 members this error contributes to the run's `error`."""
        return {"type": PACK_ERROR_TYPE, "title": self.title, "detail": self.detail}


class PackConfigError(ValueError):
    """The operator's environment for a pack is invalid.

    Unlike a broken third-party entry point (logged and skipped), this stops
    startup: SPEC §5 says a bad configuration value stops startup with one
    clear line naming it. The message names the variable, never its value
    (values such as webhook URLs may hold credentials).
    """


class PackDefinitionError(ValueError):
    """A pack object breaks the contract (types, price invariants, schema)."""


@dataclass(frozen=True, slots=True)
class PackContext:
    """What a pack knows about the run it executes, beyond its inputs."""

    run_id: str
    tenant_id: str
    trace_id: str | None
    timebox_sec: int
    reserved_usd_micros: int
    minimum_fee_usd_micros: int

    def __post_init__(self) -> None:
        assert isinstance(self.run_id, str) and self.run_id
        assert isinstance(self.tenant_id, str) and self.tenant_id
        assert self.trace_id is None or isinstance(self.trace_id, str)
        assert _is_int(self.timebox_sec)
        assert TIMEBOX_SEC_MIN <= self.timebox_sec <= TIMEBOX_SEC_MAX, self.timebox_sec
        assert _is_int(self.reserved_usd_micros) and _is_int(self.minimum_fee_usd_micros)
        # SPEC §1: 0 <= M <= R.
        assert 0 <= self.minimum_fee_usd_micros <= self.reserved_usd_micros <= USD_MICROS_MAX


@dataclass(frozen=True, slots=True)
class PackOutput:
    """A finished execution: the result document and what the work cost.

    `actual_cost_usd_micros` is the cost *before* clamping; the settlement
    charges it clamped to ``[M, R]``. Reporting the honest figure (even above
    `R`) keeps under-reservation visible in metrics instead of hiding it.
    """

    body: bytes
    content_type: str
    actual_cost_usd_micros: int

    def __post_init__(self) -> None:
        assert isinstance(self.body, bytes), type(self.body)
        assert isinstance(self.content_type, str) and self.content_type
        assert _is_int(self.actual_cost_usd_micros), type(self.actual_cost_usd_micros)
        assert 0 <= self.actual_cost_usd_micros <= USD_MICROS_MAX, self.actual_cost_usd_micros


class Pack(Protocol):
    """A pack type: declared prices and schema plus an async executor.

    Invariant (checked by `check_pack` at registration):
    ``0 <= minimum_fee <= default_reservation <= max_reservation``.
    """

    pack_type: str
    description: str
    input_schema: dict[str, Any]  # JSON Schema 2020-12 for the run's `inputs`
    minimum_fee_usd_micros: int
    default_reservation_usd_micros: int
    max_reservation_usd_micros: int
    default_timebox_sec: int
    pricing: dict[str, Any]  # JSON-serialisable, shown in the catalog

    def validate(self, inputs: Any) -> list[FieldError]:
        """Semantic checks beyond the schema; called only once the schema passed."""
        ...

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        """What a run with these (valid) inputs is expected to cost."""
        ...

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        """Do the work. Raise `PackError` for a pack failure; stay cancellable."""
        ...


class PackFactory(Protocol):
    """What an entry point names: usually the pack class itself."""

    def from_environment(self, env: Mapping[str, str]) -> Pack | None:
        """Build the pack from settings, or None when it is not available here."""
        ...


def check_pack(pack: object) -> None:
    """Raise `PackDefinitionError` unless `pack` honours the `Pack` contract.

    Run once at registration so that request handlers and actors may rely on
    the declared prices without re-checking them.
    """
    pack_type = getattr(pack, "pack_type", None)
    if not isinstance(pack_type, str) or PACK_TYPE_PATTERN.fullmatch(pack_type) is None:
        raise PackDefinitionError(f"pack_type must match {PACK_TYPE_PATTERN.pattern}")
    where = f"pack {pack_type!r}"
    description = getattr(pack, "description", None)
    if not isinstance(description, str) or not 0 < len(description) <= _DESCRIPTION_CHARS_MAX:
        raise PackDefinitionError(f"{where}: description must be 1..1000 characters")
    schema = getattr(pack, "input_schema", None)
    if not isinstance(schema, dict):
        raise PackDefinitionError(f"{where}: input_schema must be a dict")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise PackDefinitionError(f"{where}: input_schema is invalid: {error.message}") from None
    pricing = getattr(pack, "pricing", None)
    if not isinstance(pricing, dict):
        raise PackDefinitionError(f"{where}: pricing must be a dict")
    for name, document in (("input_schema", schema), ("pricing", pricing)):
        try:
            orjson.dumps(document)
        except TypeError:
            raise PackDefinitionError(f"{where}: {name} is not JSON-serialisable") from None
    prices = [
        getattr(pack, name, None)
        for name in (
            "minimum_fee_usd_micros",
            "default_reservation_usd_micros",
            "max_reservation_usd_micros",
        )
    ]
    minimum_fee, default_reservation, max_reservation = prices
    if not (_is_int(minimum_fee) and _is_int(default_reservation) and _is_int(max_reservation)):
        raise PackDefinitionError(f"{where}: prices must be int USD micros (no floats, no bools)")
    if not 0 <= minimum_fee <= default_reservation <= max_reservation <= USD_MICROS_MAX:
        raise PackDefinitionError(
            f"{where}: need 0 <= minimum_fee ({minimum_fee}) <= default_reservation "
            f"({default_reservation}) <= max_reservation ({max_reservation})"
        )
    timebox_sec = getattr(pack, "default_timebox_sec", None)
    if not _is_int(timebox_sec) or not TIMEBOX_SEC_MIN <= timebox_sec <= TIMEBOX_SEC_MAX:
        raise PackDefinitionError(
            f"{where}: default_timebox_sec must be an int in {TIMEBOX_SEC_MIN}..{TIMEBOX_SEC_MAX}"
        )
    for name in ("validate", "estimate_cost_usd_micros"):
        if not callable(getattr(pack, name, None)):
            raise PackDefinitionError(f"{where}: {name} must be callable")
    if not inspect.iscoroutinefunction(getattr(pack, "execute", None)):
        raise PackDefinitionError(f"{where}: execute must be an `async def` method")


def _is_int(value: object) -> TypeGuard[int]:
    """True for a real int; `bool` is an int subclass but never an amount."""
    return isinstance(value, int) and not isinstance(value, bool)
