"""The deployment's gauges an operator scales and alerts on, read from Postgres.

Queue depth and the oldest QUEUED run's age by pack (scale workers on them),
AUDIT_REQUIRED runs by pack, and the money audit's violations by invariant.
They are the deployment's numbers, not a replica's: computed when ``/metrics``
is scraped, at most once per ``queue_ttl_s`` (one cheap query over two
partial indexes) and once per ``audit_interval_s`` for the audit (a full
read-only pass), however many scrapes arrive. Every replica reports the same
values, so queries take their ``max`` across instances.

A refresh that fails or overruns its bound keeps the last values (and logs):
``/metrics`` always answers, and ``dpp_dependency_up`` / the not-ready alert
say why the numbers stopped moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from dpp.metrics import Metrics
from dpp.money.audit import AuditReport
from dpp.runs.store import RunStore

__all__ = ["AUDIT_INTERVAL_S", "QUEUE_TTL_S", "OperatorGauges"]

log = logging.getLogger("dpp.runs.gauges")

QUEUE_TTL_S = 5.0
QUEUE_TIMEOUT_S = 2.0
# The audit reads every tenant and run: every five minutes per replica at most.
AUDIT_INTERVAL_S = 300.0
AUDIT_TIMEOUT_S = 8.0
# invariant 5 (the Redis mirror) is left to GET /admin/audit: it holds only when quiet
PERIODIC_INVARIANTS = ("1", "2", "3", "4", "6")
PACK_TYPES_MAX = 1000  # bounded label values, whatever the table holds

Audit = Callable[[], Awaitable[AuditReport]]


class OperatorGauges:
    """Refreshes the Postgres-backed gauges of ``Metrics``; ``refresh`` is what
    ``/metrics`` awaits before it renders."""

    def __init__(
        self,
        store: RunStore,
        audit: Audit,
        metrics: Metrics,
        pack_types: Iterable[str],
        *,
        queue_ttl_s: float = QUEUE_TTL_S,
        audit_interval_s: float = AUDIT_INTERVAL_S,
    ) -> None:
        assert queue_ttl_s >= 0 and audit_interval_s >= 0
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.queue_ttl_s = queue_ttl_s
        self.audit_interval_s = audit_interval_s  # 0: the periodic audit is off
        self.queue_queries = 0
        self.audits = 0
        # every pack ever reported: one seen before and gone now reads 0, not stale
        self._packs: set[str] = set(pack_types)
        self._queue_at: float | None = None
        self._audit_at: float | None = None
        self._lock = anyio.Lock()
        for pack_type in self._packs:
            self._set_pack(pack_type, queued=0, oldest_age_s=0.0, audit_required=0)
        for invariant in PERIODIC_INVARIANTS:
            metrics.audit_violations.labels(invariant).set(0)

    async def refresh(self) -> None:
        """Bring each gauge up to date if it is older than its interval. Concurrent
        scrapes wait for the one refresh under way and reuse its numbers."""
        async with self._lock, anyio.create_task_group() as group:
            # side by side: a scrape waits at most the longer bound (8 s), inside
            # Prometheus's default 10 s scrape timeout
            now = anyio.current_time()
            if self._queue_at is None or now - self._queue_at >= self.queue_ttl_s:
                self._queue_at = now
                group.start_soon(self._refresh_queue)
            if self.audit_interval_s > 0 and (
                self._audit_at is None or now - self._audit_at >= self.audit_interval_s
            ):
                self._audit_at = now
                group.start_soon(self._refresh_audit)

    async def _refresh_queue(self) -> None:
        self.queue_queries += 1
        rows = None
        with anyio.move_on_after(QUEUE_TIMEOUT_S):
            try:
                rows = await self.store.waiting_by_pack()
            except Exception as error:
                log.warning("queue gauges: not refreshed", extra={"error": type(error).__name__})
                return
        if rows is None:
            log.warning("queue gauges: not refreshed", extra={"error": "timeout"})
            return
        queued: dict[str, tuple[int, float]] = {}
        audit_required: dict[str, int] = {}
        for row in rows:
            if row["status"] == "QUEUED":
                queued[row["pack_type"]] = (row["runs"], max(0.0, row["oldest_age_sec"]))
            else:
                assert row["status"] == "AUDIT_REQUIRED", row["status"]
                audit_required[row["pack_type"]] = row["runs"]
        for pack_type in (*queued, *audit_required):
            if len(self._packs) < PACK_TYPES_MAX:
                self._packs.add(pack_type)
        for pack_type in self._packs:
            count, oldest_age_s = queued.get(pack_type, (0, 0.0))
            self._set_pack(
                pack_type,
                queued=count,
                oldest_age_s=oldest_age_s,
                audit_required=audit_required.get(pack_type, 0),
            )

    def _set_pack(
        self, pack_type: str, *, queued: int, oldest_age_s: float, audit_required: int
    ) -> None:
        self.metrics.queue_depth.labels(pack_type).set(queued)
        self.metrics.queue_oldest_age.labels(pack_type).set(oldest_age_s)
        self.metrics.audit_required_runs.labels(pack_type).set(audit_required)

    async def _refresh_audit(self) -> None:
        self.audits += 1
        report = None
        with anyio.move_on_after(AUDIT_TIMEOUT_S):
            try:
                report = await self.audit()
            except Exception as error:
                log.warning("periodic audit: not run", extra={"error": type(error).__name__})
                return
        if report is None:
            log.warning("periodic audit: not run", extra={"error": "timeout"})
            return
        counts = dict.fromkeys(PERIODIC_INVARIANTS, 0)
        for violation in report.violations:
            invariant = str(violation["invariant"])
            assert invariant in counts, violation
            counts[invariant] += 1
        for invariant, count in counts.items():
            self.metrics.audit_violations.labels(invariant).set(count)
        self.metrics.audit_completed.set(time.time())
        if report.violations:
            log.error(
                "periodic audit: money invariants violated",
                extra={"violations": len(report.violations)},
            )
