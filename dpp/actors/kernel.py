"""Actor kernel: bounded mailboxes, typed refs, tell/ask and one-shot replies.

An actor is one task that owns its state and handles one message (or one batch)
at a time from a bounded mailbox. The *mailbox*, not the task, is the actor's
identity: an `ActorRef` points at the mailbox, so when a supervisor restarts a
crashed actor on the same mailbox, the refs callers hold keep working and the
messages queued behind the crash wait for the new incarnation.

What callers can rely on:

- `tell_nowait` raises `MailboxFull` when the mailbox is full (back-pressure:
  the HTTP front answers 503); `tell` waits for room instead.
- Both raise `ActorStopped` once the mailbox is closed (the actor stopped for
  good, or is between a stop and a restart).
- A request message carries its `Reply` as the attribute ``reply`` (asserted by
  `ActorRef.ask`). The kernel completes every reply it takes charge of, so no
  caller hangs on a dead actor:

  * the handler raised, or the actor was cancelled while handling it: the reply
    fails with `ActorCrashed` -- outcome unknown, the handler may have done part
    of its work (money code reconciles);
  * the message was still queued when the mailbox closed for good: the reply
    fails with `ActorStopped` -- never handled, safe to retry.

- A tell (no reply) that is in flight when the actor crashes is lost: tells are
  at-most-once across crashes.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, Literal, Self, TypeVar, cast

import anyio
from anyio.abc import TaskStatus

__all__ = [
    "ASK_TIMEOUT_MAX_S",
    "BATCH_MAX_LIMIT",
    "MAILBOX_SIZE_MAX",
    "Actor",
    "ActorCrashed",
    "ActorRef",
    "ActorState",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Mailbox",
    "MailboxFull",
    "Reply",
]

T = TypeVar("T")
M = TypeVar("M")

logger = logging.getLogger("dpp.actors")

# Limits (TigerBeetle: put a limit on everything).
MAILBOX_SIZE_MAX = 65_536
BATCH_MAX_LIMIT = 4_096
ASK_TIMEOUT_MAX_S = 3_600.0
ON_STOP_TIMEOUT_MAX_S = 600.0

ActorState = Literal["starting", "running", "stopping", "stopped", "crashed"]


class MailboxFull(Exception):
    """The mailbox is at capacity. Expected under load: back-pressure, not a bug."""


class AskTimeout(Exception):
    """No reply within the ask's timeout. The message may still be handled later."""


class ActorStopped(Exception):
    """The actor is not running and this message was not, and will not be, handled."""


class ActorCrashed(Exception):
    """The actor crashed or was cancelled while handling this message: outcome unknown."""


class Reply(Generic[T]):
    """One-shot reply channel carried inside a request message.

    `set` and `fail` are sync and never block (the actor must not wait on its
    callers); completing a reply twice is a programmer error.
    """

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def set(self, value: T) -> None:
        assert not self._done.is_set(), "Reply completed twice"
        self._value = value
        self._done.set()

    def fail(self, error: Exception) -> None:
        assert not self._done.is_set(), "Reply completed twice"
        # Replies carry outcomes; cancellation belongs to the scope that raised it.
        assert isinstance(error, Exception), error
        self._error = error
        self._done.set()

    async def wait(self) -> T:
        """Wait for the reply; return its value or raise its error."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def _fail_reply(message: object, error: Exception) -> None:
    """Fail the reply carried by `message` (attribute ``reply``), if still pending."""
    reply = getattr(message, "reply", None)
    if isinstance(reply, Reply) and not reply.done:
        reply.fail(error)


class Mailbox(Generic[M]):
    """Bounded FIFO of one actor's messages; outlives the actor's task.

    At most one incarnation consumes a mailbox at a time (`attach`/`detach`).
    `close` is graceful: new sends raise `ActorStopped`, the attached actor
    drains what is queued and then sees end-of-stream. Whatever is left when no
    actor is attached any more is discarded, failing replies with
    `ActorStopped`. `reopen` lets a supervisor restart an actor behind the same
    refs after a stop.
    """

    __slots__ = (
        "_attached",
        "_closed",
        "_receive",
        "_ref",
        "_send",
        "capacity",
        "kind",
        "messages_handled",
        "name",
    )

    def __init__(self, name: str, kind: str, capacity: int) -> None:
        assert name, "actors have names"
        assert kind, "actors have kinds"
        # "If in doubt, use 0" does not fit a mailbox, but unbounded never does.
        assert 0 < capacity <= MAILBOX_SIZE_MAX, capacity
        self.name = name
        self.kind = kind
        self.capacity = capacity
        # Counted here, not on the Actor, so the number survives restarts.
        self.messages_handled = 0
        self._attached = False
        self._closed = False
        self._send, self._receive = anyio.create_memory_object_stream[M](capacity)
        self._ref: ActorRef[M] = ActorRef(self)

    def __repr__(self) -> str:
        return f"<Mailbox {self.kind}:{self.name} {self.depth()}/{self.capacity}>"

    @property
    def ref(self) -> ActorRef[M]:
        return self._ref

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def attached(self) -> bool:
        return self._attached

    def depth(self) -> int:
        """Messages queued (not counting senders blocked in `put`)."""
        depth = self._send.statistics().current_buffer_used
        assert 0 <= depth <= self.capacity
        return depth

    def put_nowait(self, message: M) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            raise MailboxFull(f"{self.kind}:{self.name} mailbox full ({self.capacity})") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorStopped(f"{self.kind}:{self.name} is not running") from None

    async def put(self, message: M) -> None:
        try:
            await self._send.send(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ActorStopped(f"{self.kind}:{self.name} is not running") from None

    async def receive(self) -> M:
        """Next message; raises anyio.EndOfStream once closed and drained."""
        assert self._attached, "only the attached incarnation receives"
        try:
            return await self._receive.receive()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None  # closed and already discarded

    def receive_nowait(self) -> M:
        """Next message if one is queued; raises anyio.WouldBlock or anyio.EndOfStream."""
        assert self._attached, "only the attached incarnation receives"
        try:
            return self._receive.receive_nowait()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None  # closed and already discarded

    def receive_nowait_batch(self, max_n: int) -> list[M]:
        """Up to `max_n` already-queued messages, without waiting."""
        assert 0 <= max_n <= BATCH_MAX_LIMIT, max_n
        batch: list[M] = []
        while len(batch) < max_n:
            try:
                batch.append(self.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        assert len(batch) <= max_n
        return batch

    def attach(self) -> None:
        assert not self._attached, f"{self.name}: two incarnations on one mailbox"
        self._attached = True

    def detach(self) -> None:
        assert self._attached
        self._attached = False
        if self._closed:
            self._discard()

    def close(self) -> None:
        """Stop accepting messages (idempotent). Queued messages are still handled
        by the attached actor, or discarded right away if none is attached."""
        if not self._closed:
            self._closed = True
            # Senders blocked in put() are withdrawn and raise ActorStopped.
            self._send.close()
        if not self._attached:
            self._discard()

    def reopen(self) -> None:
        """Accept messages again after `close`, behind the same refs."""
        assert self._closed and not self._attached, "reopen a closed, idle mailbox only"
        self._send, self._receive = anyio.create_memory_object_stream[M](self.capacity)
        self._closed = False

    def _discard(self) -> None:
        assert self._closed and not self._attached
        # Bounded: the send side is closed, so at most `capacity` items remain.
        for _ in range(self.capacity + 1):
            try:
                message = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            _fail_reply(message, ActorStopped(f"{self.kind}:{self.name} stopped before handling"))
        self._receive.close()


class ActorRef(Generic[M]):
    """Handle to send messages to an actor; stays valid across restarts."""

    __slots__ = ("_mailbox",)

    def __init__(self, mailbox: Mailbox[M]) -> None:
        self._mailbox = mailbox

    def __repr__(self) -> str:
        return f"<ActorRef {self.kind}:{self.name}>"

    @property
    def name(self) -> str:
        return self._mailbox.name

    @property
    def kind(self) -> str:
        return self._mailbox.kind

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def mailbox_depth(self) -> int:
        return self._mailbox.depth()

    def mailbox_capacity(self) -> int:
        return self._mailbox.capacity

    def messages_handled(self) -> int:
        """Messages whose handler returned, over every incarnation (tests, statistics)."""
        return self._mailbox.messages_handled

    def tell_nowait(self, message: M) -> None:
        """Queue `message`; raise MailboxFull when full, ActorStopped when closed."""
        self._mailbox.put_nowait(message)

    async def tell(self, message: M) -> None:
        """Queue `message`, waiting for room (back-pressure); ActorStopped when closed."""
        await self._mailbox.put(message)

    async def ask(self, make_message: Callable[[Reply[T]], M], *, timeout_s: float) -> T:
        """Send a request built around a fresh Reply and wait for the answer.

        Sending never waits: a full mailbox raises MailboxFull so the caller can
        shed load. No answer within `timeout_s` raises AskTimeout; the request
        stays queued and may still be handled (money code must be idempotent).
        """
        assert 0 < timeout_s <= ASK_TIMEOUT_MAX_S and math.isfinite(timeout_s), timeout_s
        reply: Reply[T] = Reply()
        message = make_message(reply)
        # The kernel fails in-flight replies by this attribute; pair it here.
        assert getattr(message, "reply", None) is reply, "a request carries its Reply as .reply"
        self._mailbox.put_nowait(message)
        # move_on_after rather than fail_after: a TimeoutError *from the actor*
        # (e.g. a database timeout passed through reply.fail) must not turn into
        # AskTimeout.
        with anyio.move_on_after(timeout_s):
            answer: T = await reply.wait()
            return answer
        raise AskTimeout(f"{self.kind}:{self.name}: no reply within {timeout_s}s")


@dataclass(frozen=True, slots=True)
class ActorStatistics:
    name: str
    kind: str
    state: ActorState
    mailbox_depth: int
    mailbox_capacity: int
    messages_handled: int


class _Stop(enum.Enum):
    STOP = enum.auto()


class Actor(Generic[M]):
    """Base class: subclasses set `kind` and implement `handle`.

    One Actor object is one incarnation: `run` may be called once. To restart,
    build a new object (state restored in `on_start`) and `adopt_mailbox` the old
    mailbox -- `supervisor.actor_child` and `ActorRegistry` do this.
    """

    kind: ClassVar[str] = "actor"

    def __init__(
        self,
        name: str,
        mailbox_size: int,
        *,
        batch_max: int = 1,
        on_stop_timeout_s: float = 5.0,
    ) -> None:
        assert 1 <= batch_max <= BATCH_MAX_LIMIT, batch_max
        assert 0 < on_stop_timeout_s <= ON_STOP_TIMEOUT_MAX_S, on_stop_timeout_s
        self.name = name
        # Largest batch handed to handle_batch (1 = one message at a time).
        self.batch_max = batch_max
        self.on_stop_timeout_s = on_stop_timeout_s
        self.mailbox: Mailbox[M] = Mailbox(name, self.kind, mailbox_size)
        self._state: ActorState = "starting"
        self._has_run = False
        self._has_started = False
        self._busy = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}:{self.name} {self._state}>"

    # -- hooks -------------------------------------------------------------

    async def on_start(self) -> None:
        """Restore state before the first message. Raising here fails the start."""

    async def on_stop(self) -> None:
        """Clean up (flush, release leases). Runs shielded, within on_stop_timeout_s,
        after a normal stop, a crash, or cancellation -- once on_start succeeded."""

    async def handle(self, message: M) -> None:
        """Handle one message; a subclass overrides this or `handle_batch`."""
        raise AssertionError(f"{type(self).__name__} overrides neither handle nor handle_batch")

    async def handle_batch(self, messages: list[M]) -> None:
        """Handle already-dequeued messages in order; override to group-commit.

        If this raises, every message of the batch whose reply is still pending
        gets ActorCrashed, including ones not reached yet.
        """
        for message in messages:
            await self.handle(message)

    # -- queries -----------------------------------------------------------

    @property
    def ref(self) -> ActorRef[M]:
        return self.mailbox.ref

    @property
    def state(self) -> ActorState:
        return self._state

    @property
    def has_run(self) -> bool:
        return self._has_run

    @property
    def has_started(self) -> bool:
        """on_start completed and readiness was reported."""
        return self._has_started

    @property
    def busy(self) -> bool:
        """A batch is being handled right now."""
        return self._busy

    def statistics(self) -> ActorStatistics:
        state = self._state
        if state == "running" and self.mailbox.closed:
            state = "stopping"  # draining what was queued before the close
        return ActorStatistics(
            name=self.name,
            kind=self.kind,
            state=state,
            mailbox_depth=self.mailbox.depth(),
            mailbox_capacity=self.mailbox.capacity,
            messages_handled=self.mailbox.messages_handled,
        )

    # -- lifecycle ---------------------------------------------------------

    def adopt_mailbox(self, mailbox: Mailbox[M]) -> Self:
        """Take over a previous incarnation's mailbox so its refs stay valid."""
        assert not self._has_run, "adopt before run"
        assert mailbox.name == self.name and mailbox.kind == self.kind, (mailbox, self)
        assert mailbox.capacity == self.mailbox.capacity, "mailbox size changed on restart"
        if mailbox is not self.mailbox:
            self.mailbox.close()  # the fresh one was never used; release its streams
            self.mailbox = mailbox
        return self

    def stop(self) -> None:
        """Graceful stop: refuse new messages, handle the queued ones, then exit."""
        self.mailbox.close()

    async def run(
        self,
        *,
        task_status: TaskStatus[ActorRef[M]] = anyio.TASK_STATUS_IGNORED,
        idle_timeout_s: float | None = None,
    ) -> None:
        """on_start, report ready with the ref, then handle messages until the
        mailbox is closed and drained (or, with `idle_timeout_s`, until no
        message came for that long: the mailbox is then closed).

        An exception from a handler propagates (a crash: the supervisor restarts
        on the same mailbox); in-flight replies are failed first.
        """
        assert not self._has_run, "an Actor object runs once; restart with a new incarnation"
        assert idle_timeout_s is None or idle_timeout_s > 0, idle_timeout_s
        self._has_run = True
        mailbox = self.mailbox
        mailbox.attach()
        in_flight: list[M] = []
        try:
            try:
                await self.on_start()
                self._has_started = True
                self._state = "running"
                task_status.started(mailbox.ref)
                while True:
                    first = await self._receive_next(idle_timeout_s)
                    if first is _Stop.STOP:
                        break
                    # TigerBeetle: batch at our own pace -- take what is already
                    # queued, never wait to fill a batch.
                    in_flight = [first, *mailbox.receive_nowait_batch(self.batch_max - 1)]
                    assert 1 <= len(in_flight) <= self.batch_max
                    self._busy = True
                    await self.handle_batch(in_flight)
                    self._busy = False
                    mailbox.messages_handled += len(in_flight)
                    in_flight = []
            except BaseException as exc:
                self._busy = False
                crashed = isinstance(exc, Exception)
                for message in in_flight:
                    error = ActorCrashed(
                        f"{self.kind}:{self.name} "
                        f"{'crashed' if crashed else 'was cancelled'} while handling "
                        f"{type(message).__name__}; outcome unknown"
                    )
                    if crashed:
                        error.__cause__ = exc
                    _fail_reply(message, error)
                if self._has_started:
                    self._state = "stopping"
                    await self._call_on_stop(quiet=True)
                self._state = "crashed" if crashed else "stopped"
                raise
            self._state = "stopping"
            try:
                await self._call_on_stop(quiet=False)
            except Exception:
                self._state = "crashed"
                raise
            self._state = "stopped"
        finally:
            mailbox.detach()

    async def _receive_next(self, idle_timeout_s: float | None) -> M | _Stop:
        mailbox = self.mailbox
        try:
            if idle_timeout_s is None:
                return await mailbox.receive()
            with anyio.move_on_after(idle_timeout_s):
                return await mailbox.receive()
            # Idle for idle_timeout_s. A message may have raced the deadline in.
            try:
                return mailbox.receive_nowait()
            except anyio.WouldBlock:
                # Nothing queued and no await since the check: closing now cannot
                # strand a message; later tells raise ActorStopped.
                mailbox.close()
                return _Stop.STOP
        except anyio.EndOfStream:
            return _Stop.STOP

    async def _call_on_stop(self, *, quiet: bool) -> None:
        """on_stop, shielded (cleanup must run under cancellation) and bounded.

        quiet: we are already propagating a crash or cancellation; log an on_stop
        failure rather than let it mask the original exception.
        """
        with anyio.move_on_after(self.on_stop_timeout_s, shield=True) as scope:
            try:
                await self.on_stop()
            except Exception:
                if not quiet:
                    raise
                logger.exception("%s:%s on_stop failed", self.kind, self.name)
        if scope.cancelled_caught:
            logger.error("%s:%s on_stop exceeded %ss", self.kind, self.name, self.on_stop_timeout_s)
