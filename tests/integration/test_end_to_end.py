"""Submit → execute → settle over the HTTP API on the full runtime, both queue backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import orjson
import pytest

from dpp.app import Runtime, open_runtime
from dpp.config import load_settings
from tests.integration.test_runs_api import BASE_URL, ECHO, _audit_ok, _tenant
from tests.services import create_sqs_queues

TERMINAL = {"COMPLETED", "FAILED", "EXPIRED", "CANCELED"}

DECISION = {
    "pack_type": "decision",
    "inputs": {
        "question": "Which database?",
        "criteria": [
            {"id": "cost", "weight": 2, "direction": "minimize"},
            {"id": "speed", "weight": 1, "direction": "maximize"},
        ],
        "options": [
            {"id": "a", "scores": {"cost": 10, "speed": 5}},
            {"id": "b", "scores": {"cost": 5, "speed": 4}},
            {"id": "c", "scores": {"cost": 20, "speed": 9}},
        ],
    },
}


@pytest.fixture(params=["postgres", "sqs"])
async def live(request, settings_env, services) -> AsyncIterator[Runtime]:
    env = {**settings_env, "DPP_HEARTBEAT_SEC": "1", "DPP_LEASE_SEC": "5"}
    if request.param == "sqs":
        queue_url, _ = await create_sqs_queues(services.object_store_url)
        env |= {
            "DPP_QUEUE": "sqs",
            "SQS_QUEUE_URL": queue_url,
            "SQS_ENDPOINT_URL": services.object_store_url,
        }
    async with open_runtime(load_settings(env), environment=env) as runtime:
        yield runtime


@pytest.fixture
async def http(live: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=live.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


async def _until_terminal(http: httpx.AsyncClient, run_id: str, key) -> httpx.Response:
    with anyio.fail_after(20):
        while True:
            answer = await http.get(f"/v1/runs/{run_id}", headers=key)
            if answer.json()["status"] in TERMINAL:
                return answer
            await anyio.sleep(0.05)


async def test_echo_and_decision_run_end_to_end(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    echo = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    decision = (await http.post("/v1/runs", json=DECISION, headers=key)).json()

    done = await _until_terminal(http, echo["id"], key)
    run = done.json()
    assert run["status"] == "COMPLETED", run
    assert run["charged_usd_micros"] == 1_000  # echo's fixed price
    assert run["refunded_usd_micros"] == run["reserved_usd_micros"] - 1_000
    assert done.headers["x-dpp-cost-actual"] == "1000"
    assert run["started_at"] and run["finished_at"] and run["retention_until"]
    result = run["result"]
    assert result["content_type"] == "application/json"
    download = await anyio.to_thread.run_sync(httpx.get, result["download_url"])
    assert download.status_code == 200
    assert orjson.loads(download.content) == {"payload": {"hello": "world"}}
    assert result["bytes"] == len(download.content)

    decided = (await _until_terminal(http, decision["id"], key)).json()
    assert decided["status"] == "COMPLETED", decided
    document = orjson.loads(
        (await anyio.to_thread.run_sync(httpx.get, decided["result"]["download_url"])).content
    )
    assert document["winner"] == document["ranking"][0]["option_id"]
    assert [r["rank"] for r in document["ranking"]] == [1, 2, 3]
    # cost grows with options x criteria: 3 x 2 cells
    assert decided["charged_usd_micros"] == 1_000 + 200 * 6

    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 0
    assert budget["balance_usd_micros"] == 1_000_000 - 1_000 - 2_200
    usage = (await http.get("/v1/usage", headers=key)).json()
    assert sum(day["completed"] for day in usage["days"]) == 2
    assert sum(day["charged_usd_micros"] for day in usage["days"]) == 3_200
    await _audit_ok(http, admin_headers)


async def test_a_failing_pack_charges_the_minimum_fee(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    failing = {"pack_type": "echo", "inputs": {"payload": 1, "fail": True}}
    run = (await http.post("/v1/runs", json=failing, headers=key)).json()
    done = (await _until_terminal(http, run["id"], key)).json()
    assert done["status"] == "FAILED"
    assert done["charged_usd_micros"] == done["minimum_fee_usd_micros"]
    assert done["error"]["type"] == "https://dpp.dev/problems/pack-error"
    assert done["result"] is None
    await _audit_ok(http, admin_headers)


async def test_admin_actors_shows_the_live_tree(http, admin_headers) -> None:
    tree = (await http.get("/admin/actors", headers=admin_headers)).json()
    assert tree["kind"] == "supervisor" and tree["state"] == "running"
    kinds = {child["kind"] for child in tree["children"]}
    assert {"dispatcher", "reconciler"} <= kinds
    for node in tree["children"]:
        assert {"name", "kind", "state", "mailbox_depth", "restarts", "children"} <= node.keys()


async def test_admin_reconcile_runs_one_pass(http, admin_headers) -> None:
    answer = await http.post("/admin/reconcile", headers=admin_headers)
    assert answer.status_code == 200
    report = answer.json()
    assert {"expired", "rolled_forward", "rolled_back", "audit_required"} <= report.keys()
