"""Runs after admission: read them, page through them, cancel, count, resolve.

The tenant API and the admin API call these; each answers a stored run (a
row) or a typed refusal that the HTTP layer renders. Money moves only through
``Settler`` (the budget handle, wired in by the composition root): cancelling
and an operator's resolve are settlements like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

from dpp import ids, tracing
from dpp.adapters.blobs import ResultStore
from dpp.adapters.postgres import Record
from dpp.money.ledger import SettleRefused, SettleRequest, SettleResult
from dpp.money.rules import Outcome, RunStatus, Settlement
from dpp.runs.documents import RunRow, encode_cursor, run_object, timestamp
from dpp.runs.failures import RunFailure
from dpp.runs.settled import past_retention
from dpp.runs.store import RunStore

# An operator's resolve of an AUDIT_REQUIRED run, a span of the run's trace.
RESOLVE_SPAN = "dpp.run.resolve"


class Settler(Protocol):
    """Settle one run through its tenant's settlement actor (``dpp.actors.budgets``).

    Raises ``SettleRefused`` when the run is not in a state the request may
    move it from, and ``SettlementUnavailable`` when it cannot settle now.
    """

    async def settle(self, tenant_id: str, request: SettleRequest) -> SettleResult: ...


# --- refusals ----------------------------------------------------------------------------


class SettlementUnavailable(Exception):
    """The settlement actor could not take or answer the settlement now (503 with
    ``retry_after_s``). A settlement is idempotent: retrying it is safe."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class RunNotFound(Exception):
    """No such run (for this tenant): one answer for both, so existence never leaks."""


class RunGone(Exception):
    """The owner's terminal run is past its retention (410)."""

    def __init__(self, row: RunRow) -> None:
        super().__init__(row["id"])
        self.status = RunStatus(row["status"])
        self.charged_usd_micros: int | None = row["charged_usd_micros"]
        self.refunded_usd_micros: int | None = row["refunded_usd_micros"]


class RunNotCancelable(Exception):
    """Only a QUEUED run can be canceled (409); ``status`` is where it is."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class RunNotAuditRequired(Exception):
    """Only an AUDIT_REQUIRED run can be resolved (409)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class ChargeAboveReservation(Exception):
    """An operator asked to charge more than the run reserved (422)."""

    def __init__(self, reserved_usd_micros: int) -> None:
        super().__init__(reserved_usd_micros)
        self.reserved_usd_micros = reserved_usd_micros


# --- answers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunView:
    """A run as its owner sees it: the row, and the run object with its result link."""

    row: Record
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunPage:
    documents: list[dict[str, Any]]
    next_cursor: str | None
    has_more: bool


class Runs:
    def __init__(self, store: RunStore, results: ResultStore, settler: Settler) -> None:
        self._store = store
        self._results = results
        self._settler = settler

    async def get(self, tenant_id: str, run_id: str, *, base_url: str | None = None) -> RunView:
        """The tenant's run; ``RunNotFound``, or ``RunGone`` past retention.
        ``base_url``: the API's address as the client reached it, for result links
        DPP serves itself (a local results store)."""
        row = await self._owned(tenant_id, run_id)
        if past_retention(row, datetime.now(UTC)):
            raise RunGone(row)
        return RunView(row, run_object(row, await self._result_link(row, base_url)))

    async def page(
        self,
        tenant_id: str,
        *,
        statuses: list[RunStatus] | None,
        after: tuple[datetime, str] | None,
        limit: int,
        base_url: str | None = None,
    ) -> RunPage:
        """Newest first, after the cursor; one row more than asked says whether more exist."""
        rows = await self._store.page(tenant_id, statuses, after, limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        documents = [run_object(row, await self._result_link(row, base_url)) for row in rows]
        next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_more else None
        return RunPage(documents, next_cursor, has_more)

    async def cancel(self, tenant_id: str, run_id: str) -> Record:
        """Cancel a QUEUED run (full refund); a CANCELED one again is a no-op (SPEC §6)."""
        row = await self._owned(tenant_id, run_id)
        if row["status"] not in (RunStatus.QUEUED, RunStatus.CANCELED):
            raise RunNotCancelable(row["status"])
        request = SettleRequest(
            row["id"], Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        )
        try:
            await self._settler.settle(tenant_id, request)
        except SettleRefused as refused:
            raise RunNotCancelable(refused.status) from None
        return await self._owned(tenant_id, row["id"])

    async def result_body(self, row: RunRow) -> bytes | None:
        """The stored result document of a COMPLETED run (the MCP tools answer it
        inline); None when there is none or it is past retention."""
        if row["status"] != RunStatus.COMPLETED or row["result_key"] is None:
            return None
        if row["result_deleted_at"]:
            return None
        return await self._results.get(row["result_key"])

    async def usage(self, tenant_id: str, first: date, last: date) -> list[Record]:
        return await self._store.usage(tenant_id, first, last)

    # --- operators (the console): any tenant's runs, read only ---------------------------

    async def operator_page(
        self,
        tenant_id: str | None,
        statuses: list[RunStatus] | None,
        limit: int,
        after: tuple[datetime, str] | None = None,
    ) -> list[Record]:
        """Any tenant's runs, or one tenant's, newest first (at most ``limit``),
        after the ``(created_at, id)`` of the last row seen (``decode_cursor``)."""
        assert 1 <= limit <= 1000, limit
        if tenant_id is not None and not ids.is_id(tenant_id, "ten"):
            return []
        return await self._store.operator_page(tenant_id, statuses, limit, after)

    async def operator_get(self, run_id: str) -> tuple[Record, list[Record]]:
        """Any tenant's run and its ledger entries; ``RunNotFound``."""
        row = await self._store.operator_get(run_id) if ids.is_id(run_id, "run") else None
        if row is None:
            raise RunNotFound(run_id)
        entries = await self._store.ledger_entries_of([run_id])
        return row, entries.get(run_id, [])

    async def operator_entries(self, run_ids: list[str]) -> dict[str, list[Record]]:
        """The ledger entries of each of these runs (any tenant's), in one read;
        a run with none maps to an empty list."""
        found = await self._store.ledger_entries_of(run_ids) if run_ids else {}
        return {run_id: found.get(run_id, []) for run_id in run_ids}

    async def usage_all(self, first: date, last: date) -> list[Record]:
        """Runs, charged and refunded per UTC creation date and pack, every tenant."""
        return await self._store.usage_all(first, last)

    async def resolve(self, run_id: str, outcome: Outcome, charged_usd_micros: int) -> Settlement:
        """An operator settles an AUDIT_REQUIRED run once, charging exactly this."""
        assert outcome in (Outcome.COMPLETED, Outcome.FAILED), outcome
        assert charged_usd_micros >= 0
        row = await self._store.by_id(run_id) if ids.is_id(run_id, "run") else None
        if row is None:
            raise RunNotFound(run_id)
        if row["status"] != RunStatus.AUDIT_REQUIRED:
            raise RunNotAuditRequired(row["status"])
        if charged_usd_micros > row["reserved_usd_micros"]:
            raise ChargeAboveReservation(row["reserved_usd_micros"])
        failure = None if outcome is Outcome.COMPLETED else RunFailure.resolved_by_operator()
        request = SettleRequest(
            run_id,
            outcome,
            actual_cost_usd_micros=charged_usd_micros,
            from_statuses=frozenset({RunStatus.AUDIT_REQUIRED}),
            charged_override_usd_micros=charged_usd_micros,
            error=None if failure is None else failure.document(),
        )
        # a span of the run's own trace, as the reconciler's set-aside was
        with tracing.run_step(
            row["trace_id"], run_id, RESOLVE_SPAN, {"dpp.run.outcome": outcome.value}
        ):
            try:
                result = await self._settler.settle(row["tenant_id"], request)
            except SettleRefused as refused:
                raise RunNotAuditRequired(refused.status) from None
        return result.settlement

    async def _owned(self, tenant_id: str, run_id: str) -> Record:
        row = await self._store.owned(tenant_id, run_id) if ids.is_id(run_id, "run") else None
        if row is None:
            raise RunNotFound(run_id)
        return row

    async def _result_link(self, row: RunRow, base_url: str | None) -> dict[str, Any] | None:
        if row["status"] != RunStatus.COMPLETED or row["result_key"] is None:
            return None
        if row["result_deleted_at"]:
            return None
        expires_at = datetime.now(UTC) + timedelta(seconds=self._results.presign_expiry_sec)
        return {
            "download_url": await self._results.presigned_get(row["result_key"], base_url=base_url),
            "expires_at": timestamp(expires_at, cached=False),
            "sha256": row["result_sha256"],
            "bytes": row["result_bytes"],
            "content_type": row["result_content_type"],
        }
