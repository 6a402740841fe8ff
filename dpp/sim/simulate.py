"""One seeded run of the money path: the real actors over the simulated ports.

The schedule is trio's: ``MockClock(autojump_threshold=0)`` makes time
virtual (it jumps to the next deadline whenever every task waits), and trio's
deterministic-scheduling switch (``trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING``,
the hook its Hypothesis plugin uses, covered by trio's own
``test_the_trio_scheduler_is_deterministic_if_seeded``) shuffles each batch of
runnable tasks with a ``random.Random`` we seed. The seed therefore chooses
every interleaving; a second ``Random`` seeded from it chooses every fault.

What runs for real: the budget and settlement actors (``Budgets``, its
registries), the dispatcher and run actors, the reconciler, the supervisor
above them, the admission logic with its idempotency keys, and the runs
service's cancel.
What is simulated: Postgres, Redis, SQS and S3 (``dpp/sim/ledger.py``,
``mirror.py``, ``services.py``), the pack, and the clients.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import orjson

from dpp import faults as crash_points
from dpp.actors.budgets import Budgets
from dpp.actors.dispatcher import Dispatcher
from dpp.actors.reconciler import Reconciler
from dpp.actors.run import RunServices
from dpp.actors.supervisor import INTENSITY_MAX, Supervisor, SupervisorSpec
from dpp.metrics import Metrics
from dpp.money.rules import TERMINAL_STATUSES, RunStatus
from dpp.packs import PackRegistry
from dpp.runs.admission import (
    Admission,
    Admitted,
    BudgetShort,
    ConcurrencyLimit,
    KeyInFlight,
    KeyReused,
    KeyTakenOver,
    Replayed,
    ReservationUnavailable,
)
from dpp.runs.service import Runs
from dpp.runs.submission import SubmitRequest
from dpp.sim.ledger import MemLedger
from dpp.sim.mirror import MemMirror
from dpp.sim.services import MemBlobs, MemQueue, SimPack, mem_drift
from dpp.sim.world import KNOWN_HOLES, SCENARIOS, Faults, Trace, Violations, now_dt

LEASE_SEC = 20
HEARTBEAT_SEC = 5.0
WORKERS = 3
TENANTS = 2
CLIENTS_PER_TENANT = 2
OPS_PER_CLIENT = 5
# after the workload: faults off, this long for the reaper and reconciler to finish
HEAL_S = 1_200.0  # past QUEUED_MESSAGE_LOST_AFTER_SEC: lost messages are resent
RUN_DEADLINE_S = 20_000.0  # virtual: a run that never quiesces is a violation


@dataclass(slots=True)
class SeedResult:
    seed: int
    digest: str
    violations: list[str]
    known_holes: list[str]
    runs: int
    crashes: int
    trace: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@contextlib.contextmanager
def deterministic_trio(seed: int) -> Iterator[None]:
    """Trio's scheduler, shuffled by ``seed`` (and put back as it was after)."""
    import trio

    run_module: Any = trio._core._run
    allowed = run_module._ALLOW_DETERMINISTIC_SCHEDULING
    state = run_module._r.getstate()
    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    run_module._r.seed(seed)
    try:
        yield
    finally:
        run_module._ALLOW_DETERMINISTIC_SCHEDULING = allowed
        run_module._r.setstate(state)


_METRICS: list[Metrics] = []


def _metrics() -> Metrics:
    """One set of counters per process (nothing the simulation reads)."""
    if not _METRICS:
        from prometheus_client import CollectorRegistry

        _METRICS.append(Metrics.create(CollectorRegistry()))
    return _METRICS[0]


def run_seed(
    seed: int,
    scenarios: frozenset[str] = frozenset(),
    *,
    known: frozenset[str] = KNOWN_HOLES,
    keep_trace: bool = False,
) -> SeedResult:
    """Run one seed to the end; the same seed gives the same ``digest``."""
    import trio
    import trio.testing

    unknown = scenarios - set(SCENARIOS)
    assert not unknown, f"unknown scenarios {sorted(unknown)}"
    world = World(seed, scenarios, keep_trace)
    world.violations.known = known
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with deterministic_trio(seed), crash_points.injecting(world.faults.crash):
            trio.run(world.main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logging.disable(previous)
    return SeedResult(
        seed,
        world.trace.digest(),
        world.violations.found,
        world.violations.known_found,
        len(world.ledger.runs),
        world.faults.crashes,
        world.trace.lines,
    )


class World:
    """Everything one seed builds; ``main`` is the run."""

    def __init__(self, seed: int, scenarios: frozenset[str], keep_trace: bool) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.trace = Trace(keep=keep_trace)
        self.violations = Violations()
        self.faults = Faults(random.Random(self.rng.getrandbits(64)), scenarios)
        self.ledger = MemLedger(self.trace, self.violations, self.faults)
        self.mirror = MemMirror(
            self.trace,
            self.violations,
            self.ledger.committed_operations,
            self.faults,
            replayed=self.ledger.replayed.__contains__,
        )
        self.queue = MemQueue(self.ledger, self.trace, self.faults, LEASE_SEC)
        self.blobs = MemBlobs(self.trace, self.faults)
        self.pack = SimPack()
        self.tenant_ids = [f"ten_{index:026d}" for index in range(1, TENANTS + 1)]
        for tenant_id in self.tenant_ids:
            self.ledger.add_tenant(tenant_id, max_concurrent_runs=self.rng.choice((2, 4, 8)))
        self.run_ids = 0
        # what each client was told per Idempotency-Key
        self.told: dict[str, str] = {}
        self.known_runs: dict[str, list[str]] = {t: [] for t in self.tenant_ids}
        self._clients_left = TENANTS * CLIENTS_PER_TENANT
        # exceptions a client saw that the HTTP layer would answer 500 (by type)
        self.unexpected: dict[str, int] = {}
        self._clients_done = anyio.Event()

    def new_run_id(self) -> str:
        self.run_ids += 1
        return f"run_{self.run_ids:026d}"

    # ---------------------------------------------------------------- run

    async def main(self) -> None:
        with anyio.move_on_after(RUN_DEADLINE_S) as deadline:
            async with anyio.create_task_group() as group:
                self.violations.on_first = group.cancel_scope.cancel
                await self._live(group)
        if deadline.cancelled_caught:
            self.violations.add("the run did not quiesce before its deadline")

    async def _live(self, group: Any) -> None:
        budgets = Budgets(self.ledger, self.mirror, metrics=None)
        reconciler_box: list[Reconciler] = []

        def trigger() -> None:
            if reconciler_box:
                reconciler_box[0].trigger()

        services = RunServices(
            leases=cast(Any, self.ledger),
            queue=self.queue,
            results=self.blobs,
            settler=budgets,
            packs=PackRegistry([self.pack]),
            lease_sec=LEASE_SEC,
            heartbeat_sec=HEARTBEAT_SEC,
        )
        dispatcher = Dispatcher(
            services,
            concurrency=WORKERS,
            shutdown_grace_s=5.0,
            poll_interval_s=10.0,
            on_run_crash=lambda run_id, error: trigger(),
        )
        reconciler = Reconciler(
            runs=cast(Any, self.ledger),
            ledger=cast(Any, self.ledger),
            keys=cast(Any, self.ledger),
            drift=mem_drift(self.ledger, self.mirror),
            results=self.blobs,
            settler=budgets,
            queue=self.queue,
            reaper_interval_s=5.0,
            reconcile_interval_s=15.0,
            claimed_threshold_sec=30,
            drift_settle_s=0.5,
        )
        reconciler_box.append(reconciler)
        supervisor = Supervisor(
            "root",
            SupervisorSpec("one_for_one", intensity=INTENSITY_MAX, period_s=1.0),
            [*budgets.child_specs(), dispatcher.child_spec(), reconciler.child_spec()],
            on_child_crash=lambda supervisor, child, error: trigger(),
        )
        await group.start(supervisor.run)
        admission = Admission(
            keys=cast(Any, self.ledger),
            reserver=budgets,
            announcer=self.queue,
            metrics=_metrics(),
            clock=now_dt,
            new_run_id=self.new_run_id,
        )
        runs = Runs(cast(Any, self.ledger), self.blobs, budgets)
        for tenant_id in self.tenant_ids:
            await self._credit(
                budgets, tenant_id, f"seed-{tenant_id}", self.rng.randrange(2, 20) * 1000
            )
        async with anyio.create_task_group() as clients:
            for tenant_id in self.tenant_ids:
                for client in range(CLIENTS_PER_TENANT):
                    clients.start_soon(self._client, admission, runs, budgets, tenant_id, client)
            chaos = anyio.CancelScope()
            clients.start_soon(self._chaos, chaos)
            await self._clients_done.wait()
            chaos.cancel()
        # The world heals; every run must end and the mirror converge.
        self.faults.active = False
        self.trace.add("heal")
        await anyio.sleep(HEAL_S)
        for _ in range(2):
            await reconciler.reconcile_once()
        self._final_checks()
        await supervisor.shutdown()

    # ------------------------------------------------------------ clients

    async def _client(
        self, admission: Admission, runs: Runs, budgets: Budgets, tenant_id: str, client: int
    ) -> None:
        rng = self.rng
        try:
            for op in range(OPS_PER_CLIENT):
                await anyio.sleep(rng.uniform(0.0, 20.0))
                kind = rng.choices(("submit", "cancel", "credit"), weights=(6, 3, 1))[0]
                name = f"{tenant_id[-2:]}.{client}.{op}"
                if kind == "submit":
                    await self._submit(admission, tenant_id, name)
                elif kind == "cancel":
                    await self._cancel(runs, tenant_id)
                else:
                    await self._credit(
                        budgets, tenant_id, f"credit-{name}", rng.randrange(1, 5) * 1000
                    )
        finally:
            self._clients_left -= 1
            if not self._clients_left:
                self._clients_done.set()

    def _tell(self, key: str | None, outcome: str) -> None:
        """What the client was told; one key never tells two outcomes."""
        self.trace.add(f"client told {key} {outcome}")
        if key is None:
            return
        first = self.told.setdefault(key, outcome)
        if first != outcome:
            self.violations.add(
                f"Idempotency-Key {key!r} answered {first} and then {outcome}", hole="hole1"
            )

    async def _submit(self, admission: Admission, tenant_id: str, name: str) -> None:
        rng = self.rng
        key = f"key-{name}" if rng.random() < 0.75 else None
        reserved = rng.choice((1_000, 2_000, 5_000))
        inputs = {
            "work_s": rng.choice((0.5, 3.0, 12.0, 40.0, 70.0)),
            "cost": rng.choice((0, 500, 1_500, 9_000)),
            "fail": rng.random() < 0.15,
        }
        body = {"pack_type": "sim", "inputs": inputs, "max_cost_usd_micros": reserved}
        request = SubmitRequest(self.pack, inputs, reserved, 100, 60, {})
        for _attempt in range(8):
            try:
                outcome = await admission.submit(
                    tenant_id, request, body=body, idempotency_key=key, trace_id=None
                )
                if isinstance(outcome, BudgetShort):
                    outcome = await admission.remember_refusal(
                        outcome, "application/problem+json", b"402"
                    )
            except (ReservationUnavailable, OSError) as error:
                self.trace.add(f"client {name} 503 {type(error).__name__}")
                await anyio.sleep(rng.uniform(1.0, 30.0))
                continue
            except Exception as error:
                # Not a 503 the route maps: the HTTP layer answers 500. Seen: a
                # MirrorMissing when a flush races the budget actor's rebuild.
                self.unexpected[type(error).__name__] = (
                    self.unexpected.get(type(error).__name__, 0) + 1
                )
                self.trace.add(f"client {name} 500 {type(error).__name__}")
                await anyio.sleep(rng.uniform(1.0, 30.0))
                continue
            if self.faults.chance(0.1):
                self.trace.add(f"client {name} reply lost")
                await anyio.sleep(rng.uniform(1.0, 30.0))
                continue  # retried: with a key, the same answer must come back
            match outcome:
                case Admitted(run_id=run_id):
                    self.known_runs[tenant_id].append(run_id)
                    self._tell(key, f"202 {run_id}")
                    return
                case Replayed(status=status, body=stored):
                    if status == 202:
                        run_id = orjson.loads(stored)["id"]
                        self.known_runs[tenant_id].append(run_id)
                        self._tell(key, f"202 {run_id}")
                    else:
                        self._tell(key, str(status))
                    return
                case BudgetShort():
                    self._tell(key, "402")
                    return
                case KeyInFlight() | KeyTakenOver() | ConcurrencyLimit():
                    self.trace.add(f"client {name} {type(outcome).__name__}")
                    await anyio.sleep(rng.uniform(5.0, 40.0))
                case KeyReused():
                    self.violations.add(f"key {key!r} refused as reused with the same body")
                    return

    async def _cancel(self, runs: Runs, tenant_id: str) -> None:
        known = self.known_runs[tenant_id]
        if not known:
            return
        run_id = self.rng.choice(known)
        for _attempt in range(self.rng.choice((1, 2, 3))):  # retries replay the cancel
            try:
                row = await runs.cancel(tenant_id, run_id)
                self.trace.add(f"client cancel {run_id} -> {row['status']}")
            except Exception as error:  # 404/409/503 to the client
                self.trace.add(f"client cancel {run_id} {type(error).__name__}")
            await anyio.sleep(self.rng.uniform(0.0, 5.0))

    async def _credit(
        self, budgets: Budgets, tenant_id: str, operation_id: str, amount: int
    ) -> None:
        for _attempt in range(6):
            try:
                await budgets.credit(tenant_id, amount, operation_id)
                return
            except Exception as error:
                self.trace.add(f"client credit {operation_id} {type(error).__name__}")
                await anyio.sleep(self.rng.uniform(1.0, 10.0))

    # -------------------------------------------------------------- chaos

    async def _chaos(self, scope: anyio.CancelScope) -> None:
        import trio

        with scope:
            while True:
                await anyio.sleep(self.rng.expovariate(1 / 25.0))
                tenant_id = self.rng.choice(self.tenant_ids)
                what = self.rng.random()
                if what < 0.25:
                    self.mirror.flush(tenant_id)
                elif what < 0.5 and "marker_loss" in self.faults.scenarios:
                    self.mirror.evict_markers(tenant_id)
                elif what < 0.75:
                    jump = self.rng.uniform(5.0, 60.0)
                    self.trace.add(f"clock jump {jump:.3f}")
                    clock = trio.lowlevel.current_clock()
                    cast(Any, clock).jump(jump)

    # ------------------------------------------------------------- checks

    def _final_checks(self) -> None:
        self.ledger.check("the end")
        for run in self.ledger.runs.values():
            if run["status"] not in TERMINAL_STATUSES and run["status"] != RunStatus.AUDIT_REQUIRED:
                self.violations.add(f"{run['id']} still {run['status']} after the world healed")
        for tenant_id in self.tenant_ids:
            tenant = self.ledger.tenants[tenant_id]
            hash_ = self.mirror.hashes.get(tenant_id)
            if hash_ is not None and (hash_.balance, hash_.reserved) != (
                tenant.balance,
                tenant.reserved,
            ):
                self.violations.add(
                    f"invariant 5: mirror of {tenant_id} is {hash_.balance}/{hash_.reserved},"
                    f" postgres {tenant.balance}/{tenant.reserved} after the world healed"
                )


def simulate(
    seeds: list[int],
    scenarios: frozenset[str] = frozenset(),
    *,
    report: Callable[[SeedResult], None] = lambda result: None,
    stop_at_first: bool = True,
) -> tuple[list[SeedResult], float]:
    """Run ``seeds`` in order; the failures, and seeds per second."""
    started = time.perf_counter()
    failures = []
    ran = 0
    for seed in seeds:
        ran += 1
        result = run_seed(seed, scenarios)
        report(result)
        if not result.ok:
            failures.append(result)
            if stop_at_first:
                break
    elapsed = time.perf_counter() - started
    return failures, ran / elapsed if elapsed > 0 else 0.0
