"""A real `dpp serve` process for the chaos and fault tests, and an HTTP client's view of it.

Runs ``python -m dpp.cli serve`` (``dpp.app.run_server``) as a subprocess with
the environment given; its output goes to a log file the test can quote.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
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

    def drain(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """SIGTERM: the replica must drain and exit 0 within ``timeout_s``."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=timeout_s) == 0, self.output()

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


AUDIT_POLL_S = 0.5


async def wait_audit_ok(
    client: httpx.AsyncClient, url: str, admin: dict[str, str], timeout_s: float
) -> None:
    """Poll ``GET /admin/audit`` until it reports the invariants hold: a
    settlement a replica died in the middle of may leave the mirror behind
    until drift repair runs, so the first reports may not."""
    with anyio.fail_after(timeout_s):
        while True:
            answer = await client.get(f"{url}/admin/audit", headers=admin)
            if answer.status_code == 200 and answer.json()["ok"]:
                return
            await anyio.sleep(AUDIT_POLL_S)


# --- setting a replica up through its admin API ------------------------------------------

PLAN_RETENTION_DAYS = 30


@dataclass(frozen=True)
class FundedTenant:
    """A tenant made through the admin API, with its API key when one was issued."""

    tenant_id: str
    api_key: str | None
    key_id: str | None

    @property
    def bearer(self) -> dict[str, str]:
        assert self.api_key is not None, "no key was issued for this tenant"
        return {"Authorization": f"Bearer {self.api_key}"}


async def admin_plan(
    client: httpx.AsyncClient,
    url: str,
    admin: dict[str, str],
    plan_id: str,
    *,
    requests_per_minute: int,
    max_concurrent_runs: int,
) -> None:
    """``POST /admin/plans``, asserting it was created."""
    created = await client.post(
        f"{url}/admin/plans",
        json={
            "id": plan_id,
            "requests_per_minute": requests_per_minute,
            "max_concurrent_runs": max_concurrent_runs,
            "retention_days": PLAN_RETENTION_DAYS,
        },
        headers=admin,
    )
    assert created.status_code == 201, created.text


async def admin_funded_tenant(
    client: httpx.AsyncClient,
    url: str,
    admin: dict[str, str],
    amount_usd_micros: int,
    *,
    name: str = "t",
    plan_id: str | None = None,
    key: bool = True,
) -> FundedTenant:
    """A tenant (on ``plan_id``, or the default plan), an API key for it unless
    ``key`` is False, and a credit of ``amount_usd_micros``; each step asserted."""
    body = {"name": name} if plan_id is None else {"name": name, "plan_id": plan_id}
    tenant = await client.post(f"{url}/admin/tenants", json=body, headers=admin)
    assert tenant.status_code == 201, tenant.text
    tenant_id = str(tenant.json()["id"])
    api_key = key_id = None
    if key:
        issued = await client.post(
            f"{url}/admin/tenants/{tenant_id}/api-keys", json={}, headers=admin
        )
        assert issued.status_code == 201, issued.text
        api_key, key_id = str(issued.json()["api_key"]), str(issued.json()["id"])
    credited = await client.post(
        f"{url}/admin/tenants/{tenant_id}/credits",
        json={"amount_usd_micros": amount_usd_micros},
        headers={**admin, "Idempotency-Key": f"seed-{tenant_id}"},
    )
    assert credited.status_code == 201, credited.text
    return FundedTenant(tenant_id, api_key, key_id)
