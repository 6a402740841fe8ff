"""`decision`: multi-criteria decision analysis (SPEC §4, §6 "Decision pack").

Options are scored against weighted criteria with a weighted sum of min-max
normalised values. The scoring (`decide`) is a pure function so it can be
property-tested without an event loop; the pack wraps it with a price that
grows with options x criteria.

Two documented choices beyond the letter of the SPEC (see docs/packs.md):
scores and contributions are rounded to `SCORE_DECIMALS` places *before*
ranking, so options that tie mathematically also tie in floating point and
keep input order; and every number is bounded by `NUMBER_ABS_MAX` (below
2**53), so integer scores convert to floats exactly and no sum can overflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import anyio.lowlevel
import orjson

from dpp.packs.base import FieldError, PackContext, PackError, PackOutput, field_path
from dpp.packs.registry import validate_inputs

__all__ = ["DecisionPack", "decide", "decision_cost_usd_micros"]

OPTIONS_MIN = 2
OPTIONS_MAX = 100
CRITERIA_MIN = 1
CRITERIA_MAX = 50
ID_CHARS_MAX = 128
LABEL_CHARS_MAX = 200
QUESTION_CHARS_MAX = 1_000
NUMBER_ABS_MAX = 1e15  # < 2**53: integers up to here are exact as floats
SCORE_DECIMALS = 12
METHOD = "weighted-sum/min-max"

BASE_USD_MICROS = 1_000
USD_MICROS_PER_OPTION_CRITERION = 200

_RATIONALE_CRITERIA_MAX = 3  # name at most this many criteria per sentence
_PACK_ERROR_FIELDS_MAX = 5


def decision_cost_usd_micros(option_count: int, criterion_count: int) -> int:
    """The price of one run: a base plus a fee per scored cell (integers only)."""
    assert OPTIONS_MIN <= option_count <= OPTIONS_MAX, option_count
    assert CRITERIA_MIN <= criterion_count <= CRITERIA_MAX, criterion_count
    return BASE_USD_MICROS + USD_MICROS_PER_OPTION_CRITERION * option_count * criterion_count


_ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": ID_CHARS_MAX}
_NUMBER_SCHEMA = {"type": "number", "minimum": -NUMBER_ABS_MAX, "maximum": NUMBER_ABS_MAX}

INPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "question": {"type": "string", "maxLength": QUESTION_CHARS_MAX},
        "criteria": {
            "type": "array",
            "minItems": CRITERIA_MIN,
            "maxItems": CRITERIA_MAX,
            "items": {
                "type": "object",
                "properties": {
                    "id": _ID_SCHEMA,
                    "weight": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": NUMBER_ABS_MAX,
                    },
                    "direction": {"enum": ["maximize", "minimize"]},
                },
                "required": ["id", "weight", "direction"],
                "additionalProperties": False,
            },
        },
        "options": {
            "type": "array",
            "minItems": OPTIONS_MIN,
            "maxItems": OPTIONS_MAX,
            "items": {
                "type": "object",
                "properties": {
                    "id": _ID_SCHEMA,
                    "label": {"type": "string", "maxLength": LABEL_CHARS_MAX},
                    "scores": {"type": "object", "additionalProperties": _NUMBER_SCHEMA},
                },
                "required": ["id", "scores"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["criteria", "options"],
    "additionalProperties": False,
}


class DecisionPack:
    """Weighted-sum MCDA. Pure computation: runs on any anyio backend."""

    pack_type = "decision"
    description = (
        "Multi-criteria decision analysis: ranks 2-100 options scored against 1-50 weighted "
        "criteria (weighted sum of min-max normalised scores) and returns the ranking, the "
        "per-criterion breakdown and a rationale. Price grows with options x criteria."
    )
    input_schema = INPUT_SCHEMA
    minimum_fee_usd_micros = BASE_USD_MICROS
    default_reservation_usd_micros = decision_cost_usd_micros(10, 10)  # 21_000
    max_reservation_usd_micros = decision_cost_usd_micros(OPTIONS_MAX, CRITERIA_MAX)
    default_timebox_sec = 30
    pricing: dict[str, Any] = {
        "model": "per_cell",
        "base_usd_micros": BASE_USD_MICROS,
        "usd_micros_per_option_criterion": USD_MICROS_PER_OPTION_CRITERION,
    }

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> DecisionPack:
        """Always available: the decision pack needs no settings."""
        return cls()

    def validate(self, inputs: Any) -> list[FieldError]:
        """Unique ids, exactly the listed criteria per option, finite numbers.

        Assumes the schema passed, so the shapes and bounds are known.
        """
        errors: list[FieldError] = []
        criterion_index: dict[str, int] = {}
        for index, criterion in enumerate(inputs["criteria"]):
            first = criterion_index.setdefault(criterion["id"], index)
            if first != index:
                errors.append(
                    FieldError(
                        field_path("criteria", index, "id"),
                        f"duplicate criterion id {json.dumps(criterion['id'])} "
                        f"(first used at {field_path('criteria', first, 'id')})",
                    )
                )
            if not _is_finite(criterion["weight"]):
                errors.append(
                    FieldError(field_path("criteria", index, "weight"), "must be a finite number")
                )
        option_index: dict[str, int] = {}
        for index, option in enumerate(inputs["options"]):
            first = option_index.setdefault(option["id"], index)
            if first != index:
                errors.append(
                    FieldError(
                        field_path("options", index, "id"),
                        f"duplicate option id {json.dumps(option['id'])} "
                        f"(first used at {field_path('options', first, 'id')})",
                    )
                )
            scores = option["scores"]
            for criterion_id in criterion_index:
                if criterion_id not in scores:
                    errors.append(
                        FieldError(
                            field_path("options", index, "scores", criterion_id),
                            f"missing score for criterion {json.dumps(criterion_id)}",
                        )
                    )
            for key, value in scores.items():
                path = field_path("options", index, "scores", key)
                if key not in criterion_index:
                    errors.append(FieldError(path, f"unknown criterion {json.dumps(key)}"))
                elif not _is_finite(value):
                    errors.append(FieldError(path, "must be a finite number"))
        return errors

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        return decision_cost_usd_micros(len(inputs["options"]), len(inputs["criteria"]))

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        """Rank the options. Re-validates: the pack may have changed since submit."""
        await anyio.lowlevel.checkpoint()
        errors = validate_inputs(self, inputs)
        if errors:
            shown = "; ".join(f"{e.field}: {e.message}" for e in errors[:_PACK_ERROR_FIELDS_MAX])
            raise PackError("Invalid decision inputs", shown)
        body = orjson.dumps(decide(inputs))
        cost_usd_micros = self.estimate_cost_usd_micros(inputs)
        assert self.minimum_fee_usd_micros <= cost_usd_micros <= self.max_reservation_usd_micros
        return PackOutput(
            body=body, content_type="application/json", actual_cost_usd_micros=cost_usd_micros
        )


def decide(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The decision document for inputs that passed `validate_inputs`.

    Weights are normalised to sum 1; each criterion's values are min-max
    normalised to [0, 1] (flipped for minimize; all-equal values give 1); an
    option's breakdown holds weight * normalised value and its score is their
    sum. Ranking is a stable sort on the score: ties keep input order, and
    ranks run 1..n without gaps or repeats.
    """
    criteria: Sequence[Mapping[str, Any]] = inputs["criteria"]
    options: Sequence[Mapping[str, Any]] = inputs["options"]
    assert CRITERIA_MIN <= len(criteria) <= CRITERIA_MAX, len(criteria)
    assert OPTIONS_MIN <= len(options) <= OPTIONS_MAX, len(options)
    weight_total = math.fsum(float(criterion["weight"]) for criterion in criteria)
    assert math.isfinite(weight_total) and weight_total > 0, weight_total
    weights = [float(criterion["weight"]) / weight_total for criterion in criteria]
    # normalised[j][i]: option i's value on criterion j, in [0, 1].
    normalised = [
        _min_max(
            [float(option["scores"][criterion["id"]]) for option in options],
            minimize=criterion["direction"] == "minimize",
        )
        for criterion in criteria
    ]
    breakdowns: list[dict[str, float]] = []
    scores: list[float] = []
    for i in range(len(options)):
        contributions = [weights[j] * normalised[j][i] for j in range(len(criteria))]
        # fsum of weights can exceed 1 by an ulp; a score is a share of 1.
        scores.append(round(min(1.0, math.fsum(contributions)), SCORE_DECIMALS))
        breakdowns.append(
            {
                criterion["id"]: round(contribution, SCORE_DECIMALS)
                for criterion, contribution in zip(criteria, contributions, strict=True)
            }
        )
    order = sorted(range(len(options)), key=lambda i: -scores[i])  # stable: ties keep order
    ranking = [
        {
            "option_id": options[i]["id"],
            "rank": rank,
            "score": scores[i],
            "breakdown": breakdowns[i],
        }
        for rank, i in enumerate(order, start=1)
    ]
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert [entry["rank"] for entry in ranking] == list(range(1, len(options) + 1))
    return {
        "winner": ranking[0]["option_id"],
        "ranking": ranking,
        "rationale": _rationale(
            inputs.get("question"), criteria, options, scores, breakdowns, order
        ),
        "method": METHOD,
    }


def _min_max(values: list[float], *, minimize: bool) -> list[float]:
    low, high = min(values), max(values)
    if low == high:
        return [1.0] * len(values)  # nothing separates the options on this criterion
    span = high - low
    # (high - v) rather than 1 - (v - low): exact at both ends, and rounding
    # is monotonic, so every result stays inside [0, 1].
    result = [(high - v) / span if minimize else (v - low) / span for v in values]
    assert all(0.0 <= value <= 1.0 for value in result), result
    return result


def _rationale(
    question: str | None,
    criteria: Sequence[Mapping[str, Any]],
    options: Sequence[Mapping[str, Any]],
    scores: Sequence[float],
    breakdowns: Sequence[Mapping[str, float]],
    order: Sequence[int],
) -> str:
    """A deterministic English explanation of the ranking (the same scores it shows)."""
    winner, runner_up = order[0], order[1]
    winner_name, runner_name = _option_name(options[winner]), _option_name(options[runner_up])
    sentences: list[str] = []
    opening = f'For the question "{question.strip()}", ' if question and question.strip() else ""
    lead = (
        f"{opening}{winner_name} ranks first of {len(options)} options with a score of "
        f"{_number(scores[winner])} out of 1"
    )
    tied = sum(1 for score in scores if score == scores[winner]) - 1
    if tied == len(options) - 1 and all(
        len({b[c["id"]] for b in breakdowns}) == 1 for c in criteria
    ):
        sentences.append(
            f"{lead}, but every option scores the same on every criterion, "
            "so the ranking simply follows input order."
        )
    elif tied:
        others = runner_name if tied == 1 else f"{tied} other options (next: {runner_name})"
        sentences.append(
            f"{lead}, tied with {others}; ties are broken by input order, where it comes first."
        )
    else:
        margin = scores[winner] - scores[runner_up]
        sentences.append(
            f"{lead}, ahead of {runner_name} ({_number(scores[runner_up])}) by {_number(margin)}."
        )
    strengths = _largest(breakdowns[winner])
    if strengths:
        covered = math.fsum(value for _, value in strengths)
        if covered >= scores[winner] * (1 - 1e-9):
            share = "all of its score"
        elif covered * 2 > scores[winner]:
            share = "most of its score"
        else:
            share = "the largest parts of its score"
        sentences.append(f"It earns {share} from {_criteria_list(strengths, sign='+')}.")
    gains = _largest(
        {c["id"]: breakdowns[winner][c["id"]] - breakdowns[runner_up][c["id"]] for c in criteria}
    )
    losses = _largest(
        {c["id"]: breakdowns[runner_up][c["id"]] - breakdowns[winner][c["id"]] for c in criteria}
    )
    if gains:
        sentences.append(
            f"Against {runner_name} it gains most on {_criteria_list(gains, sign='+')}."
        )
    if losses:
        sentences.append(
            f"{runner_name} is stronger on {_criteria_list(losses, sign='+')}"
            f"{', but not by enough' if scores[winner] > scores[runner_up] else ''}."
        )
    sentences.append(
        "Method: weights are normalised to sum to 1; each criterion's scores are min-max "
        "normalised to 0..1 (reversed for criteria to minimize; equal scores give 1); an "
        "option's score is the weighted sum of its normalised scores."
    )
    return " ".join(sentences)


def _largest(values: Mapping[str, float]) -> list[tuple[str, float]]:
    """The few largest positive entries, largest first, ties in criteria order."""
    positive = [(key, value) for key, value in values.items() if value > 0]
    positive.sort(key=lambda item: -item[1])
    return positive[:_RATIONALE_CRITERIA_MAX]


def _criteria_list(items: Sequence[tuple[str, float]], *, sign: str) -> str:
    parts = [f"{json.dumps(key, ensure_ascii=False)} ({sign}{_number(v)})" for key, v in items]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _option_name(option: Mapping[str, Any]) -> str:
    label = option.get("label")
    if label and label.strip() and label != option["id"]:
        return f"{json.dumps(label.strip(), ensure_ascii=False)} ({option['id']})"
    return json.dumps(option["id"], ensure_ascii=False)


def _number(value: float) -> str:
    """Three decimals, unless that would print a nonzero difference as 0.000."""
    if value == 0 or abs(value) >= 0.0005:
        return f"{value:.3f}"
    return f"{value:.1e}"


def _is_finite(value: object) -> bool:
    # ints are bounded by the schema; only floats can be NaN or infinite.
    return not isinstance(value, float) or math.isfinite(value)
