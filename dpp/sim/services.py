"""The other simulated ports: an SQS-like queue, a blob store, drift repair, a pack.

- ``MemQueue`` behaves as ``dpp/adapters/queue/sqs.py`` over SQS: a message
  is a hint; receiving hides it for the visibility timeout, after which it is
  delivered again; the claim is the guarded UPDATE in the ledger. Faults:
  duplicate sends (a retried SendMessage), lost sends (the backstop re-sends),
  a claim statement that fails (the message reappears).
- ``MemBlobs`` keeps objects with their receipt metadata.
- ``mem_drift`` is ``dpp/money/drift.py``'s own repair over the in-memory stores.
- ``SimPack`` sleeps, then answers a cost or a pack error, as its inputs say.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus

from dpp.adapters.blobs import StoredObject
from dpp.adapters.queue.base import (
    STATEMENT_DEADLINE_S,
    ClaimedRun,
    DeadLetter,
    QueuedRun,
    claimed_from_row,
)
from dpp.limits import CLAIM_BATCH_MAX, QUEUED_MESSAGE_LOST_AFTER_SEC
from dpp.money.drift import DriftRepair, TenantCounters
from dpp.money.mirror import MirrorBudget, MirrorObservation
from dpp.packs import PackContext, PackError, PackOutput
from dpp.packs.base import FieldError
from dpp.sim.ledger import MemLedger
from dpp.sim.mirror import MemMirror
from dpp.sim.world import Faults, Trace, now_dt, now_s


@dataclass(slots=True)
class Message:
    seq: int
    run_id: str
    visible_at: float
    handle: str = ""


@dataclass(slots=True)
class MemQueue:
    """The SQS backend's behaviour (``RunQueue``)."""

    ledger: MemLedger
    trace: Trace
    faults: Faults | None
    lease_sec: int
    backend: str = "sqs"
    claim_waits: bool = False
    messages: list[Message] = field(default_factory=list)
    sent: int = 0
    receipts: int = 0
    _wake: list[Callable[[], None]] = field(default_factory=list)

    async def enqueue(self, runs: Sequence[QueuedRun]) -> None:
        faults = self.faults
        if faults is not None:
            await faults.before("sqs.send", self.trace)
        for run in runs:
            copies = 2 if faults is not None and faults.chance(0.05) else 1
            if faults is not None and faults.chance(0.02):
                copies = 0  # accepted, then lost (retention, a purge): the backstop resends
            for _ in range(copies):
                self.sent += 1
                self.messages.append(Message(self.sent, run.run_id, now_s()))
            self.trace.add(f"sqs send {run.run_id} x{copies}")
        for wake in self._wake:
            wake()
        await self.ledger.mark_enqueued([run.run_id for run in runs])

    async def claim_batch(self, n: int) -> list[ClaimedRun]:
        assert 1 <= n <= CLAIM_BATCH_MAX
        if self.faults is not None:
            await self.faults.before("sqs.receive", self.trace)
        now = now_s()
        visible = sorted(
            (m for m in self.messages if m.visible_at <= now), key=lambda m: (m.visible_at, m.seq)
        )[: min(n, 10)]
        for message in visible:
            self.receipts += 1
            message.handle = f"h{self.receipts}"
            message.visible_at = now + self.lease_sec
        claimed = []
        # shielded with a deadline, as the SQS backend claims a received batch
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STATEMENT_DEADLINE_S
            for message in visible:
                run = await self._claim_message(message)
                if run is not None:
                    claimed.append(run)
        return claimed

    async def _claim_message(self, message: Message) -> ClaimedRun | None:
        try:
            with anyio.fail_after(STATEMENT_DEADLINE_S, shield=True):
                row = await self.ledger.claim_run_by_id(message.run_id, self.lease_sec)
        except (OSError, TimeoutError):
            return None  # left in flight: it reappears after the visibility timeout
        if row is None:
            self._delete(message.handle)
            return None
        return claimed_from_row(row, message.handle)

    def _delete(self, handle: str) -> None:
        # a stale receipt handle (the message was received again since) deletes nothing
        self.messages = [m for m in self.messages if m.handle != handle]

    async def extend_visibility(self, run: ClaimedRun, visibility_sec: int) -> None:
        if self.faults is not None:
            await self.faults.before("sqs.extend", self.trace)
        for message in self.messages:
            if message.handle == run.receipt_handle:
                message.visible_at = now_s() + visibility_sec

    async def ack(self, run: ClaimedRun) -> None:
        if self.faults is not None:
            await self.faults.before("sqs.delete", self.trace)
        assert run.receipt_handle is not None
        self._delete(run.receipt_handle)

    async def release(self, run: ClaimedRun) -> bool:
        released = await self.ledger.release_run(run.run_id, run.lease_token) is not None
        try:
            if released:
                await self.enqueue(
                    [QueuedRun(run.run_id, run.tenant_id, run.pack_type, run.trace_id, now_dt())]
                )
            assert run.receipt_handle is not None
            self._delete(run.receipt_handle)
        except OSError:
            pass  # release cleared enqueued_at: the backstop announces the run
        return released

    async def requeue_unsent(self, older_than_sec: int) -> int:
        rows = await self.ledger.queued_unsent(older_than_sec, 500, QUEUED_MESSAGE_LOST_AFTER_SEC)
        runs = [
            QueuedRun(r["id"], r["tenant_id"], r["pack_type"], r["trace_id"], now_dt())
            for r in rows
        ]
        if runs:
            await self.enqueue(runs)
        return len(runs)

    async def receive_dead_letters(self, n: int) -> list[DeadLetter]:
        return []  # no redrive policy is simulated

    async def delete_dead_letter(self, letter: DeadLetter) -> None:
        raise AssertionError("no dead letters are simulated")

    async def listen(
        self, wake: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._wake.append(wake)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            self._wake.remove(wake)

    async def ping(self) -> None:
        return None


@dataclass(slots=True)
class MemBlobs:
    """Object storage with metadata (``ResultStore``)."""

    trace: Trace
    faults: Faults | None
    presign_expiry_sec: int = 3600
    objects: dict[str, StoredObject] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)

    async def ping(self) -> None:
        return None

    async def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        if self.faults is not None:
            await self.faults.before("s3.put", self.trace)
        self.objects[key] = StoredObject(key, len(body), content_type, dict(metadata))
        self.bodies[key] = body
        self.trace.add(f"s3 put {key}")
        if self.faults is not None:
            self.faults.after("s3.put", self.trace)

    async def head(self, key: str) -> StoredObject | None:
        if self.faults is not None:
            await self.faults.before("s3.head", self.trace)
        return self.objects.get(key)

    async def get(self, key: str) -> bytes:
        return self.bodies[key]

    async def delete(self, key: str) -> None:
        if self.faults is not None:
            await self.faults.before("s3.delete", self.trace)
        self.objects.pop(key, None)
        self.bodies.pop(key, None)
        self.trace.add(f"s3 delete {key}")

    async def presigned_get(self, key: str, *, base_url: str | None = None) -> str:
        return f"sim://{key}"


@dataclass(slots=True)
class MemCounters:
    """``dpp.money.drift.CountersStore`` over the in-memory ledger, so the
    reconciler runs the real drift repair. It remembers, per tenant, what
    Postgres had committed at its last look: the mirror a repair writes from
    that look includes exactly those operations (``MemMirror``'s double-apply
    check reads it)."""

    ledger: MemLedger
    committed_at_look: dict[str, set[str]] = field(default_factory=dict)

    async def tenant_ids_page(self, after_tenant_id: str, limit: int) -> list[str]:
        return sorted(t for t in self.ledger.tenants if t > after_tenant_id)[:limit]

    async def tenant_counters(self, tenant_ids: Sequence[str]) -> list[TenantCounters]:
        await self.ledger._begin("tenant_counters")
        rows = []
        for tenant_id, tenant in self.ledger.tenants.items():
            if tenant_id in tenant_ids:
                self.committed_at_look[tenant_id] = self.ledger.committed_operations(
                    tenant_id, tenant.version
                )
                rows.append(
                    TenantCounters(tenant_id, tenant.balance, tenant.reserved, tenant.version)
                )
        return rows

    async def reserved_run_ids(self, run_ids: Sequence[str]) -> Collection[str]:
        return await self.ledger.reserved_run_ids(run_ids)


@dataclass(slots=True)
class RepairingMirror:
    """``dpp.money.drift.MirrorRepairs`` over ``MemMirror``: a repair carries what
    Postgres had committed when drift repair last looked at the tenant."""

    mirror: MemMirror
    counters: MemCounters

    async def observe(self, tenant_id: str) -> MirrorObservation | None:
        return await self.mirror.observe(tenant_id)

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
        return await self.mirror.repair(
            tenant_id,
            observed,
            balance,
            reserved,
            version,
            dropped_holds=dropped_holds,
            included=self.counters.committed_at_look.get(tenant_id),
        )


def mem_drift(ledger: MemLedger, mirror: MemMirror) -> DriftRepair:
    """The real drift repair over the in-memory stores."""
    counters = MemCounters(ledger)
    return DriftRepair(counters, RepairingMirror(mirror, counters))


class SimPack:
    """A pack whose inputs say how long it works, what it costs, whether it fails."""

    pack_type = "sim"
    description = "The simulator's pack: sleeps work_s, then costs cost or fails."
    input_schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
    }
    minimum_fee_usd_micros = 100
    default_reservation_usd_micros = 1_000
    max_reservation_usd_micros = 1_000_000
    default_timebox_sec = 60
    pricing: dict[str, Any] = {"model": "simulated"}

    def validate(self, inputs: Any) -> list[FieldError]:
        return []

    def estimate_cost_usd_micros(self, inputs: Any) -> int:
        return int(inputs["cost"])

    async def execute(self, inputs: Any, ctx: PackContext) -> PackOutput:
        await anyio.sleep(float(inputs["work_s"]))
        if inputs["fail"]:
            raise PackError("Simulated failure", "The simulator's pack failed on purpose.")
        return PackOutput(
            body=f'{{"run":"{ctx.run_id}"}}'.encode(),
            content_type="application/json",
            actual_cost_usd_micros=int(inputs["cost"]),
        )
