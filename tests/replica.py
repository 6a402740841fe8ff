"""A real `dpp serve` process for the chaos and fault tests, and an HTTP client's view of it.

Runs ``python -m dpp.cli serve`` (``dpp.app.run_server``) as a subprocess with
the environment given; its output goes to a log file the test can quote.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx

START_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replica:
    """One `dpp serve` process and an HTTP client to it."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dpp.cli", "serve", *args],
            env={**env, "PORT": str(self.port), "DPP_HOST": "127.0.0.1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_TIMEOUT_S)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                assert self.process.poll() is None, f"replica exited:\n{self.output()}"
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.2)


@contextlib.asynccontextmanager
async def ready_replica(
    env: dict[str, str], log_path: Path, admin_token: str, *, timeout_s: float = 15.0
) -> AsyncIterator[tuple[Replica, httpx.AsyncClient]]:
    """A replica started with ``env``, ready, and a client that speaks the admin
    API to it (its bearer token set); the process is killed however it ends."""
    replica = Replica(env, log_path)
    try:
        async with httpx.AsyncClient(
            base_url=replica.url,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=timeout_s,
        ) as admin:
            await replica.wait_ready(admin)
            yield replica, admin
    finally:
        replica.close()
