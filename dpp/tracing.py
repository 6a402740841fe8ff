"""Traces: OpenTelemetry spans along a run's path, exported with OTLP when asked.

Off unless the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and ``OTEL_SDK_DISABLED`` is not
``true``, nor ``OTEL_TRACES_EXPORTER`` ``none``): then ``configure_tracing``
installs the official SDK with a batching OTLP/HTTP exporter, which reads the
rest of its settings (headers, timeout, compression, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``) from the
environment itself. Off, every helper here returns at once (a shared
``nullcontext``), and the SDK is not even imported.

One run, one trace: its trace id is the one the request's logs carry (the
incoming ``traceparent``'s, else a fresh one), stored on the run row. A run's
spans hang under its *enqueue* span, whose span id is derived from the run id
(``run_span_context``), so any replica, after any restart, continues the trace
from the row's ``trace_id`` and ``id`` alone, with nothing else stored:

    POST /v1/runs                      (server span, http/middleware.py)
    └── dpp.run.enqueue                (admission; span id = f(run id))
        ├── dpp.budget.reserve         (the run row committed QUEUED, money held)
        ├── dpp.queue.announce         (NOTIFY / the SQS message)
        ├── dpp.run.claim              (recorded by the dispatcher)
        ├── dpp.run.execute            (the pack)
        ├── dpp.run.upload             (the result to the results store)
        ├── dpp.run.settle
        └── dpp.run.reconcile          (a reconciler's repair: reaped, rolled
                                        forward or back; any replica)

Work done once for many runs (a budget or settlement actor's group commit, a
batched claim) is a root span of its own, linked to the span of
every run it served. Attributes never carry a tenant id, a key or a secret;
a failed span records the exception's type only (its text may hold data).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "SpanContext",
    "SpanKind",
    "TraceIds",
    "batch_span",
    "configure_tracing",
    "continue_run",
    "current_span_context",
    "enabled",
    "record_claims",
    "run_span",
    "run_span_context",
    "run_step",
    "server_span",
    "shutdown_tracing",
    "span",
    "tracing_endpoint",
]

TRACER_NAME = "dpp"
DEFAULT_SERVICE_NAME = "dpp"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

RUN_SPAN = "dpp.run.enqueue"
CLAIM_SPAN = "dpp.run.claim"
CLAIM_BATCH_SPAN = "dpp.queue.claim_batch"
RUN_ID_ATTRIBUTE = "dpp.run.id"
BATCH_SIZE_ATTRIBUTE = "dpp.batch.size"

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_NOTHING: contextlib.nullcontext[None] = contextlib.nullcontext()

# (trace id, span id) the next span must get instead of random ones; set only
# around one ``start_span`` call (``_start``).
_forced_ids: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "dpp_forced_trace_ids", default=(None, None)
)


class TraceIds(Protocol):
    """What the dispatcher hands ``record_claims`` for each run it claimed."""

    @property
    def run_id(self) -> str: ...

    @property
    def trace_id(self) -> str | None: ...


# --- setup -----------------------------------------------------------------------------


def tracing_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint that switches tracing on, or None (tracing stays off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    for name in ENDPOINT_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def configure_tracing(*, exporter: SpanExporter | None = None, batched: bool = False) -> bool:
    """Install the SDK when the environment names an OTLP endpoint; answer
    whether tracing is on. The SDK reads its settings from ``os.environ``.

    ``exporter`` (tests, benchmarks) exports there instead, with no endpoint
    needed: as each span ends, or ``batched`` like the OTLP exporter. Call
    ``shutdown_tracing`` to flush and switch off.
    """
    global _tracer, _provider
    if exporter is None and tracing_endpoint(os.environ) is None:
        return False
    # Imported only when tracing is on: off costs no import time either.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown_tracing()
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, id_generator=_make_id_generator())
    processor: SpanProcessor
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    elif batched:
        processor = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    return True


def shutdown_tracing() -> None:
    """Flush what is pending and switch tracing off (blocking: call from a thread)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def _make_id_generator() -> Any:
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class ForcedIdGenerator(IdGenerator):
        """Random ids, except where ``_start`` forces them (a run's enqueue span,
        a request's root span that must carry the logs' trace id)."""

        def __init__(self) -> None:
            self._random = RandomIdGenerator()

        def generate_span_id(self) -> int:
            forced = _forced_ids.get()[1]
            return forced if forced is not None else self._random.generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()[0]
            return forced if forced is not None else self._random.generate_trace_id()

        def is_trace_id_random(self) -> bool:
            # forced trace ids are random too: secrets.token_hex or a hash of a random id
            return True

    return ForcedIdGenerator()


# --- ids -------------------------------------------------------------------------------


def _digest(what: str, value: str, size: int) -> int:
    digest = hashlib.blake2b(value.encode(), digest_size=size, person=what.encode()).digest()
    return int.from_bytes(digest, "big") or 1  # all-zero ids are invalid


def run_trace_id(trace_id: str | None, run_id: str) -> int:
    """The run's trace id: the stored one, or (a run admitted without one) the
    same id derived from its run id wherever it is asked."""
    if trace_id is not None:
        return int(trace_id, 16)
    return _digest("dpp.run.trace", run_id, 16)


def run_span_context(trace_id: str | None, run_id: str) -> SpanContext:
    """The context of the run's enqueue span, computed from the run row alone."""
    return SpanContext(
        trace_id=run_trace_id(trace_id, run_id),
        span_id=_digest("dpp.run.enqueue", run_id, 8),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


# --- spans -----------------------------------------------------------------------------


def _start(
    name: str,
    *,
    context: Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] = (),
    start_time: int | None = None,
    trace_id: int | None = None,
    span_id: int | None = None,
) -> Span:
    assert _tracer is not None
    token = _forced_ids.set((trace_id, span_id)) if trace_id or span_id else None
    try:
        return _tracer.start_span(
            name, context, kind, attributes, links or None, start_time=start_time
        )
    finally:
        if token is not None:
            _forced_ids.reset(token)


@contextlib.contextmanager
def _current(span: Span) -> Iterator[Span]:
    """``span`` as the current span until the block ends, then ended. An
    exception marks it failed with the exception's type only."""
    with trace.use_span(
        span, end_on_exit=True, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except Exception as error:
            mark_failed(current, error)
            raise


def mark_failed(span: Span, error: BaseException | str) -> None:
    name = error if isinstance(error, str) else type(error).__name__
    span.set_attribute("error.type", name)
    span.set_status(Status(StatusCode.ERROR, name))


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
) -> contextlib.AbstractContextManager[Span | None]:
    """A child of the current span for the block (nothing when tracing is off)."""
    if _tracer is None:
        return _NOTHING
    return _current(_start(name, kind=kind, attributes=attributes))


def current_span_context() -> SpanContext | None:
    """The current span's context (to link a batch to), or None."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def batch_span(
    name: str,
    served: Sequence[SpanContext | None],
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A root span for work done once for many runs, linked to each run's span."""
    if _tracer is None:
        return _NOTHING
    links = [Link(context) for context in served if context is not None]
    attributes = {BATCH_SIZE_ATTRIBUTE: len(served), **(attributes or {})}
    return _current(_start(name, context=Context(), attributes=attributes, links=links))


def server_span(
    method: str, trace_id: str, parent_id: str | None, sampled: bool
) -> contextlib.AbstractContextManager[Span | None]:
    """One HTTP request's server span, in the trace its logs carry: the
    incoming ``traceparent``'s (``parent_id`` its span), else a new root with
    ``trace_id``. Named ``method`` until ``finish_server_span`` knows the route."""
    if _tracer is None:
        return _NOTHING
    attributes = {"http.request.method": method}
    if parent_id is None:
        started = _start(
            method,
            context=Context(),
            kind=SpanKind.SERVER,
            attributes=attributes,
            trace_id=int(trace_id, 16),
        )
        return _current(started)
    parent = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(parent_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    return _current(_start(method, context=context, kind=SpanKind.SERVER, attributes=attributes))


def finish_server_span(span: Span, method: str, route: str | None, status: int) -> None:
    """Name the server span by its route template (never the path: it may hold
    ids or a result link's token) and record the status."""
    if route is not None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        mark_failed(span, str(status))


def run_span(
    trace_id: str | None, run_id: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Span | None]:
    """The run's enqueue span (its id derived from ``run_id``), current for the
    block: under the request's span when that is in the run's trace, else a
    root of the run's trace."""
    if _tracer is None:
        return _NOTHING
    wanted = run_trace_id(trace_id, run_id)
    current = trace.get_current_span().get_span_context()
    inside = current.is_valid and current.trace_id == wanted
    attributes = {RUN_ID_ATTRIBUTE: run_id, **(attributes or {})}
    started = _start(
        RUN_SPAN,
        context=None if inside else Context(),
        attributes=attributes,
        trace_id=None if inside else wanted,
        span_id=run_span_context(trace_id, run_id).span_id,
    )
    return _current(started)


def continue_run(trace_id: str | None, run_id: str) -> contextlib.AbstractContextManager[Any]:
    """Make the run's enqueue span the parent of every span opened in the block
    (and in the tasks it starts): a worker continues the run's trace."""
    if _tracer is None:
        return _NOTHING
    return trace.use_span(NonRecordingSpan(_run_parent(trace_id, run_id)))


@contextlib.contextmanager
def run_step(
    trace_id: str | None, run_id: str, name: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[Span | None]:
    """A span ``name`` under the run's enqueue span, for work on the run done
    away from its worker (the reconciler's repairs, an operator's resolve): the
    run's trace shows how it ended whoever ended it."""
    with continue_run(trace_id, run_id), span(name, attributes) as step:
        yield step


def _run_parent(trace_id: str | None, run_id: str) -> SpanContext:
    """``run_span_context``, sampled as the sampler decides for the run's trace
    id as a root: the row keeps no sampled flag, and a trace-id-ratio sampler
    decides the same way on every replica (always on: every run is sampled)."""
    from opentelemetry.sdk.trace.sampling import Decision

    context = run_span_context(trace_id, run_id)
    assert _provider is not None
    result = _provider.sampler.should_sample(Context(), context.trace_id, RUN_SPAN)
    if result.decision is Decision.RECORD_AND_SAMPLE:
        return context
    return SpanContext(context.trace_id, context.span_id, is_remote=True, trace_flags=TraceFlags(0))


def record_claims(started_ns: int, claimed: Sequence[TraceIds], *, waited: bool) -> None:
    """A batched claim that began at ``started_ns`` and just returned
    ``claimed``: its batch span, linked to each run, and each run's claim span
    in the run's trace, linked back to the batch.

    ``waited``: the claim began with a wait for messages (SQS's long poll),
    which may have begun before the runs existed; their claim spans then mark
    the moment the batch returned rather than the whole wait, which the batch
    span keeps."""
    if _tracer is None or not claimed:
        return
    runs = [run_span_context(run.trace_id, run.run_id) for run in claimed]
    batch = _start(
        CLAIM_BATCH_SPAN,
        context=Context(),
        kind=SpanKind.CONSUMER,
        attributes={BATCH_SIZE_ATTRIBUTE: len(claimed), "dpp.queue.waited": waited},
        links=[Link(run) for run in runs],
        start_time=started_ns,
    )
    ended_ns = time.time_ns()
    batch.end(ended_ns)
    for run in claimed:
        parent = _run_parent(run.trace_id, run.run_id)
        _start(
            CLAIM_SPAN,
            context=trace.set_span_in_context(NonRecordingSpan(parent)),
            attributes={RUN_ID_ATTRIBUTE: run.run_id},
            links=[Link(batch.get_span_context())],
            start_time=ended_ns if waited else started_ns,
        ).end(ended_ns)
