"""The operator console in a real browser: what a person sees, and money moving once.

Each test starts a real ``dpp serve`` (``console_replica``), signs in through
the sign-in page with the admin token, and compares what the page shows with
what the admin API answers. Screenshots of every page: tests/artifacts/.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

import anyio
import httpx

from tests.browser.conftest import ConsoleReplica, screenshot

if TYPE_CHECKING:
    from playwright.async_api import Page


def usd(micros: int) -> str:
    """How the console prints an amount (dpp.http.console.render.usd)."""
    whole, fraction = divmod(micros, 1_000_000)
    return f"${whole:,}.{f'{fraction:06d}'.rstrip('0').ljust(2, '0')}"


async def sign_in(page: Page, served: ConsoleReplica) -> None:
    await page.goto(f"{served.url}/console")
    assert page.url.endswith("/console/sign-in")  # no session: the sign-in page
    await page.fill("#token", served.token)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{served.url}/console")


async def test_sign_in_and_overview(browser_page: Page, console_replica: ConsoleReplica) -> None:
    page = browser_page
    await page.goto(f"{console_replica.url}/console/sign-in")
    await screenshot(page, "sign-in")
    await sign_in(page, console_replica)
    readiness = (await console_replica.admin.get("/readyz")).json()
    assert "Overview" in await page.title()
    rows = await page.locator("#readiness tbody tr").all_inner_texts()
    shown = dict(row.split("\t") for row in rows)
    assert shown == {name: state for name, state in readiness["checks"].items()}, (shown, readiness)
    tree = (await console_replica.admin.get("/admin/actors")).json()
    actors = await page.locator("#actors").inner_text()
    for child in tree["children"]:
        assert child["name"] in actors
    assert "Consistent: no violations" in await page.locator("#audit-verdict").inner_text()
    await screenshot(page, "overview")


ECHO = {"pack_type": "echo", "inputs": {"payload": {"n": 1}}}


async def run_to_end(
    served: ConsoleReplica, key: str, body: dict[str, object]
) -> dict[str, object]:
    """Submit a run with the tenant's key and wait until it settled."""
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=15.0
    ) as tenant:
        submitted = await tenant.post("/v1/runs", json=body)
        assert submitted.status_code == 202, submitted.text
        run_id = submitted.json()["id"]
        for _ in range(300):
            run = (await tenant.get(f"/v1/runs/{run_id}")).json()
            if run["charged_usd_micros"] is not None:
                return dict(run)
            await anyio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not settle: {run}")


async def cell_texts(page: Page, selector: str) -> list[list[str]]:
    rows = await page.locator(f"{selector} tbody tr").all()
    return [await row.locator("td, th").all_inner_texts() for row in rows]


async def test_reconcile_button_runs_one_pass(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    await sign_in(page, console_replica)
    await page.click("text=Run one reconciliation pass")
    await page.wait_for_url(f"{console_replica.url}/console/reconcile")
    assert "One pass ran." in await page.locator("#reconciled").inner_text()
    report = dict((name, value) for name, value in await cell_texts(page, "#reconcile-report"))
    assert report["expired"] == "0" and report["drift repairs"] == "0", report
    await screenshot(page, "reconciled")


async def test_tenant_search_and_page_match_the_api(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    marker = secrets.token_hex(4)
    tenant_id = await served.tenant(f"Acme {marker}", credit_usd_micros=7_250_000)
    await served.tenant(f"Other {marker}")
    key = await served.api_key(tenant_id, name="ci", spend_limit_usd_micros=3_000_000)
    run = await run_to_end(served, key, ECHO)
    await sign_in(page, served)
    await page.click("nav >> text=Tenants")
    await page.fill("#q", f"acme {marker}")
    await page.click("text=Search")
    names = [row[0] for row in await cell_texts(page, "#tenants")]
    assert names == [f"Acme {marker}"]
    await screenshot(page, "tenants")
    await page.click(f"text=Acme {marker}")
    await page.wait_for_url(f"{served.url}/console/tenants/{tenant_id}")
    budget = (await served.admin.get(f"/admin/tenants/{tenant_id}/budget")).json()
    postgres = budget["postgres"]
    assert postgres["balance_usd_micros"] == 7_250_000 - run["charged_usd_micros"]
    assert await page.locator("#pg-balance").inner_text() == usd(postgres["balance_usd_micros"])
    assert await page.locator("#pg-reserved").inner_text() == usd(postgres["reserved_usd_micros"])
    assert await page.locator("#redis-balance").inner_text() == usd(
        budget["redis"]["balance_usd_micros"]
    )
    assert await page.locator("#consistent").inner_text() == "consistent: yes"
    plan = dict(await cell_texts(page, "#plan"))
    assert plan["requests per minute"] == "600"
    keys = await cell_texts(page, "#keys")
    assert len(keys) == 1
    key_view = (await served.admin.get(f"/admin/api-keys/{keys[0][1]}")).json()
    assert keys[0][0] == "ci"
    assert keys[0][4] == usd(3_000_000)  # the spend limit
    assert keys[0][5] == usd(key_view["spent_usd_micros"]) == usd(run["charged_usd_micros"])
    await screenshot(page, "tenant")


async def test_topup_double_submit_adds_once(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Top-up Ltd", credit_usd_micros=1_000_000)
    await sign_in(page, served)
    await page.goto(f"{served.url}/console/tenants/{tenant_id}")
    form = {
        "csrf": await page.locator("#topup input[name=csrf]").input_value(),
        "topup_id": await page.locator("#topup input[name=topup_id]").input_value(),
        "amount_usd": "12.5",
    }
    await page.fill("#amount_usd", "12.5")
    await page.click("text=Add credit")
    await page.wait_for_url(re.compile(r".*\?topup=added$"))
    assert await page.locator("#notice").inner_text() == "Credit added."
    assert await page.locator("#pg-balance").inner_text() == usd(13_500_000)
    # the same form sent again (a double click, a resend after a timeout)
    again = await page.request.post(f"{served.url}/console/tenants/{tenant_id}/credits", form=form)
    assert again.ok and again.url.endswith("?topup=replayed"), again.url
    assert "already applied; nothing was added again" in await again.text()
    assert await served.balance(tenant_id) == 13_500_000  # added once
    await page.reload()
    assert await page.locator("#pg-balance").inner_text() == usd(13_500_000)
    # a fresh form is a fresh top-up
    await page.goto(f"{served.url}/console/tenants/{tenant_id}")
    await page.fill("#amount_usd", "0.000001")
    await page.click("text=Add credit")
    await page.wait_for_url(re.compile(r".*\?topup=added$"))
    assert await served.balance(tenant_id) == 13_500_001
    await screenshot(page, "tenant-topped-up")


async def test_topup_refuses_a_bad_amount(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Careful Co")
    await sign_in(page, served)
    await page.goto(f"{served.url}/console/tenants/{tenant_id}")
    await page.fill("#amount_usd", "1.0000001")  # below a micro
    await page.click("text=Add credit")
    assert "422" in await page.locator("h1").inner_text()
    assert await served.balance(tenant_id) == 0


async def test_runs_filter_and_run_page(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Runner", credit_usd_micros=5_000_000)
    key = await served.api_key(tenant_id)
    done = await run_to_end(served, key, ECHO)
    failed = await run_to_end(
        served, key, {"pack_type": "echo", "inputs": {"payload": 1, "fail": True}}
    )
    other = await served.tenant("Elsewhere", credit_usd_micros=5_000_000)
    await run_to_end(served, await served.api_key(other), ECHO)
    await sign_in(page, served)
    await page.click("nav >> text=Runs")
    await page.fill("#tenant", tenant_id)
    await page.click("text=Filter")
    listed = [row[0] for row in await cell_texts(page, "#runs")]
    assert sorted(listed) == sorted([done["id"], failed["id"]])
    await page.select_option("#status", "FAILED")
    await page.click("text=Filter")
    rows = await cell_texts(page, "#runs")
    assert [row[0] for row in rows] == [failed["id"]]
    assert rows[0][3] == "FAILED" and rows[0][5] == usd(failed["charged_usd_micros"])
    await screenshot(page, "runs")
    await page.click(f"text={failed['id']}")
    await page.wait_for_url(f"{served.url}/console/runs/{failed['id']}")
    assert await page.locator("#run-status").inner_text() == "FAILED"
    assert await page.locator("#run-charged").inner_text() == usd(failed["charged_usd_micros"])
    assert await page.locator("#run-refunded").inner_text() == usd(failed["refunded_usd_micros"])
    timeline = {row[0]: row[1] for row in await cell_texts(page, "#timeline")}
    # a pack that failed is not claimed for finalize: not recorded, shown as such
    assert timeline["claimed"] == "—", timeline
    for event in ("created", "started", "finished", "settled"):
        assert timeline[event].endswith("UTC"), (event, timeline)
    entries = [(row[1], row[2]) for row in await cell_texts(page, "#ledger")]
    assert entries == [
        ("reserve", usd(failed["reserved_usd_micros"])),
        ("charge", usd(failed["charged_usd_micros"])),
        ("refund", usd(failed["refunded_usd_micros"])),
    ]
    assert "pack" in await page.locator("#error").inner_text()
    await screenshot(page, "run")


async def test_audit_required_queue_and_resolve(
    browser_page: Page, console_replica: ConsoleReplica, database_url: str
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Disputed", credit_usd_micros=5_000_000)
    key = await served.api_key(tenant_id)
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=15.0
    ) as tenant:
        submitted = await tenant.post(
            "/v1/runs",
            json={"pack_type": "echo", "inputs": {"payload": 1, "delay_ms": 60_000}},
        )
        assert submitted.status_code == 202, submitted.text
    run = submitted.json()
    await set_aside(database_url, run["id"])
    await sign_in(page, served)
    assert "1 AUDIT_REQUIRED run(s)" in await page.locator("#audit-verdict").inner_text()
    await page.click("nav >> text=AUDIT_REQUIRED")
    item = page.locator(".audit-item")
    assert await item.count() == 1
    text = await item.inner_text()
    assert run["id"] in text and "test: the receipt contradicts the ledger" in text
    assert f"held by the ledger {usd(run['reserved_usd_micros'])}" in text
    await screenshot(page, "audit-required")
    charge = run["reserved_usd_micros"] // 2
    await page.fill(f"#charged-{run['id']}", str(charge))
    await page.select_option(f"#outcome-{run['id']}", "COMPLETED")
    await page.click("text=Resolve once")
    await page.wait_for_url(re.compile(r".*\?resolved=1$"))
    assert await page.locator("#run-status").inner_text() == "COMPLETED"
    assert await page.locator("#run-charged").inner_text() == usd(charge)
    budget = (await served.admin.get(f"/admin/tenants/{tenant_id}/budget")).json()
    assert budget["postgres"]["balance_usd_micros"] == 5_000_000 - charge
    assert budget["postgres"]["reserved_usd_micros"] == 0
    await page.goto(f"{served.url}/console/audit-required")
    assert await page.locator("#queue-empty").is_visible()
    audit = (await served.admin.get("/admin/audit")).json()
    assert audit["ok"] is True, audit


async def set_aside(database_url: str, run_id: str) -> None:
    """What the reconciler does with a run it cannot prove: AUDIT_REQUIRED, its
    reservation held (``ledger.mark_audit_required``, the production function)."""
    from dpp.adapters.postgres import Queries, create_pool
    from dpp.money import ledger
    from dpp.runs.failures import RunFailure

    pool = await create_pool(database_url, max_size=1)
    try:
        failure = RunFailure.audit_required("test: the receipt contradicts the ledger")
        for _ in range(50):
            version = await pool.fetchval("SELECT version FROM runs WHERE id = $1", run_id)
            if await ledger.mark_audit_required(
                pool, Queries.load(), run_id, version, failure.document()
            ):
                return
            await anyio.sleep(0.05)
        raise AssertionError("could not set the run aside")
    finally:
        await pool.close()


async def test_usage_chart_and_table_match_the_api(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Meter", credit_usd_micros=9_000_000)
    key = await served.api_key(tenant_id)
    for body in (ECHO, ECHO, {"pack_type": "echo", "inputs": {"payload": 1, "fail": True}}):
        await run_to_end(served, key, body)
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {key}"}, timeout=15.0
    ) as tenant:
        api = (await tenant.get("/v1/usage")).json()
    (day,) = api["days"]
    await sign_in(page, served)
    await page.goto(f"{served.url}/console/usage?tenant={tenant_id}")
    rows = await cell_texts(page, "#usage")
    assert rows == [
        [
            day["date"],
            "echo",
            str(day["runs"]),
            usd(day["charged_usd_micros"]),
            usd(day["refunded_usd_micros"]),
        ]
    ]
    assert await page.locator("#total-charged").inner_text() == usd(day["charged_usd_micros"])
    bars = page.locator("#usage-chart rect")
    assert await bars.count() == 2  # charged and refunded of one pack on one day
    titles = await page.locator("#usage-chart rect title").all_text_contents()
    assert f"{day['date']} echo refunded" in titles[1]
    await screenshot(page, "usage")
    await page.goto(f"{served.url}/console/usage")  # every tenant
    assert await page.locator("#usage-chart").is_visible()


async def test_html_in_names_and_metadata_is_escaped(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    hostile = '<script>alert("name")</script><b>bold</b>'
    tenant_id = await served.tenant(hostile, credit_usd_micros=1_000_000)
    key = await served.api_key(tenant_id, name="<img src=x onerror=alert(1)>")
    run = await run_to_end(
        served, key, {**ECHO, "metadata": {"note": "<script>alert('meta')</script>"}}
    )
    await sign_in(page, served)
    await page.goto(f"{served.url}/console/tenants")
    assert hostile in await page.locator("#tenants").inner_text()
    await page.goto(f"{served.url}/console/tenants/{tenant_id}")
    assert await page.locator("#tenant-name").inner_text() == hostile
    assert "<img src=x onerror=alert(1)>" in await page.locator("#keys").inner_text()
    await page.goto(f"{served.url}/console/runs/{run['id']}")
    assert "<script>alert('meta')</script>" in await page.locator("#metadata").inner_text()
    for path in ("/console/tenants", f"/console/tenants/{tenant_id}", f"/console/runs/{run['id']}"):
        await page.goto(f"{served.url}{path}")
        assert await page.locator("script, b, img").count() == 0, path
    assert dialogs == []
    await screenshot(page, "escaped")


async def test_unknown_tenant_and_run_are_404_pages(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    await sign_in(page, served)
    for path in (
        "/console/tenants/ten_00000000000000000000000000",
        "/console/tenants/not-an-id",
        "/console/runs/run_00000000000000000000000000",
        "/console/runs/%3Cscript%3E",
    ):
        answer = await page.goto(f"{served.url}{path}")
        assert answer is not None and answer.status == 404, path
        assert "404 · Not found" in await page.locator("h1").inner_text()
    await screenshot(page, "not-found")


async def test_bad_csrf_is_403_and_moves_nothing(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    tenant_id = await served.tenant("Guarded", credit_usd_micros=1_000_000)
    await sign_in(page, served)
    await page.goto(f"{served.url}/console/tenants/{tenant_id}")
    topup_id = await page.locator("#topup input[name=topup_id]").input_value()
    for csrf in ("forged", ""):
        answer = await page.request.post(
            f"{served.url}/console/tenants/{tenant_id}/credits",
            form={"csrf": csrf, "topup_id": topup_id, "amount_usd": "5"},
        )
        assert answer.status == 403
        assert "CSRF token is missing or wrong" in await answer.text()
    assert await served.balance(tenant_id) == 1_000_000


async def test_forged_or_missing_cookie_shows_sign_in(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    await sign_in(page, served)
    cookies = await page.context.cookies()
    (session,) = [c for c in cookies if c["name"] == "dpp_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["expires"] > 0
    version, expires, nonce, mac = session["value"].split(".")
    forged = {**session, "value": f"{version}.{int(expires) + 86_400}.{nonce}.{mac}"}
    await page.context.clear_cookies()
    await page.context.add_cookies([forged])  # type: ignore[list-item]
    await page.goto(f"{served.url}/console/tenants")
    assert page.url.endswith("/console/sign-in")
    assert await page.locator("#token").is_visible()
    await page.context.clear_cookies()
    await page.goto(f"{served.url}/console/runs")
    assert page.url.endswith("/console/sign-in")
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    assert "not this deployment's admin token" in await page.locator(".error").inner_text()


async def test_sign_out_ends_the_session(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    served = console_replica
    await sign_in(page, served)
    await page.click("text=Sign out")
    await page.wait_for_url(f"{served.url}/console/sign-in")
    await page.goto(f"{served.url}/console")
    assert page.url.endswith("/console/sign-in")
