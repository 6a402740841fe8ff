"""The runs API over HTTP (in-process ASGI), on the full runtime."""

from __future__ import annotations

import anyio
import httpx

from dpp.app import open_runtime
from dpp.config import Settings
from dpp.money import ledger
from dpp.money.ledger import LedgerStore
from dpp.money.rules import Outcome, RunStatus
from dpp.runs import idempotency
from dpp.runs.failures import RunFailure
from tests.integration.conftest import CapturedLogs
from tests.redis_cluster import single_and_cluster

BASE_URL = "http://testserver"


async def _tenant(http: httpx.AsyncClient, admin_headers, credit: int, plan_id: str | None = None):
    body = {"name": "acme"} if plan_id is None else {"name": "acme", "plan_id": plan_id}
    created = await http.post("/admin/tenants", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    tenant_id = created.json()["id"]
    issued = await http.post(
        f"/admin/tenants/{tenant_id}/api-keys", json={"name": "ci"}, headers=admin_headers
    )
    assert issued.status_code == 201, issued.text
    if credit:
        credited = await http.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": credit},
            headers={**admin_headers, "Idempotency-Key": f"seed-{tenant_id}"},
        )
        assert credited.status_code == 201, credited.text
    return tenant_id, {"Authorization": f"Bearer {issued.json()['api_key']}"}


async def _audit_ok(http: httpx.AsyncClient, admin_headers) -> None:
    answer = await http.get("/admin/audit", headers=admin_headers)
    assert answer.status_code == 200
    assert answer.json()["ok"], answer.json()


ECHO = {"pack_type": "echo", "inputs": {"payload": {"hello": "world"}}}

RUN_MEMBERS = {
    "id",
    "status",
    "pack_type",
    "created_at",
    "started_at",
    "finished_at",
    "reserved_usd_micros",
    "minimum_fee_usd_micros",
    "charged_usd_micros",
    "refunded_usd_micros",
    "metadata",
    "result",
    "error",
    "retention_until",
}


async def test_submit_get_list_and_budget(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    submitted = await http.post("/v1/runs", json={**ECHO, "metadata": {"k": "v"}}, headers=key)
    assert submitted.status_code == 202, submitted.text
    run = submitted.json()
    assert set(run) == RUN_MEMBERS
    assert run["status"] == "QUEUED" and run["metadata"] == {"k": "v"}
    assert submitted.headers["location"] == f"/v1/runs/{run['id']}"
    assert submitted.headers["x-dpp-cost-reserved"] == str(run["reserved_usd_micros"])
    assert submitted.headers["x-dpp-cost-minimum-fee"] == str(run["minimum_fee_usd_micros"])
    assert "ratelimit" in submitted.headers and "ratelimit-policy" in submitted.headers

    fetched = await http.get(f"/v1/runs/{run['id']}", headers=key)
    assert fetched.status_code == 200
    assert fetched.json()["id"] == run["id"]
    assert fetched.headers["x-dpp-cost-reserved"] == str(run["reserved_usd_micros"])

    listed = await http.get("/v1/runs?limit=1", headers=key)
    assert listed.status_code == 200
    page = listed.json()
    assert [r["id"] for r in page["data"]] == [run["id"]]
    assert page["has_more"] is False and page["next_cursor"] is None

    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == run["reserved_usd_micros"]
    assert budget["available_usd_micros"] == 1_000_000 - run["reserved_usd_micros"]
    assert set(budget["plan"]) == {
        "id",
        "requests_per_minute",
        "max_concurrent_runs",
        "retention_days",
    }
    await _audit_ok(http, admin_headers)


async def test_a_submit_logs_one_line_naming_its_run(
    http, admin_headers, captured_logs: CapturedLogs
) -> None:
    """The access line of an admitting POST is the run's "admitted" line: it
    names the run and its tenant, and no second INFO line repeats it."""
    _, key = await _tenant(http, admin_headers, 1_000_000)
    submitted = await http.post("/v1/runs", json=ECHO, headers={**key, "X-Request-ID": "req-admit"})
    assert submitted.status_code == 202, submitted.text
    run = submitted.json()
    lines = [line for line in captured_logs.lines() if line.get("request_id") == "req-admit"]
    [access] = [line for line in lines if line["logger"] == "dpp.access"]
    assert access["status"] == 202 and access["run_id"] == run["id"]
    assert access["tenant_id"].startswith("ten_")
    named = [line for line in lines if line.get("run_id") == run["id"]]
    assert [line["logger"] for line in named if line["level"] != "DEBUG"] == ["dpp.access"]
    refused = await http.post("/v1/runs", json={"pack_type": "nope"}, headers=key)
    assert refused.status_code == 422
    [refused_access] = [
        line
        for line in captured_logs.lines()
        if line["logger"] == "dpp.access" and line["status"] == 422
    ]
    assert "run_id" not in refused_access


async def test_insufficient_budget_is_402_and_reserves_nothing(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 500)
    answer = await http.post("/v1/runs", json={**ECHO, "max_cost_usd_micros": 1_000}, headers=key)
    assert answer.status_code == 402
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["available_usd_micros"] == 500
    assert problem["required_usd_micros"] == 1_000
    assert problem["instance"] == "/v1/runs"
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 0
    await _audit_ok(http, admin_headers)


async def test_hundred_concurrent_submits_for_a_budget_of_ten(http, admin_headers) -> None:
    plan = {
        "id": "wide",
        "requests_per_minute": 10_000,
        "max_concurrent_runs": 1_000,
        "retention_days": 30,
    }
    assert (await http.post("/admin/plans", json=plan, headers=admin_headers)).status_code == 201
    _, key = await _tenant(http, admin_headers, 10_000, plan_id="wide")
    statuses: list[int] = []

    async def submit() -> None:
        answer = await http.post(
            "/v1/runs", json={**ECHO, "max_cost_usd_micros": 1_000}, headers=key
        )
        statuses.append(answer.status_code)

    async with anyio.create_task_group() as group:
        for _ in range(100):
            group.start_soon(submit)
    assert statuses.count(202) == 10
    assert statuses.count(402) == 90
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["available_usd_micros"] == 0
    await _audit_ok(http, admin_headers)


@single_and_cluster
async def test_idempotent_submit_replays_and_guards(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    headers = {**key, "Idempotency-Key": "order-1"}
    first = await http.post("/v1/runs", json=ECHO, headers=headers)
    reordered = {"inputs": {"payload": {"hello": "world"}}, "pack_type": "echo"}
    again = await http.post("/v1/runs", json=reordered, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert "idempotent-replayed" not in first.headers
    other = await http.post("/v1/runs", json={**ECHO, "metadata": {"x": 1}}, headers=headers)
    assert other.status_code == 422
    for bad_key in ("é".encode(), b"", b"x" * 256, b"tab\there"):
        bad = await http.post("/v1/runs", json=ECHO, headers={**key, "Idempotency-Key": bad_key})
        assert bad.status_code == 400, bad_key
    await _audit_ok(http, admin_headers)


async def test_twenty_concurrent_requests_with_one_key_make_one_run(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    headers = {**key, "Idempotency-Key": "storm"}
    answers: list[httpx.Response] = []

    async def submit() -> None:
        answers.append(await http.post("/v1/runs", json=ECHO, headers=headers))

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(submit)
    accepted = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(accepted) == 1
    assert {a.status_code for a in answers} <= {202, 409}
    listed = (await http.get("/v1/runs", headers=key)).json()
    assert len(listed["data"]) == 1
    await _audit_ok(http, admin_headers)


async def test_replayed_402_is_stored(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    headers = {**key, "Idempotency-Key": "poor"}
    first = await http.post("/v1/runs", json=ECHO, headers=headers)
    again = await http.post("/v1/runs", json=ECHO, headers=headers)
    assert first.status_code == again.status_code == 402
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


async def test_cancel_refunds_and_is_idempotent(http, admin_headers, runtime) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    run = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    canceled = await http.post(f"/v1/runs/{run['id']}/cancel", headers=key)
    assert canceled.status_code == 200
    body = canceled.json()
    assert body["status"] == "CANCELED"
    assert body["charged_usd_micros"] == 0
    assert body["refunded_usd_micros"] == run["reserved_usd_micros"]
    assert body["retention_until"] is not None and body["finished_at"] is not None
    assert (await http.post(f"/v1/runs/{run['id']}/cancel", headers=key)).status_code == 200
    other = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    await runtime.adapters.pool.execute(
        "UPDATE runs SET status='PROCESSING', lease_token=gen_random_uuid() WHERE id=$1",
        other["id"],
    )
    refused = await http.post(f"/v1/runs/{other['id']}/cancel", headers=key)
    assert refused.status_code == 409
    assert refused.json()["run_status"] == "PROCESSING"
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == other["reserved_usd_micros"]


async def test_stealth_404_for_another_tenants_run(http, admin_headers) -> None:
    _, owner = await _tenant(http, admin_headers, 1_000_000)
    _, stranger = await _tenant(http, admin_headers, 0)
    run = (await http.post("/v1/runs", json=ECHO, headers=owner)).json()
    theirs = await http.get(f"/v1/runs/{run['id']}", headers=stranger)
    missing = await http.get("/v1/runs/run_00000000000000000000000000", headers=stranger)
    malformed = await http.get("/v1/runs/not-a-run-id", headers=stranger)
    assert theirs.status_code == missing.status_code == malformed.status_code == 404
    # a route's Problem is an answer of the API like any other: it carries the quota
    assert "ratelimit" in missing.headers and "ratelimit-policy" in missing.headers

    def without_request_id(response: httpx.Response) -> bytes:
        request_id = response.headers["x-request-id"]
        assert request_id in response.json()["instance"]
        return response.content.replace(request_id.encode(), b"<request-id>")

    # identical bytes apart from request ids: existence never leaks
    assert without_request_id(theirs) == without_request_id(missing)
    assert without_request_id(theirs) == without_request_id(malformed)
    varying = {"x-request-id", "ratelimit"}  # the request's own id and its quota count
    assert {k: v for k, v in theirs.headers.items() if k not in varying} == {
        k: v for k, v in missing.headers.items() if k not in varying
    }
    cancel = await http.post(f"/v1/runs/{run['id']}/cancel", headers=stranger)
    assert cancel.status_code == 404


async def test_owner_gets_410_past_retention(http, admin_headers, runtime) -> None:
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    run = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    # canceled through its budget actor as the cancel route does, but without the
    # route's re-read: no replica has read the run settled (it would keep the row,
    # dpp.runs.settled, and only the clock, not this UPDATE, ends that), so the
    # UPDATE below stands for the days passing
    await runtime.context.budgets.settle(
        tenant_id,
        ledger.SettleRequest(
            run["id"], Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
        ),
    )
    await runtime.adapters.pool.execute(
        "UPDATE runs SET retention_until = now() - interval '1 day' WHERE id = $1", run["id"]
    )
    gone = await http.get(f"/v1/runs/{run['id']}", headers=key)
    assert gone.status_code == 410
    assert gone.json()["run_status"] == "CANCELED"
    assert gone.json()["status"] == 410
    assert gone.json()["refunded_usd_micros"] == run["reserved_usd_micros"]
    listed = (await http.get("/v1/runs", headers=key)).json()
    assert listed["data"] == []


async def test_pagination_and_status_filter(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    ids = [(await http.post("/v1/runs", json=ECHO, headers=key)).json()["id"] for _ in range(5)]
    await http.post(f"/v1/runs/{ids[0]}/cancel", headers=key)
    seen: list[str] = []
    cursor = None
    while True:
        query = "/v1/runs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await http.get(query, headers=key)).json()
        seen.extend(r["id"] for r in page["data"])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == list(reversed(ids))
    canceled = (await http.get("/v1/runs?status=CANCELED", headers=key)).json()
    assert [r["id"] for r in canceled["data"]] == [ids[0]]
    for bad in ("limit=0", "limit=101", "limit=x", "status=NOPE", "cursor=%%%"):
        answer = await http.get(f"/v1/runs?{bad}", headers=key)
        assert answer.status_code == 422, bad


async def test_submit_validation_problems(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    cases = [
        ({"pack_type": "nope", "inputs": {}}, "pack_type"),
        ({"pack_type": "echo", "inputs": {"delay_ms": "slow"}}, "inputs.delay_ms"),
        ({**ECHO, "max_cost_usd_micros": 1}, "max_cost_usd_micros"),
        ({**ECHO, "max_cost_usd_micros": 10**12}, "max_cost_usd_micros"),
        ({**ECHO, "max_cost_usd_micros": 1.5}, "max_cost_usd_micros"),
        ({**ECHO, "timebox_sec": 0}, "timebox_sec"),
        ({**ECHO, "metadata": []}, "metadata"),
        ({"pack_type": "echo"}, "inputs"),
    ]
    for body, field in cases:
        answer = await http.post("/v1/runs", json=body, headers=key)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["field"] == field, (body, answer.json())
    malformed = await http.post(
        "/v1/runs", content=b"{nope", headers={**key, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 400
    wrong_type = await http.post(
        "/v1/runs", content=b"{}", headers={**key, "Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    huge = await http.post(
        "/v1/runs",
        content=b'{"pack_type":"echo","inputs":{"payload":"' + b"x" * 300_000 + b'"}}',
        headers={**key, "Content-Type": "application/json"},
    )
    assert huge.status_code == 413
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 0


async def test_usage_counts_by_day_and_pack(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    run = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    await http.post(f"/v1/runs/{run['id']}/cancel", headers=key)
    await http.post("/v1/runs", json=ECHO, headers=key)
    usage = (await http.get("/v1/usage", headers=key)).json()
    assert len(usage["days"]) == 1
    day = usage["days"][0]
    assert (day["pack_type"], day["runs"], day["canceled"]) == ("echo", 2, 1)
    assert day["refunded_usd_micros"] == run["reserved_usd_micros"]
    assert day["charged_usd_micros"] == 0
    for bad in (
        "from=2026-13-01",
        "from=2026-02-30",
        "from=yesterday",
        "from=2026-05-02&to=2026-05-01",
        "from=2020-01-01&to=2026-01-01",
    ):
        assert (await http.get(f"/v1/usage?{bad}", headers=key)).status_code == 422, bad


async def test_packs_catalog(http, admin_headers) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    packs = (await http.get("/v1/packs", headers=key)).json()["packs"]
    types = [p["pack_type"] for p in packs]
    assert "echo" in types and "decision" in types and "webhook" not in types
    for pack in packs:
        assert pack["minimum_fee_usd_micros"] <= pack["default_reservation_usd_micros"]
        assert pack["default_reservation_usd_micros"] <= pack["max_reservation_usd_micros"]


@single_and_cluster
async def test_admin_credits_are_idempotent(http, admin_headers) -> None:
    tenant_id, _ = await _tenant(http, admin_headers, 0)
    url = f"/admin/tenants/{tenant_id}/credits"
    body = {"amount_usd_micros": 5_000}
    assert (await http.post(url, json=body, headers=admin_headers)).status_code == 400
    headers = {**admin_headers, "Idempotency-Key": "top-up-1"}
    first = await http.post(url, json=body, headers=headers)
    again = await http.post(url, json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert (
        again.json()
        == first.json()
        == {
            "balance_usd_micros": 5_000,
            "reserved_usd_micros": 0,
            "available_usd_micros": 5_000,
        }
    )
    conflict = await http.post(url, json={"amount_usd_micros": 6_000}, headers=headers)
    assert conflict.status_code == 422
    for bad in (0, -5, 1.5, "5", True, None):
        answer = await http.post(
            url,
            json={"amount_usd_micros": bad},
            headers={**admin_headers, "Idempotency-Key": "bad"},
        )
        assert answer.status_code == 422, bad
    missing = await http.post(
        "/admin/tenants/ten_00000000000000000000000000/credits", json=body, headers=headers
    )
    assert missing.status_code == 404
    view = (await http.get(f"/admin/tenants/{tenant_id}/budget", headers=admin_headers)).json()
    assert view["postgres"]["balance_usd_micros"] == 5_000
    assert view["redis"] == view["postgres"] and view["consistent"] is True


async def test_resolve_audit_required_run(http, admin_headers, runtime) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    run = (await http.post("/v1/runs", json=ECHO, headers=key)).json()
    url = f"/admin/runs/{run['id']}/resolve"
    body = {"outcome": "COMPLETED", "charged_usd_micros": 700}
    assert (await http.post(url, json=body, headers=admin_headers)).status_code == 409
    missing = await http.post(
        "/admin/runs/run_00000000000000000000000000/resolve", json=body, headers=admin_headers
    )
    assert missing.status_code == 404
    adapters = runtime.adapters
    version = await adapters.pool.fetchval("SELECT version FROM runs WHERE id=$1", run["id"])
    failure = RunFailure.audit_required("test: receipt contradicts the ledger")
    assert await ledger.mark_audit_required(
        adapters.pool, adapters.queries, run["id"], version, failure.document()
    )
    audit = (await http.get("/admin/audit", headers=admin_headers)).json()
    assert audit["ok"] is False
    assert [r["run_id"] for r in audit["audit_required_runs"]] == [run["id"]]
    too_much = {"outcome": "COMPLETED", "charged_usd_micros": run["reserved_usd_micros"] + 1}
    assert (await http.post(url, json=too_much, headers=admin_headers)).status_code == 422
    resolved = await http.post(url, json=body, headers=admin_headers)
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["charged_usd_micros"] == 700
    assert (await http.post(url, json=body, headers=admin_headers)).status_code == 409
    fetched = (await http.get(f"/v1/runs/{run['id']}", headers=key)).json()
    assert fetched["status"] == "COMPLETED" and fetched["charged_usd_micros"] == 700
    await _audit_ok(http, admin_headers)


async def test_two_replicas_share_one_budget_without_overspend(
    settings: Settings, settings_env: dict[str, str], admin_headers
) -> None:
    async with (
        open_runtime(settings, environment=settings_env, dispatch=False) as first,
        open_runtime(settings, environment=settings_env, dispatch=False) as second,
    ):
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=rt.app), base_url=BASE_URL)
            for rt in (first, second)
        ]
        plan = {
            "id": "wide",
            "requests_per_minute": 10_000,
            "max_concurrent_runs": 1_000,
            "retention_days": 30,
        }
        assert (await clients[0].post("/admin/plans", json=plan, headers=admin_headers)).is_success
        _, key = await _tenant(clients[1], admin_headers, 10_000, plan_id="wide")
        statuses: list[int] = []

        async def submit(index: int) -> None:
            answer = await clients[index % 2].post(
                "/v1/runs", json={**ECHO, "max_cost_usd_micros": 1_000}, headers=key
            )
            statuses.append(answer.status_code)

        async with anyio.create_task_group() as group:
            for index in range(100):
                group.start_soon(submit, index)
        assert statuses.count(202) == 10 and statuses.count(402) == 90
        for client in clients:
            budget = (await client.get("/v1/budget", headers=key)).json()
            assert budget["available_usd_micros"] == 0
        await _audit_ok(clients[0], admin_headers)
        for client in clients:
            await client.aclose()


async def test_a_crashing_budget_actor_is_restarted_and_the_front_stays_up(
    http, admin_headers
) -> None:
    from dpp.faults import armed

    _, key = await _tenant(http, admin_headers, 1_000_000)
    with armed("reserve.before_commit"):
        crashed = await http.post("/v1/runs", json=ECHO, headers=key)
    assert crashed.status_code == 503
    assert crashed.json()["type"].endswith("/unavailable")
    assert (await http.get("/health")).status_code == 200
    tree = (await http.get("/admin/actors", headers=admin_headers)).json()
    budgets = next(node for node in tree["children"] if node["name"] == "budgets")
    tenants = budgets["children"]
    assert sum(node["restarts"] for node in tenants) >= 1, budgets
    # the restarted actor admits the next run; nothing was reserved by the crashed one
    assert (await http.post("/v1/runs", json=ECHO, headers=key)).status_code == 202
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 1_000
    await _audit_ok(http, admin_headers)


async def test_a_retry_after_the_key_lock_expires_proceeds_and_one_run_is_charged(
    runtime, http, admin_headers, monkeypatch
) -> None:
    """Public behaviour only: a request holding an Idempotency-Key stalls past the
    key's lock; the client's retry with the key takes it over and goes on. However
    the two race, the tenant ends with exactly one run for that key, and every
    202 either answer carries names it. (Before the idempotency owner tokens this
    made two runs, both answered 202: hole 1 of issue 9.)"""
    monkeypatch.setattr(idempotency, "IDEMPOTENCY_LOCK_S", 1.0)
    stalled = LedgerStore.reserve_batch
    calls = 0

    async def first_commit_is_late(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(1.5)  # a slow pool, a lock wait: past the key's lock
        return await stalled(self, *args, **kwargs)

    tenant_id, key = await _tenant(http, admin_headers, 1_000_000)
    monkeypatch.setattr(LedgerStore, "reserve_batch", first_commit_is_late)
    headers = {**key, "Idempotency-Key": "one-run-please"}
    answers: list[httpx.Response] = []

    async def submit() -> None:
        answers.append(await http.post("/v1/runs", json=ECHO, headers=headers))

    async with anyio.create_task_group() as group:
        group.start_soon(submit)
        await anyio.sleep(1.1)  # the lock has expired; the holder is still committing
        group.start_soon(submit)
    runs = await runtime.adapters.pool.fetch("SELECT id FROM runs WHERE tenant_id = $1", tenant_id)
    assert len(runs) == 1, (runs, [a.status_code for a in answers])
    for answer in answers:
        if answer.status_code == 202:
            assert answer.json()["id"] == runs[0]["id"]
    await _audit_ok(http, admin_headers)
