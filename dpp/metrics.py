"""Prometheus metrics, registered on the context's own ``CollectorRegistry``.

One ``Metrics`` per registry (``metrics_for`` creates it once and hands the same
object to the HTTP front and the actors). Labels are bounded sets chosen by
DPP, never by a client: HTTP metrics carry the route *template*
(``/v1/runs/{run_id}``, or ``unmatched``), never a path, tenant id or key;
pack types are the registry's, outcomes and actions fixed sets.
To add a metric, add a field and create it in ``Metrics.create``
(docs/operations.md, "Metrics and alerts", says what each one means).

Two kinds of gauge: this replica's own (``runs_in_flight``, ``budget_actors``,
``settlement_actors``)
and the whole deployment's, read from Postgres (``queue_depth``,
``queue_oldest_age``, ``audit_required_runs``, ``audit_violations``): every
replica reports the same value for those, so dashboards and alerts take their
``max`` across instances, never the ``sum``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BATCH_KINDS",
    "HTTP_METHODS",
    "RECONCILER_ACTIONS",
    "UNMATCHED_ROUTE",
    "Metrics",
    "metrics_for",
    "status_class",
]

UNMATCHED_ROUTE = "unmatched"
# Any other method is counted as "other": the method is client input.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HTTP_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A run lasts from milliseconds (echo) to its timebox (at most an hour).
RUN_DURATION_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
# Work done once for many requests, one label value per kind of batch: how well
# group commit and the coalescing of reads and checks are working (issue 11).
BATCH_KINDS = frozenset(
    {
        "reservation",  # a budget actor's group commit of one tenant's reservations
        "settlement",  # a settlement actor's group commit of one tenant's settlements
        "read",  # GET /v1/runs/{id} reads answered by one Postgres query
        "rate_limit",  # one tenant's rate-limit checks in one Redis call
    }
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# What the reconciler did, one label value per kind of repair (its report's fields).
RECONCILER_ACTIONS = frozenset(
    {
        "reaped",  # a lapsed lease: EXPIRED, minimum fee
        "rolled_forward",  # a stuck CLAIMED run with a valid receipt: COMPLETED
        "rolled_back",  # a stuck CLAIMED run without a result: FAILED
        "audit_required",  # evidence that cannot be trusted: left for a person
        "drift_repaired",  # a tenant's Redis mirror rewritten from Postgres
        "requeued",  # a QUEUED run whose SQS message was never sent
        "dead_lettered",  # a dead-lettered SQS run: FAILED
    }
)


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
    settlement_actors: Gauge  # live settlement actors on this replica
    mailbox_full_rejections: Counter  # actor kind
    actor_crashes: Counter  # actor kind: keyed actors (budget, settlement) that crashed
    actor_cooldowns: Counter  # actor kind: keyed actors stopped for crashing too often
    supervisor_restarts: Counter  # child: a supervised child crashed and was restarted
    runs_in_flight: Gauge  # runs this replica's dispatcher hosts now
    worker_slots: Gauge  # how many it may host (DPP_WORKER_CONCURRENCY)
    run_duration: Histogram  # pack_type, outcome: claim to settlement, on the worker
    settled_charged: Counter  # outcome: USD micros charged at settlement
    settled_refunded: Counter  # outcome: USD micros refunded at settlement
    reconciler_actions: Counter  # action: one of RECONCILER_ACTIONS
    batch_size: Histogram  # kind: one of BATCH_KINDS
    settled_run_reads: Counter  # GET /v1/runs/{id} answered from memory (dpp.runs.settled)
    # the deployment's, from Postgres (dpp.runs.gauges), refreshed when scraped
    queue_depth: Gauge  # pack_type: QUEUED runs
    queue_oldest_age: Gauge  # pack_type: seconds since the oldest QUEUED run was submitted
    audit_required_runs: Gauge  # pack_type: runs waiting for a person (SPEC §6 resolve)
    audit_violations: Gauge  # invariant: violations the last periodic audit found
    audit_completed: Gauge  # when that audit last completed (unix seconds)
    dependency_up: Gauge  # dependency: 1 when it answered the last check, else 0
    # (method label, route, status class) -> the two HTTP children: ``labels()``
    # locks and builds a key on every call; bounded like the labels themselves
    http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = field(
        default_factory=dict
    )

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        metrics = cls._create(registry)
        # every action exported from the start at 0: rate() and alerts see a series
        for action in RECONCILER_ACTIONS:
            metrics.reconciler_actions.labels(action)
        for kind in BATCH_KINDS:
            metrics.batch_size.labels(kind)
        return metrics

    @classmethod
    def _create(cls, registry: CollectorRegistry) -> Metrics:
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
            settled_run_reads=Counter(
                "dpp_settled_run_reads",
                "Reads of a settled run answered from this replica's memory, not Postgres.",
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
            settlement_actors=Gauge(
                "dpp_settlement_actors",
                "Settlement actors alive on this replica.",
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
            supervisor_restarts=Counter(
                "dpp_supervisor_restarts",
                "Supervised children (dispatcher, reconciler, budgets, http, ...) that crashed "
                "and were restarted; the root gives up after 5 in 30 s.",
                ("child",),
                registry=registry,
            ),
            runs_in_flight=Gauge(
                "dpp_runs_in_flight",
                "Runs this replica is executing now (claimed, not yet settled or released).",
                registry=registry,
            ),
            worker_slots=Gauge(
                "dpp_worker_slots",
                "Runs this replica may execute at once (DPP_WORKER_CONCURRENCY).",
                registry=registry,
            ),
            run_duration=Histogram(
                "dpp_run_duration_seconds",
                "From a run's claim to its settlement by the worker that ran it.",
                ("pack_type", "outcome"),
                buckets=RUN_DURATION_BUCKETS_S,
                registry=registry,
            ),
            settled_charged=Counter(
                "dpp_settled_charged_usd_micros",
                "USD micros charged at settlement, by outcome (every path: worker, "
                "reconciler, cancel, resolve).",
                ("outcome",),
                registry=registry,
            ),
            settled_refunded=Counter(
                "dpp_settled_refunded_usd_micros",
                "USD micros refunded at settlement, by outcome.",
                ("outcome",),
                registry=registry,
            ),
            reconciler_actions=Counter(
                "dpp_reconciler_actions",
                "What the reconciler repaired, by action: reaped, rolled_forward, rolled_back, "
                "audit_required, drift_repaired, requeued, dead_lettered.",
                ("action",),
                registry=registry,
            ),
            queue_depth=Gauge(
                "dpp_queue_depth",
                "QUEUED runs in the whole deployment, by pack type (same on every replica).",
                ("pack_type",),
                registry=registry,
            ),
            queue_oldest_age=Gauge(
                "dpp_queue_oldest_age_seconds",
                "Seconds since the oldest QUEUED run was submitted, by pack type (0: none).",
                ("pack_type",),
                registry=registry,
            ),
            audit_required_runs=Gauge(
                "dpp_audit_required_runs",
                "AUDIT_REQUIRED runs waiting for an operator's resolve, by pack type.",
                ("pack_type",),
                registry=registry,
            ),
            audit_violations=Gauge(
                "dpp_audit_violations",
                "Money invariant violations found by the last periodic audit, by invariant "
                "(1-4, 6; the mirror's 5 is checked by GET /admin/audit when quiet).",
                ("invariant",),
                registry=registry,
            ),
            audit_completed=Gauge(
                "dpp_audit_last_completed_timestamp_seconds",
                "When this replica's periodic audit last completed (unix time; 0: never).",
                registry=registry,
            ),
            batch_size=Histogram(
                "dpp_batch_size",
                "Requests served by one backend call: a group commit of one tenant's"
                " reservations or settlements, a burst of run reads, one tenant's"
                " burst of rate-limit checks.",
                ("kind",),
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
            dependency_up=Gauge(
                "dpp_dependency_up",
                "1 when the dependency answered this replica's last readiness check, else 0.",
                ("dependency",),
                registry=registry,
            ),
        )

    def batch_observer(self, kind: str) -> Callable[[float], None]:
        """What records one batch of ``kind`` and its size (the child's
        ``observe``, looked up once: ``labels()`` locks on every call)."""
        assert kind in BATCH_KINDS, kind
        observe: Callable[[float], None] = self.batch_size.labels(kind).observe
        return observe

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        method_label = method if method in HTTP_METHODS else "other"
        key = (method_label, route, status // 100)
        children = self.http_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method_label, route, status_class(status)),
                self.http_request_duration.labels(method_label, route),
            )
            self.http_children[key] = children
        requests, duration = children
        requests.inc()
        duration.observe(duration_s)

    def count_reconciler_actions(self, counts: Mapping[str, int]) -> None:
        """Add one reconciler pass's repairs (zeros are skipped)."""
        assert counts.keys() <= RECONCILER_ACTIONS, counts.keys() - RECONCILER_ACTIONS
        for action, count in counts.items():
            assert count >= 0, (action, count)
            if count:
                self.reconciler_actions.labels(action).inc(count)

    def observe_settlement(
        self, outcome: str, charged_usd_micros: int, refunded_usd_micros: int
    ) -> None:
        """One settlement that moved money (a replay moves none and is not counted)."""
        assert charged_usd_micros >= 0 and refunded_usd_micros >= 0
        self.runs_settled.labels(outcome).inc()
        self.settled_charged.labels(outcome).inc(charged_usd_micros)
        self.settled_refunded.labels(outcome).inc(refunded_usd_micros)


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
