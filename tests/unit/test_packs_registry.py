"""Pack registry: entry-point discovery, the catalog, and input validation."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpp.packs import (
    FIELD_ERRORS_MAX,
    INPUT_DEPTH_MAX,
    DuplicatePackTypeError,
    FieldError,
    PackConfigError,
    PackContext,
    PackDefinitionError,
    PackError,
    PackOutput,
    PackRegistry,
    check_pack,
    field_path,
    json_value_errors,
    storable_text,
    validate_inputs,
)
from dpp.packs import registry as registry_module
from dpp.packs.decision import DecisionPack
from dpp.packs.echo import EchoPack
from dpp.packs.webhook import WebhookPack


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


CATALOG_KEYS = {
    "pack_type",
    "description",
    "input_schema",
    "minimum_fee_usd_micros",
    "default_reservation_usd_micros",
    "max_reservation_usd_micros",
    "default_timebox_sec",
    "pricing",
}


class ThirdPartyPack:
    """A well-formed pack from an operator's own package."""

    pack_type = "third-party"
    description = "Counts the keys of its inputs."
    input_schema: dict[str, Any] = {"type": "object"}
    minimum_fee_usd_micros = 0
    default_reservation_usd_micros = 10
    max_reservation_usd_micros = 10
    default_timebox_sec = 5
    pricing: dict[str, Any] = {"model": "fixed", "usd_micros_per_run": 10}

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ThirdPartyPack:
        return cls()

    def validate(self, inputs: Any) -> list[FieldError]:
        return []

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        return 10

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        return PackOutput(orjson.dumps(len(inputs)), "application/json", 10)


class NoFactory:
    """Names a class but forgot `from_environment`."""


class ExplodingFactory:
    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> None:
        raise RuntimeError("bug in a third-party pack")


class GreedyPack(ThirdPartyPack):
    """Breaks the price invariant: minimum fee above the default reservation."""

    pack_type = "greedy"
    minimum_fee_usd_micros = 11

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> GreedyPack:
        return cls()


class MisconfiguredPack(ThirdPartyPack):
    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> MisconfiguredPack:
        raise PackConfigError("THIRD_PARTY_TOKEN must be set")


class ImpostorEcho(ThirdPartyPack):
    """Claims a built-in pack type, which could change prices under tenants."""

    pack_type = "echo"

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ImpostorEcho:
        return cls()


def entry_point(name: str, target: str) -> EntryPoint:
    return EntryPoint(name=name, value=target, group="dpp.packs")


HERE = __name__


def use_entry_points(monkeypatch: pytest.MonkeyPatch, *extra: EntryPoint) -> None:
    """The real (built-in) entry points plus `extra` ones."""
    real = registry_module._entry_points()
    monkeypatch.setattr(registry_module, "_entry_points", lambda: [*real, *extra])


# --- discovery -------------------------------------------------------------


def test_builtin_entry_points_are_installed() -> None:
    names = {ep.name for ep in registry_module._entry_points()}
    assert {"echo", "decision", "webhook"} <= names


def test_load_without_webhook_url_offers_echo_and_decision_only() -> None:
    registry = PackRegistry.load({})
    assert registry.pack_types() == ["decision", "echo"]
    assert "webhook" not in registry
    assert registry.get("webhook") is None
    assert isinstance(registry.get("echo"), EchoPack)
    assert isinstance(registry.get("decision"), DecisionPack)


def test_load_with_webhook_url_offers_webhook() -> None:
    registry = PackRegistry.load(
        {"DPP_WEBHOOK_URL": "https://hooks.example/run", "DPP_WEBHOOK_TIMEOUT_SEC": "3"}
    )
    assert registry.pack_types() == ["decision", "echo", "webhook"]
    webhook = registry.get("webhook")
    assert isinstance(webhook, WebhookPack)
    assert webhook.timeout_sec == 3


def test_blank_webhook_url_counts_as_unset() -> None:
    assert "webhook" not in PackRegistry.load({"DPP_WEBHOOK_URL": "  "})


def test_bad_webhook_configuration_stops_startup_without_echoing_the_value() -> None:
    with pytest.raises(PackConfigError, match="DPP_WEBHOOK_URL") as caught:
        PackRegistry.load({"DPP_WEBHOOK_URL": "ftp://user:hunter2@files.example/"})
    assert "hunter2" not in str(caught.value)
    with pytest.raises(PackConfigError, match="DPP_WEBHOOK_TIMEOUT_SEC"):
        PackRegistry.load(
            {"DPP_WEBHOOK_URL": "https://hooks.example/", "DPP_WEBHOOK_TIMEOUT_SEC": "soon"}
        )


def test_broken_third_party_entry_points_are_logged_and_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_entry_points(
        monkeypatch,
        entry_point("missing", "dpp_no_such_module.packs:Pack"),
        entry_point("nofactory", f"{HERE}:NoFactory"),
        entry_point("exploding", f"{HERE}:ExplodingFactory"),
        entry_point("greedy", f"{HERE}:GreedyPack"),
        entry_point("third-party", f"{HERE}:ThirdPartyPack"),
    )
    with caplog.at_level(logging.INFO, logger="dpp.packs"):
        registry = PackRegistry.load({})
    assert registry.pack_types() == ["decision", "echo", "third-party"]
    errors = [r for r in caplog.records if r.name == "dpp.packs" and r.levelno >= logging.ERROR]
    skipped = " ".join(record.getMessage() for record in errors)
    for name in ("missing", "nofactory", "exploding", "greedy"):
        assert f"[{name} = " in skipped
    assert "minimum_fee (11) <= default_reservation (10)" in skipped


def test_pack_configuration_error_from_a_third_party_pack_stops_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_entry_points(monkeypatch, entry_point("misconfigured", f"{HERE}:MisconfiguredPack"))
    with pytest.raises(PackConfigError, match="THIRD_PARTY_TOKEN"):
        PackRegistry.load({})


def test_duplicate_pack_type_stops_startup_naming_both_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_entry_points(monkeypatch, entry_point("impostor", f"{HERE}:ImpostorEcho"))
    with pytest.raises(DuplicatePackTypeError) as caught:
        PackRegistry.load({})
    assert "dpp.packs.echo:EchoPack" in str(caught.value)
    assert f"{HERE}:ImpostorEcho" in str(caught.value)


def test_the_same_entry_point_seen_twice_is_not_a_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A package visible twice on sys.path must not stop startup."""
    twice = [entry_point("echo", "dpp.packs.echo:EchoPack")] * 2
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda group: twice)
    assert PackRegistry.load({}).pack_types() == ["echo"]


def test_duplicate_pack_type_in_constructor() -> None:
    with pytest.raises(DuplicatePackTypeError, match="'echo'"):
        PackRegistry([EchoPack(), EchoPack()])


async def test_loaded_packs_execute(anyio_backend: str) -> None:
    registry = PackRegistry.load({})
    echo = registry.get("echo")
    assert echo is not None
    ctx = PackContext("run_1", "ten_1", None, 10, 1_000, 100)
    output = await echo.execute({"payload": [1, "two"]}, ctx)
    assert orjson.loads(output.body) == {"payload": [1, "two"]}


# --- the contract checked at registration ---------------------------------


def mutated(**attributes: Any) -> ThirdPartyPack:
    pack = ThirdPartyPack()
    for name, value in attributes.items():
        setattr(pack, name, value)
    return pack


@pytest.mark.parametrize(
    ("attributes", "complaint"),
    [
        ({"pack_type": "Bad Type"}, "pack_type"),
        ({"pack_type": ""}, "pack_type"),
        ({"description": ""}, "description"),
        ({"input_schema": {"type": "no-such-type"}}, "input_schema is invalid"),
        ({"input_schema": []}, "input_schema must be a dict"),
        ({"pricing": {"rate": {1, 2}}}, "pricing is not JSON-serialisable"),
        ({"minimum_fee_usd_micros": 1.0}, "int USD micros"),
        ({"max_reservation_usd_micros": True}, "int USD micros"),
        ({"minimum_fee_usd_micros": -1}, "0 <= minimum_fee"),
        ({"minimum_fee_usd_micros": 11}, "minimum_fee (11) <= default_reservation (10)"),
        ({"default_reservation_usd_micros": 11}, "default_reservation (11) <= max_reservation"),
        ({"max_reservation_usd_micros": 2**63}, "max_reservation"),
        ({"default_timebox_sec": 0}, "default_timebox_sec"),
        ({"default_timebox_sec": 3601}, "default_timebox_sec"),
        ({"default_timebox_sec": 30.0}, "default_timebox_sec"),
        ({"validate": None}, "validate must be callable"),
        ({"execute": lambda inputs, ctx: None}, "execute must be an `async def`"),
    ],
)
def test_check_pack_rejects_contract_violations(attributes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(PackDefinitionError) as caught:
        check_pack(mutated(**attributes))
    assert complaint in str(caught.value)
    with pytest.raises(PackDefinitionError):
        PackRegistry([mutated(**attributes)])


def test_builtin_packs_honour_the_contract() -> None:
    for pack in (EchoPack(), DecisionPack(), WebhookPack("https://hooks.example/")):
        check_pack(pack)


# --- catalog ---------------------------------------------------------------


def test_catalog_has_the_exact_member_shape_sorted_by_pack_type() -> None:
    registry = PackRegistry.load({"DPP_WEBHOOK_URL": "https://hooks.example/"})
    catalog = registry.catalog()
    assert [entry["pack_type"] for entry in catalog] == ["decision", "echo", "webhook"]
    for entry in catalog:
        assert set(entry) == CATALOG_KEYS
        for key in CATALOG_KEYS - {"pack_type", "description", "input_schema", "pricing"}:
            assert type(entry[key]) is int, key
        assert (
            0
            <= entry["minimum_fee_usd_micros"]
            <= entry["default_reservation_usd_micros"]
            <= entry["max_reservation_usd_micros"]
        )
        assert 1 <= entry["default_timebox_sec"] <= 3600
    orjson.dumps({"packs": catalog})  # serialisable as the GET /v1/packs body


def test_catalog_prices_of_builtin_packs() -> None:
    registry = PackRegistry.load({"DPP_WEBHOOK_URL": "https://hooks.example/"})
    prices = {
        entry["pack_type"]: (
            entry["minimum_fee_usd_micros"],
            entry["default_reservation_usd_micros"],
            entry["max_reservation_usd_micros"],
            entry["default_timebox_sec"],
        )
        for entry in registry.catalog()
    }
    assert prices == {
        "decision": (1_000, 21_000, 1_001_000, 30),
        "echo": (100, 1_000, 1_000_000, 60),
        "webhook": (1_000, 100_000, 10_000_000, 30),
    }


def test_catalog_documents_are_copies() -> None:
    registry = PackRegistry([EchoPack()])
    registry.catalog()[0]["input_schema"]["properties"].clear()
    registry.catalog()[0]["pricing"]["usd_micros_per_run"] = 0
    entry = registry.catalog()[0]
    assert "payload" in entry["input_schema"]["properties"]
    assert entry["pricing"]["usd_micros_per_run"] == 1_000


def test_registry_container_protocol() -> None:
    registry = PackRegistry([DecisionPack(), EchoPack()])
    assert len(registry) == 2
    assert "echo" in registry and "nope" not in registry and 3 not in registry
    assert [pack.pack_type for pack in registry] == ["decision", "echo"]


# --- validate_inputs -------------------------------------------------------


def test_field_path_rendering() -> None:
    assert field_path() == "inputs"
    assert field_path("options", 2, "scores", "cost") == "inputs.options[2].scores.cost"
    assert field_path("scores", "unit cost") == 'inputs.scores["unit cost"]'
    assert field_path("a.b", "") == 'inputs["a.b"][""]'
    assert field_path("k", 0, root="metadata") == "metadata.k[0]"
    # a member of the body itself: the name alone, or bracketed when it needs it
    assert field_path("inputs", root="") == "inputs"
    assert field_path("", root="") == '[""]'
    assert field_path("a.b", "c", root="") == '["a.b"].c'


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ("a\x00b", "inputs.payload"),
        (["ok", "\x00"], "inputs.payload[1]"),
        ({"\x00": 1}, 'inputs.payload["\\u0000"]'),
        ({"k": "\ud800"}, "inputs.payload.k"),
        ({"\udc00": 1}, 'inputs.payload["\\udc00"]'),
    ],
    ids=["nul", "nul-in-list", "nul-in-key", "lone-surrogate", "lone-surrogate-key"],
)
def test_what_postgres_cannot_store_is_refused(payload: Any, field: str) -> None:
    [error] = validate_inputs(EchoPack(), {"payload": payload})
    assert error.field == field
    assert "NUL" in error.message or "surrogate" in error.message


def test_storable_values_named_anywhere_are_checked_under_their_root() -> None:
    errors = json_value_errors({"a": {"b": "\x00"}, "c": float("nan")}, root="metadata")
    assert [error.field for error in errors] == ["metadata.a.b", "metadata.c"]
    assert json_value_errors({"a": "fine \u2028 \U0001f600"}, root="metadata") == []


def test_pack_error_texts_are_made_storable() -> None:
    error = PackError("bad\x00title", "detail \ud800 here")
    assert error.title == "bad\ufffdtitle"
    assert error.detail == "detail \ufffd here"
    assert storable_text("plain") == "plain"


def test_schema_errors_name_the_field_and_come_sorted() -> None:
    errors = validate_inputs(DecisionPack(), {"criteria": "many", "question": 7})
    assert errors == [
        FieldError("inputs.criteria", "must be of type array"),
        FieldError("inputs.options", "is required"),
        FieldError("inputs.question", "must be of type string"),
    ]


def test_array_indices_sort_numerically() -> None:
    options = [{"id": f"o{i}", "scores": {"c": 1}} for i in range(12)]
    options[2]["scores"]["c"] = "high"
    options[10]["scores"]["c"] = "low"
    inputs = {"criteria": [{"id": "c", "weight": 1, "direction": "maximize"}], "options": options}
    assert [error.field for error in validate_inputs(DecisionPack(), inputs)] == [
        "inputs.options[2].scores.c",
        "inputs.options[10].scores.c",
    ]


def test_messages_do_not_echo_large_inputs() -> None:
    criteria = [{"id": f"c{i}", "weight": 1, "direction": "maximize"} for i in range(51)]
    [error] = validate_inputs(DecisionPack(), {"criteria": criteria, "options": []})[:1]
    assert error == FieldError("inputs.criteria", "must have at most 50 items")


def test_error_count_is_capped() -> None:
    options = [{"id": "", "scores": {}} for _ in range(60)]
    errors = validate_inputs(
        DecisionPack(),
        {"criteria": [{"id": "c", "weight": 1, "direction": "maximize"}], "options": options},
    )
    assert len(errors) == FIELD_ERRORS_MAX


def test_semantic_validation_runs_only_after_the_schema_passed() -> None:
    criterion = {"id": "c", "weight": 1, "direction": "maximize"}
    duplicate_ids = {"criteria": [criterion, criterion], "options": []}
    # The schema fails (too few options): the duplicate is not reported yet.
    assert [e.field for e in validate_inputs(DecisionPack(), duplicate_ids)] == ["inputs.options"]


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        (math.nan, "inputs.payload", "finite"),
        ([1, math.inf], "inputs.payload[1]", "finite"),
        ({"n": 2**64}, "inputs.payload.n", "out of the supported range"),
        ({"n": -(2**63) - 1}, "inputs.payload.n", "out of the supported range"),
        ((1, 2), "inputs.payload", "not a JSON value"),
        ({1: "one"}, "inputs.payload", "keys must be strings"),
        ({"when": object()}, "inputs.payload.when", "not a JSON value"),
    ],
)
def test_values_that_are_not_plain_json_are_refused(payload: Any, field: str, message: str) -> None:
    [error] = validate_inputs(EchoPack(), {"payload": payload})
    assert error.field == field
    assert message in error.message


def test_extreme_but_encodable_integers_are_accepted() -> None:
    assert validate_inputs(EchoPack(), {"payload": [2**64 - 1, -(2**63)]}) == []


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: Any = "bottom"
    for _ in range(100_000):
        deep = [deep]
    [error] = validate_inputs(EchoPack(), {"payload": deep})
    assert error.message == f"nested deeper than {INPUT_DEPTH_MAX} levels"
    assert error.field == "inputs.payload" + "[0]" * (INPUT_DEPTH_MAX - 1)


def test_nesting_at_the_limit_is_accepted() -> None:
    deep: Any = 1
    for _ in range(INPUT_DEPTH_MAX - 1):  # plus the inputs object itself
        deep = {"a": deep}
    assert validate_inputs(EchoPack(), {"payload": deep}) == []


def test_validator_is_compiled_once_per_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    pack = EchoPack()
    PackRegistry([pack])
    compiled: list[object] = []
    original = registry_module.InputValidator
    monkeypatch.setattr(
        registry_module,
        "InputValidator",
        lambda schema: compiled.append(schema) or original(schema),
    )
    for _ in range(3):
        validate_inputs(pack, {"payload": 1})
    assert compiled == []
    validate_inputs(EchoPack(), {"payload": 1})  # another instance: compiled once
    validate_inputs(ThirdPartyPack(), {})
    assert len(compiled) == 2


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["maximize", "minimize", "c", "o", ""]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    *("payload", "delay_ms", "fail", "criteria", "options", "id", "weight"),
                    *("direction", "scores", "label", "question", "c", "o"),
                ]
            )
            | st.text(max_size=4),
            children,
            max_size=5,
        )
    ),
    max_leaves=40,
)

BUILTIN_PACKS = [EchoPack(), DecisionPack(), WebhookPack("https://hooks.example/")]


@settings(max_examples=300, deadline=None)
@given(inputs=json_values)
def test_validate_inputs_never_raises_on_any_json_value(inputs: Any) -> None:
    for pack in BUILTIN_PACKS:
        errors = validate_inputs(pack, inputs)
        assert len(errors) <= FIELD_ERRORS_MAX
        assert all(isinstance(error, FieldError) for error in errors)
        assert all(error.field.startswith("inputs") for error in errors)


numbers = st.integers(-5, 5) | st.floats() | st.integers() | st.booleans() | st.text(max_size=2)
ids = st.sampled_from(["a", "b", "c", "", "a b"])
decision_like = st.fixed_dictionaries(
    {
        "criteria": st.lists(
            st.fixed_dictionaries(
                {
                    "id": ids,
                    "weight": numbers,
                    "direction": st.sampled_from(["maximize", "minimize", "up"]),
                }
            ),
            min_size=0,
            max_size=4,
        ),
        "options": st.lists(
            st.fixed_dictionaries(
                {"id": ids, "scores": st.dictionaries(ids, numbers, max_size=4)},
                optional={"label": st.text(max_size=3)},
            ),
            min_size=0,
            max_size=5,
        ),
    },
    optional={"question": st.text(max_size=5)},
)


@settings(max_examples=300, deadline=None)
@given(inputs=decision_like)
def test_validate_inputs_never_raises_on_nearly_valid_decisions(inputs: dict[str, Any]) -> None:
    errors = validate_inputs(DecisionPack(), inputs)
    assert len(errors) <= FIELD_ERRORS_MAX


@pytest.mark.parametrize("delay_ms", [1.0, True, 2.5])
def test_an_integer_in_a_pack_schema_is_an_int_not_a_float_or_bool(delay_ms: object) -> None:
    """JSON Schema would count 1.0 as an integer; the echo pack would then assert on
    it mid-run (a FAILED run, charged). It is a 422 at the door instead."""
    [error] = validate_inputs(EchoPack(), {"payload": 1, "delay_ms": delay_ms})
    assert error == FieldError("inputs.delay_ms", "must be of type integer")
    assert validate_inputs(EchoPack(), {"payload": 1, "delay_ms": 1}) == []
