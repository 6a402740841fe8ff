"""deploy/: the Prometheus alerts and the Grafana dashboard name only metrics DPP
exports, parse as PromQL, and the alerts fire when they should (promtool)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from dpp.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
# Prometheus's own series, not DPP's: the scrape's health.
PROMETHEUS_OWN = frozenset({"up"})
# Grafana's range variables, as a window PromQL accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not a
    function call, a keyword, a label (in ``{}`` or a grouping) or a number."""
    text = _STRING.sub('""', expression)
    text = _BRACES.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_the_metric_name_parser() -> None:
    expression = (
        'sum by (le, pack_type) (rate(dpp_run_duration_seconds_bucket{route="/v1/x"}[5m]))'
        " / 1e6 and on (instance) up{job='dpp'} offset 5m > bool 0"
        " or histogram_quantile(0.95, dpp_a_total) unless max without (x) (dpp_b)"
    )
    assert metric_names(expression) == {
        "dpp_run_duration_seconds_bucket",
        "up",
        "dpp_a_total",
        "dpp_b",
    }


def exported_names() -> set[str]:
    """Every series name DPP's registry declares, with the suffixes the text
    format adds (``_total``, ``_bucket``/``_count``/``_sum``, ``_created``)."""
    registry = CollectorRegistry()
    Metrics.create(registry)
    names: set[str] = set()
    for family in registry.collect():
        match family.type:
            case "counter":
                names |= {f"{family.name}_total", f"{family.name}_created"}
            case "histogram":
                names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum")}
                names.add(f"{family.name}_created")
            case "gauge":
                names.add(family.name)
            case other:
                raise AssertionError(f"{family.name}: a {other}; teach this test its suffixes")
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def as_promql(expression: str) -> str:
    for variable, window in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, window)
    assert "$" not in expression, f"an unknown Grafana variable in {expression}"
    return expression


def test_every_alert_names_only_metrics_dpp_exports() -> None:
    exported = exported_names()
    rules = alert_rules()
    assert rules
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - exported - PROMETHEUS_OWN
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} not exported by DPP"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        anchor = rule["alert"].lower()
        assert rule["annotations"]["runbook"] == f"docs/operations.md#{anchor}"


def test_every_alert_has_its_runbook_in_the_operations_guide() -> None:
    guide = (DEPLOY.parent / "docs" / "operations.md").read_text()
    headings = set(re.findall(r"^#### `?(Dpp\w+)`?", guide, re.MULTILINE))
    assert {rule["alert"] for rule in alert_rules()} <= headings


def test_the_issue_asks_for_these_alerts() -> None:
    alerts = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "dpp_audit_required_runs" in alerts["DppAuditRequiredRuns"]
    assert "dpp_audit_violations" in alerts["DppAuditViolations"]
    assert "dpp_dependency_up" in alerts["DppNotReady"]
    assert "dpp_queue_oldest_age_seconds" in alerts["DppQueueAgeHigh"]
    assert "dpp_supervisor_restarts_total" in alerts["DppRestartIntensity"]
    assert "dpp_actor_cooldowns_total" in alerts["DppKeyCoolingDown"]


def test_the_dashboard_names_only_metrics_dpp_exports() -> None:
    exported = exported_names()
    used: set[str] = set()
    for title, expression in dashboard_expressions():
        names = metric_names(as_promql(expression))
        assert names, title
        unknown = names - exported
        assert not unknown, f"panel {title!r}: {sorted(unknown)} not exported by DPP"
        used |= names
    # what the operator came for: queue, workers, latency, money, repairs, audit, restarts
    assert used >= {
        "dpp_queue_depth",
        "dpp_queue_oldest_age_seconds",
        "dpp_runs_in_flight",
        "dpp_runs_settled_total",
        "dpp_run_duration_seconds_bucket",
        "dpp_http_request_duration_seconds_bucket",
        "dpp_settled_charged_usd_micros_total",
        "dpp_settled_refunded_usd_micros_total",
        "dpp_reconciler_actions_total",
        "dpp_audit_required_runs",
        "dpp_audit_violations",
        "dpp_supervisor_restarts_total",
        "dpp_actor_crashes_total",
    }


def test_the_dashboard_uses_a_datasource_variable_not_a_fixed_uid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


# --- promtool (Debian's `prometheus` package; .ci/run installs it) -------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs it")
    return found


def run_promtool(promtool: str, *arguments: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool, *arguments], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS.name, cwd=DEPLOY)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=DEPLOY)
    assert "SUCCESS" in output


def test_a_broken_alert_fails_promtool(promtool: str, tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(("}]}]})
    )
    done = subprocess.run(
        [promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def test_every_dashboard_expression_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each panel's query, held as a recording rule."""
    rules = [
        {"record": f"dpp_dashboard:panel_{index}", "expr": as_promql(expression)}
        for index, (_, expression) in enumerate(dashboard_expressions())
    ]
    held = tmp_path / "dashboard-rules.yml"
    held.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", str(held), cwd=tmp_path)
    assert f"SUCCESS: {len(rules)} rules found" in output
