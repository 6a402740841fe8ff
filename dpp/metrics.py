"""Prometheus metrics, registered on the context's own ``CollectorRegistry``.

One ``Metrics`` per registry (``metrics_for`` creates it once and hands the same
object to the HTTP front and the actors). Labels are bounded sets chosen by
DPP, never by a client: HTTP metrics carry the route *template*
(``/v1/runs/{run_id}``, or ``unmatched``), never a path, tenant id or key.
To add a metric, add a field and create it in ``Metrics.create``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["HTTP_METHODS", "UNMATCHED_ROUTE", "Metrics", "metrics_for", "status_class"]

UNMATCHED_ROUTE = "unmatched"
# Any other method is counted as "other": the method is client input.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HTTP_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Metrics:
    http_requests: Counter  # method, route, status_class
    http_request_duration: Histogram  # method, route
    runs_submitted: Counter  # pack_type
    runs_settled: Counter  # outcome: COMPLETED | FAILED | EXPIRED | CANCELED
    reservations: (
        Counter  # result: reserved | insufficient | key_spend_limit | rejected | key_not_held
    )
    budget_actors: Gauge  # live budget actors on this replica
    mailbox_full_rejections: Counter  # actor kind
    actor_crashes: Counter  # actor kind: keyed actors (budget) that crashed
    actor_cooldowns: Counter  # actor kind: keyed actors stopped for crashing too often

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            http_requests=Counter(
                "dpp_http_requests",
                "HTTP requests answered, by method, route template and status class.",
                ("method", "route", "status_class"),
                registry=registry,
            ),
            http_request_duration=Histogram(
                "dpp_http_request_duration_seconds",
                "Time from request start to the last response byte.",
                ("method", "route"),
                buckets=HTTP_DURATION_BUCKETS_S,
                registry=registry,
            ),
            runs_submitted=Counter(
                "dpp_runs_submitted",
                "Runs accepted (202), by pack type.",
                ("pack_type",),
                registry=registry,
            ),
            runs_settled=Counter(
                "dpp_runs_settled",
                "Runs settled, by terminal outcome.",
                ("outcome",),
                registry=registry,
            ),
            reservations=Counter(
                "dpp_reservations",
                "Reservation attempts, by result.",
                ("result",),
                registry=registry,
            ),
            budget_actors=Gauge(
                "dpp_budget_actors",
                "Budget actors alive on this replica.",
                registry=registry,
            ),
            mailbox_full_rejections=Counter(
                "dpp_mailbox_full_rejections",
                "Requests refused with 503 because an actor mailbox was full.",
                ("actor_kind",),
                registry=registry,
            ),
            actor_crashes=Counter(
                "dpp_actor_crashes",
                "Keyed actors (one per tenant) that crashed and were restarted.",
                ("actor_kind",),
                registry=registry,
            ),
            actor_cooldowns=Counter(
                "dpp_actor_cooldowns",
                "Keyed actors stopped for crashing too often; their key answers 503 a while.",
                ("actor_kind",),
                registry=registry,
            ),
        )

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        method_label = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(method_label, route, status_class(status)).inc()
        self.http_request_duration.labels(method_label, route).observe(duration_s)


def status_class(status: int) -> str:
    """``"2xx"`` ... ``"5xx"`` (a label with five values, not sixty)."""
    assert 100 <= status <= 599, status
    return f"{status // 100}xx"


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry) -> Metrics:
    """The registry's ``Metrics``, created on first use (registering twice would fail)."""
    with _by_registry_lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = Metrics.create(registry)
            _by_registry[registry] = metrics
        return metrics
