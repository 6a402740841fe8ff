"""Actor kernel: mailbox, refs, tell/ask, replies, crashes, batching (both backends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import assert_never

import anyio
import pytest

from dpp.actors.kernel import (
    Actor,
    ActorCrashed,
    ActorStatistics,
    ActorStopped,
    AskTimeout,
    MailboxFull,
    Reply,
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass(frozen=True, slots=True)
class Add:
    amount: int


@dataclass(frozen=True, slots=True)
class Get:
    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class Boom:
    reply: Reply[int] | None = None


@dataclass(frozen=True, slots=True)
class Block:
    """The handler reports it entered, then waits for `release`."""

    entered: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    reply: Reply[int] | None = None


@dataclass(frozen=True, slots=True)
class FailWith:
    error: Exception
    reply: Reply[int]


CounterMessage = Add | Get | Boom | Block | FailWith


class Counter(Actor[CounterMessage]):
    kind = "counter"

    def __init__(
        self,
        name: str = "counter",
        mailbox_size: int = 8,
        *,
        batch_max: int = 1,
        events: list[str] | None = None,
    ) -> None:
        super().__init__(name, mailbox_size, batch_max=batch_max)
        self.total = 0
        self.batch_sizes: list[int] = []
        self.events = events if events is not None else []

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_stop(self) -> None:
        await anyio.lowlevel.checkpoint()  # would raise if not shielded under cancellation
        self.events.append("stop")

    async def handle_batch(self, messages: list[CounterMessage]) -> None:
        self.batch_sizes.append(len(messages))
        await super().handle_batch(messages)

    async def handle(self, message: CounterMessage) -> None:
        match message:
            case Add(amount):
                self.total += amount
            case Get(reply):
                reply.set(self.total)
            case Boom():
                raise RuntimeError("boom")
            case Block(entered, release, _):
                entered.set()
                await release.wait()
            case FailWith(error, reply):
                reply.fail(error)
            case _:
                assert_never(message)


async def test_reply_set_fail_and_double_completion() -> None:
    reply: Reply[int] = Reply()
    assert not reply.done
    reply.set(7)
    assert reply.done
    assert await reply.wait() == 7
    with pytest.raises(AssertionError):
        reply.set(8)
    with pytest.raises(AssertionError):
        reply.fail(ValueError("late"))

    failed: Reply[int] = Reply()
    failed.fail(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        await failed.wait()


async def test_tell_ask_and_statistics() -> None:
    actor = Counter()
    async with anyio.create_task_group() as tg:
        ref = await tg.start(actor.run)
        assert ref is actor.ref
        assert (ref.name, ref.kind) == ("counter", "counter")
        await ref.tell(Add(2))
        ref.tell_nowait(Add(3))
        assert await ref.ask(Get, timeout_s=1) == 5
        assert actor.statistics() == ActorStatistics(
            name="counter",
            kind="counter",
            state="running",
            mailbox_depth=0,
            mailbox_capacity=8,
            messages_handled=3,
        )
        actor.stop()
    assert actor.state == "stopped"
    assert actor.events == ["start", "stop"]


async def test_ask_times_out_and_actor_keeps_working() -> None:
    actor = Counter()
    async with anyio.create_task_group() as tg:
        ref = await tg.start(actor.run)
        block = Block()
        ref.tell_nowait(block)
        await block.entered.wait()
        with pytest.raises(AskTimeout):
            await ref.ask(Get, timeout_s=0.05)
        block.release.set()
        ref.tell_nowait(Add(4))
        # The timed-out Get is still handled (its reply goes nowhere), then this one.
        assert await ref.ask(Get, timeout_s=1) == 4
        actor.stop()


async def test_error_from_actor_is_not_reported_as_ask_timeout() -> None:
    actor = Counter()
    async with anyio.create_task_group() as tg:
        ref = await tg.start(actor.run)
        with pytest.raises(TimeoutError, match="database"):
            await ref.ask(lambda r: FailWith(TimeoutError("database"), r), timeout_s=1)
        actor.stop()


async def test_ask_asserts_the_request_carries_its_reply() -> None:
    actor = Counter()
    with pytest.raises(AssertionError, match="carries its Reply"):
        await actor.ref.ask(lambda _reply: Add(1), timeout_s=1)
    actor.stop()


async def test_full_mailbox_applies_back_pressure() -> None:
    actor = Counter(mailbox_size=2)
    ref = actor.ref
    ref.tell_nowait(Add(1))
    ref.tell_nowait(Add(2))
    assert ref.mailbox_depth() == 2
    with pytest.raises(MailboxFull):
        ref.tell_nowait(Add(100))
    with pytest.raises(MailboxFull):
        await ref.ask(Get, timeout_s=1)

    told = anyio.Event()

    async def tell_blocking() -> None:
        await ref.tell(Add(3))
        told.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tell_blocking)
        await anyio.wait_all_tasks_blocked()
        assert not told.is_set()  # waiting for room
        await tg.start(actor.run)
        await told.wait()
        assert await ref.ask(Get, timeout_s=1) == 6
        actor.stop()


async def test_crash_fails_in_flight_reply_and_keeps_queue_for_next_incarnation() -> None:
    events: list[str] = []
    first = Counter(events=events)
    ref = first.ref
    async with anyio.create_task_group() as tg:

        async def ask_boom() -> None:
            with pytest.raises(ActorCrashed) as caught:
                await ref.ask(Boom, timeout_s=1)
            assert isinstance(caught.value.__cause__, RuntimeError)

        tg.start_soon(ask_boom)
        await anyio.wait_all_tasks_blocked()
        ref.tell_nowait(Add(5))
        with pytest.raises(RuntimeError, match="boom"):
            await first.run()
        assert first.state == "crashed"
        assert events == ["start", "stop"]  # on_stop runs after a crash too
        assert ref.mailbox_depth() == 1  # Add(5) waits for the next incarnation

        second = Counter(events=events).adopt_mailbox(first.mailbox)
        assert await tg.start(second.run) is ref
        assert await ref.ask(Get, timeout_s=1) == 5
        # Counted across incarnations; the message that crashed is not "handled".
        assert second.statistics().messages_handled == 2
        second.stop()


async def test_cancellation_mid_handle_fails_reply_and_runs_on_stop() -> None:
    actor = Counter()
    ref = actor.ref
    block = Block()
    outcomes: list[str] = []

    async def ask_block() -> None:
        with pytest.raises(ActorCrashed, match="cancelled"):
            await ref.ask(lambda r: Block(block.entered, block.release, r), timeout_s=1)
        outcomes.append("ActorCrashed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask_block)
        with anyio.CancelScope() as actor_scope:
            async with anyio.create_task_group() as actor_tg:
                await actor_tg.start(actor.run)
                await block.entered.wait()
                ref.tell_nowait(Add(1))
                actor_scope.cancel()
    assert outcomes == ["ActorCrashed"]
    assert actor.state == "stopped"
    assert actor.events == ["start", "stop"]  # on_stop ran shielded under cancellation
    assert ref.mailbox_depth() == 1  # the mailbox outlives the task


async def test_batch_draining_hands_queued_messages_to_handle_batch() -> None:
    actor = Counter(batch_max=4)
    ref = actor.ref
    for amount in range(1, 7):
        ref.tell_nowait(Add(amount))
    reply: Reply[int] = Reply()
    ref.tell_nowait(Get(reply))
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        assert await reply.wait() == 21
        assert actor.batch_sizes == [4, 3]
        # A lone message is not held back to fill a batch.
        assert await ref.ask(Get, timeout_s=1) == 21
        assert actor.batch_sizes == [4, 3, 1]
        actor.stop()


async def test_stop_drains_queued_messages_then_refuses_new_ones() -> None:
    actor = Counter()
    ref = actor.ref
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        block = Block()
        ref.tell_nowait(block)
        await block.entered.wait()
        ref.tell_nowait(Add(1))
        ref.tell_nowait(Add(2))
        reply: Reply[int] = Reply()
        ref.tell_nowait(Get(reply))
        actor.stop()
        assert actor.statistics().state == "stopping"
        with pytest.raises(ActorStopped):
            ref.tell_nowait(Add(100))
        block.release.set()
        assert await reply.wait() == 3
    assert actor.state == "stopped"
    with pytest.raises(ActorStopped):
        await ref.tell(Add(1))


async def test_closing_an_unattended_mailbox_fails_queued_replies_and_blocked_senders() -> None:
    actor = Counter(mailbox_size=1)
    ref = actor.ref
    reply: Reply[int] = Reply()
    ref.tell_nowait(Get(reply))
    async with anyio.create_task_group() as tg:

        async def tell_blocking() -> None:
            with pytest.raises(ActorStopped):
                await ref.tell(Add(1))

        tg.start_soon(tell_blocking)
        await anyio.wait_all_tasks_blocked()
        actor.stop()
    with pytest.raises(ActorStopped):
        await reply.wait()
    assert ref.mailbox_depth() == 0
    with pytest.raises(ActorStopped):
        await ref.ask(Get, timeout_s=1)


async def test_reopened_mailbox_serves_the_same_ref() -> None:
    first = Counter()
    ref = first.ref
    first.stop()
    first.mailbox.reopen()
    ref.tell_nowait(Add(2))
    async with anyio.create_task_group() as tg:
        await tg.start(first.run)
        assert await ref.ask(Get, timeout_s=1) == 2
        first.stop()


async def test_idle_timeout_stops_the_actor() -> None:
    actor = Counter()
    ref = actor.ref
    ref.tell_nowait(Add(1))
    with anyio.fail_after(1):
        await actor.run(idle_timeout_s=0.05)
    assert actor.state == "stopped"
    assert ref.closed
    assert actor.statistics().messages_handled == 1
    with pytest.raises(ActorStopped):
        ref.tell_nowait(Add(1))


async def test_on_start_failure_fails_the_start() -> None:
    class Broken(Counter):
        async def on_start(self) -> None:
            raise OSError("database down")

    actor = Broken()
    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="database down"):
            await tg.start(actor.run)
    assert actor.state == "crashed"
    assert not actor.has_started
    assert not actor.mailbox.attached
    assert actor.events == []  # on_stop only follows a successful on_start


async def test_an_actor_object_runs_once() -> None:
    actor = Counter()
    actor.stop()
    await actor.run()
    with pytest.raises(AssertionError, match="runs once"):
        await actor.run()


def test_limits_are_asserted() -> None:
    with pytest.raises(AssertionError):
        Counter(mailbox_size=0)
    with pytest.raises(AssertionError):
        Counter(batch_max=0)
