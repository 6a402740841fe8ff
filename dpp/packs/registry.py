"""Pack discovery (entry points), the catalog, and input validation.

Packs come from the ``dpp.packs`` entry-point group so an operator adds work
without editing DPP (SPEC §4). Startup must survive a broken third-party
package: such an entry point is logged and skipped. Two packs claiming one
`pack_type`, or a pack reporting a bad configuration value, stop startup
instead, because silently picking one would let prices change under tenants.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from jsonschema.validators import extend

from dpp.packs.base import (
    PACK_TYPE_PATTERN,
    TIMEBOX_SEC_MAX,
    TIMEBOX_SEC_MIN,
    FieldError,
    Pack,
    PackConfigError,
    PackDefinitionError,
    check_pack,
    field_path,
)
from dpp.schemas import USD_MICROS, Schema, all_required, integer

__all__ = [
    "ENTRY_POINT_GROUP",
    "FIELD_ERRORS_MAX",
    "INPUT_DEPTH_MAX",
    "PACK",
    "PACK_CATALOG",
    "DuplicatePackTypeError",
    "PackRegistry",
    "json_value_errors",
    "validate_inputs",
]

ENTRY_POINT_GROUP = "dpp.packs"

# A 422 names at most this many problems: enough to fix a request in one go,
# bounded so a pathological body cannot produce a megabyte of errors.
FIELD_ERRORS_MAX = 20
# Deeper inputs are refused before any schema runs: it bounds recursion in
# validators and packs, and orjson refuses to encode past 255 levels anyway.
INPUT_DEPTH_MAX = 64
# orjson's integer range; results and webhook bodies are encoded with it.
_JSON_INT_MIN = -(2**63)
_JSON_INT_MAX = 2**64 - 1
_PACKS_MAX = 128
_VALIDATOR_CACHE_MAX = 2 * _PACKS_MAX
_ERROR_MESSAGE_CHARS_MAX = 200

logger = logging.getLogger("dpp.packs")


# id(pack) -> (pack, validator). Holding the pack keeps its id from being
# reused by another object while the entry lives; LRU-bounded like any cache.
# JSON Schema counts 1.0 as an "integer"; DPP never does (money, counts and
# delays are ints, and a pack may rely on ``isinstance(value, int)``): a float
# where a schema says integer is a 422, never an assertion inside the pack.
def _is_strict_integer(checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


InputValidator: type[Draft202012Validator] = extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)
_validators: OrderedDict[int, tuple[Pack, Draft202012Validator]] = OrderedDict()


# One entry of GET /v1/packs (SPEC §3 "Budget, usage, packs"), beside ``catalog``.
PACK = Schema(
    "Pack",
    all_required(
        {
            "pack_type": {"type": "string", "pattern": f"^{PACK_TYPE_PATTERN.pattern}$"},
            "description": {"type": "string"},
            "input_schema": {"type": "object", "description": "A JSON Schema (2020-12)."},
            "minimum_fee_usd_micros": USD_MICROS,
            "default_reservation_usd_micros": USD_MICROS,
            "max_reservation_usd_micros": USD_MICROS,
            "default_timebox_sec": integer(TIMEBOX_SEC_MIN, TIMEBOX_SEC_MAX),
            "pricing": {"type": "object", "description": "How the actual cost is computed."},
        }
    ),
)
PACK_CATALOG = Schema("PackCatalog", all_required({"packs": {"type": "array", "items": PACK}}))


class DuplicatePackTypeError(ValueError):
    """Two packs claim the same `pack_type`; the operator must remove one."""


class PackRegistry:
    """The packs this process offers, keyed by `pack_type`; immutable once built."""

    def __init__(self, packs: Iterable[Pack]) -> None:
        by_type: dict[str, Pack] = {}
        for pack in packs:
            check_pack(pack)
            if pack.pack_type in by_type:
                raise DuplicatePackTypeError(f"duplicate pack type {pack.pack_type!r}")
            by_type[pack.pack_type] = pack
            _validator_for(pack)  # compile once, at startup, not on the first request
        if len(by_type) > _PACKS_MAX:
            raise PackDefinitionError(f"at most {_PACKS_MAX} pack types are supported")
        self._packs: dict[str, Pack] = dict(sorted(by_type.items()))

    @classmethod
    def load(cls, env: Mapping[str, str]) -> PackRegistry:
        """Discover, configure and check every pack installed in this environment."""
        packs: list[Pack] = []
        origin_by_type: dict[str, str] = {}
        for entry_point in _entry_points():
            pack = _instantiate(entry_point, env)
            if pack is None:
                continue
            origin = f"{entry_point.name} = {entry_point.value}"
            if pack.pack_type in origin_by_type:
                raise DuplicatePackTypeError(
                    f"pack type {pack.pack_type!r} is provided by both "
                    f"[{origin_by_type[pack.pack_type]}] and [{origin}]; uninstall one"
                )
            origin_by_type[pack.pack_type] = origin
            packs.append(pack)
        registry = cls(packs)
        logger.info("packs loaded: %s", ", ".join(registry.pack_types()) or "(none)")
        return registry

    def get(self, pack_type: str) -> Pack | None:
        return self._packs.get(pack_type)

    def __contains__(self, pack_type: object) -> bool:
        return isinstance(pack_type, str) and pack_type in self._packs

    def __iter__(self) -> Iterator[Pack]:
        return iter(self._packs.values())

    def __len__(self) -> int:
        return len(self._packs)

    def pack_types(self) -> list[str]:
        return list(self._packs)

    def catalog(self) -> list[dict[str, Any]]:
        """The `GET /v1/packs` members, sorted by pack type.

        Copies, so a caller that decorates the documents cannot alter the
        schema or the prices the registry validates and charges with.
        """
        catalog = [
            {
                "pack_type": pack.pack_type,
                "description": pack.description,
                "input_schema": copy.deepcopy(pack.input_schema),
                "minimum_fee_usd_micros": pack.minimum_fee_usd_micros,
                "default_reservation_usd_micros": pack.default_reservation_usd_micros,
                "max_reservation_usd_micros": pack.max_reservation_usd_micros,
                "default_timebox_sec": pack.default_timebox_sec,
                "pricing": copy.deepcopy(pack.pricing),
            }
            for pack in self._packs.values()
        ]
        assert all(entry.keys() == PACK.members for entry in catalog)
        return catalog


def validate_inputs(pack: Pack, inputs: Any) -> list[FieldError]:
    """Every reason `inputs` are unacceptable to `pack` (empty when they are fine).

    Three stages, each only when the previous one passed: plain JSON-ness and
    depth, the pack's JSON schema (all errors, sorted by path), then the pack's
    own semantic `validate`. At most `FIELD_ERRORS_MAX` errors are returned.
    Never raises on a JSON value, whatever its shape.
    """
    errors = json_value_errors(inputs)
    if errors:
        return errors
    located = sorted(
        (_locate(error) for error in _validator_for(pack).iter_errors(inputs)),
        key=lambda item: (_path_sort_key(item[0]), item[1]),
    )
    if located:
        return [
            FieldError(field_path(*path), message) for path, message in located[:FIELD_ERRORS_MAX]
        ]
    semantic = pack.validate(inputs)
    assert isinstance(semantic, list), type(semantic)
    assert all(isinstance(error, FieldError) for error in semantic), semantic
    return semantic[:FIELD_ERRORS_MAX]


def _entry_points() -> Sequence[metadata.EntryPoint]:
    """The group's entry points, deduplicated and in a deterministic order.

    A package visible twice on sys.path (editable plus built) must not look
    like a duplicate pack type.
    """
    unique = {(ep.name, ep.value): ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return [unique[key] for key in sorted(unique)]


def _instantiate(entry_point: metadata.EntryPoint, env: Mapping[str, str]) -> Pack | None:
    """The configured pack, or None when it is unavailable here or broken."""
    origin = f"{entry_point.name} = {entry_point.value}"
    try:
        factory = entry_point.load()
        pack = factory.from_environment(env)
    except PackConfigError:
        raise  # the operator's settings are wrong: stop startup, naming the variable
    except Exception:
        logger.exception("skipping broken pack entry point [%s]", origin)
        return None
    if pack is None:
        logger.info("pack entry point [%s] is not configured here; not offered", origin)
        return None
    try:
        check_pack(pack)
    except PackDefinitionError as error:
        logger.error("skipping pack entry point [%s]: %s", origin, error)
        return None
    checked: Pack = pack
    return checked


def _validator_for(pack: Pack) -> Draft202012Validator:
    key = id(pack)
    cached = _validators.get(key)
    if cached is not None and cached[0] is pack:
        _validators.move_to_end(key)
        return cached[1]
    validator = InputValidator(pack.input_schema)
    _validators[key] = (pack, validator)
    while len(_validators) > _VALIDATOR_CACHE_MAX:
        _validators.popitem(last=False)
    return validator


def json_value_errors(value: Any, *, root: str = "inputs") -> list[FieldError]:
    """Every reason ``value`` is not plain JSON that Postgres can store, naming
    where (``root`` is the member it came in, e.g. ``metadata``); without recursion.

    `json.loads` accepts NaN, Infinity and integers orjson cannot encode;
    nesting deep enough would blow the stack of any recursive validator (and of
    the encoder); ``jsonb`` and ``text`` refuse the NUL character (``\\u0000``),
    in keys too, and nothing can encode an unpaired surrogate. Anything this
    lets through must be storable: a data error at commit would fail the batch
    of reservations it shares (``dpp.actors.budget``).
    """
    errors: list[FieldError] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack and len(errors) < FIELD_ERRORS_MAX:
        item, path = stack.pop()
        problem: str | None = None
        children: list[tuple[Any, tuple[str | int, ...]]] = []
        if item is None or isinstance(item, bool):
            pass
        elif isinstance(item, str):
            problem = _text_problem(item)
        elif isinstance(item, int):
            if not _JSON_INT_MIN <= item <= _JSON_INT_MAX:
                problem = "integer is out of the supported range (-2**63 .. 2**64-1)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                problem = "must be a finite number (NaN and Infinity are not JSON)"
        elif isinstance(item, list | dict):
            if len(path) >= INPUT_DEPTH_MAX:
                problem = f"nested deeper than {INPUT_DEPTH_MAX} levels"
            elif isinstance(item, list):
                children = [(child, (*path, index)) for index, child in enumerate(item)]
            elif all(isinstance(key, str) for key in item):
                for key, child in item.items():
                    key_problem = _text_problem(key)
                    if key_problem is not None:
                        # named by its path, rendered safely (json escapes it)
                        errors.append(
                            FieldError(field_path(*path, key, root=root), f"key {key_problem}")
                        )
                    else:
                        children.append((child, (*path, key)))
            else:
                problem = "object keys must be strings"
        else:
            problem = "is not a JSON value"
        if problem is not None:
            errors.append(FieldError(field_path(*path, root=root), problem))
        stack.extend(reversed(children))  # reversed: errors come out in document order
    return errors[:FIELD_ERRORS_MAX]


def _text_problem(text: str) -> str | None:
    """Why Postgres could not store ``text`` (as ``text`` or inside ``jsonb``), if it cannot."""
    if "\x00" in text:
        return "must not contain the NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "must not contain unpaired surrogates"
    return None


def _locate(error: ValidationError) -> tuple[tuple[str | int, ...], str]:
    """(path, message) for one schema error, phrased without echoing the input.

    jsonschema's own messages embed a repr of the offending value, which for a
    100-option list is a wall of text; the common keywords get short messages.
    """
    path = tuple(error.absolute_path)
    keyword = error.validator
    value = error.validator_value
    if keyword == "required" and isinstance(value, list):
        for name in value:
            if isinstance(name, str) and error.message == f"{name!r} is a required property":
                return (*path, name), "is required"
    message = _short_message(str(keyword), value) or error.message
    if len(message) > _ERROR_MESSAGE_CHARS_MAX:
        message = message[: _ERROR_MESSAGE_CHARS_MAX - 1] + "…"
    return path, message


def _short_message(keyword: str, value: Any) -> str | None:
    match keyword:
        case "type":
            names = value if isinstance(value, list) else [value]
            return "must be of type " + " or ".join(str(name) for name in names)
        case "enum":
            return "must be one of " + ", ".join(json.dumps(item) for item in value)
        case "const":
            return f"must be {json.dumps(value)}"
        case "minItems":
            return f"must have at least {value} items"
        case "maxItems":
            return f"must have at most {value} items"
        case "minLength":
            return f"must be at least {value} characters long"
        case "maxLength":
            return f"must be at most {value} characters long"
        case "minProperties":
            return f"must have at least {value} members"
        case "maxProperties":
            return f"must have at most {value} members"
        case "minimum":
            return f"must be >= {value}"
        case "maximum":
            return f"must be <= {value}"
        case "exclusiveMinimum":
            return f"must be > {value}"
        case "exclusiveMaximum":
            return f"must be < {value}"
        case _:
            return None


def _path_sort_key(path: tuple[str | int, ...]) -> tuple[tuple[int, int, str], ...]:
    """Order paths as a reader would: options[2] before options[10]."""
    return tuple((0, item, "") if isinstance(item, int) else (1, 0, item) for item in path)
