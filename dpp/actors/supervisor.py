"""Supervision tree: Erlang/OTP supervisor rules on anyio.

- Children start in list order, each awaited as started (`task_group.start`)
  before the next, and stop in reverse order.
- A child that raises is logged and restarted per its `Restart` type;
  cancellation is never swallowed.
- "If more than MaxR restarts occur in the last MaxT seconds, the supervisor
  terminates all the child processes and then itself": `run` stops every child
  in reverse order and raises `IntensityExceeded`, which the parent supervisor
  sees as this child crashing.

Stopping (OTP's shutdown procedure): the supervisor sets `stopping`, then
takes the children in reverse order. A child with a `stop` hook is asked to
stop gracefully (an actor closes its mailbox and drains it; a server stops
accepting) and gets `shutdown_s` to return before it is cancelled. A child
without a hook is cancelled at once -- OTP's shutdown signal to a process that
does not trap exits -- so a plain loop never stalls shutdown; its `finally:`
blocks still run their own shielded, bounded cleanup. (A child that ends by
watching `stopping` passes a hook, even `stop=lambda: None`, to be given its
`shutdown_s`.) Once a child has reported started, its task is shielded from
outside cancellation: only its supervisor cancels it, so reverse-order
shutdown holds even when the supervisor itself is cancelled.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, assert_never, cast

import anyio
from anyio.abc import TaskGroup, TaskStatus

from dpp.actors.kernel import Actor, ActorRef, Mailbox
from dpp.schemas import COUNT, Schema, all_required

__all__ = [
    "CHILDREN_MAX",
    "SHUTDOWN_S_MAX",
    "ChildSpec",
    "IntensityExceeded",
    "Restart",
    "RestartIntensity",
    "Supervisor",
    "SupervisorSpec",
    "actor_child",
    "should_restart",
]

M = TypeVar("M")

logger = logging.getLogger("dpp.supervisor")

CHILDREN_MAX = 1_000
SHUTDOWN_S_MAX = 3_600.0
INTENSITY_MAX = 1_000
# Extra time a parent gives a nested supervisor beyond the sum of its children's.
NESTED_SHUTDOWN_MARGIN_S = 1.0

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
ChildState = Literal["starting", "running", "restarting", "stopping", "stopped", "crashed"]
SupervisorState = Literal["starting", "running", "stopping", "stopped", "crashed"]

# A node of GET /admin/actors (SPEC §3, §6): these members on every node; each
# kind adds its own (a dispatcher its runs in flight, a registry its actors).
ACTOR_NODE = Schema(
    "ActorNode",
    all_required(
        {
            "name": {"type": "string"},
            "kind": {"type": "string"},
            "state": {"type": "string"},
            "mailbox_depth": COUNT,
            "restarts": COUNT,
            "children": {"type": "array", "items": {"$ref": "#/components/schemas/ActorNode"}},
        },
        closed=False,
    ),
)


class Restart(enum.Enum):
    """OTP restart types."""

    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only when it raised
    TEMPORARY = "temporary"  # never restarted


def should_restart(restart: Restart, error: BaseException | None) -> bool:
    """Pure restart decision for a child that exited (`error` None: returned normally)."""
    match restart:
        case Restart.PERMANENT:
            return True
        case Restart.TRANSIENT:
            return error is not None
        case Restart.TEMPORARY:
            return False
        case _:
            assert_never(restart)


class IntensityExceeded(Exception):
    """More than `intensity` restarts within `period_s`: the supervisor gave up.

    Raised by `Supervisor.run` (and `ActorRegistry.run`) after all children have
    stopped, so the parent sees this child crash; at the root it ends the process.
    """

    def __init__(self, supervisor: str, child_id: str, intensity: int, period_s: float) -> None:
        super().__init__(
            f"{supervisor}: more than {intensity} restarts in {period_s}s (last: {child_id})"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.intensity = intensity
        self.period_s = period_s


class RestartIntensity:
    """Sliding window of restart times: at most `intensity` within `period_s`."""

    __slots__ = ("_times", "intensity", "period_s")

    def __init__(self, intensity: int, period_s: float) -> None:
        assert 0 <= intensity <= INTENSITY_MAX, intensity
        assert period_s > 0 and math.isfinite(period_s), period_s
        self.intensity = intensity
        self.period_s = period_s
        # One more than allowed: the entry that exceeds the limit.
        self._times: deque[float] = deque(maxlen=intensity + 1)

    def record(self, now: float) -> bool:
        """Record a restart at `now`; False when it is one too many."""
        assert not self._times or now >= self._times[-1], "clock went backwards"
        while self._times and now - self._times[0] >= self.period_s:
            self._times.popleft()
        self._times.append(now)
        return len(self._times) <= self.intensity

    def count(self) -> int:
        return len(self._times)

    def reset(self) -> None:
        self._times.clear()


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What a supervisor needs to start, stop and describe one child.

    start: async function taking a `task_status` keyword; it reports readiness
        with `task_status.started(value)` and runs until the child ends.
    stop: optional sync trigger for a graceful stop at this child's turn
        (close a mailbox, set a server's shutdown event). Without one the
        child is cancelled at its turn.
    shutdown_s: how long a child with a `stop` hook may take to return once
        asked, before it is cancelled; 0 cancels at once.
    statistics: optional node for the tree; its keys are merged into the node
        the supervisor builds (name, kind, state and restarts are the
        supervisor's view and win). JSON types only.
    """

    id: str
    kind: str
    start: Callable[..., Awaitable[Any]]
    restart: Restart = Restart.PERMANENT
    shutdown_s: float = 5.0
    statistics: Callable[[], dict[str, Any]] | None = None
    stop: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        assert self.id, "children have ids"
        assert self.kind, "children have kinds"
        assert 0 <= self.shutdown_s <= SHUTDOWN_S_MAX, self.shutdown_s


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    strategy: Strategy = "one_for_one"
    intensity: int = 5
    period_s: float = 10.0

    def __post_init__(self) -> None:
        assert self.strategy in ("one_for_one", "one_for_all", "rest_for_one"), self.strategy
        assert 0 <= self.intensity <= INTENSITY_MAX, self.intensity
        assert self.period_s > 0 and math.isfinite(self.period_s), self.period_s


class _StartProbe:
    """Passes readiness through, remembering that it happened.

    Readiness is also the moment the child's scope becomes shielded (see the
    module docstring): before it, the caller of `start` may still cancel it.
    """

    __slots__ = ("_inner", "has_started", "scope")

    def __init__(self, inner: TaskStatus[Any]) -> None:
        self._inner = inner
        self.has_started = False
        self.scope: anyio.CancelScope | None = None

    def started(self, value: Any = None) -> None:
        assert not self.has_started, "started() called twice"
        self.has_started = True
        if self.scope is not None:
            self.scope.shield = True
        self._inner.started(value)


@dataclass(eq=False, slots=True)
class _Child:
    """A supervisor's live view of one child (the spec is the static part)."""

    spec: ChildSpec
    state: ChildState = "stopped"
    restarts: int = 0
    # Per incarnation: set by the host task.
    scope: anyio.CancelScope | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)
    error: Exception | None = None
    value: Any = None


class Supervisor:
    """Starts, watches and restarts a list of children (see the module docstring)."""

    def __init__(
        self,
        name: str,
        spec: SupervisorSpec,
        children: list[ChildSpec],
        *,
        on_child_crash: Callable[[str, str, BaseException], None] | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        assert name, "supervisors have names"
        assert len(children) <= CHILDREN_MAX, len(children)
        ids = [child.id for child in children]
        assert len(set(ids)) == len(ids), f"duplicate child ids in {name}: {ids}"
        self.name = name
        self.spec = spec
        self._children = [_Child(child) for child in children]
        self._on_child_crash = on_child_crash
        self._clock = clock
        self._intensity = RestartIntensity(spec.intensity, spec.period_s)
        self._state: SupervisorState = "starting"
        self._runs = 0
        self._tg: TaskGroup | None = None
        # Set when shutdown begins, before any child is stopped (e.g. to fail
        # readiness early). Per-child graceful stop in reverse order: ChildSpec.stop.
        self.stopping = anyio.Event()
        # Set by a child's host task when it exits, and by stop().
        self._wakeup = anyio.Event()
        self._finished = anyio.Event()

    def __repr__(self) -> str:
        return f"<Supervisor {self.name} {self._state}>"

    @property
    def state(self) -> SupervisorState:
        return self._state

    def child_value(self, child_id: str) -> Any:
        """What the child passed to task_status.started (e.g. an ActorRef)."""
        (child,) = [c for c in self._children if c.spec.id == child_id]
        return child.value

    # -- running -----------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[Supervisor] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report ready, supervise until stopped.

        Returns after `stop()` once all children have stopped. Raises
        IntensityExceeded (or a child's start failure) after stopping all
        children in reverse order.
        """
        assert self._state in ("starting", "stopped", "crashed"), f"{self.name} already running"
        self._runs += 1
        # A previous run's event (a parent is restarting us). Before the first
        # run, a set event is an early stop() and is honoured.
        if self._runs > 1 and self.stopping.is_set():
            self.stopping = anyio.Event()
        if self._finished.is_set():
            self._finished = anyio.Event()
        self._state = "starting"
        self._intensity.reset()
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    for child in self._children:
                        try:
                            await self._start_child(child)
                        except Exception:
                            child.state = "crashed"
                            raise
                    self._state = "running"
                    task_status.started(self)
                    await self._supervise()
                except Exception as exc:
                    # Raised after the task group, not from inside it, so the
                    # parent sees IntensityExceeded itself, not an ExceptionGroup.
                    failure = exc
                finally:
                    self._state = "stopping"
                    self.stopping.set()
                    await self._stop_all()
        finally:
            self._tg = None
            self._state = "crashed" if failure is not None else "stopped"
            self._finished.set()
        if failure is not None:
            raise failure

    def stop(self) -> None:
        """Begin an orderly shutdown (children in reverse order). Sync, idempotent."""
        self.stopping.set()
        self._wakeup.set()

    async def shutdown(self) -> None:
        """`stop()` and wait until `run` has returned.

        Bounded by the children's shutdown_s (each is cancelled after its own).
        """
        self.stop()
        if self._runs:
            await self._finished.wait()

    def child_spec(
        self,
        *,
        id: str | None = None,
        restart: Restart = Restart.PERMANENT,
        shutdown_s: float | None = None,
    ) -> ChildSpec:
        """This supervisor as a child of another one (its crash escalates there)."""
        if shutdown_s is None:
            shutdown_s = (
                sum(child.spec.shutdown_s for child in self._children) + NESTED_SHUTDOWN_MARGIN_S
            )
        return ChildSpec(
            id=id or self.name,
            kind="supervisor",
            start=self.run,
            restart=restart,
            shutdown_s=shutdown_s,
            statistics=self.statistics,
            stop=self.stop,
        )

    async def _supervise(self) -> None:
        while not self.stopping.is_set():
            await self._wakeup.wait()
            # Fresh event before scanning: exits during the scan wake the next pass.
            self._wakeup = anyio.Event()
            for child in self._children:
                if self.stopping.is_set():
                    return
                if child.state == "running" and child.exited.is_set():
                    await self._handle_exit(child)

    async def _handle_exit(self, child: _Child) -> None:
        error = child.error
        child.state = "crashed" if error is not None else "stopped"
        if error is not None:
            self._report_crash(child, error)
        if not should_restart(child.spec.restart, error):
            return
        self._count_restart(child, error)
        affected = self._affected_by(child)
        for sibling in reversed(affected):
            if sibling is not child:
                await self._stop_child(sibling)
        for other in affected:
            # OTP: a temporary sibling stopped by the strategy is not restarted.
            if other is child or other.spec.restart is not Restart.TEMPORARY:
                await self._restart_child(other)

    def _affected_by(self, child: _Child) -> list[_Child]:
        """The children a restart of `child` involves, in start order."""
        index = self._children.index(child)
        match self.spec.strategy:
            case "one_for_one":
                return [child]
            case "one_for_all":
                return list(self._children)
            case "rest_for_one":
                return self._children[index:]
            case _:
                assert_never(self.spec.strategy)

    def _count_restart(self, child: _Child, error: Exception | None) -> None:
        if not self._intensity.record(self._clock()):
            raise IntensityExceeded(
                self.name, child.spec.id, self.spec.intensity, self.spec.period_s
            ) from error

    async def _restart_child(self, child: _Child) -> None:
        # A restart that fails to start is another crash, counted like one, so
        # this loop ends within `intensity` attempts (OTP does the same).
        while True:
            child.restarts += 1
            child.state = "restarting"
            try:
                await self._start_child(child)
                return
            except Exception as exc:
                child.state = "crashed"
                self._report_crash(child, exc)
                self._count_restart(child, exc)

    async def _start_child(self, child: _Child) -> None:
        assert self._tg is not None
        assert child.scope is None or child.exited.is_set(), "child already running"
        child.exited = anyio.Event()
        child.error = None
        child.scope = None
        if child.state != "restarting":
            child.state = "starting"
        child.value = await self._tg.start(self._host_child, child)
        # _host_child set it before reporting started (mypy cannot see across the await)
        assert cast("anyio.CancelScope | None", child.scope) is not None
        child.state = "running"

    async def _host_child(self, child: _Child, *, task_status: TaskStatus[Any]) -> None:
        """One incarnation of a child. Exceptions after readiness are recorded
        for the supervisor, never raised into the task group; exceptions before
        readiness reach the `start` caller."""
        probe = _StartProbe(task_status)
        try:
            with anyio.CancelScope() as scope:
                child.scope = probe.scope = scope
                await child.spec.start(task_status=probe)
        except Exception as exc:
            if not probe.has_started:
                raise
            child.error = exc
        finally:
            child.exited.set()
            self._wakeup.set()

    async def _stop_all(self) -> None:
        for child in reversed(self._children):
            await self._stop_child(child)

    async def _stop_child(self, child: _Child) -> None:
        """OTP shutdown: graceful stop within shutdown_s, then cancel."""
        if child.scope is None or child.exited.is_set():
            if child.state == "running" and child.error is not None:
                self._report_crash(child, child.error)  # exited, not yet handled
            if child.state in ("running", "starting", "restarting", "stopping"):
                child.state = "crashed" if child.error is not None else "stopped"
            return
        child.state = "stopping"
        if child.spec.stop is not None and child.spec.shutdown_s > 0:
            child.spec.stop()
            # Shielded: this also runs while the supervisor is being cancelled.
            with anyio.move_on_after(child.spec.shutdown_s, shield=True):
                await child.exited.wait()
        if not child.exited.is_set():
            child.scope.cancel()
            with anyio.CancelScope(shield=True):
                await child.exited.wait()
        if child.error is not None:
            self._report_crash(child, child.error)
        child.state = "crashed" if child.error is not None else "stopped"

    def _report_crash(self, child: _Child, error: Exception) -> None:
        logger.error(
            "supervisor %s: child %s (%s) crashed: %r",
            self.name,
            child.spec.id,
            child.spec.kind,
            error,
            exc_info=error,
        )
        if self._on_child_crash is not None:
            # An observer's bug must not change supervision; log it instead.
            try:
                self._on_child_crash(self.name, child.spec.id, error)
            except Exception:
                logger.exception("supervisor %s: on_child_crash hook failed", self.name)

    # -- statistics --------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """This supervisor's node of the live tree (JSON types only; ``ACTOR_NODE``).

        `restarts` on every node counts how often that node was restarted by
        its parent (for a supervisor: its runs beyond the first).
        """
        return {
            "name": self.name,
            "kind": "supervisor",
            "state": self._state,
            "mailbox_depth": 0,
            "restarts": max(0, self._runs - 1),
            "strategy": self.spec.strategy,
            "children": [self._child_node(child) for child in self._children],
        }

    def _child_node(self, child: _Child) -> dict[str, Any]:
        node: dict[str, Any] = {"mailbox_depth": 0, "children": []}
        if child.spec.statistics is not None:
            node.update(child.spec.statistics())
        node.update(
            name=child.spec.id,
            kind=child.spec.kind,
            state=child.state,
            restarts=child.restarts,
        )
        assert isinstance(node["mailbox_depth"], int) and isinstance(node["children"], list)
        return node


class _ActorIncarnations(Generic[M]):
    """The successive Actor objects of one child spec, all on one mailbox."""

    __slots__ = ("_actor", "_factory", "mailbox")

    def __init__(self, factory: Callable[[], Actor[M]]) -> None:
        self._factory = factory
        # Built now so the ref exists before the supervisor starts.
        self._actor = factory()
        self.mailbox: Mailbox[M] = self._actor.mailbox

    async def start(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.mailbox.closed:
            self.mailbox.reopen()  # stopped before (e.g. one_for_all, or a parent restart)
        if self._actor.has_run:
            self._actor = self._factory().adopt_mailbox(self.mailbox)
        await self._actor.run(task_status=task_status)

    def stop(self) -> None:
        self.mailbox.close()

    def statistics(self) -> dict[str, Any]:
        statistics = self._actor.statistics()
        return {
            "actor_name": statistics.name,
            "actor_state": statistics.state,
            "mailbox_depth": statistics.mailbox_depth,
            "mailbox_capacity": statistics.mailbox_capacity,
            "messages_handled": statistics.messages_handled,
            "children": [],
        }


def actor_child(
    actor_factory: Callable[[], Actor[M]],
    *,
    id: str | None = None,
    restart: Restart = Restart.PERMANENT,
    shutdown_s: float = 5.0,
) -> tuple[ChildSpec, ActorRef[M]]:
    """Wrap an actor as a child: each restart builds a new incarnation with
    `actor_factory` on the same mailbox, so the returned ref stays valid.

    Stopping closes the mailbox: queued messages are handled within shutdown_s,
    then the actor is cancelled.
    """
    incarnations = _ActorIncarnations(actor_factory)
    spec = ChildSpec(
        id=id or incarnations.mailbox.name,
        kind=incarnations.mailbox.kind,
        start=incarnations.start,
        restart=restart,
        shutdown_s=shutdown_s,
        statistics=incarnations.statistics,
        stop=incarnations.stop,
    )
    return spec, incarnations.mailbox.ref
