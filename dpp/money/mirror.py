"""The Redis mirror of tenant budgets (the cross-replica fast path).

Each call is one atomic script (``budget.lua`` beside this module) keyed by
operation ids, so a retried call never moves the mirror twice. Callers send
only what Postgres applied *this time* (a replay's marker may be long gone),
with the commit's ledger_version; holds stay *pending* until their commit is
reported, so drift repair never takes one in flight for drift (docs/money.md).
Postgres stays the truth: when a
tenant's hash is missing (restart, flush, eviction) the caller rebuilds it
from Postgres with ``load`` before admitting anything — never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpp.adapters.redis import Redis, tenant_key

OPERATION_MARKER_TTL_S = 7 * 24 * 3600
HOLD_PREFIX = "reserve:"
SCRIPT = Path(__file__).with_name("budget.lua").read_text(encoding="utf-8")


class MirrorMissing(Exception):
    """The tenant's counters are not in Redis; rebuild them from Postgres."""


@dataclass(frozen=True, slots=True)
class MirrorBudget:
    balance_usd_micros: int
    reserved_usd_micros: int
    version: int

    @property
    def available_usd_micros(self) -> int:
        return self.balance_usd_micros - self.reserved_usd_micros


@dataclass(frozen=True, slots=True)
class PendingHold:
    """A hold placed in the mirror whose Postgres commit was not reported back."""

    hold_id: str
    amount_usd_micros: int
    age_s: float


@dataclass(frozen=True, slots=True)
class MirrorObservation:
    budget: MirrorBudget
    pending: tuple[PendingHold, ...]


def hold_id(run_id: str) -> str:
    """The operation id of a run's reservation hold (its marker and pending entry)."""
    return f"{HOLD_PREFIX}{run_id}"


def run_id_of_hold(hold_id: str) -> str | None:
    return hold_id[len(HOLD_PREFIX) :] if hold_id.startswith(HOLD_PREFIX) else None


@dataclass(frozen=True, slots=True)
class MirrorReserve:
    accepted: list[bool]
    available_usd_micros: int


class BudgetMirror:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._script = redis.register_script(SCRIPT)

    def key(self, tenant_id: str) -> str:
        return tenant_key(self._prefix, "budget", tenant_id)

    def pending_key(self, tenant_id: str) -> str:
        """The hash of holds placed here whose Postgres commit is not yet reported."""
        return self.key(tenant_id) + ":pending"

    async def _call_raw(self, tenant_id: str, command: str, *args: object) -> list[object]:
        answer = await self._script(
            keys=[self.key(tenant_id)],
            args=[command, OPERATION_MARKER_TTL_S, *[str(a) for a in args]],
        )
        return list(answer)

    async def _call(self, tenant_id: str, command: str, *args: object) -> list[int]:
        return [int(value) for value in await self._call_raw(tenant_id, command, *args)]  # type: ignore[call-overload]

    async def reserve(
        self, tenant_id: str, items: Sequence[tuple[str, int]], resolved: Sequence[str] = ()
    ) -> MirrorReserve:
        """Hold each (hold id, amount) that fits, in order; one round trip. Each new
        hold is also recorded *pending* until its commit is reported (``resolved``
        of a later call, or ``resolve_holds``), so drift repair never mistakes it
        for drift. ``resolved``: earlier holds Postgres has committed, no longer
        pending (reported here to save a round trip of their own)."""
        assert items and all(amount > 0 for _, amount in items)
        flat = [part for operation_id, amount in items for part in (operation_id, amount)]
        answer = await self._call(tenant_id, "reserve", len(resolved), *resolved, *flat)
        if answer[0] == -1:
            raise MirrorMissing(tenant_id)
        accepted = [flag == 1 for flag in answer[2:]]
        assert len(accepted) == len(items)
        return MirrorReserve(accepted, answer[1])

    async def resolve_holds(
        self, tenant_id: str, kept: Sequence[str], released: Sequence[tuple[str, int]]
    ) -> None:
        """After the reservation's Postgres transaction: ``kept`` holds were committed
        (no longer pending), ``released`` (hold id, amount) were refused or failed and
        are given back — each only if still pending, so a hold that a repair dropped
        or a rebuild lost is never given back twice. A lost mirror has nothing to do."""
        assert all(amount > 0 for _, amount in released)
        if not kept and not released:
            return
        flat = [part for hold_id, amount in released for part in (hold_id, amount)]
        await self._call(tenant_id, "resolve", len(kept), *kept, *flat)

    async def settle_many(
        self, tenant_id: str, items: Sequence[tuple[str, int, int]], ledger_version: int
    ) -> bool:
        """Mirror settlements Postgres applied (operation id, reserved, charged) in the
        commit that produced ``ledger_version``; one round trip. Skipped when the
        mirror was loaded or repaired from that version or later (it already holds
        them); a lost mirror is rebuilt from Postgres later, so a miss is skipped
        too. True when applied."""
        assert items and ledger_version >= 1
        assert all(reserved > 0 and 0 <= charged <= reserved for _, reserved, charged in items)
        flat = [part for item in items for part in item]
        answer = await self._call(tenant_id, "settle", ledger_version, *flat)
        return answer[0] == 1 and answer[2] == 1

    async def credit(
        self, tenant_id: str, operation_id: str, amount_usd_micros: int, ledger_version: int
    ) -> bool:
        """Mirror a credit Postgres applied in the commit that produced ``ledger_version``
        (skipped like ``settle_many``). True when applied."""
        assert amount_usd_micros > 0 and ledger_version >= 1
        answer = await self._call(
            tenant_id, "credit", ledger_version, operation_id, amount_usd_micros
        )
        return answer[0] == 1 and answer[2] == 1

    async def load(self, tenant_id: str, balance: int, reserved: int, version: int) -> bool:
        """Create the mirror from Postgres values unless it already exists."""
        assert reserved >= 0 and balance - reserved >= 0
        answer = await self._call(tenant_id, "load", balance, reserved, version)
        return answer[0] == 1

    async def read(self, tenant_id: str) -> MirrorBudget | None:
        answer = await self._call(tenant_id, "read")
        if answer[0] == -1:
            return None
        return MirrorBudget(answer[1], answer[2], answer[3])

    async def observe(self, tenant_id: str) -> MirrorObservation | None:
        """The counters and the pending holds, read in one atomic step (drift repair)."""
        answer = await self._call_raw(tenant_id, "observe")
        if int(answer[0]) == -1:  # type: ignore[call-overload]
            return None
        numbers = [int(value) for value in answer[1:5]]  # type: ignore[call-overload]
        now_ms = numbers[3]
        holds = []
        for index in range(5, len(answer), 3):
            raw_id = answer[index]
            hold_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            amount = int(answer[index + 1])  # type: ignore[call-overload]
            placed_ms = int(answer[index + 2])  # type: ignore[call-overload]
            holds.append(PendingHold(hold_id, amount, max(0, now_ms - placed_ms) / 1000))
        return MirrorObservation(
            MirrorBudget(numbers[0], numbers[1], numbers[2]),
            tuple(sorted(holds, key=lambda hold: hold.hold_id)),
        )

    async def repair(
        self,
        tenant_id: str,
        observed: MirrorBudget,
        balance: int,
        reserved: int,
        version: int,
        *,
        dropped_holds: Sequence[str] = (),
    ) -> bool:
        """Overwrite the mirror with these values (``version``: the Postgres
        ledger_version they are from) if it still holds what we observed, and
        forget ``dropped_holds`` (pending holds judged abandoned)."""
        answer = await self._call(
            tenant_id,
            "repair",
            observed.balance_usd_micros,
            observed.reserved_usd_micros,
            balance,
            reserved,
            version,
            *dropped_holds,
        )
        return answer[0] == 1
