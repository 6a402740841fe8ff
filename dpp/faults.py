"""Named crash points for failure-injection tests.

Production code calls ``await crash_point("settle.after_commit")`` at each
place where a process could die between two writes; docs/crash-points.md
lists them. Nothing is armed in production, so each call is one dict lookup.
Tests arm a point with ``armed("name")`` and the next pass through it raises
``InjectedCrash`` — to the code around it, indistinguishable from a crash of
the task (transactions roll back, actors crash and are restarted).

A crash no ``finally:`` sees: a test that runs ``dpp serve`` as a child process
sets ``DPP_FAULT_SIGKILL_AT=<point>`` in its environment, and the first pass
through that point SIGKILLs the whole process (tests/chaos/test_sigkill.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator

CRASH_POINTS = (
    "reserve.after_redis_hold",
    "reserve.before_commit",
    "reserve.after_commit",
    "settle.before_commit",
    "settle.after_commit",
    "run.after_claim",
    "run.after_finalize_claim",
    "run.after_result_put",
)

_armed: dict[str, int] = {}
# The simulator's oracle (dpp/sim): asked at every pass whether to crash here.
_injector: Callable[[str], bool] | None = None
# Read once at import: the environment of a child process a chaos test started.
_SIGKILL_AT = os.environ.get("DPP_FAULT_SIGKILL_AT")


class InjectedCrash(Exception):
    """Raised at an armed crash point (tests only)."""


async def crash_point(name: str) -> None:
    assert name in CRASH_POINTS, f"unknown crash point {name}"
    if name == _SIGKILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    remaining = _armed.get(name)
    if remaining:
        if remaining == 1:
            del _armed[name]
        else:
            _armed[name] = remaining - 1
        raise InjectedCrash(name)
    if _injector is not None and _injector(name):
        raise InjectedCrash(name)


@contextlib.contextmanager
def injecting(decide: Callable[[str], bool]) -> Iterator[None]:
    """Let ``decide(name)`` crash any pass through any point (the simulator's
    seeded oracle); one at a time, removed on exit."""
    global _injector
    assert _injector is None, "one injector at a time"
    _injector = decide
    try:
        yield
    finally:
        _injector = None


@contextlib.contextmanager
def armed(name: str, times: int = 1) -> Iterator[None]:
    """Arm ``name`` for the next ``times`` passes; disarm on exit."""
    assert name in CRASH_POINTS, f"unknown crash point {name}"
    assert times >= 1
    _armed[name] = times
    try:
        yield
    finally:
        _armed.pop(name, None)


def disarm_all() -> None:
    _armed.clear()
