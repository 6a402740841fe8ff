"""The decision pack: SPEC §6 method, validation, pricing, and properties."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpp.packs import FieldError, PackContext, PackError, validate_inputs
from dpp.packs.decision import DecisionPack, decide, decision_cost_usd_micros


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def context() -> PackContext:
    return PackContext("run_dec", "ten_1", None, 30, 21_000, 1_000)


def criterion(id: str, weight: float = 1, direction: str = "maximize") -> dict[str, Any]:
    return {"id": id, "weight": weight, "direction": direction}


def option(id: str, label: str | None = None, **scores: float) -> dict[str, Any]:
    document: dict[str, Any] = {"id": id, "scores": scores}
    if label is not None:
        document["label"] = label
    return document


# Chosen so that every normalised value and weight is a binary fraction:
# the expected numbers below are exact.
VENDORS: dict[str, Any] = {
    "question": "Which vendor should we pick?",
    "criteria": [
        criterion("price", 1, "minimize"),
        criterion("quality", 1),
        criterion("support", 2),
    ],
    "options": [
        option("a", "Acme", price=100, quality=8, support=3),
        option("b", "Bolt", price=200, quality=10, support=5),
        option("c", price=300, quality=6, support=4),
    ],
}


def by_id(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["option_id"]: entry for entry in result["ranking"]}


# --- the SPEC's worked properties -----------------------------------------


def test_worked_example() -> None:
    result = decide(VENDORS)
    assert set(result) == {"winner", "ranking", "rationale", "method"}
    assert result["winner"] == "b"
    assert result["method"] == "weighted-sum/min-max"
    assert result["ranking"] == [
        {
            "option_id": "b",
            "rank": 1,
            "score": 0.875,
            "breakdown": {"price": 0.125, "quality": 0.25, "support": 0.5},
        },
        {
            "option_id": "a",
            "rank": 2,
            "score": 0.375,
            "breakdown": {"price": 0.25, "quality": 0.125, "support": 0.0},
        },
        {
            "option_id": "c",
            "rank": 3,
            "score": 0.25,
            "breakdown": {"price": 0.0, "quality": 0.0, "support": 0.25},
        },
    ]


def test_weights_are_normalised_to_sum_one() -> None:
    scaled = copy.deepcopy(VENDORS)
    for item in scaled["criteria"]:
        item["weight"] *= 1_000
    assert decide(scaled) == decide(VENDORS)
    # The best option on a lone criterion gets the whole weight: 1.
    lone = {"criteria": [criterion("x", 7)], "options": [option("p", x=1), option("q", x=2)]}
    assert by_id(decide(lone))["q"]["score"] == 1.0


def test_minimize_flips_the_scale() -> None:
    options = [option("cheap", cost=10), option("mid", cost=20), option("dear", cost=30)]
    minimized = decide({"criteria": [criterion("cost", 1, "minimize")], "options": options})
    assert [(e["option_id"], e["score"]) for e in minimized["ranking"]] == [
        ("cheap", 1.0),
        ("mid", 0.5),
        ("dear", 0.0),
    ]
    maximized = decide({"criteria": [criterion("cost", 1, "maximize")], "options": options})
    assert [(e["option_id"], e["score"]) for e in maximized["ranking"]] == [
        ("dear", 1.0),
        ("mid", 0.5),
        ("cheap", 0.0),
    ]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_all_equal_values_give_one(direction: str) -> None:
    inputs = {
        "criteria": [criterion("flat", 3, direction), criterion("x", 1)],
        "options": [option("p", flat=5, x=0), option("q", flat=5, x=1)],
    }
    for entry in decide(inputs)["ranking"]:
        assert entry["breakdown"]["flat"] == 0.75  # weight 3/4 times 1


def test_breakdown_sums_to_score() -> None:
    inputs = {
        "criteria": [criterion("a", 0.3), criterion("b", 1 / 7, "minimize"), criterion("c", 2)],
        "options": [
            option("x", a=1.1, b=2.2, c=3.3),
            option("y", a=0.1, b=9.9, c=0.5),
            option("z", a=5, b=-3, c=1e-9),
        ],
    }
    for entry in decide(inputs)["ranking"]:
        assert math.isclose(sum(entry["breakdown"].values()), entry["score"], abs_tol=1e-9)


def test_ties_keep_input_order_with_distinct_ranks() -> None:
    inputs = {
        "criteria": [criterion("x"), criterion("y")],
        "options": [
            option("zed", x=1, y=0),
            option("yak", x=0, y=1),
            option("top", x=1, y=1),
            option("ant", x=0.5, y=0.5),
        ],
    }
    ranking = decide(inputs)["ranking"]
    assert [(e["option_id"], e["rank"], e["score"]) for e in ranking] == [
        ("top", 1, 1.0),
        ("zed", 2, 0.5),
        ("yak", 3, 0.5),
        ("ant", 4, 0.5),
    ]


def test_mathematical_ties_survive_float_rounding() -> None:
    """0.1 + 0.2 != 0.3 in binary; scores are rounded before ranking."""
    inputs = {
        "criteria": [criterion("x"), criterion("y")],
        "options": [
            option("first", x=0.3, y=0),
            option("second", x=0.1, y=0.2),
            option("span", x=0, y=0),
            option("top", x=1, y=1),
        ],
    }
    ranking = decide(inputs)["ranking"]
    assert [e["option_id"] for e in ranking] == ["top", "first", "second", "span"]
    assert ranking[1]["score"] == ranking[2]["score"]


def test_largest_problem_ranks_one_to_n() -> None:
    criteria = [criterion(f"c{j}", j + 1, ("maximize", "minimize")[j % 2]) for j in range(50)]
    options = [
        option(f"o{i}", **{f"c{j}": (i * 7 + j * 3) % 11 for j in range(50)}) for i in range(100)
    ]
    inputs = {"criteria": criteria, "options": options}
    assert validate_inputs(DecisionPack(), inputs) == []
    ranking = decide(inputs)["ranking"]
    assert [entry["rank"] for entry in ranking] == list(range(1, 101))
    assert sorted(entry["option_id"] for entry in ranking) == sorted(o["id"] for o in options)


# --- rationale -------------------------------------------------------------


def test_rationale_explains_the_winner() -> None:
    rationale = decide(VENDORS)["rationale"]
    assert rationale.startswith('For the question "Which vendor should we pick?", "Bolt" (b)')
    assert 'ahead of "Acme" (a) (0.375) by 0.500' in rationale
    assert '"support" (+0.500)' in rationale  # its largest contribution
    assert '"Acme" (a) is stronger on "price" (+0.125), but not by enough' in rationale
    assert "min-max" in rationale


def test_rationale_is_deterministic_and_question_is_optional() -> None:
    without_question = {key: value for key, value in VENDORS.items() if key != "question"}
    first, second = decide(without_question), decide(copy.deepcopy(without_question))
    assert first["rationale"] == second["rationale"]
    assert first["rationale"].startswith('"Bolt" (b) ranks first of 3 options')


def test_rationale_names_ties_and_indifference() -> None:
    tied = {
        "criteria": [criterion("x"), criterion("y")],
        "options": [option("p", x=1, y=0), option("q", x=0, y=1)],
    }
    assert "tied with" in decide(tied)["rationale"]
    assert "input order" in decide(tied)["rationale"]
    flat = {"criteria": [criterion("x")], "options": [option("p", x=1), option("q", x=1)]}
    assert "every option scores the same on every criterion" in decide(flat)["rationale"]


# --- execution and pricing -------------------------------------------------


async def test_execute_returns_the_decision_priced_per_cell(anyio_backend: str) -> None:
    output = await DecisionPack().execute(VENDORS, context())
    assert output.content_type == "application/json"
    assert orjson.loads(output.body) == decide(VENDORS)
    assert output.actual_cost_usd_micros == 1_000 + 200 * 3 * 3


async def test_execute_refuses_invalid_inputs_as_a_pack_error(anyio_backend: str) -> None:
    broken = copy.deepcopy(VENDORS)
    del broken["options"][1]["scores"]["quality"]
    with pytest.raises(PackError) as caught:
        await DecisionPack().execute(broken, context())
    assert caught.value.title == "Invalid decision inputs"
    assert "inputs.options[1].scores.quality" in caught.value.detail


def test_prices() -> None:
    pack = DecisionPack.from_environment({})
    assert pack.minimum_fee_usd_micros == 1_000
    assert pack.default_reservation_usd_micros == 21_000 == decision_cost_usd_micros(10, 10)
    assert pack.max_reservation_usd_micros == 1_001_000 == decision_cost_usd_micros(100, 50)
    assert pack.default_timebox_sec == 30
    assert pack.pricing == {
        "model": "per_cell",
        "base_usd_micros": 1_000,
        "usd_micros_per_option_criterion": 200,
    }
    assert pack.estimate_cost_usd_micros(VENDORS) == 2_800
    assert decision_cost_usd_micros(2, 1) == 1_400


# --- validation ------------------------------------------------------------


def with_change(change: Any) -> dict[str, Any]:
    inputs = copy.deepcopy(VENDORS)
    change(inputs)
    return inputs


def _set(path: list[Any], value: Any) -> Any:
    def change(inputs: Any) -> None:
        target = inputs
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            _set(["criteria", 2, "id"], "price"),
            [
                FieldError(
                    "inputs.criteria[2].id",
                    'duplicate criterion id "price" (first used at inputs.criteria[0].id)',
                ),
                *[
                    FieldError(f"inputs.options[{i}].scores.support", 'unknown criterion "support"')
                    for i in range(3)
                ],
            ],
        ),
        (
            _set(["options", 2, "id"], "a"),
            [
                FieldError(
                    "inputs.options[2].id",
                    'duplicate option id "a" (first used at inputs.options[0].id)',
                )
            ],
        ),
        (
            lambda inputs: inputs["options"][1]["scores"].pop("quality"),
            [
                FieldError(
                    "inputs.options[1].scores.quality", 'missing score for criterion "quality"'
                )
            ],
        ),
        (
            _set(["options", 0, "scores", "color"], 3),
            [FieldError("inputs.options[0].scores.color", 'unknown criterion "color"')],
        ),
        (
            _set(["options", 0, "scores", "price"], math.nan),
            [
                FieldError(
                    "inputs.options[0].scores.price",
                    "must be a finite number (NaN and Infinity are not JSON)",
                )
            ],
        ),
        (
            _set(["criteria", 0, "weight"], 0),
            [FieldError("inputs.criteria[0].weight", "must be > 0")],
        ),
        (
            _set(["criteria", 0, "weight"], -1),
            [FieldError("inputs.criteria[0].weight", "must be > 0")],
        ),
        (
            _set(["criteria", 0, "weight"], 1e16),
            [FieldError("inputs.criteria[0].weight", "must be <= 1000000000000000.0")],
        ),
        (
            _set(["criteria", 0, "direction"], "up"),
            [FieldError("inputs.criteria[0].direction", 'must be one of "maximize", "minimize"')],
        ),
        (
            _set(["criteria", 0, "id"], ""),
            [FieldError("inputs.criteria[0].id", "must be at least 1 characters long")],
        ),
        (
            _set(["options", 0, "id"], "x" * 129),
            [FieldError("inputs.options[0].id", "must be at most 128 characters long")],
        ),
        (
            _set(["options", 0, "scores", "price"], True),
            [FieldError("inputs.options[0].scores.price", "must be of type number")],
        ),
        (
            _set(["options", 0, "scores", "price"], "cheap"),
            [FieldError("inputs.options[0].scores.price", "must be of type number")],
        ),
        (
            _set(["options", 0, "scores", "price"], -1e16),
            [FieldError("inputs.options[0].scores.price", "must be >= -1000000000000000.0")],
        ),
        (
            _set(["question"], "?" * 1_001),
            [FieldError("inputs.question", "must be at most 1000 characters long")],
        ),
        (
            _set(["options", 0, "label"], 5),
            [FieldError("inputs.options[0].label", "must be of type string")],
        ),
        (lambda inputs: inputs["options"].pop(), []),  # two options are enough
        (
            lambda inputs: del_items(inputs["options"], 2),
            [FieldError("inputs.options", "must have at least 2 items")],
        ),
        (
            _set(["options"], [option(f"o{i}", price=1, quality=1, support=1) for i in range(101)]),
            [FieldError("inputs.options", "must have at most 100 items")],
        ),
        (_set(["criteria"], []), [FieldError("inputs.criteria", "must have at least 1 items")]),
        (
            _set(["options", 0, "rating"], 5),
            [
                FieldError(
                    "inputs.options[0]",
                    "Additional properties are not allowed ('rating' was unexpected)",
                )
            ],
        ),
    ],
)
def test_validation_errors_name_the_field(change: Any, expected: list[FieldError]) -> None:
    assert validate_inputs(DecisionPack(), with_change(change)) == expected


def del_items(items: list[Any], count: int) -> None:
    del items[:count]


def test_fifty_one_criteria_are_refused() -> None:
    inputs = {"criteria": [criterion(f"c{j}") for j in range(51)], "options": []}
    assert FieldError("inputs.criteria", "must have at most 50 items") in validate_inputs(
        DecisionPack(), inputs
    )


def test_keys_that_need_quoting_are_rendered_unambiguously() -> None:
    inputs = {
        "criteria": [criterion("unit cost")],
        "options": [option("p", **{"unit cost": 1}), option("q", **{"unit.cost": 1})],
    }
    assert validate_inputs(DecisionPack(), inputs) == [
        FieldError(
            'inputs.options[1].scores["unit cost"]', 'missing score for criterion "unit cost"'
        ),
        FieldError('inputs.options[1].scores["unit.cost"]', 'unknown criterion "unit.cost"'),
    ]


# --- properties ------------------------------------------------------------

weights = (
    st.integers(1, 10**6)
    | st.floats(min_value=0, max_value=1e15, exclude_min=True, allow_nan=False)
    | st.sampled_from([0.1, 1, 2.5])
)
# Small integers make ties frequent; the bounds are the schema's.
scores = (
    st.integers(0, 3)
    | st.integers(-(10**15), 10**15)
    | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
)


# What a client can send that Postgres stores: no NUL, no unpaired surrogate
# (json_value_errors refuses those before any pack sees them).
STORABLE_TEXT = st.characters(codec="utf-8", exclude_characters="\x00")


@st.composite
def decision_inputs(draw: st.DrawFn) -> dict[str, Any]:
    criterion_ids = draw(
        st.lists(
            st.text(STORABLE_TEXT, min_size=1, max_size=6), min_size=1, max_size=8, unique=True
        )
    )
    option_ids = draw(
        st.lists(
            st.text(STORABLE_TEXT, min_size=1, max_size=6), min_size=2, max_size=12, unique=True
        )
    )
    inputs: dict[str, Any] = {
        "criteria": [
            {
                "id": criterion_id,
                "weight": draw(weights),
                "direction": draw(st.sampled_from(["maximize", "minimize"])),
            }
            for criterion_id in criterion_ids
        ],
        "options": [
            {"id": option_id, "scores": {c: draw(scores) for c in criterion_ids}}
            for option_id in option_ids
        ],
    }
    if draw(st.booleans()):
        inputs["question"] = draw(st.text(STORABLE_TEXT, max_size=20))
    return inputs


@settings(max_examples=300, deadline=None)
@given(inputs=decision_inputs())
def test_decision_properties(inputs: dict[str, Any]) -> None:
    assert validate_inputs(DecisionPack(), inputs) == []
    result = decide(inputs)
    ranking = result["ranking"]
    option_ids = [o["id"] for o in inputs["options"]]
    criterion_ids = [c["id"] for c in inputs["criteria"]]
    position = {option_id: index for index, option_id in enumerate(option_ids)}

    assert sorted(e["option_id"] for e in ranking) == sorted(option_ids)  # a permutation
    assert result["winner"] == ranking[0]["option_id"]
    assert [e["rank"] for e in ranking] == list(range(1, len(option_ids) + 1))
    for entry in ranking:
        assert 0.0 <= entry["score"] <= 1.0
        assert list(entry["breakdown"]) == criterion_ids
        assert all(value >= 0.0 for value in entry["breakdown"].values())
        assert math.isclose(sum(entry["breakdown"].values()), entry["score"], abs_tol=1e-9)
    for better, worse in itertools.pairwise(ranking):
        assert better["score"] >= worse["score"]
        if better["score"] == worse["score"]:  # ties keep input order
            assert position[better["option_id"]] < position[worse["option_id"]]
    assert isinstance(result["rationale"], str) and result["rationale"]
    assert decide(copy.deepcopy(inputs)) == result  # deterministic
    orjson.dumps(result)  # storable


@settings(max_examples=100, deadline=None)
@given(inputs=decision_inputs(), factor=st.integers(1, 1_000))
def test_scaling_all_weights_changes_nothing(inputs: dict[str, Any], factor: int) -> None:
    scaled = copy.deepcopy(inputs)
    for item in scaled["criteria"]:
        item["weight"] = min(item["weight"] * factor, 1e15)
    if any(
        item["weight"] != original["weight"] * factor
        for item, original in zip(scaled["criteria"], inputs["criteria"], strict=True)
    ):
        return  # clipped at the bound: not a pure rescaling
    original_scores = {e["option_id"]: e["score"] for e in decide(inputs)["ranking"]}
    scaled_scores = {e["option_id"]: e["score"] for e in decide(scaled)["ranking"]}
    for option_id, score in original_scores.items():
        assert math.isclose(scaled_scores[option_id], score, abs_tol=1e-9)
