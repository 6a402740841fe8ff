"""A tiny OTLP/HTTP trace receiver on loopback, for tests and benchmarks.

It answers every ``POST /v1/traces`` with 200 and keeps the decoded
``ExportTraceServiceRequest`` (or, with ``keep=False``, only counts them), so a
test can check what the SDK's real exporter sent over the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"


@dataclass
class OtlpSink:
    url: str  # the base URL: what OTEL_EXPORTER_OTLP_ENDPOINT names
    keep: bool
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    posts: int = 0
    spans: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        count = sum(
            len(scope.spans)
            for resource in request.resource_spans
            for scope in resource.scope_spans
        )
        with self.lock:
            self.posts += 1
            self.spans += count
            if self.keep:
                self.requests.append(request)


@contextmanager
def otlp_sink(*, keep: bool = True) -> Iterator[OtlpSink]:
    """Serve a sink on 127.0.0.1 (a free port) for the block."""
    sink: OtlpSink | None = None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != TRACES_PATH:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            assert sink is not None
            sink.received(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = OtlpSink(f"http://127.0.0.1:{server.server_address[1]}", keep)
    thread = threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
