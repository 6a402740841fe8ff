"""Packs: the units of metered work DPP runs (SPEC §4).

The public surface is the contract in `dpp.packs.base` and the registry in
`dpp.packs.registry`. Concrete packs (`echo`, `decision`, `webhook`) are not
imported here: they are found through the ``dpp.packs`` entry-point group,
exactly like an operator's own packs, and the webhook pack pulls in aiohttp.
"""

from dpp.packs.base import (
    PACK_ERROR_TYPE,
    TIMEBOX_SEC_MAX,
    TIMEBOX_SEC_MIN,
    USD_MICROS_MAX,
    FieldError,
    Pack,
    PackConfigError,
    PackContext,
    PackDefinitionError,
    PackError,
    PackFactory,
    PackOutput,
    check_pack,
    field_path,
    storable_text,
)
from dpp.packs.registry import (
    ENTRY_POINT_GROUP,
    FIELD_ERRORS_MAX,
    INPUT_DEPTH_MAX,
    PACK,
    PACK_CATALOG,
    DuplicatePackTypeError,
    PackRegistry,
    json_value_errors,
    validate_inputs,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FIELD_ERRORS_MAX",
    "INPUT_DEPTH_MAX",
    "PACK",
    "PACK_CATALOG",
    "PACK_ERROR_TYPE",
    "TIMEBOX_SEC_MAX",
    "TIMEBOX_SEC_MIN",
    "USD_MICROS_MAX",
    "DuplicatePackTypeError",
    "FieldError",
    "Pack",
    "PackConfigError",
    "PackContext",
    "PackDefinitionError",
    "PackError",
    "PackFactory",
    "PackOutput",
    "PackRegistry",
    "check_pack",
    "field_path",
    "json_value_errors",
    "storable_text",
    "validate_inputs",
]
