"""`dpp serve --processes N`: N full replicas on one machine, sharing one port.

Each child is a whole `dpp serve` — its own supervision tree, pools, actors —
in its own OS process, so every core of the machine serves. They share the
port through SO_REUSEPORT and the kernel spreads connections among them.
Correctness never depended on one process (replicas coordinate only through
Postgres and Redis), so N local replicas are N replicas behind a balancer.

This parent does no request work. It claims the port first with a bound but
not listening SO_REUSEPORT socket (so "port in use" stays a one-line startup
error, and PORT=0 picks one port for all), starts the children, restarts one
that dies, and forwards SIGTERM/SIGINT so that all drain. Restarts are
bounded OTP-style: more than ``RESTART_LIMIT`` within ``RESTART_WINDOW_SEC``
and the parent stops everything and exits 1. A child that exits 2 (bad
configuration) stops everything at once: restarting cannot fix it. A second
SIGINT kills the children now (the operator's "stop now"). If the parent
itself dies, the kernel sends its children SIGTERM (Linux), so none is left
serving unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from dpp.actors.supervisor import RestartIntensity
from dpp.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from dpp.config import Settings
from dpp.http.server import bind_socket

log = logging.getLogger("dpp.cli.processes")

RESTART_LIMIT = 5
RESTART_WINDOW_SEC = 60.0
POLL_SEC = 0.1
# After the children's own grace period, how long to wait before SIGKILL.
KILL_MARGIN_SEC = 15.0
_PR_SET_PDEATHSIG = 1


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]


@dataclass
class _Stop:
    """What the signal handlers ask of the supervision loop."""

    requested: bool = False
    now: bool = False
    signals: list[int] = field(default_factory=list)

    def handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.requested and signal_number == signal.SIGINT:
            self.now = True
        self.requested = True
        self.signals.append(signal_number)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_child(index: int, port: int, settings: Settings) -> _Child:
    env = {
        **os.environ,
        "PORT": str(port),
        "DPP_HOST": settings.host,
        "DPP_PROCESSES": "1",
        "DPP_REUSE_PORT": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "dpp.cli", "serve"],
        env=env,
        preexec_fn=_die_with_parent,  # the parent is single-threaded here
    )
    log.info("replica started", extra={"replica": index, "pid": process.pid})
    return _Child(index, process)


def _signal_all(children: list[_Child], signal_number: int) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal_number)


def _drain(children: list[_Child], stop: _Stop, deadline_sec: float) -> int:
    """SIGTERM every child, wait for all (SIGKILL past the deadline); the exit status."""
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + deadline_sec
    while any(child.process.poll() is None for child in children):
        if stop.now or time.monotonic() > deadline:
            log.warning("killing replicas that did not drain in time")
            _signal_all(children, signal.SIGKILL)
            for child in children:
                child.process.wait()
            return EXIT_FAILURE
        time.sleep(POLL_SEC)
    # -SIGTERM: a replica still starting (before its handlers exist) stopped as asked.
    failed = [child for child in children if child.process.returncode not in (0, -signal.SIGTERM)]
    for child in failed:
        log.warning(
            "replica did not drain cleanly",
            extra={"replica": child.index, "exit_status": child.process.returncode},
        )
    return EXIT_FAILURE if failed else EXIT_OK


def run_processes(settings: Settings) -> int:
    """Serve with ``settings.processes`` child replicas until SIGTERM/SIGINT."""
    assert settings.processes >= 1
    claim = bind_socket(settings.host, settings.port, reuse_port=True, listen=False)
    port = int(claim.getsockname()[1])
    stop = _Stop()
    previous = {
        number: signal.signal(number, stop.handle) for number in (signal.SIGTERM, signal.SIGINT)
    }
    children: list[_Child] = []
    restarts = RestartIntensity(RESTART_LIMIT, RESTART_WINDOW_SEC)
    status = EXIT_OK
    try:
        log.info("dpp serving", extra={"port": port, "processes": settings.processes})
        children = [_start_child(i, port, settings) for i in range(settings.processes)]
        while not stop.requested:
            time.sleep(POLL_SEC)
            for position, child in enumerate(children):
                code = child.process.poll()
                if code is None or stop.requested:
                    continue
                log.warning("replica exited", extra={"replica": child.index, "exit_status": code})
                if code == EXIT_CONFIG:
                    log.error("replica refused its configuration; stopping every replica")
                    status = EXIT_CONFIG
                    stop.requested = True
                    break
                if not restarts.record(time.monotonic()):
                    log.error(
                        "replicas restart too often; stopping every replica",
                        extra={"restarts": restarts.count(), "window_sec": RESTART_WINDOW_SEC},
                    )
                    status = EXIT_FAILURE
                    stop.requested = True
                    break
                children[position] = _start_child(child.index, port, settings)
        drained = _drain(children, stop, settings.shutdown_grace_sec + KILL_MARGIN_SEC)
        return status if status != EXIT_OK else drained
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        for number, handler in previous.items():
            signal.signal(number, handler)
        claim.close()
