"""Settled runs' rows kept in memory, so a read of a finished run costs no query.

A settled run (COMPLETED, FAILED, EXPIRED or CANCELED) no longer changes: the
database refuses any change of its status, tenant or money
(``runs_transition_allowed``, migration 0004), and nothing else writes its
row until its retention passes (``mark_result_deleted`` requires
``retention_until < now()``). So a row read once from Postgres in a settled
state answers every later ``GET /v1/runs/{id}`` of its tenant exactly as
Postgres would, on any replica, until its ``retention_until``; from then on
the read goes to Postgres again (and the run is past retention: 410).

Only settled rows are kept. A run still QUEUED, PROCESSING, CLAIMED or
AUDIT_REQUIRED is read from Postgres every time, so its reader sees every
change as soon as it commits. Entries are keyed by (tenant, run id), so a
tenant never gets another tenant's run from here (the stealth 404 of SPEC §3
holds: another tenant's id misses and goes to the query, which matches the
tenant). The cache is bounded (least recently read first out): a replica's
memory does not grow with the number of runs it has served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from dpp.adapters.postgres import Record
from dpp.money.rules import TERMINAL_STATUSES

# ~1-2 KiB a row (its inputs and result fields): a few MiB per replica at most.
SETTLED_RUNS_MAX: Final = 4_096


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SettledRuns:
    """``get`` a kept settled row; ``keep`` any row read from Postgres (only a
    settled one is kept)."""

    def __init__(
        self,
        capacity: int = SETTLED_RUNS_MAX,
        *,
        now: Callable[[], datetime] = _utc_now,
        on_hit: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_hit`` is told each read answered from memory."""
        assert capacity >= 1
        self._capacity = capacity
        self._now = now
        self._on_hit = on_hit
        self._rows: OrderedDict[tuple[str, str], Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, tenant_id: str, run_id: str) -> Record | None:
        """The tenant's settled run as Postgres last answered it, or None: not
        kept, another tenant's, or past its retention (then it is dropped)."""
        key = (tenant_id, run_id)
        row = self._rows.get(key)
        if row is None:
            return None
        retention = row["retention_until"]
        if retention is None or retention <= self._now():
            del self._rows[key]
            return None
        self._rows.move_to_end(key)
        self._on_hit()
        return row

    def keep(self, row: Record) -> None:
        """Remember ``row`` if its run is settled; anything else is not kept."""
        if row["status"] not in TERMINAL_STATUSES:
            return
        key = (row["tenant_id"], row["id"])
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self._capacity:
            self._rows.popitem(last=False)
