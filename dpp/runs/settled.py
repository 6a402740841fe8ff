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
tenant). The cache is bounded by weight, not count (least recently read first
out): a row weighs its JSON (inputs, metadata, error) plus a fixed allowance for
the rest, a run heavier than ``SETTLED_RUN_BYTES_MAX`` is never kept (its reads
go to Postgres), and a replica's memory does not grow with the number or the
size of the runs it has served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import orjson

from dpp.adapters.postgres import Record
from dpp.money.rules import TERMINAL_STATUSES

# What the kept rows may weigh together, and one row at most (an input may be up
# to DPP_MAX_BODY_BYTES, 256 KiB by default): a few tens of MiB of Python objects
# per replica at most, however large the runs.
SETTLED_RUNS_BYTES_MAX: Final = 8 * 1024 * 1024
SETTLED_RUN_BYTES_MAX: Final = 32 * 1024
ROW_BYTES: Final = 1_024  # the allowance for a row's other columns


def row_weight(row: Record) -> int:
    """A row's weight: its JSON columns serialized, plus ``ROW_BYTES``."""
    weight = ROW_BYTES
    for column in ("inputs", "metadata", "error"):
        value = row[column]
        if value is not None:
            weight += len(orjson.dumps(value))
    return weight


def past_retention(row: Record, now: datetime) -> bool:
    """Whether the run is settled and its retention is over (``now`` included):
    its read answers 410 (SPEC §6), and no replica answers it from memory."""
    retention: datetime | None = row["retention_until"]
    return row["status"] in TERMINAL_STATUSES and retention is not None and retention <= now


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SettledRuns:
    """``get`` a kept settled row; ``keep`` any row read from Postgres (only a
    settled one is kept)."""

    def __init__(
        self,
        capacity_bytes: int = SETTLED_RUNS_BYTES_MAX,
        *,
        row_bytes_max: int = SETTLED_RUN_BYTES_MAX,
        now: Callable[[], datetime] = _utc_now,
        on_hit: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_hit`` is told each read answered from memory."""
        assert ROW_BYTES <= row_bytes_max <= capacity_bytes
        self._capacity_bytes = capacity_bytes
        self._row_bytes_max = row_bytes_max
        self._now = now
        self._on_hit = on_hit
        # (tenant, run id) -> (row, its weight); least recently read first
        self._rows: OrderedDict[tuple[str, str], tuple[Record, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def weight(self) -> int:
        """What the kept rows weigh together (``row_weight``)."""
        return self._bytes

    def get(self, tenant_id: str, run_id: str) -> Record | None:
        """The tenant's settled run as Postgres last answered it, or None: not
        kept, another tenant's, or past its retention (then it is dropped)."""
        key = (tenant_id, run_id)
        kept = self._rows.get(key)
        if kept is None:
            return None
        row, weight = kept
        if past_retention(row, self._now()):
            del self._rows[key]
            self._bytes -= weight
            return None
        self._rows.move_to_end(key)
        self._on_hit()
        return row

    def keep(self, row: Record) -> None:
        """Remember ``row`` if its run is settled and not too heavy; anything else
        is not kept."""
        if row["status"] not in TERMINAL_STATUSES:
            return
        # the schema's CHECK: a settled run has its retention (past_retention relies on it)
        assert row["retention_until"] is not None, row["id"]
        weight = row_weight(row)
        if weight > self._row_bytes_max:
            return
        key = (row["tenant_id"], row["id"])
        previous = self._rows.pop(key, None)
        if previous is not None:
            self._bytes -= previous[1]
        self._rows[key] = (row, weight)
        self._bytes += weight
        while self._bytes > self._capacity_bytes:
            _, (_, dropped) = self._rows.popitem(last=False)
            self._bytes -= dropped
        assert 0 <= self._bytes <= self._capacity_bytes
