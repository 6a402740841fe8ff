"""Benchmark: the CPU cost of one run's tracing calls, tracing off and on.

Replays, in one process and without I/O, every ``dpp.tracing`` call one run
makes on its way (the request's server span, the run's enqueue span, the
reservation and the announcement, the budget actor's two batch spans and the
two messages' span contexts, the claim, the pack, the upload, the settlement)
and reports CPU microseconds per run: off (nothing configured: the path every
deployment without an OTLP endpoint takes), and on, with spans going to the
SDK's batching processor (an exporter that drops them, so only DPP's and the
SDK's own work is measured). ``bench_http.py --otlp`` measures the same under
HTTP load, with a real OTLP exporter.

    .venv/bin/python bench/bench_tracing.py [--runs 20000]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpp import tracing  # noqa: E402


@dataclass(frozen=True, slots=True)
class Claimed:
    run_id: str
    trace_id: str | None


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_run(trace_id: str, run_id: str) -> None:
    with tracing.server_span("POST", trace_id, "00f067aa0ba902b7", True) as request:
        with tracing.run_span(trace_id, run_id, {"dpp.pack.type": "echo"}):
            with tracing.span("dpp.budget.reserve"):
                reserve = tracing.current_span_context()
                with tracing.batch_span("dpp.budget.reserve_batch", [reserve]):
                    pass
            with tracing.span("dpp.queue.announce", kind=tracing.SpanKind.PRODUCER):
                pass
        if request is not None:
            tracing.finish_server_span(request, "POST", "/v1/runs", 202)
    tracing.record_claims(time.time_ns(), [Claimed(run_id, trace_id)], waited=False)
    with tracing.continue_run(trace_id, run_id):
        with tracing.span("dpp.run.execute", {"dpp.pack.type": "echo"}):
            pass
        with tracing.span("dpp.run.upload", {"dpp.result.bytes": 30}):
            pass
        with tracing.span("dpp.run.settle", {"dpp.run.outcome": "COMPLETED"}):
            settle = tracing.current_span_context()
            with tracing.batch_span("dpp.budget.settle_batch", [settle]):
                pass


def measure(runs: int) -> float:
    ids = [(secrets.token_hex(16), f"run_{secrets.token_hex(13)}") for _ in range(runs)]
    started = time.process_time()
    for trace_id, run_id in ids:
        one_run(trace_id, run_id)
    return (time.process_time() - started) * 1e6 / runs


def main(runs: int) -> None:
    assert not tracing.enabled(), "unset OTEL_EXPORTER_OTLP_ENDPOINT for the 'off' figure"
    measure(1_000)  # warm up
    off = min(measure(runs) for _ in range(3))
    # the batching processor, as in production, with an exporter that drops
    assert tracing.configure_tracing(exporter=Dropping(), batched=True)
    measure(1_000)
    on = min(measure(runs) for _ in range(3))
    tracing.shutdown_tracing()
    print(f"one run's tracing calls ({runs} runs, best of 3, CPU time):")
    print(f"  off: {off:7.2f} us per run")
    print(f"  on:  {on:7.2f} us per run (11 spans, batching processor)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    main(parser.parse_args().runs)
