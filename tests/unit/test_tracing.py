"""dpp.tracing: off unless an OTLP endpoint is configured; what it exports when on."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dpp import tracing
from tests.otlp_sink import otlp_sink

OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter)
    return exporter


def test_without_an_endpoint_nothing_is_installed() -> None:
    assert tracing.configure_tracing() is False
    assert not tracing.enabled()
    # every helper is a no-op: nothing current, nothing to link
    with tracing.span("dpp.run.execute") as span:
        assert span is None
        assert tracing.current_span_context() is None
    with tracing.batch_span("dpp.budget.settle_batch", [None]) as span:
        assert span is None
    with tracing.server_span("GET", secrets.token_hex(16), None, True) as span:
        assert span is None
    tracing.record_claims(0, [], waited=False)


ENDPOINT = "http://127.0.0.1:4318"


@pytest.mark.parametrize(
    ("variables", "on"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_the_standard_variables_switch_tracing(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], on: bool
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert tracing.configure_tracing() is on
    assert tracing.enabled() is on


def test_spans_reach_the_configured_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    trace_id = secrets.token_hex(16)
    with otlp_sink() as sink:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "dpp-eu-1")
        assert tracing.configure_tracing()
        with tracing.server_span("POST", trace_id, None, True) as request:
            assert request is not None
            with tracing.span("dpp.run.execute"):
                pass
            tracing.finish_server_span(request, "POST", "/v1/runs", 202)
        tracing.shutdown_tracing()  # flushes the batch processor
    assert not tracing.enabled()
    (resource,) = [r for request in sink.requests for r in request.resource_spans]
    attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert attributes["service.name"] == "dpp-eu-1"
    exported = [span for scope in resource.scope_spans for span in scope.spans]
    assert sorted(span.name for span in exported) == ["POST /v1/runs", "dpp.run.execute"]
    assert {span.trace_id.hex() for span in exported} == {trace_id}


def test_the_service_is_named_dpp_unless_configured(spans: InMemorySpanExporter) -> None:
    with tracing.span("x"):
        pass
    (span,) = spans.get_finished_spans()
    assert span.resource.attributes["service.name"] == "dpp"


def test_a_request_without_a_parent_is_a_root_with_the_logs_trace_id(
    spans: InMemorySpanExporter,
) -> None:
    trace_id = secrets.token_hex(16)
    with tracing.server_span("GET", trace_id, None, True):
        pass
    (span,) = spans.get_finished_spans()
    assert span.parent is None and span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == trace_id


@pytest.mark.parametrize("trace_id", [None, "4bf92f3577b34da6a3ce929d0e0e4736"])
def test_a_worker_continues_the_run_from_its_row_alone(
    spans: InMemorySpanExporter, trace_id: str | None
) -> None:
    run_id = "run_" + "A" * 26
    with tracing.run_span(trace_id, run_id):
        pass
    # later, anywhere: only the row's trace_id and id are known
    with tracing.continue_run(trace_id, run_id), tracing.span("dpp.run.execute"):
        pass
    admit, execute = spans.get_finished_spans()
    expected = tracing.run_span_context(trace_id, run_id)
    assert (admit.context.trace_id, admit.context.span_id) == (
        expected.trace_id,
        expected.span_id,
    )
    assert execute.context.trace_id == admit.context.trace_id
    assert execute.parent is not None and execute.parent.span_id == admit.context.span_id
    if trace_id is not None:
        assert f"{admit.context.trace_id:032x}" == trace_id


def test_a_run_admitted_under_its_request_is_a_child_of_it(spans: InMemorySpanExporter) -> None:
    trace_id = secrets.token_hex(16)
    with (
        tracing.server_span("POST", trace_id, "00f067aa0ba902b7", True),
        tracing.run_span(trace_id, "run_" + "B" * 26),
    ):
        pass
    admit, request = spans.get_finished_spans()
    assert admit.parent is not None and admit.parent.span_id == request.context.span_id
    assert request.parent is not None and request.parent.span_id == 0x00F067AA0BA902B7


def test_batch_spans_are_roots_linked_to_what_they_served(spans: InMemorySpanExporter) -> None:
    served = [tracing.run_span_context(secrets.token_hex(16), f"run_{i:026d}") for i in range(3)]
    # even started inside a request (an actor spawned from one), a root
    with (
        tracing.server_span("POST", secrets.token_hex(16), None, True),
        tracing.batch_span("dpp.budget.reserve_batch", [*served, None]),
    ):
        pass
    batch = spans.get_finished_spans()[0]
    assert batch.name == "dpp.budget.reserve_batch" and batch.parent is None
    assert [link.context for link in batch.links] == served
    assert batch.attributes is not None and batch.attributes["dpp.batch.size"] == 4


def test_a_failed_span_records_the_error_type_only(spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), tracing.span("dpp.run.upload"):
        raise ValueError("Bearer dpp_live_secretsecret in a message")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    assert span.attributes is not None and span.attributes["error.type"] == "ValueError"
    assert not span.events  # no exception event: its message may carry data


@pytest.mark.parametrize(("ratio", "kept"), [("0", 0), ("1", 1)])
def test_a_worker_samples_a_run_as_the_trace_id_ratio_says(
    monkeypatch: pytest.MonkeyPatch, ratio: str, kept: int
) -> None:
    """The row keeps no sampled flag: a ratio sampler decides from the trace id,
    the same way on every replica."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter)
    trace_id, run_id = secrets.token_hex(16), "run_" + "C" * 26
    with tracing.continue_run(trace_id, run_id), tracing.span("dpp.run.execute"):
        pass
    tracing.record_claims(0, [_Claimed(run_id, trace_id)], waited=False)
    run_spans = [s for s in exporter.get_finished_spans() if s.name.startswith("dpp.run.")]
    assert len(run_spans) == 2 * kept


@dataclasses.dataclass(frozen=True)
class _Claimed:
    run_id: str
    trace_id: str | None
