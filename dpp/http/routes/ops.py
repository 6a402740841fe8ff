"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document.

None of them needs a key (SPEC §6 Routing). ``/readyz`` asks every dependency
in ``context.readiness`` at once, each bounded by ``READINESS_TIMEOUT_S``, so
one hung dependency cannot hold the probe past the load balancer's timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import orjson
from prometheus_client import generate_latest
from starlette.requests import Request
from starlette.responses import Response

from dpp.context import AppContext, ReadinessCheck
from dpp.http.endpoints import Endpoint, Reply, problem
from dpp.http.problems import Problem
from dpp.metrics import metrics_for
from dpp.schemas import Schema, all_required

__all__ = ["ENDPOINTS", "METRICS_CONTENT_TYPE", "READINESS_TIMEOUT_S", "check_readiness"]

log = logging.getLogger("dpp.http.routes.ops")

READINESS_TIMEOUT_S = 2.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_STORE = {"Cache-Control": "no-store"}


async def check_readiness(checks: Sequence[ReadinessCheck], timeout_s: float) -> dict[str, bool]:
    """Run every check concurrently; a check that raises or overruns ``timeout_s`` is down."""
    assert timeout_s > 0, timeout_s
    assert len({check.name for check in checks}) == len(checks), "check names are unique"
    results = {check.name: False for check in checks}

    async def run(check: ReadinessCheck) -> None:
        with anyio.move_on_after(timeout_s):
            try:
                await check.check()
            except Exception as error:
                log.warning(
                    "readiness: %s is down",
                    check.name,
                    extra={"dependency": check.name, "error_type": type(error).__name__},
                )
                return
            results[check.name] = True
            return
        log.warning(
            "readiness: %s did not answer within %ss",
            check.name,
            timeout_s,
            extra={"dependency": check.name, "error_type": "timeout"},
        )

    async with anyio.create_task_group() as task_group:
        for check in checks:
            task_group.start_soon(run, check)
    return results


def _context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json", headers=NO_STORE)


async def _readiness_gauges(context: AppContext) -> dict[str, bool]:
    """Ask every dependency (the module constant is read per call, so a test can
    shorten it) and record the answers in ``dpp_dependency_up``."""
    results = await check_readiness(context.readiness, READINESS_TIMEOUT_S)
    dependency_up = metrics_for(context.metrics_registry).dependency_up
    for name, up in results.items():
        dependency_up.labels(name).set(1 if up else 0)
    return results


async def readyz(request: Request) -> Response:
    results = await _readiness_gauges(_context(request))
    checks = {name: "ok" if up else "down" for name, up in results.items()}
    down = [name for name, up in results.items() if not up]
    if down:
        raise Problem(
            503,
            "not-ready",
            f"Not ready: {', '.join(down)} {'is' if len(down) == 1 else 'are'} down.",
            title="Not Ready",
            extensions={"checks": checks},
            headers=NO_STORE,
        )
    body = orjson.dumps({"status": "ready", "checks": checks})
    return Response(body, media_type="application/json", headers=NO_STORE)


async def metrics(request: Request) -> Response:
    """Refresh what is computed on scrape (readiness, and the deployment's queue and
    audit gauges, each bounded in time), then render; a refresh that fails keeps
    the last values, so a scrape always answers."""
    context = _context(request)
    async with anyio.create_task_group() as group:
        group.start_soon(_readiness_gauges, context)
        if context.gauges is not None:
            group.start_soon(context.gauges.refresh)
    body = generate_latest(context.metrics_registry)
    return Response(body, headers={"Content-Type": METRICS_CONTENT_TYPE, **NO_STORE})


async def openapi_json(request: Request) -> Response:
    # rendered once by create_app: the document never changes while the process runs
    body: bytes = request.app.state.openapi_body
    return Response(body, media_type="application/json")


HEALTH = Schema("Health", all_required({"status": {"const": "ok"}}))
READINESS = Schema(
    "Readiness",
    all_required(
        {
            "status": {"const": "ready"},
            "checks": {
                "type": "object",
                "additionalProperties": {"enum": ["ok", "down"]},
                "description": "Each dependency by name: postgres, redis, object_storage, sqs.",
            },
        }
    ),
)
OPENAPI_DOCUMENT = Schema(
    "OpenApiDocument", {"type": "object", "description": "This document (OpenAPI 3.1)."}
)

ENDPOINTS = (
    Endpoint(
        "GET",
        "/health",
        health,
        "health",
        "Liveness",
        "operations",
        None,
        (Reply(200, "Serving.", HEALTH),),
        name="health",
    ),
    Endpoint(
        "GET",
        "/readyz",
        readyz,
        "readiness",
        "Readiness of every dependency",
        "operations",
        None,
        (
            Reply(200, "Every dependency answers.", READINESS),
            problem(503, "Not ready: `checks` names each dependency ok or down."),
        ),
        name="readyz",
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        "metrics",
        "Prometheus text exposition",
        "operations",
        None,
        (Reply(200, "Metrics (text format 0.0.4).", None, (), "text/plain"),),
        name="metrics",
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        openapi_json,
        "openapi",
        "This document",
        "operations",
        None,
        (Reply(200, "OpenAPI 3.1.", OPENAPI_DOCUMENT),),
        name="openapi",
    ),
)
