"""Fuzz every /v1 and /admin operation of a served replica from its own /openapi.json.

schemathesis reads the document the replica serves, generates requests for
each operation (valid and invalid bodies, query strings, headers and path
parameters), sends them, authenticated (a tenant API key for /v1, the admin
token for /admin), and checks each answer: never a 5xx, and a status, content
type, headers and body the document describes. A money audit closes the run.

``DPP_FUZZ_EXAMPLES`` sets the examples per operation (CI: the default below);
docs/operations.md gives the longer run.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dpp.http.routes import openapi_body
from tests import services as test_services
from tests.replica import Replica
from tests.services import create_database, delete_redis_prefix, drop_database, store_env

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
# DPP_FUZZ_LONG=1: the longer run (docs/operations.md) — more examples, fresh
# random ones each time, and schemathesis's coverage phase (boundary values of
# every schema, derived when the tests are collected: minutes on its own).
LONG_RUN = os.environ.get("DPP_FUZZ_LONG") == "1"
EXAMPLES_PER_OPERATION = int(os.environ.get("DPP_FUZZ_EXAMPLES", "2000" if LONG_RUN else "150"))
PHASES = (
    (Phase.explicit, Phase.generate, Phase.shrink) if LONG_RUN else (Phase.generate, Phase.shrink)
)
READY_TIMEOUT_S = 30.0
PACK_TYPES = ("echo", "decision", "no-such-pack")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class Served:
    def __init__(self, replica: Replica, api_key: str) -> None:
        self.replica = replica
        self.api_key = api_key

    def headers_for(self, path: str) -> dict[str, str]:
        token = ADMIN_TOKEN if path.startswith("/admin") else self.api_key
        return {"Authorization": f"Bearer {token}"}


def _aim_at_packs(case: schemathesis.Case) -> None:
    """A generated ``pack_type`` is almost never a pack of the catalog, and its
    ``inputs`` almost never a pack's: name a real pack, and wrap echo's inputs
    as its payload, so that submissions reach a pack's checks and the
    reservation, with whatever values the generator drew."""
    if case.method == "POST" and case.path == "/v1/runs" and isinstance(case.body, dict):
        pack_type = case.body.get("pack_type")
        if isinstance(pack_type, str):
            case.body["pack_type"] = PACK_TYPES[len(pack_type) % len(PACK_TYPES)]
            if case.body["pack_type"] == "echo" and "inputs" in case.body:
                case.body["inputs"] = {"payload": case.body["inputs"]}


def _wait_ready(replica: Replica) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert replica.process.poll() is None, replica.output()
        try:
            if httpx.get(f"{replica.url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the replica did not become ready:\n{replica.output()}")


def _tenant_key(url: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=url, headers=admin) as client:
        plan = client.post(
            "/admin/plans",
            json={
                "id": "fuzz",
                "requests_per_minute": 1_000_000,
                "max_concurrent_runs": 100_000,
                "retention_days": 1,
            },
        )
        assert plan.status_code == 201, plan.text
        tenant = client.post("/admin/tenants", json={"name": "fuzz", "plan_id": "fuzz"})
        assert tenant.status_code == 201, tenant.text
        tenant_id = tenant.json()["id"]
        key = client.post(f"/admin/tenants/{tenant_id}/api-keys", json={})
        assert key.status_code == 201, key.text
        credited = client.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": 1_000_000_000},
            headers={"Idempotency-Key": "fuzz-funding"},
        )
        assert credited.status_code == 201, credited.text
        return str(key.json()["api_key"])


@pytest.fixture(scope="module")
def served(
    service_stack: test_services.TestServices, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    services = service_stack  # module-scoped: the session's services, single Redis
    name = f"dpp_test_{secrets.token_hex(6)}"
    database_url = create_database(services, name)
    prefix = f"dpptest{secrets.token_hex(5)}"
    log_path: Path = tmp_path_factory.mktemp("fuzz") / "replica.log"
    env = {
        **os.environ,
        **store_env(services, database_url, prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": os.environ.get("DPP_FUZZ_LOG_LEVEL", "WARNING"),
    }
    replica = Replica(env, log_path)
    try:
        _wait_ready(replica)
        served_document = httpx.get(f"{replica.url}/openapi.json").json()
        assert served_document == DOCUMENT, "the replica serves another document"
        yield Served(replica, _tenant_key(replica.url))
        audit = httpx.get(
            f"{replica.url}/admin/audit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert audit.status_code == 200 and audit.json()["ok"], audit.text
    finally:
        replica.close()
        delete_redis_prefix(services.redis_url, prefix)
        drop_database(services, name)


# The document the code renders (dpp.http.routes), which is the one the replica
# serves: the ``served`` fixture checks they are the same bytes.
DOCUMENT = orjson.loads(openapi_body())
schema = schemathesis.openapi.from_dict(DOCUMENT).include(path_regex="^/(v1|admin)(/|$)")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=not LONG_RUN,
    phases=PHASES,
)
def test_every_operation_answers_what_the_document_says(
    case: schemathesis.Case, served: Served
) -> None:
    _aim_at_packs(case)
    case.call_and_validate(
        base_url=served.replica.url,
        headers=served.headers_for(case.path),
        checks=CHECKS,
        excluded_checks=[],
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/admin/tenants", {"name": "x", "": 1}),
        (
            "/admin/plans",
            {
                "id": "p1",
                "requests_per_minute": 1,
                "max_concurrent_runs": 1,
                "retention_days": 1,
                "": 1,
            },
        ),
        ("/admin/runs/run_x/resolve", {"outcome": "FAILED", "charged_usd_micros": 0, "": 1}),
    ],
)
def test_an_admin_body_member_named_empty_is_refused_not_a_500(
    served: Served, path: str, body: dict[str, object]
) -> None:
    response = httpx.post(
        f"{served.replica.url}{path}", json=body, headers=served.headers_for(path)
    )
    assert response.status_code in (404, 422), response.text


def test_a_submission_member_named_empty_is_a_422(served: Served) -> None:
    response = httpx.post(
        f"{served.replica.url}/v1/runs",
        json={"pack_type": "echo", "inputs": {"payload": 1}, "": 1},
        headers=served.headers_for("/v1/runs"),
    )
    assert response.status_code == 422, response.text


def test_a_nul_in_a_submission_is_a_422(served: Served) -> None:
    response = httpx.post(
        f"{served.replica.url}/v1/runs",
        json={"pack_type": "echo", "inputs": {"payload": "a\u0000b"}},
        headers=served.headers_for("/v1/runs"),
    )
    assert response.status_code == 422, response.text
