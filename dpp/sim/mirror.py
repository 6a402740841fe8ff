"""The in-memory Redis mirror: ``dpp/money/budget.lua``, command by command.

One hash per tenant (its ``version`` the Postgres baseline a settle or credit
must exceed), one marker per applied operation id with the marker TTL on the
simulated clock, and the tenant's pending holds (placed at simulated time).
Each call is atomic (as a Lua script is).
Redis data loss is two faults: ``flush`` (the tenant's hash and markers gone:
FLUSHALL, a failover to an empty replica) and ``evict_markers`` (only the
markers: they carry a TTL, so ``volatile-*`` eviction takes them first).

Beyond the script, it keeps what invariant 5's per-step check needs: the
operations whose effect the current hash already includes (those Postgres had
committed when the hash was loaded or repaired, plus those applied since). A
settlement or credit applied to a hash that already includes it is money the
mirror moved twice (issue 9, hole 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dpp.money.mirror import (
    OPERATION_MARKER_TTL_S,
    MirrorBudget,
    MirrorMissing,
    MirrorObservation,
    MirrorReserve,
    PendingHold,
)
from dpp.sim.world import Faults, Trace, Violations, now_s


@dataclass(slots=True)
class Hash:
    balance: int
    reserved: int
    version: int  # the baseline: the ledger_version the values were loaded or repaired from
    # operation ids ("settle:<run>", "credit:<op>") this hash's values include
    included: set[str]


@dataclass(slots=True)
class MemMirror:
    trace: Trace
    violations: Violations
    # what Postgres had committed for a tenant at or below a ledger_version: a
    # hash loaded from counters read at that version includes exactly that
    # (``MemLedger.committed_operations``). Not what it has committed at the
    # load: a settlement may commit between the counters' read and the load
    # (the budget actor rebuilds while the settlement actor settles), and the
    # loaded values do not count it
    committed: Callable[[str, int], set[str]]
    faults: Faults | None = None
    # was this operation answered as a replay by Postgres (MemLedger.replayed)?
    replayed: Callable[[str], bool] = lambda operation_id: False
    hashes: dict[str, Hash] = field(default_factory=dict)
    markers: dict[str, dict[str, float]] = field(default_factory=dict)  # tenant -> id -> expiry
    # tenant -> hold id -> (amount, placed at): holds whose commit is not reported yet
    pending: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)

    async def _begin(self, what: str) -> None:
        if self.faults is not None:
            await self.faults.before(what, self.trace)

    def _end(self, what: str) -> None:
        if self.faults is not None:
            self.faults.after(what, self.trace)

    def _first_time(self, tenant_id: str, operation_id: str) -> bool:
        """SET marker NX EX ttl."""
        markers = self.markers.setdefault(tenant_id, {})
        expiry = markers.get(operation_id)
        if expiry is not None and expiry > now_s():
            return False
        markers[operation_id] = now_s() + OPERATION_MARKER_TTL_S
        return True

    def _exists(self, tenant_id: str, operation_id: str) -> bool:
        expiry = self.markers.get(tenant_id, {}).get(operation_id)
        return expiry is not None and expiry > now_s()

    def _apply_once(self, tenant_id: str, hash_: Hash, operation_id: str) -> None:
        """Invariant 5, per step: an operation moves a hash at most once."""
        if operation_id in hash_.included:
            # A replay reaching the mirror is hole 3; a first application landing
            # after drift repair already counted it is hole 4's race, for a
            # settlement or credit in flight instead of a reservation.
            self.violations.add(
                f"invariant 5: the mirror of {tenant_id} applied {operation_id} twice"
                f" (reserved now {hash_.reserved})",
                hole="hole3" if self.replayed(operation_id) else "hole4",
            )
        hash_.included.add(operation_id)

    # ------------------------------------------------------- the commands

    async def reserve(
        self, tenant_id: str, items: Sequence[tuple[str, int]], resolved: Sequence[str] = ()
    ) -> MirrorReserve:
        assert items and all(amount > 0 for _, amount in items)
        await self._begin("mirror.reserve")
        hash_ = self.hashes.get(tenant_id)
        if hash_ is None:
            self.trace.add(f"redis reserve {tenant_id} missing")
            raise MirrorMissing(tenant_id)
        accepted = []
        pending = self.pending.setdefault(tenant_id, {})
        for hold in resolved:
            pending.pop(hold, None)
        for operation_id, amount in items:
            if self._exists(tenant_id, operation_id):
                accepted.append(True)
            elif hash_.balance - hash_.reserved >= amount:
                self._first_time(tenant_id, operation_id)
                hash_.reserved += amount
                pending[operation_id] = (amount, now_s())
                accepted.append(True)
            else:
                accepted.append(False)
        self.trace.add(f"redis reserve {tenant_id} {accepted} reserved {hash_.reserved}")
        result = MirrorReserve(accepted, hash_.balance - hash_.reserved)
        self._end("mirror.reserve")
        return result

    async def resolve_holds(
        self, tenant_id: str, kept: Sequence[str], released: Sequence[tuple[str, int]]
    ) -> None:
        assert all(amount > 0 for _, amount in released)
        if not kept and not released:
            return
        await self._begin("mirror.resolve")
        hash_ = self.hashes.get(tenant_id)
        if hash_ is not None:
            pending = self.pending.setdefault(tenant_id, {})
            for hold in kept:
                pending.pop(hold, None)
            for hold, amount in released:
                if pending.pop(hold, None) is not None:
                    hash_.reserved -= amount
            self.trace.add(f"redis resolve {tenant_id} reserved {hash_.reserved}")
        self._end("mirror.resolve")

    async def settle_many(
        self, tenant_id: str, items: Sequence[tuple[str, int, int]], ledger_version: int
    ) -> bool:
        assert items and ledger_version >= 1
        assert all(reserved > 0 and 0 <= charged <= reserved for _, reserved, charged in items)
        await self._begin("mirror.settle")
        hash_ = self.hashes.get(tenant_id)
        applied = False
        if hash_ is not None and ledger_version > hash_.version:
            applied = True
            for operation_id, reserved, charged in items:
                if self._first_time(tenant_id, operation_id):
                    self._apply_once(tenant_id, hash_, operation_id)
                    hash_.reserved -= reserved
                    hash_.balance -= charged
            self.trace.add(
                f"redis settle {tenant_id} {[i[0] for i in items]} reserved {hash_.reserved}"
            )
        self._end("mirror.settle")
        return applied

    async def credit(
        self, tenant_id: str, operation_id: str, amount_usd_micros: int, ledger_version: int
    ) -> bool:
        assert amount_usd_micros > 0 and ledger_version >= 1
        await self._begin("mirror.credit")
        hash_ = self.hashes.get(tenant_id)
        applied = False
        if hash_ is not None and ledger_version > hash_.version:
            applied = True
            if self._first_time(tenant_id, operation_id):
                self._apply_once(tenant_id, hash_, f"credit:{operation_id}")
                hash_.balance += amount_usd_micros
                self.trace.add(f"redis credit {tenant_id} {operation_id} balance {hash_.balance}")
        self._end("mirror.credit")
        return applied

    async def load(self, tenant_id: str, balance: int, reserved: int, version: int) -> bool:
        assert reserved >= 0 and balance - reserved >= 0
        await self._begin("mirror.load")
        if tenant_id in self.hashes:
            return False
        self.pending.pop(tenant_id, None)  # holds pending on a lost mirror were lost with it
        self.hashes[tenant_id] = Hash(
            balance, reserved, version, self.committed(tenant_id, version)
        )
        self.trace.add(f"redis load {tenant_id} {balance} {reserved} v{version}")
        self._end("mirror.load")
        return True

    async def read(self, tenant_id: str) -> MirrorBudget | None:
        await self._begin("mirror.read")
        hash_ = self.hashes.get(tenant_id)
        if hash_ is None:
            return None
        return MirrorBudget(hash_.balance, hash_.reserved, hash_.version)

    async def observe(self, tenant_id: str) -> MirrorObservation | None:
        await self._begin("mirror.observe")
        hash_ = self.hashes.get(tenant_id)
        if hash_ is None:
            return None
        holds = tuple(
            PendingHold(hold, amount, max(0.0, now_s() - placed))
            for hold, (amount, placed) in sorted(self.pending.get(tenant_id, {}).items())
        )
        return MirrorObservation(MirrorBudget(hash_.balance, hash_.reserved, hash_.version), holds)

    async def repair(
        self,
        tenant_id: str,
        observed: MirrorBudget,
        balance: int,
        reserved: int,
        version: int,
        *,
        dropped_holds: Sequence[str] = (),
        included: set[str] | None = None,
    ) -> bool:
        """Compare-and-set; ``included`` is what Postgres had committed when observed."""
        await self._begin("mirror.repair")
        hash_ = self.hashes.get(tenant_id)
        if hash_ is None or (hash_.balance, hash_.reserved) != (
            observed.balance_usd_micros,
            observed.reserved_usd_micros,
        ):
            return False
        self.hashes[tenant_id] = Hash(balance, reserved, version, set(included or ()))
        pending = self.pending.setdefault(tenant_id, {})
        for hold in dropped_holds:
            pending.pop(hold, None)
        self.trace.add(f"redis repair {tenant_id} {balance} {reserved} v{version}")
        self._end("mirror.repair")
        return True

    # -------------------------------------------------------- data loss

    def flush(self, tenant_id: str) -> None:
        self.hashes.pop(tenant_id, None)
        self.markers.pop(tenant_id, None)
        self.pending.pop(tenant_id, None)
        self.trace.add(f"redis flush {tenant_id}")

    def evict_markers(self, tenant_id: str) -> None:
        self.markers.pop(tenant_id, None)
        self.trace.add(f"redis evict markers {tenant_id}")
