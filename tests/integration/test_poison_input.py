"""Poison input: what Postgres cannot store is a 422 naming the field, before any
actor sees it; a data error inside a reservation batch is its own request's
answer; a tenant whose budget actor keeps crashing cools down alone (issue 12).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import orjson
import pytest

from dpp.app import Runtime
from dpp.faults import armed
from dpp.ids import new_id
from dpp.money import ledger
from dpp.runs.admission import ReservationInvalid

WIDE_PLAN = {
    "id": "wide",
    "requests_per_minute": 100_000,
    "max_concurrent_runs": 10_000,
    "retention_days": 30,
}


async def _tenant(
    http: httpx.AsyncClient, admin_headers: dict[str, str], credit: int, plan_id: str = "default"
) -> tuple[str, dict[str, str]]:
    created = await http.post(
        "/admin/tenants", json={"name": "acme", "plan_id": plan_id}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    tenant_id = created.json()["id"]
    issued = await http.post(f"/admin/tenants/{tenant_id}/api-keys", json={}, headers=admin_headers)
    assert issued.status_code == 201, issued.text
    if credit:
        credited = await http.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": credit},
            headers={**admin_headers, "Idempotency-Key": f"seed-{tenant_id}"},
        )
        assert credited.status_code == 201, credited.text
    return tenant_id, {"Authorization": f"Bearer {issued.json()['api_key']}"}


async def _wide_plan(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    answer = await http.post("/admin/plans", json=WIDE_PLAN, headers=admin_headers)
    assert answer.status_code == 201, answer.text


def _post_json(text: str) -> dict[str, Any]:
    """Request kwargs for a body given as JSON text (escapes such as \\u0000 kept)."""
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"pack_type": "echo", "inputs": {"payload": "a\\u0000b"}}', "inputs.payload"),
        (
            '{"pack_type": "echo", "inputs": {"payload": {"k\\u0000": 1}}}',
            'inputs.payload["k\\u0000"]',
        ),
        (
            '{"pack_type": "echo", "inputs": {"payload": [["\\u0000"]]}}',
            "inputs.payload[0][0]",
        ),
        (
            '{"pack_type": "echo", "inputs": {"payload": 1}, "metadata": {"note": "\\u0000"}}',
            "metadata.note",
        ),
        (
            '{"pack_type": "echo", "inputs": {"payload": 1}, "metadata": {"\\u0000": "x"}}',
            'metadata["\\u0000"]',
        ),
        (
            '{"pack_type": "echo", "inputs": {"payload": 1}, "metadata": {"a": '
            + _deep(300)
            + "}}",
            "metadata.a" + "[0]" * 63,
        ),
        ('{"pack_type": "echo", "inputs": {"payload": 1}, "": 1}', '[""]'),
        ('{"pack_type": "echo", "inputs": {"payload": 1}, "a.b": 1}', '["a.b"]'),
    ],
    ids=[
        "nul-in-input-string",
        "nul-in-input-key",
        "nul-nested",
        "nul-in-metadata-value",
        "nul-in-metadata-key",
        "metadata-nested-too-deep",
        "member-named-empty",
        "member-named-dotted",
    ],
)
async def test_what_postgres_cannot_store_is_422_naming_the_field(
    http: httpx.AsyncClient, admin_headers: dict[str, str], body: str, field: str
) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    kwargs = _post_json(body)
    answer = await http.post(
        "/v1/runs", content=kwargs["content"], headers={**key, **kwargs["headers"]}
    )
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["field"] == field
    assert problem["detail"].startswith(field + ": ")
    budget = (await http.get("/v1/budget", headers=key)).json()
    assert budget["reserved_usd_micros"] == 0
    listed = (await http.get("/v1/runs", headers=key)).json()
    assert listed["data"] == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/tenants", '{"name": "a\\u0000b"}', "name"),
        (
            "/admin/plans",
            '{"id": "p\\u0000", "requests_per_minute": 1, '
            '"max_concurrent_runs": 1, "retention_days": 1}',
            "id",
        ),
        ("/admin/tenants", '{"name": "ok", "": 1}', '[""]'),
    ],
    ids=["tenant-name", "plan-id", "member-named-empty"],
)
async def test_admin_bodies_refuse_what_postgres_cannot_store(
    http: httpx.AsyncClient, admin_headers: dict[str, str], path: str, body: str, field: str
) -> None:
    kwargs = _post_json(body)
    answer = await http.post(
        path, content=kwargs["content"], headers={**admin_headers, **kwargs["headers"]}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


async def test_api_key_name_with_nul_is_422(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant_id, _ = await _tenant(http, admin_headers, 0)
    kwargs = _post_json('{"name": "ci\\u0000"}')
    answer = await http.post(
        f"/admin/tenants/{tenant_id}/api-keys",
        content=kwargs["content"],
        headers={**admin_headers, **kwargs["headers"]},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "name"


@pytest.mark.slow
async def test_a_poison_storm_leaves_the_process_and_other_tenants_alone(
    http: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    """The issue's attack: hundreds of NUL-bearing submissions with a valid key,
    concurrent with another tenant's normal load. Every poison request is a 422,
    every normal one a 202; no actor crashed; the tree never restarted."""
    await _wide_plan(http, admin_headers)
    _, poisoner = await _tenant(http, admin_headers, 10_000_000, plan_id="wide")
    _, neighbour = await _tenant(http, admin_headers, 10_000_000, plan_id="wide")
    poison = _post_json(
        '{"pack_type": "echo", "inputs": {"payload": "\\u0000"}, "metadata": {"x": "\\u0000"}}'
    )
    statuses: dict[str, list[int]] = {"poison": [], "normal": []}

    async def attack() -> None:
        answer = await http.post(
            "/v1/runs", content=poison["content"], headers={**poisoner, **poison["headers"]}
        )
        statuses["poison"].append(answer.status_code)

    async def work() -> None:
        answer = await http.post(
            "/v1/runs",
            json={"pack_type": "echo", "inputs": {"payload": "fine"}, "max_cost_usd_micros": 1_000},
            headers=neighbour,
        )
        statuses["normal"].append(answer.status_code)

    async with anyio.create_task_group() as group:
        for index in range(300):
            group.start_soon(attack)
            if index % 3 == 0:
                group.start_soon(work)
    assert statuses["poison"] == [422] * 300
    assert statuses["normal"] == [202] * 100
    root = runtime.supervisor.statistics()
    assert root["state"] == "running" and root["restarts"] == 0
    (budgets,) = [child for child in root["children"] if child["name"] == "budgets"]
    assert budgets["state"] == "running" and budgets["restarts"] == 0
    assert budgets["actor_restarts"] == 0 and budgets["cooldowns"] == 0
    budget = (await http.get("/v1/budget", headers=neighbour)).json()
    assert budget["reserved_usd_micros"] == 100 * 1_000
    audit = (await http.get("/admin/audit", headers=admin_headers)).json()
    assert audit["ok"], audit


def _draft(payload: Any) -> ledger.RunDraft:
    return ledger.RunDraft(
        run_id=new_id("run"),
        pack_type="echo",
        inputs={"payload": payload},
        metadata={},
        reserved_usd_micros=1_000,
        minimum_fee_usd_micros=100,
        timebox_sec=30,
        trace_id=None,
        created_at=datetime.now(UTC),
    )


async def test_a_data_error_in_a_batch_is_answered_to_its_request_alone(
    http: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    """Past the checks (as if one were missing): Postgres refuses some drafts of a
    batch; those requests alone hear it, the rest commit, the actor lives."""
    await _wide_plan(http, admin_headers)
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000, plan_id="wide")
    budgets = runtime.context.budgets
    drafts = [_draft("\x00" if index % 7 == 3 else index) for index in range(40)]
    outcomes: dict[str, object] = {}

    async def reserve(draft: ledger.RunDraft) -> None:
        try:
            outcomes[draft.run_id] = await budgets.reserve(tenant_id, draft)
        except ReservationInvalid as error:
            outcomes[draft.run_id] = error

    async with anyio.create_task_group() as group:
        for draft in drafts:
            group.start_soon(reserve, draft)
    poisoned = [d for d in drafts if d.inputs["payload"] == "\x00"]
    assert len(poisoned) == 6
    for draft in drafts:
        expected = ReservationInvalid if draft in poisoned else ledger.Reserved
        assert isinstance(outcomes[draft.run_id], expected), outcomes[draft.run_id]
    statistics = budgets.registry.statistics()
    assert statistics["actor_restarts"] == 0 and statistics["cooldowns"] == 0
    stored = await runtime.adapters.pool.fetchval(
        "SELECT count(*) FROM runs WHERE tenant_id = $1", tenant_id
    )
    assert stored == 34
    both = (await http.get(f"/admin/tenants/{tenant_id}/budget", headers=admin_headers)).json()
    assert both["postgres"]["reserved_usd_micros"] == 34 * 1_000
    assert both["consistent"] is True, both  # the refused drafts' holds were given back
    listed = await http.get("/v1/runs?limit=100", headers=key)
    assert len(listed.json()["data"]) == 34


@pytest.mark.mirror_exempt  # the crashed reservations' holds stay pending until abandoned
async def test_a_crash_looping_budget_actor_cools_its_tenant_down_alone(
    http: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    """Six crashes in a row (an injected crash in the reservation path) stop that
    tenant's budget actor: its submissions answer 503 with Retry-After for the
    cooldown, counted in /metrics; its cancels still settle (its settlement actor
    is another actor), another tenant is untouched, and the registries and the
    root never restart."""
    _, victim = await _tenant(http, admin_headers, 1_000_000)
    _, other = await _tenant(http, admin_headers, 1_000_000)
    queued = await http.post(
        "/v1/runs", json={"pack_type": "echo", "inputs": {"payload": 1}}, headers=victim
    )
    assert queued.status_code == 202
    echo = {"pack_type": "echo", "inputs": {"payload": 2}}
    with armed("reserve.after_redis_hold", times=6):
        for _ in range(6):
            crashed = await http.post("/v1/runs", json=echo, headers=victim)
            assert crashed.status_code == 503, crashed.text
    cooling = await http.post("/v1/runs", json=echo, headers=victim)
    assert cooling.status_code == 503, cooling.text
    assert 1 <= int(cooling.headers["retry-after"]) <= 30
    assert "paused" in cooling.json()["detail"]
    assert (await http.post("/v1/runs", json=echo, headers=other)).status_code == 202
    root = runtime.supervisor.statistics()
    assert root["state"] == "running" and root["restarts"] == 0
    (budgets,) = [child for child in root["children"] if child["name"] == "budgets"]
    assert (budgets["state"], budgets["restarts"], budgets["cooldowns"]) == ("running", 0, 1)
    metrics = (await http.get("/metrics")).text
    assert 'dpp_actor_cooldowns_total{actor_kind="budget"} 1.0' in metrics
    assert 'dpp_actor_crashes_total{actor_kind="budget"} 6.0' in metrics
    assert 'dpp_actor_cooldowns_total{actor_kind="settlement"}' not in metrics
    # the queued run was left whole, and its cancel refunds it in full meanwhile
    run = (await http.get(f"/v1/runs/{queued.json()['id']}", headers=victim)).json()
    assert run["status"] == "QUEUED"
    cancel = await http.post(f"/v1/runs/{queued.json()['id']}/cancel", headers=victim)
    assert cancel.status_code == 200, cancel.text
    canceled = orjson.loads(cancel.content)
    assert canceled["status"] == "CANCELED" and canceled["charged_usd_micros"] == 0
    assert canceled["refunded_usd_micros"] == run["reserved_usd_micros"]
    (settlements,) = [c for c in root["children"] if c["name"] == "settlements"]
    assert (settlements["state"], settlements["cooldowns"]) == ("running", 0)


# --- the sweep: query, header and path values that reached a 500 -----------------


def _cursor(created_at: str, run_id: str) -> str:
    import base64

    return base64.urlsafe_b64encode(orjson.dumps([created_at, run_id])).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        {"cursor": _cursor("2026-01-01T00:00:00+00:00", "run_\x00")},
        {"cursor": _cursor("0001-01-01T00:00:00+14:00", "run_x")},
        {"cursor": _cursor("9999-12-31T23:59:59-14:00", "run_x")},
        {"cursor": "%ff%fe"},
        {"cursor": "\u00e9\u2028"},
        {"limit": "\u0663"},
        {"status": "QUEUED\x00"},
    ],
    ids=["nul-run-id", "year-1", "year-9999", "bad-bytes", "unicode", "arabic-digit", "nul"],
)
async def test_odd_list_queries_are_422_or_an_empty_page(
    http: httpx.AsyncClient, admin_headers: dict[str, str], query: dict[str, str]
) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    answer = await http.get("/v1/runs", params=query, headers=key)
    assert answer.status_code in (200, 422), answer.text
    if answer.status_code == 200:
        assert answer.json()["data"] == []


@pytest.mark.parametrize(
    "query",
    [
        {"to": "0001-01-01"},
        {"from": "0001-01-01", "to": "0001-01-05"},
        {"from": "9999-12-31", "to": "9999-12-31"},
        {"from": "9999-12-30"},
        {"to": "\u0662\u0660\u0662\u0666-01-01"},
    ],
    ids=["to-year-1", "year-1-range", "last-date", "from-after-default-to", "arabic-digits"],
)
async def test_usage_at_the_edges_of_the_calendar_is_never_a_500(
    http: httpx.AsyncClient, admin_headers: dict[str, str], query: dict[str, str]
) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    answer = await http.get("/v1/usage", params=query, headers=key)
    assert answer.status_code in (200, 422), answer.text


@pytest.mark.parametrize(
    "path",
    ["/v1/runs/run_%00", "/v1/runs/%ff", "/v1/runs/run_\u00e9/cancel", "/v1/runs/" + "r" * 5000],
    ids=["nul", "bad-byte", "unicode", "long"],
)
async def test_odd_run_ids_in_the_path_are_404(
    http: httpx.AsyncClient, admin_headers: dict[str, str], path: str
) -> None:
    _, key = await _tenant(http, admin_headers, 0)
    method = "POST" if path.endswith("/cancel") else "GET"
    answer = await http.request(method, path, headers=key)
    assert answer.status_code == 404, answer.text


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        '"text"',
        "123",
        "null",
        '{"pack_type": "echo", "inputs": {}, "metadata": []}',
        '{"pack_type": ["echo"], "inputs": {}}',
        '{"pack_type": "echo", "inputs": 1e400}',
        '{"pack_type": "echo", "inputs": {"payload": 1}, "max_cost_usd_micros": 1e30}',
        '{"pack_type": "echo", "inputs": {"payload": 1}, "timebox_sec": 18446744073709551615}',
        '{"pack_type": "echo", "inputs": {"payload": 1}, "max_cost_usd_micros": '
        + str(-(2**63))
        + "}",
        '{"pack_type": "\\u0000", "inputs": {}}',
        '{"pack_type": "echo", "inputs": {"payload": "\\ud800"}}',
        '{"pack_type": "echo", "inputs": {"payload": 1, "delay_ms": 1.0}}',
    ],
)
async def test_odd_submission_bodies_are_4xx(
    http: httpx.AsyncClient, admin_headers: dict[str, str], body: str
) -> None:
    _, key = await _tenant(http, admin_headers, 1_000_000)
    kwargs = _post_json(body)
    answer = await http.post(
        "/v1/runs", content=kwargs["content"], headers={**key, **kwargs["headers"]}
    )
    assert answer.status_code in (400, 422), answer.text


def test_an_id_is_the_whole_string() -> None:
    from dpp.ids import is_id

    run_id = new_id("run")
    assert is_id(run_id, "run")
    for suffix in ("\n", "\x00", " "):
        assert not is_id(run_id + suffix, "run")


def test_a_cursor_is_only_what_the_api_could_have_made() -> None:
    from dpp.runs.documents import decode_cursor, encode_cursor

    run_id = new_id("run")
    now = datetime.now(UTC)
    assert decode_cursor(encode_cursor(now, run_id)) == (now, run_id)
    assert decode_cursor(_cursor(now.isoformat(), run_id + "\x00")) is None
    assert decode_cursor(_cursor("0001-01-01T00:00:00+14:00", run_id)) is None
    assert decode_cursor(_cursor("2026-01-01T00:00:00", run_id)) is None  # no offset
