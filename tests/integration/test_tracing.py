"""Traces of the full runtime, caught by the SDK's in-memory exporter.

One run submitted over HTTP with a ``traceparent`` is one trace: the request,
the run's enqueue (its reservation commits it QUEUED), the claim, the pack,
the upload and the settlement, in that order and under the caller's span. The
work done in batches (group commits, the claim) is in spans of its own, linked
to each run it served.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from dpp import tracing
from dpp.adapters.blobs import RECEIPT_RUN
from dpp.app import Runtime, open_runtime
from dpp.config import load_settings
from dpp.http.app import create_app
from dpp.http.front import HttpFront
from dpp.money.rules import Outcome
from tests.integration.test_end_to_end import _until_terminal
from tests.integration.test_execution import create_sqs_queues, open_harness
from tests.integration.test_reconciler import claimed_run, expired_run
from tests.integration.test_runs_api import BASE_URL, ECHO, _tenant

# The run's path, in the order its spans start. (The queue's announcement, a
# wake-up sent after the commit, may come after the claim: it is in the trace,
# but not in this order.)
RUN_PATH = [
    "POST /v1/runs",
    "dpp.run.enqueue",
    "dpp.budget.reserve",
    "dpp.run.claim",
    "dpp.run.execute",
    "dpp.run.upload",
    "dpp.run.settle",
]
BATCHES = {
    "dpp.budget.reserve_batch": "dpp.budget.reserve",
    "dpp.queue.claim_batch": "dpp.run.enqueue",
    "dpp.budget.settle_batch": "dpp.run.settle",
}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown_tracing()
    assert not tracing.enabled()


@pytest.fixture
def queue() -> str:
    return "postgres"


@pytest.fixture
async def http(spans, settings_env, services, queue) -> AsyncIterator[httpx.AsyncClient]:
    """A whole replica, dispatcher included, built while tracing is on."""
    env = {**settings_env, "DPP_HEARTBEAT_SEC": "1", "DPP_LEASE_SEC": "5"}
    if queue == "sqs":
        queue_url, _ = await create_sqs_queues(services.object_store_url)
        env |= {
            "DPP_QUEUE": "sqs",
            "SQS_QUEUE_URL": queue_url,
            "SQS_ENDPOINT_URL": services.object_store_url,
        }
    runtime: Runtime
    async with open_runtime(load_settings(env), environment=env) as runtime:
        transport = httpx.ASGITransport(app=runtime.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield client


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def _hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _in_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    found = [span for span in spans.get_finished_spans() if _hex_trace(span) == trace_id]
    return sorted(found, key=lambda span: span.start_time or 0)


async def _until_settled(spans: InMemorySpanExporter, trace_ids: list[str]) -> None:
    """The settle span ends just after the run reads COMPLETED: wait for it."""
    with anyio.fail_after(10):
        while True:
            settled = [
                any(span.name == "dpp.run.settle" for span in _in_trace(spans, trace_id))
                for trace_id in trace_ids
            ]
            if all(settled):
                return
            await anyio.sleep(0.02)


def _run_spans(spans: InMemorySpanExporter, trace_id: str) -> dict[str, ReadableSpan]:
    in_trace = _in_trace(spans, trace_id)
    path = [span.name for span in in_trace if span.name in RUN_PATH]
    assert path == RUN_PATH, path
    return {span.name: span for span in in_trace}


@pytest.mark.parametrize("queue", ["postgres", "sqs"])
async def test_one_run_is_one_trace_in_order(spans, http, admin_headers) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    trace_id, parent_id, traceparent = _traceparent()

    submitted = await http.post("/v1/runs", json=ECHO, headers={**key, "traceparent": traceparent})
    assert submitted.status_code == 202, submitted.text
    run_id = submitted.json()["id"]
    done = await _until_terminal(http, run_id, key)
    assert done.json()["status"] == "COMPLETED"
    await _until_settled(spans, [trace_id])

    run = _run_spans(spans, trace_id)
    request, enqueue = run["POST /v1/runs"], run["dpp.run.enqueue"]
    # the request continues the caller's span; everything of the run hangs under it
    assert request.kind is SpanKind.SERVER
    assert request.parent is not None and request.parent.is_remote
    assert f"{request.parent.span_id:016x}" == parent_id
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/v1/runs"
    assert request.attributes["http.response.status_code"] == 202
    assert enqueue.parent is not None and enqueue.parent.span_id == request.context.span_id
    assert enqueue.attributes is not None and enqueue.attributes["dpp.run.id"] == run_id
    for name in [*RUN_PATH[2:], "dpp.queue.announce"]:
        parent = run[name].parent
        assert parent is not None and parent.span_id == enqueue.context.span_id, name
    # each step starts once the one before it has ended
    for before, after in itertools.pairwise(RUN_PATH[3:]):
        assert (run[before].end_time or 0) <= (run[after].start_time or 0), (before, after)
    assert run["dpp.run.settle"].attributes == {"dpp.run.outcome": "COMPLETED"}

    # No tenant id, key or token in any span of the test.
    for span in spans.get_finished_spans():
        text = repr(dict(span.attributes or {})) + span.name
        assert tenant_id not in text and "dpp_live_" not in text and "Bearer" not in text


async def test_batches_link_to_every_run_they_served(spans, http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    traces: list[str] = []
    run_ids: list[str] = []

    async def submit() -> None:
        trace_id, _, traceparent = _traceparent()
        answer = await http.post("/v1/runs", json=ECHO, headers={**key, "traceparent": traceparent})
        assert answer.status_code == 202, answer.text
        traces.append(trace_id)
        run_ids.append(answer.json()["id"])

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(submit)
    for run_id in run_ids:
        assert (await _until_terminal(http, run_id, key)).json()["status"] == "COMPLETED"
    await _until_settled(spans, traces)

    runs = {trace_id: _run_spans(spans, trace_id) for trace_id in traces}
    finished = spans.get_finished_spans()
    for batch_name, served_name in BATCHES.items():
        batches = [span for span in finished if span.name == batch_name]
        assert batches, batch_name
        linked = {}
        for batch in batches:
            # a root of its own trace, sized by the runs it served
            assert batch.parent is None, batch_name
            assert batch.attributes is not None
            assert batch.attributes["dpp.batch.size"] == len(batch.links) >= 1
            for link in batch.links:
                linked[(link.context.trace_id, link.context.span_id)] = batch
        for trace_id, run in runs.items():
            served = run[served_name].context
            assert (served.trace_id, served.span_id) in linked, (batch_name, trace_id)
            assert _hex_trace(linked[(served.trace_id, served.span_id)]) not in traces
    # each run's claim span points back at the batch that claimed it
    claim_batches = {s.context.span_id for s in finished if s.name == "dpp.queue.claim_batch"}
    for run in runs.values():
        (link,) = run["dpp.run.claim"].links
        assert link.context.span_id in claim_batches


async def test_a_request_without_traceparent_starts_a_fresh_trace(
    spans, http, admin_headers
) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    submitted = [(await http.post("/v1/runs", json=ECHO, headers=key)).json() for _ in range(2)]
    for run in submitted:
        assert (await _until_terminal(http, run["id"], key)).json()["status"] == "COMPLETED"

    requests = [
        span
        for span in spans.get_finished_spans()
        if span.name == "POST /v1/runs" and span.kind is SpanKind.SERVER
    ]
    assert len(requests) == 2
    trace_ids = [_hex_trace(span) for span in requests]
    assert len(set(trace_ids)) == 2
    await _until_settled(spans, trace_ids)
    for request, trace_id in zip(requests, trace_ids, strict=True):
        assert request.parent is None  # a root: nobody called us from a trace
        # the worker found the same trace through the run row's stored trace id
        run = _run_spans(spans, trace_id)
        assert run["POST /v1/runs"] is request


async def test_the_server_span_follows_the_callers_sampling_decision(
    spans, http, admin_headers
) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    server_spans: dict[str, list[ReadableSpan]] = {}
    for flags in ("00", "01"):
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        traceparent = {"traceparent": f"00-{trace_id}-{parent_id}-{flags}"}
        assert (await http.get("/v1/budget", headers=key | traceparent)).status_code == 200
        server_spans[flags] = [
            span for span in _in_trace(spans, trace_id) if span.kind is SpanKind.SERVER
        ]
    assert server_spans["00"] == []  # the caller did not sample: neither do we
    (span,) = server_spans["01"]
    assert span.parent is not None and span.context is not None
    assert span.context.trace_flags.sampled


async def test_every_request_gets_a_server_span_named_by_its_route(
    spans, http, admin_headers
) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 0)
    assert (await http.get(f"/admin/tenants/{tenant_id}", headers=admin_headers)).status_code == 200
    assert (await http.get("/v1/runs/run_nope", headers=key)).status_code == 404
    names = {span.name for span in spans.get_finished_spans() if span.kind is SpanKind.SERVER}
    assert {"POST /admin/tenants", "GET /admin/tenants/{tenant_id}"} <= names
    assert "GET /v1/runs/{run_id}" in names
    for span in spans.get_finished_spans():
        assert tenant_id not in span.name


async def test_the_server_span_is_made_only_when_tracing_is_on(context) -> None:
    def stacked() -> bool:
        front = create_app(context).middleware_stack
        assert isinstance(front, HttpFront)
        return front.traced

    assert not tracing.enabled() and not stacked()
    assert tracing.configure_tracing(exporter=InMemorySpanExporter())
    try:
        assert stacked()
    finally:
        tracing.shutdown_tracing()


async def test_the_reconcilers_repairs_are_spans_of_each_runs_trace(
    spans, services, database_url, redis_prefix
) -> None:
    """A run no worker settled still shows how it ended: the reaper's EXPIRED, the
    roll-back of a stuck CLAIMED run and a run set aside for an operator are
    spans under the run's enqueue span, in the trace its request started."""
    async with open_harness(services, database_url, redis_prefix) as h:
        reaped = await expired_run(h)
        rolled_back = await claimed_run(h, receipt=None)
        set_aside = await claimed_run(h, receipt={RECEIPT_RUN: "run_" + "z" * 26})
        report = await (await h.start_reconciler()).reconcile_once()
        assert (report["expired"], report["rolled_back"], report["audit_required"]) == (1, 1, 1)
        actions = ((reaped, "reaped"), (rolled_back, "rolled_back"), (set_aside, "audit_required"))
        for run_id, action in actions:
            row = await h.row(run_id)
            enqueue = tracing.run_span_context(row["trace_id"], run_id)
            (repair,) = [
                span
                for span in spans.get_finished_spans()
                if span.name == "dpp.run.reconcile"
                and span.attributes is not None
                and span.attributes["dpp.reconciler.action"] == action
            ]
            assert repair.context is not None and repair.parent is not None
            assert repair.context.trace_id == enqueue.trace_id
            assert repair.parent.span_id == enqueue.span_id
            if action == "audit_required":
                continue  # nothing settled: the operator does, below
            # the settlement's group commit links to it
            (batch,) = [
                span
                for span in spans.get_finished_spans()
                if span.name == "dpp.budget.settle_batch"
                and any(link.context.span_id == repair.context.span_id for link in span.links)
            ]
            assert batch.context is not None
        # the operator's resolve of the run set aside is in its trace too
        await h.context.runs.resolve(set_aside, Outcome.FAILED, 0)
        row = await h.row(set_aside)
        enqueue = tracing.run_span_context(row["trace_id"], set_aside)
        (resolve,) = [span for span in spans.get_finished_spans() if span.name == "dpp.run.resolve"]
        assert resolve.context is not None and resolve.parent is not None
        assert resolve.context.trace_id == enqueue.trace_id
        assert resolve.parent.span_id == enqueue.span_id


async def test_a_dead_lettered_run_set_aside_is_a_span_of_its_requests_trace(
    spans, services, database_url, redis_prefix
) -> None:
    """The reconciler reads a dead-lettered run by its id alone; its set-aside still
    lands in the trace the run's request started, not in one made up from the id."""
    async with open_harness(services, database_url, redis_prefix, queue_backend="sqs") as h:
        assert h.sqs is not None
        run_id = await h.submit({"payload": 1})
        for _ in range(2):  # a consumer that keeps dying after receiving (maxReceiveCount 2)
            received = await h.sqs.receive_message(
                QueueUrl=h.settings.sqs_queue_url, VisibilityTimeout=0, WaitTimeSeconds=1
            )
            assert len(received["Messages"]) == 1
        assert await h.queue.claim_batch(1) == []  # moved to the dead-letter queue
        report = await (await h.start_reconciler()).reconcile_once()
        assert (report["dead_lettered"], report["audit_required"]) == (1, 1)
        row = await h.row(run_id)
        enqueue = tracing.run_span_context(row["trace_id"], run_id)
        assert enqueue.trace_id != tracing.run_span_context(None, run_id).trace_id
        (set_aside,) = [
            span
            for span in spans.get_finished_spans()
            if span.name == "dpp.run.reconcile"
            and span.attributes is not None
            and span.attributes["dpp.reconciler.action"] == "audit_required"
        ]
        assert set_aside.context is not None and set_aside.parent is not None
        assert set_aside.context.trace_id == enqueue.trace_id
        assert set_aside.parent.span_id == enqueue.span_id
        await h.context.runs.resolve(run_id, Outcome.FAILED, 0)  # the audit after is clean
