"""The Redis mirror of tenant budgets (the cross-replica fast path).

Each call is one atomic script (``budget.lua`` beside this module) keyed by
operation ids, so a retried call never moves the mirror twice. Postgres stays the truth: when a
tenant's hash is missing (restart, flush, eviction) the caller rebuilds it
from Postgres with ``load`` before admitting anything — never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpp.adapters.redis import Redis, tenant_key

OPERATION_MARKER_TTL_S = 7 * 24 * 3600
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

    async def _call(self, tenant_id: str, command: str, *args: object) -> list[int]:
        answer = await self._script(
            keys=[self.key(tenant_id)],
            args=[command, OPERATION_MARKER_TTL_S, *[str(a) for a in args]],
        )
        return [int(value) for value in answer]

    async def reserve(self, tenant_id: str, items: Sequence[tuple[str, int]]) -> MirrorReserve:
        """Hold each (operation id, amount) that fits, in order; one round trip."""
        assert items and all(amount > 0 for _, amount in items)
        flat = [part for operation_id, amount in items for part in (operation_id, amount)]
        answer = await self._call(tenant_id, "reserve", *flat)
        if answer[0] == -1:
            raise MirrorMissing(tenant_id)
        accepted = [flag == 1 for flag in answer[2:]]
        assert len(accepted) == len(items)
        return MirrorReserve(accepted, answer[1])

    async def release(self, tenant_id: str, items: Sequence[tuple[str, int]]) -> None:
        """Give back holds that Postgres refused. A lost mirror has nothing to give back."""
        assert all(amount > 0 for _, amount in items)
        if not items:
            return
        flat = [part for operation_id, amount in items for part in (operation_id, amount)]
        await self._call(tenant_id, "release", *flat)

    async def settle_many(self, tenant_id: str, items: Sequence[tuple[str, int, int]]) -> None:
        """Mirror committed settlements (operation id, reserved, charged); one round
        trip. A lost mirror is rebuilt from Postgres later, which already holds
        them, so a miss is simply skipped."""
        assert items
        assert all(reserved > 0 and 0 <= charged <= reserved for _, reserved, charged in items)
        flat = [part for item in items for part in item]
        await self._call(tenant_id, "settle", *flat)

    async def credit(self, tenant_id: str, operation_id: str, amount_usd_micros: int) -> None:
        assert amount_usd_micros > 0
        await self._call(tenant_id, "credit", operation_id, amount_usd_micros)

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

    async def repair(
        self, tenant_id: str, observed: MirrorBudget, balance: int, reserved: int, version: int
    ) -> bool:
        """Overwrite the mirror with Postgres values if it still holds what we observed."""
        answer = await self._call(
            tenant_id,
            "repair",
            observed.balance_usd_micros,
            observed.reserved_usd_micros,
            balance,
            reserved,
            version,
        )
        return answer[0] == 1
