"""Keyed actors started on demand and stopped when idle (e.g. one budget actor
per tenant), with memory bounded by `max_actors` however many keys exist.

- `get(key)` returns the live actor's ref, starting it (awaiting its on_start)
  if absent. At most one incarnation per key runs at a time: a key whose actor
  is stopping is started again only after the old one has exited (its on_stop
  may still be flushing state the new one's on_start reads).
- An actor that received nothing for `idle_timeout_s` closes its mailbox,
  drains nothing, and is removed.
- A crashed actor is restarted on the same mailbox and `on_crash(key, exc)`
  fires. More than `intensity` crashes of one key within `period_s` is that
  key's fault (one tenant's input, say), not the process's: its actor is
  stopped, its queued messages fail with ActorStopped, `on_cooldown(key, exc)`
  fires, and for `cooldown_s` `get(key)` raises KeyCoolingDown (a 503 with
  Retry-After) while every other key runs on. The registry itself never fails
  for a key, so no tenant's crash loop restarts the registry or the root; the
  registry's own supervisor sees only faults of the registry.
- A crash that `is_outage(exc)` blames on a dependency (Postgres down, say) is
  nobody's key's fault either: it is restarted after `outage_backoff_s` (so a
  dead dependency cannot spin restarts) and never counts toward the cooldown,
  so a tenant whose requests met an outage is served as soon as it ends.
- When `max_actors` are live, the least recently used idle actor is evicted;
  if none is idle, `get` raises RegistryFull (back-pressure: 503).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from dpp.actors.kernel import Actor, ActorRef, ActorStopped, Mailbox, Reply
from dpp.actors.supervisor import (
    SHUTDOWN_S_MAX,
    ChildSpec,
    Restart,
    RestartIntensity,
    SupervisorState,
)

__all__ = [
    "COOLDOWN_S_MAX",
    "REGISTRY_ACTORS_MAX",
    "ActorRegistry",
    "KeyCoolingDown",
    "RegistryFull",
]

K = TypeVar("K", bound=Hashable)
M = TypeVar("M")
T = TypeVar("T")

logger = logging.getLogger("dpp.supervisor")

REGISTRY_ACTORS_MAX = 1_000_000
STATISTICS_CHILDREN_MAX = 100
# get() retries after waiting for an old incarnation or an eviction; under churn
# it gives up rather than loop.
GET_ATTEMPTS_MAX = 8
# Extra time a supervisor gives the registry beyond its own shutdown_s.
SHUTDOWN_MARGIN_S = 1.0


COOLDOWN_S_MAX = 3_600.0


class RegistryFull(Exception):
    """max_actors are live and none is idle enough to evict. Back-pressure."""


class KeyCoolingDown(Exception):
    """This key's actor kept crashing; it is stopped until ``retry_after_s`` has
    passed. Nothing was sent to it."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        assert retry_after_s > 0, retry_after_s
        super().__init__(detail)
        self.retry_after_s = retry_after_s


@dataclass(eq=False, slots=True)
class _Entry(Generic[K, M]):
    key: K
    actor: Actor[M]  # the current incarnation
    window: RestartIntensity
    ready: anyio.Event = field(default_factory=anyio.Event)  # first start done or failed
    exited: anyio.Event = field(default_factory=anyio.Event)  # host task ended
    restarts: int = 0
    stopping: bool = False

    @property
    def mailbox(self) -> Mailbox[M]:
        return self.actor.mailbox

    def accepting(self) -> bool:
        return not self.stopping and not self.mailbox.closed

    def idle(self) -> bool:
        return (
            self.ready.is_set()
            and self.actor.has_started
            and self.accepting()
            and not self.actor.busy
            and self.mailbox.depth() == 0
        )


class ActorRegistry(Generic[K, M]):
    """Hosts keyed actors in its own task group; run it as a supervised child."""

    def __init__(
        self,
        kind: str,
        factory: Callable[[K], Actor[M]],
        *,
        idle_timeout_s: float,
        max_actors: int,
        on_crash: Callable[[K, BaseException], None] | None = None,
        on_cooldown: Callable[[K, BaseException], None] | None = None,
        is_outage: Callable[[BaseException], bool] = lambda error: False,
        outage_backoff_s: float = 1.0,
        name: str | None = None,
        intensity: int = 5,
        period_s: float = 10.0,
        cooldown_s: float = 30.0,
        shutdown_s: float = 5.0,
        statistics_children_max: int = STATISTICS_CHILDREN_MAX,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        assert kind
        assert idle_timeout_s > 0 and math.isfinite(idle_timeout_s), idle_timeout_s
        assert 0 < max_actors <= REGISTRY_ACTORS_MAX, max_actors
        assert 0 <= shutdown_s <= SHUTDOWN_S_MAX, shutdown_s
        assert 0 <= statistics_children_max <= STATISTICS_CHILDREN_MAX * 10
        assert 0 < cooldown_s <= COOLDOWN_S_MAX, cooldown_s
        assert 0 <= outage_backoff_s <= COOLDOWN_S_MAX, outage_backoff_s
        RestartIntensity(intensity, period_s)  # validates the pair
        self.kind = kind
        self.name = name or f"{kind}-registry"
        self.idle_timeout_s = idle_timeout_s
        self.max_actors = max_actors
        self.intensity = intensity
        self.period_s = period_s
        self.cooldown_s = cooldown_s
        self.outage_backoff_s = outage_backoff_s
        self.shutdown_s = shutdown_s
        self.statistics_children_max = statistics_children_max
        self._factory = factory
        self._on_crash = on_crash
        self._on_cooldown = on_cooldown
        self._is_outage = is_outage
        self._clock = clock
        # Least recently used first: eviction scans from the front.
        self._entries: OrderedDict[K, _Entry[K, M]] = OrderedDict()
        self._state: SupervisorState = "starting"
        self._runs = 0
        self._tg: TaskGroup | None = None
        self._stop_requested = anyio.Event()
        # Keys cooling down -> when they may start again. Entries are added with
        # the same cooldown, so insertion order is expiry order: expired ones are
        # pruned from the front, and at most max_actors are kept (the oldest
        # dropped first: such a key may start, and crash, a little early).
        self._cooling: OrderedDict[K, float] = OrderedDict()
        self._cooldowns = 0

    def __repr__(self) -> str:
        return f"<ActorRegistry {self.name} {self._state} {len(self._entries)} actors>"

    @property
    def state(self) -> SupervisorState:
        return self._state

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # -- running -----------------------------------------------------------

    async def run(
        self, *, task_status: TaskStatus[ActorRegistry[K, M]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Host actors until `stop()` (a key that crashes too often is cooled
        down, never raised: see the module's docstring)."""
        assert self._state in ("starting", "stopped", "crashed"), f"{self.name} already running"
        assert not self._entries
        self._runs += 1
        if self._runs > 1:
            self._stop_requested = anyio.Event()
        crashed = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._state = "running"
                task_status.started(self)
                try:
                    await self._stop_requested.wait()
                finally:
                    self._state = "stopping"
                    await self._stop_all()
                    tg.cancel_scope.cancel()  # whoever outlived shutdown_s
        except Exception:
            crashed = True  # a fault of the registry itself: its supervisor decides
            raise
        finally:
            self._tg = None
            self._state = "crashed" if crashed else "stopped"

    def stop(self) -> None:
        """Graceful stop: every actor drains its mailbox, within shutdown_s."""
        self._stop_requested.set()

    def child_spec(
        self, *, id: str | None = None, restart: Restart = Restart.PERMANENT
    ) -> ChildSpec:
        return ChildSpec(
            id=id or self.name,
            kind="registry",
            start=self.run,
            restart=restart,
            shutdown_s=self.shutdown_s + SHUTDOWN_MARGIN_S,
            statistics=self.statistics,
            stop=self.stop,
        )

    async def _stop_all(self) -> None:
        for entry in list(self._entries.values()):
            entry.stopping = True
            entry.mailbox.close()
        # Shielded: this also runs while the registry is being cancelled.
        with anyio.move_on_after(self.shutdown_s, shield=True):
            for entry in list(self._entries.values()):
                await entry.exited.wait()

    # -- access ------------------------------------------------------------

    async def get(self, key: K) -> ActorRef[M]:
        """The live actor for `key`, started on demand.

        Raises RegistryFull when at capacity with nothing idle to evict,
        KeyCoolingDown while the key's crash loop cools down, ActorStopped
        when the registry is not running, and whatever the actor's on_start
        raised if it could not start.
        """
        for _ in range(GET_ATTEMPTS_MAX):
            if self._state != "running":
                raise ActorStopped(f"registry {self.name} is not running")
            self._check_cooling(key)
            entry = self._entries.get(key)
            if entry is not None:
                if not entry.accepting():
                    await entry.exited.wait()  # one incarnation per key at a time
                    continue
                self._entries.move_to_end(key)
                if not entry.ready.is_set():
                    await entry.ready.wait()  # a concurrent get is starting it
                    continue
                return entry.mailbox.ref
            if len(self._entries) >= self.max_actors:
                victim = self._least_recently_used_idle()
                if victim is None:
                    raise RegistryFull(f"{self.name}: {self.max_actors} actors, none idle")
                victim.stopping = True
                victim.mailbox.close()
                await victim.exited.wait()
                continue
            return await self._start(key)
        raise RegistryFull(f"{self.name}: no slot for {key!r} after {GET_ATTEMPTS_MAX} tries")

    async def tell(self, key: K, message: M) -> None:
        """get + tell; retried once if the actor stopped (idle, evicted) first."""
        for attempt in range(2):
            ref = await self.get(key)
            try:
                await ref.tell(message)
                return
            except ActorStopped:
                if attempt == 1:
                    raise

    async def ask(self, key: K, make_message: Callable[[Reply[T]], M], *, timeout_s: float) -> T:
        """get + ask; retried once on ActorStopped, which means the request was
        never handled (so the retry cannot apply it twice)."""
        for attempt in range(2):
            ref = await self.get(key)
            try:
                return await ref.ask(make_message, timeout_s=timeout_s)
            except ActorStopped:
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _least_recently_used_idle(self) -> _Entry[K, M] | None:
        for entry in self._entries.values():
            if entry.idle():
                return entry
        return None

    async def _start(self, key: K) -> ActorRef[M]:
        assert key not in self._entries
        assert len(self._entries) < self.max_actors
        assert self._tg is not None
        actor = self._factory(key)
        assert actor.kind == self.kind, (actor.kind, self.kind)
        entry: _Entry[K, M] = _Entry(key, actor, RestartIntensity(self.intensity, self.period_s))
        self._entries[key] = entry
        try:
            ref: ActorRef[M] = await self._tg.start(self._host, entry)
        finally:
            entry.ready.set()
        assert ref is entry.mailbox.ref
        return ref

    async def _host(self, entry: _Entry[K, M], *, task_status: TaskStatus[Any]) -> None:
        """All incarnations of one key, restarted in place after crashes."""
        first = True
        try:
            while True:
                try:
                    if entry.actor.has_run:
                        entry.actor = self._factory(entry.key).adopt_mailbox(entry.mailbox)
                    await entry.actor.run(
                        task_status=task_status if first else anyio.TASK_STATUS_IGNORED,
                        idle_timeout_s=self.idle_timeout_s,
                    )
                    return  # mailbox closed: idle, evicted, or the registry stops
                except Exception as exc:
                    if first and not entry.actor.has_started:
                        raise  # the first on_start failed: get() raises it
                    first = False
                    self._report_crash(entry, exc)
                    if entry.mailbox.closed:
                        return  # stopping anyway: a new incarnation would only exit
                    if self._is_outage(exc):
                        # A dependency's fault, not this key's: no cooldown, a pause.
                        entry.restarts += 1
                        await anyio.sleep(self.outage_backoff_s)
                        continue
                    if not entry.window.record(self._clock()):
                        self._cool_down(entry, exc)
                        return  # finally: the mailbox closes, queued messages fail
                    entry.restarts += 1
        finally:
            entry.stopping = True
            entry.mailbox.close()  # detached now: fails queued replies with ActorStopped
            entry.ready.set()
            entry.exited.set()
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]

    def _check_cooling(self, key: K) -> None:
        now = self._clock()
        while self._cooling:  # prune what has expired (the front expires first)
            oldest, oldest_until = next(iter(self._cooling.items()))
            if oldest_until > now:
                break
            del self._cooling[oldest]
        until = self._cooling.get(key)
        if until is not None:
            raise KeyCoolingDown(
                f"{self.name}: {key!r} kept crashing; cooling down", retry_after_s=until - now
            )

    def _cool_down(self, entry: _Entry[K, M], error: Exception) -> None:
        """The key sits out ``cooldown_s``; nothing escalates past this registry."""
        self._cooling.pop(entry.key, None)
        self._cooling[entry.key] = self._clock() + self.cooldown_s
        while len(self._cooling) > self.max_actors:
            self._cooling.popitem(last=False)
        self._cooldowns += 1
        logger.error(
            "registry %s: actor %s crashed more than %d times in %ss; "
            "stopped, its key cooling down for %ss",
            self.name,
            entry.mailbox.name,
            self.intensity,
            self.period_s,
            self.cooldown_s,
            extra={"actor": entry.mailbox.name, "error": type(error).__name__},
        )
        if self._on_cooldown is not None:
            try:
                self._on_cooldown(entry.key, error)
            except Exception:
                logger.exception("registry %s: on_cooldown hook failed", self.name)

    def _report_crash(self, entry: _Entry[K, M], error: Exception) -> None:
        logger.error(
            "registry %s: actor %s crashed: %r",
            self.name,
            entry.mailbox.name,
            error,
            exc_info=error,
        )
        if self._on_crash is not None:
            try:
                self._on_crash(entry.key, error)
            except Exception:
                logger.exception("registry %s: on_crash hook failed", self.name)

    # -- statistics --------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """Tree node: totals over all actors, children only for the busiest
        `statistics_children_max` (`children_truncated` says when cut)."""
        entries = list(self._entries.values())
        busiest = heapq.nlargest(
            self.statistics_children_max, entries, key=lambda entry: entry.mailbox.depth()
        )
        return {
            "name": self.name,
            "kind": "registry",
            "state": self._state,
            "mailbox_depth": sum(entry.mailbox.depth() for entry in entries),
            "restarts": max(0, self._runs - 1),
            "actor_kind": self.kind,
            "count": len(entries),
            "max_actors": self.max_actors,
            "actor_restarts": sum(entry.restarts for entry in entries),
            "keys_cooling_down": len(self._cooling),
            "cooldowns": self._cooldowns,
            "children": [self._node(entry) for entry in busiest],
            "children_truncated": len(busiest) < len(entries),
        }

    def _node(self, entry: _Entry[K, M]) -> dict[str, Any]:
        statistics = entry.actor.statistics()
        return {
            "name": statistics.name,
            "kind": statistics.kind,
            "state": statistics.state,
            "mailbox_depth": statistics.mailbox_depth,
            "mailbox_capacity": statistics.mailbox_capacity,
            "messages_handled": statistics.messages_handled,
            "restarts": entry.restarts,
            "children": [],
        }
