"""Admission: from a checked submission to a QUEUED run with its money reserved.

One call per ``POST /v1/runs``: draft the run, reserve it through the tenant's
budget actor (one transaction records the Idempotency-Key, writes the run row,
its reserve entry, the tenant's counter and the stored 202 for the key), then
announce it to the queue. A key that has a record already (a retry, a twin)
is withdrawn by the reservation and decided by ``IdempotencyKeys.begin``:
its replay, 409, 422, or a takeover and a second reservation. The route parses and renders;
this module decides, and never builds an HTTP answer except the 202 body it
must store with the reservation so that a retry replays the very same bytes.

The budget actor lives above this layer, so admission names what it needs from
it as ``Reserver`` and the composition root wires the budget handle in
(``dpp.actors.budgets.Budgets``), which raises the ``Reservation*`` errors
below for what went wrong on its side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import orjson

from dpp import ids, tracing
from dpp.adapters.queue.base import QueuedRun
from dpp.limits import IDEMPOTENCY_LOCK_S
from dpp.metrics import Metrics
from dpp.money.ledger import (
    ConcurrencyLimited,
    DeadlinePassed,
    IdempotencyCompletion,
    InsufficientBudget,
    KeyClaim,
    KeyNotHeld,
    KeySpendLimited,
    Reserved,
    ReserveOutcome,
    RunDraft,
)
from dpp.runs.documents import cost_headers, queued_row, run_object
from dpp.runs.idempotency import (
    Held,
    IdempotencyKeys,
    InFlight,
    Mismatch,
    Proceed,
    Replay,
    Scope,
    request_fingerprint,
)
from dpp.runs.submission import SubmitRequest

log = logging.getLogger("dpp.runs")

SUBMIT_METHOD = "POST"
SUBMIT_PATH = "/v1/runs"
JSON_MEDIA_TYPE = "application/json"
# The headers of a 202 that are stored and replayed with it.
STORED_HEADERS = ("Location", "X-DPP-Cost-Reserved", "X-DPP-Cost-Minimum-Fee", "Content-Type")
# How long releasing a key may take once the request failed (shielded from
# the request's cancellation; the key's lock expiry is the backstop).
RELEASE_TIMEOUT_S = 5.0


# --- what admission needs from above ------------------------------------------------------


class ReservationUnavailable(Exception):
    """The reservation could not be made or answered now (a 503)."""


class ReservationBusy(ReservationUnavailable):
    """The tenant's budget actor refused the message (mailbox full): nothing was sent."""


class ReservationTimedOut(ReservationUnavailable):
    """No answer in time. The reservation carries this deadline and is refused
    past it, but one committing at that very moment cannot be ruled out: with a
    key, its record says which (admission releases it, so a retry replays the run
    or proceeds); without one, the client cannot tell."""


class ReservationExpired(ReservationTimedOut):
    """The deadline passed before the reservation could commit: nothing reserved."""


class ReservationSuspended(ReservationUnavailable):
    """The tenant's budget actor kept crashing and sits out a cooldown; nothing was sent."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class ReservationOutcomeUnknown(ReservationUnavailable):
    """The budget actor died mid-batch: whether this reservation committed is unknown."""


class ReservationInvalid(Exception):
    """Postgres refused this run's data (a value the request checks let through):
    nothing was reserved, and a retry of the same request fails the same way."""


class Reserver(Protocol):
    """Reserve one run's money (the budget handle, ``dpp.actors.budgets.Budgets``).

    Answers the reservation's outcome, or raises a ``ReservationUnavailable``
    (retry later) or ``ReservationInvalid`` (the request's fault).
    """

    async def reserve(self, tenant_id: str, draft: RunDraft) -> ReserveOutcome: ...


class Announcer(Protocol):
    """Tell workers about runs just committed QUEUED (the run queue)."""

    async def enqueue(self, runs: Sequence[QueuedRun]) -> None: ...


# --- outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admitted:
    """202: the run is QUEUED and its maximum cost reserved."""

    run_id: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Replayed:
    """An earlier request with this key and body: its stored answer, as it was."""

    status: int
    headers: dict[str, str]
    body: bytes
    media_type: str


@dataclass(frozen=True, slots=True)
class KeyInFlight:
    """The same key is being processed by another request (409)."""


@dataclass(frozen=True, slots=True)
class KeyTakenOver:
    """This request held the key too long: its lock expired and another request
    with the key took it over, so this one reserved nothing and stored nothing
    (409; a retry answers the other request's outcome)."""


@dataclass(frozen=True, slots=True)
class KeyReused:
    """The key was used with another body (422)."""


@dataclass(frozen=True, slots=True)
class BudgetShort:
    """402: nothing reserved. Its answer is stored for the key (``remember_refusal``)."""

    available_usd_micros: int
    required_usd_micros: int
    key: Held | None
    # the request's fingerprint when its key may have no record yet (claimed by
    # a reservation that was refused before Postgres): ``remember_refusal`` then
    # records it the old way
    unrecorded: bytes | None = None


@dataclass(frozen=True, slots=True)
class KeySpendShort:
    """402 ``key-spend-limit`` (SPEC §7): the calling key's spend limit does not
    cover this run; nothing reserved. Stored for the key like ``BudgetShort``."""

    spend_limit_usd_micros: int
    spent_usd_micros: int
    required_usd_micros: int
    key: Held | None
    unrecorded: bytes | None = None  # as BudgetShort's


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """429: the plan's concurrent-run limit is reached (not stored: a retry is safe)."""

    max_concurrent_runs: int


SubmitOutcome = (
    Admitted
    | Replayed
    | KeyInFlight
    | KeyTakenOver
    | KeyReused
    | BudgetShort
    | KeySpendShort
    | ConcurrencyLimit
)


@dataclass(frozen=True, slots=True)
class _Claim:
    """A key this request's reservation records if no record exists (``KeyClaim``)."""

    held: Held
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class _KeyRecorded:
    """The claimed key had a record already: nothing reserved, ``begin`` decides."""


def _unrecorded(key: Held | _Claim | None) -> bytes | None:
    return key.fingerprint if isinstance(key, _Claim) else None


def _existing_key(begun: Replay | InFlight | Mismatch) -> Replayed | KeyInFlight | KeyReused:
    """The answer for a key another request holds or completed."""
    if isinstance(begun, Replay):
        headers = dict(begun.headers)
        media_type = headers.pop("Content-Type", JSON_MEDIA_TYPE)
        return Replayed(begun.status, headers, begun.body, media_type)
    return KeyInFlight() if isinstance(begun, InFlight) else KeyReused()


class Admission:
    """Admits runs; one per replica, built by the composition root."""

    def __init__(
        self,
        *,
        keys: IdempotencyKeys,
        reserver: Reserver,
        announcer: Announcer | None,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        new_run_id: Callable[[], str] = lambda: ids.new_id("run"),
    ) -> None:
        """``clock`` and ``new_run_id`` are seams for the simulator (dpp/sim),
        whose runs must be the same, byte for byte, for the same seed."""
        self._keys = keys
        self._reserver = reserver
        self._announcer = announcer
        self._metrics = metrics
        self._clock = clock
        self._new_run_id = new_run_id

    async def submit(
        self,
        tenant_id: str,
        request: SubmitRequest,
        *,
        body: Any,
        idempotency_key: str | None,
        trace_id: str | None,
        api_key_id: str | None = None,
    ) -> SubmitOutcome:
        """Admit one checked submission. ``body`` is the parsed JSON the key's
        fingerprint is taken from; ``api_key_id`` is the calling key, whose spend
        limit (SPEC §7) is judged with the tenant's budget in the same
        reservation; raises ``ReservationUnavailable``."""
        if idempotency_key is None:
            outcome = await self._admit(tenant_id, request, None, trace_id, api_key_id)
            assert not isinstance(outcome, _KeyRecorded), "no key, no claim"
            return outcome
        scope = Scope(tenant_id, SUBMIT_METHOD, SUBMIT_PATH, idempotency_key)
        fingerprint = request_fingerprint(body)
        # A first submit's key is recorded by its reservation's own transaction
        # (one commit, not two); a key that has a record already is withdrawn
        # there, and ``begin`` decides it as before.
        claim = _Claim(self._keys.new_holder(scope), fingerprint)
        outcome = await self._admit(tenant_id, request, claim, trace_id, api_key_id)
        if not isinstance(outcome, _KeyRecorded):
            return outcome
        begun = await self._keys.begin(scope, fingerprint)
        if not isinstance(begun, Proceed):
            return _existing_key(begun)
        outcome = await self._admit(tenant_id, request, begun.held, trace_id, api_key_id)
        assert not isinstance(outcome, _KeyRecorded), "a held key is not claimed"
        return outcome

    async def _admit(
        self,
        tenant_id: str,
        request: SubmitRequest,
        key: Held | _Claim | None,
        trace_id: str | None,
        api_key_id: str | None,
    ) -> SubmitOutcome | _KeyRecorded:
        """Draft, reserve and announce one run, holding or claiming ``key`` if any."""
        run_id = self._new_run_id()
        try:
            # the run's own span (its reservation commits it QUEUED): every later
            # span of the run, on any replica, hangs under it
            with tracing.run_span(trace_id, run_id, {"dpp.pack.type": request.pack.pack_type}):
                return await self._admit_run(run_id, tenant_id, request, key, trace_id, api_key_id)
        except BaseException:
            # Nothing of this request committed, or its outcome is unknown:
            # either way its record goes at once (``_release`` says why that is safe).
            await self._release(key)
            raise

    async def _admit_run(
        self,
        run_id: str,
        tenant_id: str,
        request: SubmitRequest,
        key: Held | _Claim | None,
        trace_id: str | None,
        api_key_id: str | None,
    ) -> SubmitOutcome | _KeyRecorded:
        created_at = self._clock()
        row = queued_row(
            run_id=run_id,
            pack_type=request.pack.pack_type,
            reserved_usd_micros=request.reserved_usd_micros,
            minimum_fee_usd_micros=request.minimum_fee_usd_micros,
            metadata=request.metadata,
            created_at=created_at,
        )
        accepted_body = orjson.dumps(run_object(row))
        accepted_headers = {"Location": f"{SUBMIT_PATH}/{run_id}", **cost_headers(row)}
        completion = None
        held = key.held if isinstance(key, _Claim) else key
        if held is not None:
            stored_headers = {**accepted_headers, "Content-Type": JSON_MEDIA_TYPE}
            assert set(stored_headers) == set(STORED_HEADERS)
            completion = IdempotencyCompletion(
                SUBMIT_METHOD,
                SUBMIT_PATH,
                held.scope.key,
                held.owner,
                202,
                stored_headers,
                accepted_body,
                claim=(
                    KeyClaim(key.fingerprint, IDEMPOTENCY_LOCK_S)
                    if isinstance(key, _Claim)
                    else None
                ),
            )
        draft = RunDraft(
            run_id=run_id,
            pack_type=request.pack.pack_type,
            inputs=request.inputs,
            metadata=request.metadata,
            reserved_usd_micros=request.reserved_usd_micros,
            minimum_fee_usd_micros=request.minimum_fee_usd_micros,
            timebox_sec=request.timebox_sec,
            trace_id=trace_id,
            created_at=created_at,
            idempotency=completion,
            api_key_id=api_key_id,
        )
        with tracing.span("dpp.budget.reserve"):
            outcome = await self._reserve(tenant_id, draft)

        match outcome:
            case Reserved():
                self._metrics.reservations.labels("reserved").inc()
                self._metrics.runs_submitted.labels(request.pack.pack_type).inc()
                await self._announce(
                    QueuedRun(run_id, tenant_id, request.pack.pack_type, trace_id, created_at)
                )
                # DEBUG: the caller logs the admission (the REST access line names
                # the run; MCP logs it), one line per run instead of two
                log.debug("run admitted", extra={"run_id": run_id, "tenant_id": tenant_id})
                return Admitted(run_id, accepted_body, accepted_headers)
            case InsufficientBudget(available_usd_micros=available, required_usd_micros=required):
                self._metrics.reservations.labels("insufficient").inc()
                return BudgetShort(available, required, held, _unrecorded(key))
            case KeySpendLimited(
                spend_limit_usd_micros=limit, spent_usd_micros=spent, required_usd_micros=required
            ):
                self._metrics.reservations.labels("key_spend_limit").inc()
                return KeySpendShort(limit, spent, required, held, _unrecorded(key))
            case ConcurrencyLimited(max_concurrent_runs=limit):
                self._metrics.reservations.labels("rejected").inc()
                await self._release(key)
                return ConcurrencyLimit(limit)
            case KeyNotHeld() if isinstance(key, _Claim):
                # the key had a record already: the caller asks ``begin``
                return _KeyRecorded()
            case KeyNotHeld():
                # a retry owns the key now (or it was released): its outcome is the key's
                self._metrics.reservations.labels("key_not_held").inc()
                log.warning(
                    "reservation refused: its idempotency key was taken over",
                    extra={"run_id": run_id, "tenant_id": tenant_id},
                )
                return KeyTakenOver()
            case DeadlinePassed():
                raise ReservationExpired(f"reservation {run_id} refused past its deadline")
        raise AssertionError(f"unexpected reservation outcome {outcome!r}")

    async def remember_refusal(
        self, refusal: BudgetShort | KeySpendShort, media_type: str, body: bytes
    ) -> BudgetShort | KeySpendShort | KeyTakenOver | Replayed | KeyInFlight | KeyReused:
        """Store a 402's answer for its key, so a retry replays it (SPEC §6). Only
        while this request owns the key: one that lost it to a retry stores nothing
        and answers ``KeyTakenOver`` (the key's outcome is the retry's). A key
        claimed by a reservation refused before Postgres recorded it is recorded
        here as ``submit`` used to: if another request holds or completed it, its
        answer (``Replayed``, ``KeyInFlight``, ``KeyReused``) is this request's."""
        if refusal.key is None:
            return refusal
        headers = {"Content-Type": media_type}
        if await self._store_402(refusal.key, headers, body):
            return refusal
        if refusal.unrecorded is None:
            return KeyTakenOver()
        begun = await self._keys.begin(refusal.key.scope, refusal.unrecorded)
        if not isinstance(begun, Proceed):
            return _existing_key(begun)
        if await self._store_402(begun.held, headers, body):
            return replace(refusal, key=begun.held, unrecorded=None)
        return KeyTakenOver()

    async def _store_402(self, held: Held, headers: dict[str, str], body: bytes) -> bool:
        """Complete ``held`` with the 402; False when this request no longer owns
        it. A failure releases it (the outcome is not stored either way)."""
        try:
            return await self._keys.complete(held, 402, headers, body)
        except BaseException:
            await self._release(held)
            raise

    async def _reserve(self, tenant_id: str, draft: RunDraft) -> ReserveOutcome:
        try:
            return await self._reserver.reserve(tenant_id, draft)
        except ReservationBusy:
            self._metrics.mailbox_full_rejections.labels("budget").inc()
            raise
        except ReservationOutcomeUnknown:
            log.error("budget actor crashed during a reservation", extra={"run_id": draft.run_id})
            raise

    async def _release(self, key: Held | _Claim | None) -> None:
        """Release this request's record at once, so a retry with the key proceeds
        instead of waiting out its lock; shielded (the request may be cancelled) and
        never raising (if it cannot be released, its lock expires as before).

        Safe even when the reservation's outcome is unknown: its transaction locks
        the key row and admits the draft only while this request owns it in flight.
        If it committed, the record is done and the release deletes nothing (a
        retry replays the run); if it holds the row, the release waits for its end;
        if it has not locked the row yet, it finds the key gone and never commits."""
        if isinstance(key, _Claim):
            key = key.held  # a claim not recorded releases nothing
        if key is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await self._keys.release(key)
            except Exception:
                log.warning(
                    "could not release an idempotency key; its lock expires instead",
                    extra={"tenant_id": key.scope.tenant_id},
                    exc_info=True,
                )

    async def _announce(self, run: QueuedRun) -> None:
        if self._announcer is None:
            return
        try:
            with tracing.span("dpp.queue.announce", kind=tracing.SpanKind.PRODUCER):
                await self._announcer.enqueue([run])
        except Exception:
            # The run is durable and QUEUED; the queue's backstop finds it.
            log.warning(
                "enqueue failed after admission", extra={"run_id": run.run_id}, exc_info=True
            )
