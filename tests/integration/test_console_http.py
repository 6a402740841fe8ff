"""The console's gate over HTTP, in process: sign-in, cookies, CSRF, the rate limit.

What a browser cannot show cheaply: the cookie's attributes, the CSP header,
the sign-in limit holding across two replicas (it lives in Redis), the token
in no log line, 404 without an admin token, and a 503 page while Postgres is
down. The pages themselves are tested in chromium (tests/browser).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

from dpp.app import Runtime, open_runtime
from dpp.config import Settings
from dpp.http.console.pages import AUDIT_ITEMS_PER_PAGE, SIGN_IN_ATTEMPTS
from dpp.http.console.render import usd
from dpp.http.console.session import SESSION_COOKIE, SESSION_TTL_S
from dpp.money import ledger
from dpp.runs.failures import RunFailure
from tests.integration.conftest import ADMIN_TOKEN, BASE_URL, CapturedLogs
from tests.moneykit import create_plan, create_tenant, draft
from tests.tcp_proxy import TcpProxy, proxy_to

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, html
    return found.group(1)


async def sign_in_form(client: httpx.AsyncClient) -> str:
    form = await client.get("/console/sign-in")
    assert form.status_code == 200
    return csrf_of(form.text)


async def sign_in(client: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    csrf = await sign_in_form(client)
    return await client.post("/console/sign-in", data={"csrf": csrf, "token": token})


async def test_sign_in_sets_a_strict_session_cookie(
    http: httpx.AsyncClient, captured_logs: CapturedLogs
) -> None:
    assert (await http.get("/console")).headers["location"] == "/console/sign-in"
    signed = await sign_in(http)
    assert signed.status_code == 303 and signed.headers["location"] == "/console"
    cookie = next(
        value
        for name, value in signed.headers.multi_items()
        if name == "set-cookie" and value.startswith(f"{SESSION_COOKIE}=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower() and f"max-age={SESSION_TTL_S}" in cookie.lower()
    assert "path=/console" in cookie.lower()
    assert "secure" not in attributes  # plain http here; see the https test
    overview = await http.get("/console")
    assert overview.status_code == 200 and "Supervision tree" in overview.text
    csp = overview.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "'unsafe" not in csp
    assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
    assert overview.headers["cache-control"] == "no-store"
    assert "<script" not in overview.text
    assert ADMIN_TOKEN not in overview.text
    await sign_in(http, "wrong-token")
    assert ADMIN_TOKEN not in captured_logs.text() and "wrong-token" not in captured_logs.text()
    assert "console sign-in" in captured_logs.text()


async def test_over_https_the_cookie_is_secure(runtime: Runtime) -> None:
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://console.test") as client:
        signed = await sign_in(client)
    assert signed.status_code == 303
    cookie = signed.headers.get_list("set-cookie")
    session = next(value for value in cookie if value.startswith(f"{SESSION_COOKIE}="))
    assert "secure" in session.lower()


async def test_a_post_without_the_session_csrf_token_is_403(
    http: httpx.AsyncClient, admin_headers: dict[str, str], runtime: Runtime
) -> None:
    tenant = await http.post("/admin/tenants", json={"name": "csrf"}, headers=admin_headers)
    tenant_id = tenant.json()["id"]
    await sign_in(http)
    page = await http.get(f"/console/tenants/{tenant_id}")
    topup_id = re.search(r'name="topup_id" value="([^"]+)"', page.text)
    assert topup_id is not None
    url = f"/console/tenants/{tenant_id}/credits"
    body = {"topup_id": topup_id.group(1), "amount_usd": "5"}
    for csrf in (None, "", "forged", csrf_of(page.text) + "x"):
        sent = body if csrf is None else {**body, "csrf": csrf}
        refused = await http.post(url, data=sent)
        assert refused.status_code == 403, refused.text
        assert "text/html" in refused.headers["content-type"]
    # the sign-in form's own token is not this session's
    transport = httpx.ASGITransport(app=runtime.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as stranger:
        other = await sign_in_form(stranger)
    assert (await http.post(url, data={**body, "csrf": other})).status_code == 403
    for path in ("/console/reconcile", "/console/sign-out"):
        assert (await http.post(path, data={"csrf": "forged"})).status_code == 403
    budget = await http.get(f"/admin/tenants/{tenant_id}/budget", headers=admin_headers)
    assert budget.json()["postgres"]["balance_usd_micros"] == 0
    accepted = await http.post(url, data={**body, "csrf": csrf_of(page.text)})
    assert accepted.status_code == 303
    budget = await http.get(f"/admin/tenants/{tenant_id}/budget", headers=admin_headers)
    assert budget.json()["postgres"]["balance_usd_micros"] == 5_000_000


async def test_the_sign_in_form_needs_its_csrf_token(http: httpx.AsyncClient) -> None:
    await sign_in_form(http)
    refused = await http.post("/console/sign-in", data={"csrf": "x", "token": ADMIN_TOKEN})
    assert refused.status_code == 403
    assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")


async def test_the_sign_in_limit_holds_across_replicas(
    runtime: Runtime, settings: Settings, settings_env: dict[str, str]
) -> None:
    async with open_runtime(settings, environment=settings_env, dispatch=False) as second:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)
            for app in (runtime.app, second.app)
        ]
        try:
            for attempt in range(SIGN_IN_ATTEMPTS):
                wrong = await sign_in(clients[attempt % 2], "wrong")
                assert wrong.status_code == 401, wrong.text
            for client in clients:
                refused = await sign_in(client)  # even the right token, now
                assert refused.status_code == 429, refused.text
                assert 1 <= int(refused.headers["retry-after"]) <= 60
                assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")
        finally:
            for client in clients:
                await client.aclose()


@pytest.fixture
def no_admin_token_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in settings_env.items() if name != "DPP_ADMIN_TOKEN"}


async def test_without_an_admin_token_the_console_is_404(
    no_admin_token_env: dict[str, str],
) -> None:
    from dpp.config import load_settings

    settings = load_settings(no_admin_token_env)
    assert settings.admin_token is None
    async with open_runtime(settings, environment=no_admin_token_env, dispatch=False) as replica:
        transport = httpx.ASGITransport(app=replica.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            unknown = await client.get("/no-such-page")
            for method, path in (
                ("GET", "/console"),
                ("GET", "/console/sign-in"),
                ("POST", "/console/sign-in"),
                ("GET", "/console/static/console.css"),
                ("GET", "/console/tenants"),
            ):
                answer = await client.request(method, path)
                assert answer.status_code == 404, (method, path)
                assert answer.json()["type"] == unknown.json()["type"]


# --- a dependency down: a 503 page, not a 500 ------------------------------------------


@pytest.fixture
async def postgres_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    async with proxy_to(database_url) as proxy:
        yield proxy


@pytest.fixture
def settings_env(settings_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    if "postgres_proxy" not in request.fixturenames:
        return settings_env
    proxy: TcpProxy = request.getfixturevalue("postgres_proxy")
    parts = urlsplit(settings_env["DATABASE_URL"])
    user = parts.netloc.rsplit("@", 1)
    netloc = proxy.address if len(user) == 1 else f"{user[0]}@{proxy.address}"
    return {**settings_env, "DATABASE_URL": parts._replace(netloc=netloc).geturl()}


async def test_postgres_down_is_a_503_page(
    http: httpx.AsyncClient, postgres_proxy: TcpProxy
) -> None:
    await sign_in(http)
    assert (await http.get("/console/tenants")).status_code == 200
    async with postgres_proxy.outage():
        for path in ("/console/tenants", "/console", "/console/runs", "/console/usage"):
            down = await http.get(path)
            assert down.status_code == 503, (path, down.text)
            assert int(down.headers["retry-after"]) >= 1
            assert "postgres" in down.text and "text/html" in down.headers["content-type"]
    with anyio.fail_after(15):
        while True:
            if (await http.get("/console/tenants")).status_code == 200:
                break
            await anyio.sleep(0.2)


# ------------------------------------------------------------------ paging


RUN_LINK = re.compile(r'href="/console/runs/(run_[A-Za-z0-9]+)"')
OLDER = re.compile(r'id="older-runs" href="([^"]+)"')
PAGES_MAX = 10  # a cursor that does not move would page forever


async def walk_pages(
    http: httpx.AsyncClient, url: str, older: re.Pattern[str]
) -> list[tuple[str, str | None]]:
    """Each page from ``url`` on, following the link ``older`` finds: its HTML and
    that link (None on the last page)."""
    pages: list[tuple[str, str | None]] = []
    next_url: str | None = url
    while next_url is not None:
        assert len(pages) < PAGES_MAX, f"still paging after {PAGES_MAX} pages: {next_url}"
        answer = await http.get(next_url.replace("&amp;", "&"))
        assert answer.status_code == 200, answer.text
        found = older.search(answer.text)
        next_url = found.group(1) if found else None
        pages.append((answer.text, next_url))
    return pages


async def test_the_runs_list_pages_through_every_run_newest_first(
    http: httpx.AsyncClient, runtime: Runtime
) -> None:
    pool, queries = runtime.adapters.pool, runtime.adapters.queries
    await create_plan(pool, "roomy", max_concurrent_runs=1_000)
    tenant_id = await create_tenant(pool, plan_id="roomy")
    other = await create_tenant(pool, plan_id="roomy")
    await ledger.credit(pool, queries, tenant_id, 10**9, "seed:a")
    await ledger.credit(pool, queries, other, 10**9, "seed:b")
    made: list[str] = []
    for _ in range(3):  # 150 runs, in batches the ledger takes
        drafts = [draft(1_000) for _ in range(50)]
        result = await ledger.reserve_batch(pool, queries, tenant_id, drafts)
        assert all(result.accepted())
        made += [d.run_id for d in drafts]
    await ledger.reserve_batch(pool, queries, other, [draft(1_000)])  # filtered out
    newest_first = [
        row["id"]
        for row in await pool.fetch(
            "SELECT id FROM runs WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC",
            tenant_id,
        )
    ]
    assert sorted(newest_first) == sorted(made)
    await sign_in(http)
    pages = await walk_pages(http, f"/console/runs?tenant={tenant_id}", OLDER)
    assert len(pages) == 2
    for _, older in pages:
        if older is not None:
            assert f"tenant={tenant_id}" in older  # the filter carries over
    for html, _ in pages[1:]:  # an older page links back to the newest, filter kept
        assert f'<a href="/console/runs?tenant={tenant_id}">Newest</a>' in html
    seen = [run_id for html, _ in pages for run_id in RUN_LINK.findall(html)]
    assert seen == newest_first  # each run once, in order, across the pages
    broken = await http.get("/console/runs?after=not-a-cursor")
    assert broken.status_code == 400


AUDIT_ITEM = re.compile(r'<h2><a href="/console/runs/(run_[A-Za-z0-9]+)">')
OLDER_AUDIT = re.compile(r'id="older-audit" href="([^"]+)"')


@pytest.mark.audit_exempt  # the runs are left AUDIT_REQUIRED on purpose
async def test_the_audit_queue_pages_through_every_run_waiting(
    http: httpx.AsyncClient, runtime: Runtime
) -> None:
    """More runs set aside than one page shows: every one is reachable, once."""
    pool, queries = runtime.adapters.pool, runtime.adapters.queries
    await create_plan(pool, "roomy", max_concurrent_runs=1_000)
    tenant_id = await create_tenant(pool, plan_id="roomy")
    await ledger.credit(pool, queries, tenant_id, 10**9, "seed:a")
    # each its own amount: an item showing another run's entries would show
    # another amount
    drafts = [draft(1_000 + index) for index in range(AUDIT_ITEMS_PER_PAGE + 10)]
    assert all((await ledger.reserve_batch(pool, queries, tenant_id, drafts)).accepted())
    reserved = {made.run_id: made.reserved_usd_micros for made in drafts}
    failure = RunFailure.audit_required("test: the receipt contradicts the ledger")
    for made in drafts:
        version = await pool.fetchval("SELECT version FROM runs WHERE id = $1", made.run_id)
        assert await ledger.mark_audit_required(
            pool, queries, made.run_id, version, failure.document()
        )
    newest_first = [
        row["id"]
        for row in await pool.fetch(
            "SELECT id FROM runs WHERE status = 'AUDIT_REQUIRED' ORDER BY created_at DESC, id DESC"
        )
    ]
    assert len(newest_first) == AUDIT_ITEMS_PER_PAGE + 10
    await sign_in(http)
    pages = await walk_pages(http, "/console/audit-required", OLDER_AUDIT)
    assert len(pages) == 2
    for html, _ in pages[1:]:
        assert '<a href="/console/audit-required">Newest</a>' in html
    seen = [run_id for html, _ in pages for run_id in AUDIT_ITEM.findall(html)]
    assert seen == newest_first  # each once, newest first, across the pages
    # each item shows its own run's ledger: its reserve entry, and that much held
    for html, _ in pages:
        for item in html.split('<h2><a href="/console/runs/')[1:]:
            amount = usd(reserved[item.split('"', 1)[0]])
            assert f"held by the ledger {amount}" in item
            assert f'<td>reserve</td><td class="num">{amount}</td>' in item
    broken = await http.get("/console/audit-required?after=not-a-cursor")
    assert broken.status_code == 400
