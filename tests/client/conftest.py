"""A real ``dpp serve`` for the Python client's tests, and tenants to call it as.

The client is tested against the server it is written for, not a mock: each
test gets a replica (a ``dpp serve`` process on its own database, Redis prefix
and bucket) and issues itself tenants and keys through the admin API.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.replica import Replica, ready_replica
from tests.services import TestServices, store_env
from tests.tcp_proxy import TcpProxy

ADMIN_TOKEN = "client-admin-token-0123456789"
CREDIT_USD_MICROS = 10_000_000


@dataclass
class Served:
    """One running replica: its URL, an admin client, its settings."""

    replica: Replica
    admin: httpx.AsyncClient
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.replica.url

    async def plan(self, **limits: Any) -> str:
        plan_id = f"p{secrets.token_hex(4)}"
        body = {
            "id": plan_id,
            "requests_per_minute": 600,
            "max_concurrent_runs": 50,
            "retention_days": 30,
            **limits,
        }
        answer = await self.admin.post("/admin/plans", json=body)
        assert answer.status_code == 201, answer.text
        return plan_id

    async def api_key(
        self,
        *,
        credit_usd_micros: int = CREDIT_USD_MICROS,
        plan_id: str | None = None,
        **key_body: Any,
    ) -> str:
        """A fresh tenant credited ``credit_usd_micros``, and a key of it."""
        tenant_body: dict[str, Any] = {"name": f"client-{secrets.token_hex(3)}"}
        if plan_id is not None:
            tenant_body["plan_id"] = plan_id
        tenant = await self.admin.post("/admin/tenants", json=tenant_body)
        assert tenant.status_code == 201, tenant.text
        tenant_id = tenant.json()["id"]
        if credit_usd_micros:
            credited = await self.admin.post(
                f"/admin/tenants/{tenant_id}/credits",
                json={"amount_usd_micros": credit_usd_micros},
                headers={"Idempotency-Key": f"seed-{tenant_id}"},
            )
            assert credited.status_code == 201, credited.text
        key = await self.admin.post(f"/admin/tenants/{tenant_id}/api-keys", json=key_body)
        assert key.status_code == 201, key.text
        return str(key.json()["api_key"])


@pytest.fixture
def served_env() -> dict[str, str]:
    """Extra settings of the replica (a test parametrizes this to change them)."""
    return {}


@pytest.fixture
async def served(
    services: TestServices,
    database_url: str,
    redis_prefix: str,
    tmp_path: Path,
    served_env: dict[str, str],
) -> AsyncIterator[Served]:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "WARNING",
        **served_env,
    }
    log_path = tmp_path / "replica.log"
    async with ready_replica(env, log_path, ADMIN_TOKEN, timeout_s=10.0) as (replica, admin):
        yield Served(replica, admin, env)


@pytest.fixture
async def proxy(served: Served) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of ``served`` (``proxy.drop_answers(n)`` loses answers)."""
    tcp = TcpProxy("127.0.0.1", served.replica.port)
    await tcp.start()
    try:
        yield tcp
    finally:
        await tcp.close()
