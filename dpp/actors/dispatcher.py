"""The dispatcher: one per replica, it claims runs and hosts their run actors.

Back-pressure is the whole point: never more than ``concurrency`` runs in
flight here, so a replica claims only what it can work on and the rest stays
QUEUED for its peers. The dispatcher claims when told work may exist (a
``Wake`` from the queue's NOTIFY listener, the poll backstop, or a run ending
and freeing a slot) — batching at its own pace rather than once per event.

A run ending refills its slot only when work may be left behind
(``Dispatcher.backlog_possible``): the last claim took as many runs as it asked
for, or failed, or a wake found no free slot (or could not be queued). A claim
that came back short found the queue drained as far as it could see, and
every run committed or released QUEUED after it announces itself (NOTIFY,
SQS message) and so wakes the dispatcher anyway: claiming again would be a
round trip that finds nothing (with one run at a time, half of all claims).
What a short claim cannot see — a QUEUED row another transaction held locked
(SKIP LOCKED) and then left QUEUED, a NOTIFY lost with the listener's
connection — waits for the poll, the backstop it always was. SQS claims
(``claim_waits``) always refill: there the claim is the wait for new work.

Run actors are OTP "temporary" children: never restarted (a crashed worker is
a dead worker; the reaper or the reconciler recovers its run), reported to
``on_run_crash`` (wired to the reconciler's ``trigger``).

Restarts: `Dispatcher` is the stable handle (counters, the mailbox behind
``wake``); each start runs a fresh `DispatcherActor` on the same mailbox (the
supervisor's `actor_child`). A crashed incarnation drains like a stopped one:
its runs get the grace period, then are released in their ``finally``, so
nothing is orphaned.

Shutdown (SPEC §6): ``stop()`` stops claiming at once; runs in flight get
``shutdown_grace_s`` to finish; then the rest are cancelled and each releases
its run back to QUEUED in its own shielded ``finally``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

import anyio
from anyio.abc import TaskGroup, TaskStatus

from dpp import tracing
from dpp.actors.kernel import Actor, ActorRef, ActorStopped, MailboxFull
from dpp.actors.run import (
    RELEASE_DEADLINE_S,
    RunActor,
    RunEnding,
    RunServices,
    mailbox_then_cancel,
)
from dpp.actors.supervisor import ChildSpec, Restart, actor_child
from dpp.adapters.queue.base import ClaimedRun
from dpp.limits import CLAIM_BATCH_MAX

log = logging.getLogger("dpp.dispatcher")

# The backstop for a lost NOTIFY (or a replica whose listener is reconnecting).
POLL_INTERVAL_S = 5.0
# Room for one RunEnded per run in flight plus a wake: a tell never fails.
MAILBOX_SLACK = 8
TREE_CHILDREN_MAX = 100
SHUTDOWN_MARGIN_S = 2.0


@dataclass(frozen=True, slots=True)
class Wake:
    """Work may be waiting: claim up to the free slots."""


@dataclass(frozen=True, slots=True)
class RunEnded:
    """A run actor ended, freeing its slot."""

    run_id: str
    ending: RunEnding


DispatcherMessage = Wake | RunEnded


class Dispatcher:
    """The replica's dispatcher: a handle that outlives restarts.

    The work happens in a `DispatcherActor` incarnation, hosted by the
    supervisor's `actor_child`: a crashed incarnation is replaced by a fresh one
    on the same mailbox, so `wake` keeps working and the counters here survive.
    """

    kind = "dispatcher"

    def __init__(
        self,
        services: RunServices,
        *,
        concurrency: int,
        shutdown_grace_s: float,
        poll_interval_s: float = POLL_INTERVAL_S,
        on_run_crash: Callable[[str, BaseException], None] | None = None,
        name: str = "dispatcher",
    ) -> None:
        assert 1 <= concurrency <= CLAIM_BATCH_MAX * 4, concurrency
        assert shutdown_grace_s >= 0 and poll_interval_s > 0
        self.name = name
        self.services = services
        self.concurrency = concurrency
        self.shutdown_grace_s = shutdown_grace_s
        self.poll_interval_s = poll_interval_s
        self.on_run_crash = on_run_crash
        self.endings: collections.Counter[RunEnding] = collections.Counter()
        self.incarnations = 0
        # Set by stop(): from then on nothing is claimed. (Each incarnation
        # gets a fresh one: a restart after a stop claims again.)
        self.draining = anyio.Event()
        # A Wake is queued (at most one; the mailbox outlives incarnations).
        self.wake_pending = False
        # Runs may be waiting that no wake will announce again: a run ending
        # refills its slot only then (see the module's docstring).
        self.backlog_possible = True
        self._actor: DispatcherActor | None = None
        spec, self.ref = actor_child(
            self._new_incarnation,
            id=name,
            restart=Restart.PERMANENT,
            shutdown_s=shutdown_grace_s + RELEASE_DEADLINE_S + SHUTDOWN_MARGIN_S,
        )
        assert spec.stop is not None
        self._close_mailbox = spec.stop
        # Graceful stop = stop claiming, grace, release (not just a mailbox close).
        self._spec = dataclasses.replace(spec, stop=self.stop, statistics=self.tree_node)
        if services.metrics is not None:
            services.metrics.worker_slots.set(concurrency)
            services.metrics.runs_in_flight.set_function(self._hosted_count)

    def _new_incarnation(self) -> DispatcherActor:
        self.incarnations += 1
        self.draining = anyio.Event()
        # A restart may find its Wake discarded with a closed mailbox; one extra
        # Wake is harmless, a missing one would wait for the poll.
        self.wake_pending = False
        self.backlog_possible = True
        self._actor = DispatcherActor(self)
        return self._actor

    @property
    def restarts(self) -> int:
        return self.incarnations - 1

    # ---------------------------------------------------------- control

    def wake(self) -> None:
        """Work may be waiting (sync; coalesced: at most one Wake is queued)."""
        if self.wake_pending or self.draining.is_set():
            return
        try:
            self.ref.tell_nowait(Wake())
        except MailboxFull:
            # Full of RunEnded: the first of them claims in this Wake's stead.
            self.backlog_possible = True
            return
        except ActorStopped:
            return  # stopping: nothing is claimed any more
        self.wake_pending = True

    def stop(self) -> None:
        """Stop claiming now; in-flight runs get the grace period (sync, idempotent)."""
        self.draining.set()
        self._close_mailbox()

    def _hosted_count(self) -> int:
        return 0 if self._actor is None else len(self._actor.hosted)

    def in_flight(self) -> list[str]:
        assert self._actor is not None
        return list(self._actor.hosted)

    async def serve(
        self,
        *,
        task_status: TaskStatus[ActorRef[DispatcherMessage]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """One incarnation, start to end (what the supervisor starts)."""
        await self._spec.start(task_status=task_status)

    def child_spec(self) -> ChildSpec:
        """For the replica's supervisor: graceful stop = drain, grace, release."""
        return self._spec

    def tree_node(self) -> dict[str, Any]:
        """The /admin/actors node: slots, endings so far, the runs in flight."""
        actor = self._actor
        assert actor is not None
        statistics = actor.statistics()
        return {
            "mailbox_depth": statistics.mailbox_depth,
            "actor_state": statistics.state,
            "concurrency": self.concurrency,
            "in_flight": len(actor.hosted),
            "draining": self.draining.is_set(),
            "endings": {ending.value: count for ending, count in self.endings.items()},
            "children": [
                {
                    "name": run_id,
                    "kind": run.kind,
                    "state": run.phase.value,
                    "mailbox_depth": run.mailbox.depth(),
                    "restarts": 0,
                    "children": [],
                }
                for run_id, run in list(actor.hosted.items())[:TREE_CHILDREN_MAX]
            ],
        }


class DispatcherActor(Actor[DispatcherMessage]):
    """One incarnation of the dispatcher: claims, and hosts the runs it claimed."""

    kind = "dispatcher"

    def __init__(self, handle: Dispatcher) -> None:
        super().__init__(name=handle.name, mailbox_size=handle.concurrency + MAILBOX_SLACK)
        self.dispatcher = handle
        # The host table (like a supervisor's child list): added by the handler
        # when it starts a run, removed by that run's host task when it ends.
        self.hosted: dict[str, RunActor] = {}
        self._hosted_changed = anyio.Event()
        self._runs: TaskGroup | None = None

    async def run(
        self,
        *,
        task_status: TaskStatus[ActorRef[DispatcherMessage]] = anyio.TASK_STATUS_IGNORED,
        idle_timeout_s: float | None = None,
    ) -> None:
        """Claim and host runs until stopped; then drain as SPEC §6 says.

        Wraps the kernel's mailbox loop with the tasks an incarnation owns: the
        queue's listener, the poll, and the run actors.
        """
        assert idle_timeout_s is None, "the dispatcher never idles out"
        dispatcher = self.dispatcher
        async with anyio.create_task_group() as runs:
            self._runs = runs
            try:
                async with anyio.create_task_group() as pumps:
                    await pumps.start(dispatcher.services.queue.listen, dispatcher.wake)
                    pumps.start_soon(self._poll)
                    # no more wake-ups once nothing handles them
                    ref = await pumps.start(mailbox_then_cancel, super().run, pumps.cancel_scope)
                    dispatcher.wake()  # a backlog may be waiting already
                    task_status.started(ref)
            finally:
                dispatcher.draining.set()
                try:
                    if self.hosted:
                        log.info(
                            "draining runs in flight",
                            extra={
                                "runs": len(self.hosted),
                                "grace_s": dispatcher.shutdown_grace_s,
                            },
                        )
                    # Not shielded: cancelled from outside, the grace is over.
                    with anyio.move_on_after(dispatcher.shutdown_grace_s):
                        await self._wait_idle()
                finally:
                    # Whatever is left releases its run in its own finally.
                    runs.cancel_scope.cancel()

    async def _poll(self) -> None:
        while True:
            await anyio.sleep(self.dispatcher.poll_interval_s)
            self.dispatcher.wake()

    async def _wait_idle(self) -> None:
        while self.hosted:
            await self._hosted_changed.wait()

    # ---------------------------------------------------------- handlers

    async def handle(self, message: DispatcherMessage) -> None:
        match message:
            case Wake():
                self.dispatcher.wake_pending = False
                await self._fill()
            case RunEnded(run_id=run_id, ending=ending):
                log.debug("run actor ended", extra={"run_id": run_id, "ending": ending.value})
                dispatcher = self.dispatcher
                # Not a claim per ending: one coalesced Wake refills every slot
                # freed by a burst of endings (and, with SQS, one long poll).
                # Nor a claim after a short one: that queue was drained, and
                # whatever arrived since has woken us (or will) by itself.
                if dispatcher.backlog_possible or dispatcher.services.queue.claim_waits:
                    dispatcher.wake()
            case _:
                assert_never(message)

    async def _fill(self) -> None:
        """Claim up to the free slots and start a run actor for each claim."""
        dispatcher = self.dispatcher
        if dispatcher.draining.is_set():
            return
        free = dispatcher.concurrency - len(self.hosted)
        assert free >= 0, "more runs in flight than slots"
        if free == 0:
            # What woke us is still waiting: the next run to end claims it.
            dispatcher.backlog_possible = True
            return
        queue = dispatcher.services.queue
        started_ns = time.time_ns()
        asked = min(free, CLAIM_BATCH_MAX)
        # Cleared before the claim, so that a wake lost meanwhile (MailboxFull)
        # still counts after it.
        dispatcher.backlog_possible = False
        try:
            claimed = await queue.claim_batch(asked)
        except AssertionError:
            raise  # a broken invariant is a bug: crash and be seen, never retry it
        except Exception:
            # No self-wake: the next poll (or run ending) tries again.
            dispatcher.backlog_possible = True
            log.warning("claiming failed; retrying at the next poll", exc_info=True)
            return
        assert len(claimed) <= asked, (len(claimed), asked)
        if len(claimed) == asked:
            # A full batch may have left runs behind; a short one drained the
            # queue as far as this claim could see.
            dispatcher.backlog_possible = True
        tracing.record_claims(started_ns, claimed, waited=queue.claim_waits)
        for run in claimed:
            if dispatcher.draining.is_set():
                # Stopped while the claim (an SQS long poll) was under way.
                await queue.release(run)
            else:
                self._start(run)
        if queue.claim_waits and len(self.hosted) < dispatcher.concurrency:
            dispatcher.wake()  # SQS: the long poll is the wait, so poll again at once

    def _start(self, claimed: ClaimedRun) -> None:
        assert self._runs is not None
        assert claimed.run_id not in self.hosted, "claimed a run already in flight here"
        actor = RunActor(claimed, self.dispatcher.services)
        self.hosted[claimed.run_id] = actor
        self._changed()
        self._runs.start_soon(self._host, actor, name=f"run:{claimed.run_id}")

    async def _host(self, actor: RunActor) -> None:
        """One run actor, start to end; its exception is reported, never raised."""
        dispatcher = self.dispatcher
        run_id = actor.claimed.run_id
        try:
            await actor.serve()
        except Exception as error:
            log.error(
                "run actor crashed; the reaper or the reconciler recovers its run",
                extra={"run_id": run_id, "error": type(error).__name__},
                exc_info=error,
            )
            if dispatcher.on_run_crash is not None:
                try:
                    dispatcher.on_run_crash(run_id, error)
                except Exception:
                    log.exception("on_run_crash hook failed")
        finally:
            ending = actor.ending if actor.ending is not None else RunEnding.CRASHED
            dispatcher.endings[ending] += 1
            removed = self.hosted.pop(run_id, None)
            assert removed is actor
            self._changed()
            # Suppressed when draining, or full (then the poll refills the slot).
            with contextlib.suppress(MailboxFull, ActorStopped):
                self.ref.tell_nowait(RunEnded(run_id, ending))

    def _changed(self) -> None:
        self._hosted_changed.set()
        self._hosted_changed = anyio.Event()
