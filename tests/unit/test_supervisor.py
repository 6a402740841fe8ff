"""Supervisor: OTP restart rules, intensity, escalation, shutdown, statistics."""

from __future__ import annotations

import json
from typing import Any, Literal, assert_never

import anyio
import pytest

from dpp.actors.kernel import Actor, ActorCrashed, ActorStopped, Reply
from dpp.actors.supervisor import (
    ChildSpec,
    IntensityExceeded,
    Restart,
    RestartIntensity,
    Supervisor,
    SupervisorSpec,
    actor_child,
    should_restart,
)
from tests.unit.account_messages import AccountMessage, Balance, Crash, Deposit, Hold


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class FakeClock:
    """Injected time: restarts never age out of the intensity window unless moved."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """A child whose incarnations the test can observe, crash, or end."""

    def __init__(self, id: str, log: list[str], *, fail_start_from: int | None = None) -> None:
        self.id = id
        self.log = log
        self.starts = 0
        self.task_ids: list[int] = []
        self.fail_start_from = fail_start_from
        self._exit = anyio.Event()
        self._mode: Literal["crash", "finish"] = "crash"
        self._started = anyio.Event()

    def spec(self, **kwargs: Any) -> ChildSpec:
        return ChildSpec(id=self.id, kind="probe", start=self.start, **kwargs)

    def crash(self) -> None:
        self._mode = "crash"
        self._exit.set()

    def finish(self) -> None:
        self._mode = "finish"
        self._exit.set()

    async def crash_when_started(self, incarnation: int = 1) -> None:
        await self.wait_starts(incarnation)
        self.crash()

    async def wait_starts(self, count: int) -> None:
        with anyio.fail_after(1):
            while self.starts < count:
                await self._started.wait()
            await anyio.wait_all_tasks_blocked()  # let the supervisor settle too

    async def start(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        if self.fail_start_from is not None and self.starts >= self.fail_start_from:
            raise OSError(f"{self.id} cannot start")
        self._exit = anyio.Event()
        self.log.append(f"start {self.id}")
        self.task_ids.append(anyio.get_current_task().id)
        try:
            task_status.started(self.starts)
            started, self._started = self._started, anyio.Event()
            started.set()
            await self._exit.wait()
            if self._mode == "crash":
                raise RuntimeError(f"{self.id} crashed")
        finally:
            self.log.append(f"stop {self.id}")


def probes(*ids: str) -> tuple[list[str], list[Probe]]:
    log: list[str] = []
    return log, [Probe(id, log) for id in ids]


def test_restart_decision_follows_otp() -> None:
    error = RuntimeError()
    assert should_restart(Restart.PERMANENT, None)
    assert should_restart(Restart.PERMANENT, error)
    assert not should_restart(Restart.TRANSIENT, None)
    assert should_restart(Restart.TRANSIENT, error)
    assert not should_restart(Restart.TEMPORARY, None)
    assert not should_restart(Restart.TEMPORARY, error)


def test_restart_intensity_window() -> None:
    window = RestartIntensity(intensity=2, period_s=10)
    assert window.record(0)
    assert window.record(1)
    assert not window.record(2)  # a third within 10 s
    window = RestartIntensity(intensity=2, period_s=10)
    assert window.record(0)
    assert window.record(5)
    assert window.record(10)  # the first has aged out
    assert not window.record(11)
    assert not RestartIntensity(intensity=0, period_s=1).record(0)


async def test_children_start_in_order_and_stop_in_reverse() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    supervisor = Supervisor("root", SupervisorSpec(), [a.spec(), b.spec(), c.spec()])
    async with anyio.create_task_group() as tg:
        assert await tg.start(supervisor.run) is supervisor
        assert log == ["start a", "start b", "start c"]
        assert supervisor.state == "running"
        assert supervisor.child_value("b") == 1
        await supervisor.shutdown()
    assert log[3:] == ["stop c", "stop b", "stop a"]
    assert supervisor.state == "stopped"
    assert supervisor.stopping.is_set()


async def test_crashing_child_is_restarted_and_siblings_untouched() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    crashes: list[tuple[str, str, BaseException]] = []
    supervisor = Supervisor(
        "root",
        SupervisorSpec(intensity=3),
        [a.spec(), b.spec(), c.spec()],
        on_child_crash=lambda *args: crashes.append(args),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        b.crash()
        await b.wait_starts(2)
        assert [a.starts, b.starts, c.starts] == [1, 2, 1]
        assert len(a.task_ids) == len(c.task_ids) == 1  # the same tasks, never restarted
        assert log == ["start a", "start b", "start c", "stop b", "start b"]
        ((name, child_id, error),) = crashes
        assert (name, child_id) == ("root", "b")
        assert isinstance(error, RuntimeError)
        nodes = {node["name"]: node for node in supervisor.statistics()["children"]}
        assert [nodes[id]["restarts"] for id in "abc"] == [0, 1, 0]
        assert nodes["b"]["state"] == "running"
        await supervisor.shutdown()


async def test_intensity_exceeded_stops_children_in_reverse_and_raises() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    supervisor = Supervisor(
        "root",
        SupervisorSpec(intensity=2, period_s=10),
        [a.spec(), b.spec(), c.spec()],
        clock=FakeClock(),
    )

    async def crash_b_repeatedly() -> None:
        for incarnation in (1, 2, 3):
            await b.crash_when_started(incarnation)

    async with anyio.create_task_group() as tg:
        tg.start_soon(crash_b_repeatedly)
        with pytest.raises(IntensityExceeded) as caught:
            await supervisor.run()
    assert caught.value.child_id == "b"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert b.starts == 3  # two restarts allowed, the third crash exceeds
    assert log[-3:] == ["stop b", "stop c", "stop a"]
    assert supervisor.state == "crashed"


async def test_restarts_outside_the_period_do_not_accumulate() -> None:
    _log, (a,) = probes("a")
    clock = FakeClock()
    supervisor = Supervisor(
        "root", SupervisorSpec(intensity=1, period_s=10), [a.spec()], clock=clock
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        for incarnation in (2, 3, 4):
            clock.now += 11
            a.crash()
            await a.wait_starts(incarnation)
        assert supervisor.state == "running"
        await supervisor.shutdown()


async def test_failed_restarts_count_toward_intensity() -> None:
    log: list[str] = []
    flaky = Probe("flaky", log, fail_start_from=2)
    supervisor = Supervisor("root", SupervisorSpec(intensity=3), [flaky.spec()], clock=FakeClock())
    async with anyio.create_task_group() as tg:
        tg.start_soon(flaky.crash_when_started)
        with pytest.raises(IntensityExceeded) as caught:
            await supervisor.run()
    assert isinstance(caught.value.__cause__, OSError)
    assert flaky.starts == 4  # the first start, then three failed restarts


async def test_nested_supervisor_escalates_to_its_parent() -> None:
    log, (a, x, c) = probes("a", "x", "c")
    inner = Supervisor("inner", SupervisorSpec(intensity=0), [x.spec()])
    crashes: list[tuple[str, str, BaseException]] = []
    root = Supervisor(
        "root",
        SupervisorSpec(intensity=0),
        [a.spec(), inner.child_spec(), c.spec()],
        on_child_crash=lambda *args: crashes.append(args),
    )

    async def crash_x_when_all_started() -> None:
        await c.wait_starts(1)
        x.crash()

    async with anyio.create_task_group() as tg:
        tg.start_soon(crash_x_when_all_started)
        with pytest.raises(IntensityExceeded) as caught:
            await root.run()
    assert (caught.value.supervisor, caught.value.child_id) == ("root", "inner")
    ((name, child_id, error),) = crashes
    assert (name, child_id) == ("root", "inner")
    assert isinstance(error, IntensityExceeded) and error.child_id == "x"
    assert log == ["start a", "start x", "start c", "stop x", "stop c", "stop a"]
    assert inner.state == root.state == "crashed"


async def test_parent_restarts_a_nested_supervisor_that_gave_up() -> None:
    _log, (x,) = probes("x")
    inner = Supervisor("inner", SupervisorSpec(intensity=0), [x.spec()])
    root = Supervisor("root", SupervisorSpec(intensity=1), [inner.child_spec()])
    async with anyio.create_task_group() as tg:
        await tg.start(root.run)
        x.crash()
        await x.wait_starts(2)
        (node,) = root.statistics()["children"]
        assert (node["name"], node["kind"], node["restarts"]) == ("inner", "supervisor", 1)
        assert node["children"][0]["name"] == "x"
        await root.shutdown()
    assert inner.state == "stopped"


async def test_temporary_child_is_never_restarted() -> None:
    _log, (temp, other) = probes("temp", "other")
    supervisor = Supervisor(
        "root", SupervisorSpec(), [temp.spec(restart=Restart.TEMPORARY), other.spec()]
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        temp.crash()
        await anyio.wait_all_tasks_blocked()
        assert temp.starts == 1
        nodes = {node["name"]: node for node in supervisor.statistics()["children"]}
        assert nodes["temp"]["state"] == "crashed"
        assert nodes["other"]["state"] == "running"
        await supervisor.shutdown()


async def test_transient_child_is_restarted_only_after_an_exception() -> None:
    _log, (crashing, finishing) = probes("crashing", "finishing")
    supervisor = Supervisor(
        "root",
        SupervisorSpec(),
        [crashing.spec(restart=Restart.TRANSIENT), finishing.spec(restart=Restart.TRANSIENT)],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        finishing.finish()
        crashing.crash()
        await crashing.wait_starts(2)
        await anyio.wait_all_tasks_blocked()
        assert finishing.starts == 1
        nodes = {node["name"]: node for node in supervisor.statistics()["children"]}
        assert nodes["finishing"]["state"] == "stopped"
        await supervisor.shutdown()


async def test_permanent_child_is_restarted_after_a_normal_exit() -> None:
    _log, (a,) = probes("a")
    supervisor = Supervisor("root", SupervisorSpec(), [a.spec()])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        a.finish()
        await a.wait_starts(2)
        await supervisor.shutdown()


async def test_one_for_all_restarts_every_child_in_order() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    supervisor = Supervisor(
        "root", SupervisorSpec(strategy="one_for_all"), [a.spec(), b.spec(), c.spec()]
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        b.crash()
        await c.wait_starts(2)
        assert log[3:] == ["stop b", "stop c", "stop a", "start a", "start b", "start c"]
        await supervisor.shutdown()


async def test_rest_for_one_restarts_the_child_and_those_after_it() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    supervisor = Supervisor(
        "root", SupervisorSpec(strategy="rest_for_one"), [a.spec(), b.spec(), c.spec()]
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        b.crash()
        await c.wait_starts(2)
        assert log[3:] == ["stop b", "stop c", "start b", "start c"]
        assert a.starts == 1
        await supervisor.shutdown()


async def test_initial_start_failure_stops_started_children() -> None:
    log, (a, c) = probes("a", "c")
    broken = Probe("broken", log, fail_start_from=1)
    supervisor = Supervisor("root", SupervisorSpec(), [a.spec(), broken.spec(), c.spec()])
    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="broken cannot start"):
            await tg.start(supervisor.run)
    assert log == ["start a", "stop a"]
    assert c.starts == 0


async def test_cancellation_is_not_swallowed_and_still_stops_in_reverse() -> None:
    log, (a, b, c) = probes("a", "b", "c")
    supervisor = Supervisor("root", SupervisorSpec(), [a.spec(), b.spec(), c.spec()])
    with anyio.move_on_after(0.05) as scope:
        await supervisor.run()
    assert scope.cancelled_caught
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert supervisor.state == "stopped"


# -- actors under supervision ---------------------------------------------


class Account(Actor[AccountMessage]):
    kind = "account"

    def __init__(self, events: list[str]) -> None:
        super().__init__("account", mailbox_size=16)
        self.balance = 0
        self.events = events

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_stop(self) -> None:
        self.events.append(f"stop balance={self.balance}")

    async def handle(self, message: AccountMessage) -> None:
        match message:
            case Deposit(amount):
                self.balance += amount
            case Balance(reply):
                reply.set(self.balance)
            case Crash():
                raise RuntimeError("account crashed")
            case Hold(entered, release):
                entered.set()
                await release.wait()
            case _:
                assert_never(message)


async def test_restarted_actor_keeps_its_ref_and_queued_messages() -> None:
    events: list[str] = []
    spec, ref = actor_child(lambda: Account(events), id="account")
    supervisor = Supervisor("root", SupervisorSpec(), [spec])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        assert supervisor.child_value("account") is ref
        ref.tell_nowait(Deposit(2))
        hold = Hold(anyio.Event(), anyio.Event())
        ref.tell_nowait(hold)
        await hold.entered.wait()

        async def ask_crash() -> None:
            with pytest.raises(ActorCrashed):
                await ref.ask(Crash, timeout_s=1)

        tg.start_soon(ask_crash)
        await anyio.wait_all_tasks_blocked()
        ref.tell_nowait(Deposit(3))  # queued behind the crash
        hold.release.set()
        # The new incarnation starts from on_start's state and handles the queue.
        assert await ref.ask(Balance, timeout_s=1) == 3
        assert events == ["start", "stop balance=2", "start"]
        (node,) = supervisor.statistics()["children"]
        assert (node["restarts"], node["messages_handled"]) == (1, 4)
        await supervisor.shutdown()
    with pytest.raises(ActorStopped):
        ref.tell_nowait(Deposit(1))


async def test_shutdown_drains_actor_mailbox_within_the_deadline() -> None:
    events: list[str] = []
    spec, ref = actor_child(lambda: Account(events), id="account", shutdown_s=1)
    supervisor = Supervisor("root", SupervisorSpec(), [spec])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        hold = Hold(anyio.Event(), anyio.Event())
        ref.tell_nowait(hold)
        await hold.entered.wait()
        for amount in (1, 2, 3):
            ref.tell_nowait(Deposit(amount))
        late: Reply[int] = Reply()
        ref.tell_nowait(Balance(late))
        tg.start_soon(supervisor.shutdown)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(ActorStopped):
            ref.tell_nowait(Deposit(100))  # closed for new messages while draining
        hold.release.set()
        assert await late.wait() == 6
    assert events == ["start", "stop balance=6"]
    assert supervisor.statistics()["children"][0]["state"] == "stopped"


async def test_child_that_ignores_the_deadline_is_cancelled() -> None:
    outcome: list[str] = []

    async def stubborn(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    stop_requests: list[str] = []
    spec = ChildSpec(
        id="stubborn",
        kind="dispatcher",
        start=stubborn,
        shutdown_s=0.05,
        stop=lambda: stop_requests.append("stop"),
    )
    supervisor = Supervisor("root", SupervisorSpec(), [spec])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(1):
            await supervisor.shutdown()
    assert stop_requests == ["stop"]
    assert outcome == ["cancelled"]


async def test_child_watching_stopping_is_given_its_shutdown_time() -> None:
    outcome: list[str] = []
    supervisor: Supervisor

    async def watcher(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await supervisor.stopping.wait()
        outcome.append("graceful")

    # The no-op hook asks for shutdown_s; without any hook it would be cancelled.
    spec = ChildSpec(id="http", kind="http", start=watcher, shutdown_s=1, stop=lambda: None)
    supervisor = Supervisor("root", SupervisorSpec(), [spec])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(1):
            await supervisor.shutdown()
    assert outcome == ["graceful"]
    assert supervisor.statistics()["children"][0]["state"] == "stopped"


async def test_one_for_all_restart_keeps_an_actor_sibling_ref_valid() -> None:
    events: list[str] = []
    _log, (crasher,) = probes("crasher")
    spec, ref = actor_child(lambda: Account(events), id="account")
    supervisor = Supervisor("root", SupervisorSpec(strategy="one_for_all"), [spec, crasher.spec()])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        ref.tell_nowait(Deposit(1))
        crasher.crash()
        await crasher.wait_starts(2)
        # The account was stopped gracefully (drained) and started again behind
        # the same ref: its mailbox was reopened.
        assert events == ["start", "stop balance=1", "start"]
        ref.tell_nowait(Deposit(2))
        assert await ref.ask(Balance, timeout_s=1) == 2
        await supervisor.shutdown()


async def test_statistics_tree_shape_is_json() -> None:
    events: list[str] = []
    _log, (x, y) = probes("x", "y")
    spec, ref = actor_child(lambda: Account(events), id="account")
    inner = Supervisor("runs", SupervisorSpec(), [x.spec()])
    root = Supervisor(
        "root",
        SupervisorSpec(),
        [
            spec,
            inner.child_spec(),
            y.spec(statistics=lambda: {"mailbox_depth": 7, "children": []}),
        ],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(root.run)
        x.crash()
        await x.wait_starts(2)
        ref.tell_nowait(Deposit(1))
        await ref.ask(Balance, timeout_s=1)
        tree = json.loads(json.dumps(root.statistics()))
        await root.shutdown()

    def check(node: dict[str, Any]) -> None:
        assert {"name", "kind", "state", "mailbox_depth", "restarts", "children"} <= set(node)
        assert isinstance(node["mailbox_depth"], int) and isinstance(node["restarts"], int)
        for child in node["children"]:
            check(child)

    check(tree)
    assert (tree["name"], tree["kind"], tree["state"], tree["restarts"]) == (
        "root",
        "supervisor",
        "running",
        0,
    )
    account, runs, y_node = tree["children"]
    assert (account["kind"], account["state"], account["messages_handled"]) == (
        "account",
        "running",
        2,
    )
    assert account["mailbox_capacity"] == 16
    assert (runs["kind"], runs["restarts"]) == ("supervisor", 0)
    (x_node,) = runs["children"]
    assert (x_node["name"], x_node["kind"], x_node["restarts"]) == ("x", "probe", 1)
    assert (y_node["mailbox_depth"], y_node["restarts"]) == (7, 0)


def test_specs_assert_their_limits() -> None:
    with pytest.raises(AssertionError):
        SupervisorSpec(intensity=-1)
    with pytest.raises(AssertionError):
        SupervisorSpec(period_s=0)
    with pytest.raises(AssertionError):
        ChildSpec(id="", kind="probe", start=Probe("p", []).start)
    with pytest.raises(AssertionError):
        ChildSpec(id="p", kind="probe", start=Probe("p", []).start, shutdown_s=-1)
    a = Probe("a", [])
    with pytest.raises(AssertionError, match="duplicate"):
        Supervisor("root", SupervisorSpec(), [a.spec(), a.spec()])
