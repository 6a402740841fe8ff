"""Run rows in Postgres: the reads the API serves and the reconciler's scans.

Every statement is a named query of ``sql/queries`` (``runs.sql``,
``execution.sql``). Writes here never move money: the one that changes a row
(``mark_result_deleted``) is guarded by the row's own state, and money-bearing
transitions go through the ledger (``dpp.money.ledger``) via the budget actors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime

from dpp.adapters.postgres import Pool, Queries, Record
from dpp.money.rules import RunStatus
from dpp.runs.reads import RunReads
from dpp.runs.settled import SettledRuns


class RunStore:
    def __init__(
        self,
        pool: Pool,
        queries: Queries,
        *,
        on_read_batch: Callable[[int], None] = lambda size: None,
        on_settled_read: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_read_batch`` is told how many reads of ``owned`` each query
        answered; ``on_settled_read``, each read a kept settled row answered."""
        self._pool = pool
        self._queries = queries
        self._owned_reads = RunReads(pool, queries, on_batch=on_read_batch)
        self._settled = SettledRuns(on_hit=on_settled_read)

    # --- the tenant API ----------------------------------------------------------------

    async def owned(self, tenant_id: str, run_id: str) -> Record | None:
        """The tenant's run, or None when there is none or it is another tenant's.
        A settled run read before is answered from memory (``dpp.runs.settled``);
        concurrent reads of the others share one query (``dpp.runs.reads``)."""
        row = self._settled.get(tenant_id, run_id)
        if row is not None:
            return row
        row = await self._owned_reads.owned(tenant_id, run_id)
        if row is not None:
            self._settled.keep(row)
        return row

    async def page(
        self,
        tenant_id: str,
        statuses: Sequence[RunStatus] | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Record]:
        """Up to ``limit`` runs newest first, after the cursor ``(created_at, id)``."""
        after_created, after_id = after if after is not None else (None, None)
        return list(
            await self._pool.fetch(
                self._queries["list_runs"],
                tenant_id,
                None if statuses is None else [status.value for status in statuses],
                after_created,
                after_id,
                limit,
            )
        )

    async def usage(self, tenant_id: str, first: date, last: date) -> list[Record]:
        """Counts and settled money per UTC creation date and pack, ``first..last``."""
        return list(await self._pool.fetch(self._queries["usage_by_day"], tenant_id, first, last))

    # --- operators and the reconciler --------------------------------------------------

    async def waiting_by_pack(self) -> list[Record]:
        """QUEUED and AUDIT_REQUIRED runs of every tenant per (status, pack_type): count
        and the oldest one's age in seconds (the /metrics gauges; two partial indexes)."""
        return list(await self._pool.fetch(self._queries["waiting_by_pack"]))

    async def by_id(self, run_id: str) -> Record | None:
        """Any tenant's run: id, tenant, status, version, reservation, trace id."""
        row: Record | None = await self._pool.fetchrow(self._queries["run_by_id"], run_id)
        return row

    async def operator_page(
        self,
        tenant_id: str | None,
        statuses: Sequence[RunStatus] | None,
        limit: int,
        after: tuple[datetime, str] | None = None,
    ) -> list[Record]:
        """Any tenant's runs (or one tenant's), newest first, after the
        ``(created_at, id)`` of the last row seen: the operator console."""
        created_at, run_id = (None, None) if after is None else after
        return list(
            await self._pool.fetch(
                self._queries["operator_list_runs"],
                tenant_id,
                None if statuses is None else [status.value for status in statuses],
                limit,
                created_at,
                run_id,
            )
        )

    async def operator_get(self, run_id: str) -> Record | None:
        """Any tenant's run with every column (the operator console's run page)."""
        row: Record | None = await self._pool.fetchrow(self._queries["operator_get_run"], run_id)
        return row

    async def ledger_entries_of(self, run_ids: list[str]) -> dict[str, list[Record]]:
        """Each run's ledger entries, in the order written, in one query (read
        only); a run without entries is absent."""
        entries: dict[str, list[Record]] = {}
        for row in await self._pool.fetch(self._queries["runs_ledger_entries"], run_ids):
            entries.setdefault(row["run_id"], []).append(row)
        return entries

    async def usage_all(self, first: date, last: date) -> list[Record]:
        """``usage`` over every tenant."""
        return list(await self._pool.fetch(self._queries["usage_by_day_all"], first, last))

    async def lapsed_leases(self, limit: int) -> list[Record]:
        """PROCESSING runs whose lease passed (the reaper's candidates), oldest first."""
        return list(await self._pool.fetch(self._queries["lapsed_leases"], limit))

    async def stuck_claimed(self, older_than_sec: int, limit: int) -> list[Record]:
        """CLAIMED runs older than the threshold (finalize died between phases)."""
        return list(
            await self._pool.fetch(self._queries["stuck_claimed_runs"], older_than_sec, limit)
        )

    async def past_retention(self, limit: int) -> list[Record]:
        """Runs whose result object is due for deletion."""
        return list(await self._pool.fetch(self._queries["results_past_retention"], limit))

    async def mark_result_deleted(self, run_id: str, result_key: str) -> bool:
        """After the object is gone; True when this call marked it."""
        marked = await self._pool.fetchval(self._queries["mark_result_deleted"], run_id, result_key)
        return marked is not None
