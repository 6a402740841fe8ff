"""Serve the ASGI app with hypercorn, from code, on a socket DPP binds itself.

Why bind ourselves: "port in use" must be a one-line startup error before
anything else happens, and readiness (``task_status.started``) must mean the
kernel already accepts connections — a load balancer's first probe may come
the moment we say so. Hypercorn then serves that very socket (its public
``Config.create_sockets`` is overridden), so nobody double-closes a file
descriptor.

Graceful stop: when the shutdown trigger fires, hypercorn stops accepting,
closes idle keep-alive connections and gives in-flight requests
``settings.shutdown_grace_sec`` to finish before cancelling them. Cancelling
``serve_http`` itself is the hard stop.

hypercorn's ``serve`` is asyncio-only; the rest of DPP reaches it through
anyio's asyncio backend.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve
from hypercorn.config import Config, Sockets

from dpp.config import StartupError

if TYPE_CHECKING:
    from dpp.config import Settings

log = logging.getLogger("dpp.http.server")

# Connections the kernel queues while the app is busy or still starting.
LISTEN_BACKLOG = 1024
# Longer than the usual load-balancer idle timeout (AWS ALB: 60 s), so the
# balancer closes an idle connection first and never sends a request into one
# we are closing (the classic intermittent 502).
KEEP_ALIVE_SEC = 75
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

ShutdownTrigger = Callable[[], Awaitable[Any]] | anyio.Event
SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def bind_socket(
    host: str,
    port: int,
    *,
    backlog: int = LISTEN_BACKLOG,
    reuse_port: bool = False,
    listen: bool = True,
) -> socket.socket:
    """A non-blocking TCP socket bound to ``host:port`` (port 0: any free one),
    listening unless ``listen=False``.

    ``reuse_port``: SO_REUSEPORT, so the replicas of ``dpp serve --processes N``
    each listen on the same port and the kernel spreads connections among them.
    A bound socket that does not listen receives no connections; the parent of
    those replicas holds one to claim the port (and learn it, for port 0).

    Raises StartupError with one line naming the setting when it cannot listen.
    """
    assert 0 <= port <= 65_535
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"DPP_HOST={host}: cannot resolve ({error.strerror})") from error
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    try:
        # REUSEADDR: a restart must not wait out TIME_WAIT; on Linux it never
        # lets two live listeners share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise StartupError(f"PORT={port}: address already in use") from error
        raise StartupError(
            f"DPP_HOST={host} PORT={port}: cannot listen ({error.strerror})"
        ) from error
    return sock


class _BoundConfig(Config):
    """A hypercorn Config that serves an already-bound socket instead of binding,
    and whose per-response headers are built once a second.

    hypercorn asks ``response_headers`` for every response and formats the
    ``Date`` field anew each time (``wsgiref``'s ``format_date_time``: ~2 % of
    a lone ``GET /v1/runs/{id}``'s CPU). The field has one-second resolution,
    so the headers of the current second are kept and handed out as a fresh
    list (callers extend it): the same bytes, computed once per second.
    """

    def __init__(self, bound: socket.socket) -> None:
        super().__init__()
        self._bound = bound
        self._headers_second = -1
        self._headers: dict[str, list[tuple[bytes, bytes]]] = {}

    def create_sockets(self) -> Sockets:
        return Sockets(secure_sockets=[], insecure_sockets=[self._bound], quic_sockets=[])

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        if second != self._headers_second:
            self._headers_second = second
            self._headers = {}
        headers = self._headers.get(protocol)
        if headers is None:
            headers = self._headers[protocol] = super().response_headers(protocol)
        return list(headers)


def hypercorn_config(bound: socket.socket, settings: Settings) -> Config:
    config = _BoundConfig(bound)
    config.graceful_timeout = float(settings.shutdown_grace_sec)
    config.keep_alive_timeout = KEEP_ALIVE_SEC
    config.backlog = LISTEN_BACKLOG
    config.include_server_header = False
    # Through DPP's own logging (JSON, redaction); the HTTP front logs each
    # request itself, with request ids, so hypercorn's access log stays off.
    config.errorlog = logging.getLogger("dpp.http.server.hypercorn")
    config.accesslog = None
    return config


def _as_trigger(shutdown_trigger: ShutdownTrigger) -> Callable[[], Awaitable[Any]]:
    if isinstance(shutdown_trigger, anyio.Event):
        return shutdown_trigger.wait
    return shutdown_trigger


async def serve_http(
    app: Any,
    settings: Settings,
    *,
    shutdown_trigger: ShutdownTrigger,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``settings.host:settings.port`` until the trigger fires.

    ``task_status.started(port)`` reports the bound port once the socket
    listens (so ``PORT=0`` works in tests). Returns after the graceful stop.
    """
    asyncio.get_running_loop()  # hypercorn serves on asyncio only: fail here, clearly
    bound = bind_socket(settings.host, settings.port, reuse_port=settings.reuse_port)
    try:
        port = bound.getsockname()[1]
        log.info("listening", extra={"host": settings.host, "port": port})
        task_status.started(port)
        await serve(
            app, hypercorn_config(bound, settings), shutdown_trigger=_as_trigger(shutdown_trigger)
        )
    finally:
        # Usually closed already by hypercorn's server; closing twice is a no-op.
        bound.close()


def install_signal_handlers(event: anyio.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``event`` (the graceful stop); returns the undo.

    A second SIGINT while stopping raises KeyboardInterrupt out of the event
    loop: the operator's "stop now". Call from inside the running asyncio
    loop; the undo restores whatever handlers were there before.
    """
    loop = asyncio.get_running_loop()
    previous: dict[int, SignalHandler] = {}

    def on_signal(signal_number: int) -> None:
        if event.is_set() and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        log.info(
            "shutting down gracefully",
            extra={"signal": signal.Signals(signal_number).name},
        )
        event.set()

    for signal_number in SHUTDOWN_SIGNALS:
        previous[signal_number] = signal.getsignal(signal_number)
        loop.add_signal_handler(signal_number, on_signal, signal_number)

    def undo() -> None:
        for signal_number, handler in previous.items():
            loop.remove_signal_handler(signal_number)
            signal.signal(signal_number, handler if handler is not None else signal.SIG_DFL)

    return undo
