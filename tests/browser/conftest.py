"""A real browser (Debian's chromium, driven by Playwright) against a real `dpp serve`.

Reusable by any page test: ``chromium_path`` finds the system browser (never
one Playwright downloads), ``browser_page`` opens a fresh context and page in
it, ``console_replica`` runs a replica with an admin token on this test's own
database, Redis prefix and bucket. Without chromium or the ``playwright``
package the tests skip with the reason; under ``CI=true`` they fail instead.
Screenshots go to ``tests/artifacts/`` (git-ignored): ``screenshot(page, name)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.replica import Replica, ready_replica
from tests.services import TestServices, store_env

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
ADMIN_TOKEN = "console-admin-token-0123456789abcdef"


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run under CI=true: {reason}")
    pytest.skip(f"browser tests need chromium and playwright: {reason}")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The system chromium (``DPP_CHROMIUM`` overrides where to find it)."""
    path = os.environ.get("DPP_CHROMIUM") or shutil.which("chromium")
    if path is None or not os.access(path, os.X_OK):
        _skip_or_fail(f"no chromium at {path or 'PATH'} (apt-get install chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _skip_or_fail("the playwright package is not installed (pip install -e '.[dev]')")
    assert path is not None
    return path


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path,
            headless=True,
            # containers: no setuid sandbox, small /dev/shm
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def browser_page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh context (no cookies) and one page in it, 1280 px wide; every
    ``console.error`` and uncaught page error fails the test at teardown (but
    for chromium's note of a 4xx page's status, which the tests assert), as
    does any answer of 500 or more but 503."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" and not _status_note(message.text)
            else None
        ),
    )
    page.on(
        "response",
        lambda response: (
            problems.append(f"{response.status} from {response.url}")
            if response.status >= 500 and response.status != 503
            else None
        ),
    )
    try:
        yield page
    finally:
        await context.close()
    assert not problems, problems


def _status_note(text: str) -> bool:
    """Chromium's console line for a page answered 4xx (a 404 page, a 403)."""
    prefix = "Failed to load resource: the server responded with a status of 4"
    return text.startswith(prefix)


async def screenshot(page: Page, name: str) -> Path:
    """Keep what the page looks like (the last run's, under tests/artifacts/)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


@dataclass
class ConsoleReplica:
    replica: Replica
    admin: httpx.AsyncClient  # the admin API, to arrange state and to compare numbers
    token: str

    @property
    def url(self) -> str:
        return self.replica.url

    async def tenant(self, name: str, credit_usd_micros: int = 0) -> str:
        created = await self.admin.post("/admin/tenants", json={"name": name})
        assert created.status_code == 201, created.text
        tenant_id = str(created.json()["id"])
        if credit_usd_micros:
            credited = await self.admin.post(
                f"/admin/tenants/{tenant_id}/credits",
                json={"amount_usd_micros": credit_usd_micros},
                headers={"Idempotency-Key": f"seed-{tenant_id}"},
            )
            assert credited.status_code == 201, credited.text
        return tenant_id

    async def api_key(self, tenant_id: str, **body: Any) -> str:
        issued = await self.admin.post(f"/admin/tenants/{tenant_id}/api-keys", json=body)
        assert issued.status_code == 201, issued.text
        return str(issued.json()["api_key"])

    async def balance(self, tenant_id: str) -> int:
        budget = await self.admin.get(f"/admin/tenants/{tenant_id}/budget")
        assert budget.status_code == 200, budget.text
        return int(budget.json()["postgres"]["balance_usd_micros"])


@pytest.fixture
def console_env() -> dict[str, str]:
    """Extra settings of the replica (a test overrides this fixture to change them)."""
    return {}


@pytest.fixture
async def console_replica(
    services: TestServices,
    database_url: str,
    redis_prefix: str,
    tmp_path: Path,
    console_env: dict[str, str],
) -> AsyncIterator[ConsoleReplica]:
    env = {
        **os.environ,
        **store_env(services, database_url, redis_prefix),
        "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
        "LOG_LEVEL": "INFO",
        **console_env,
    }
    log_path = tmp_path / "replica.log"
    async with ready_replica(env, log_path, ADMIN_TOKEN) as (replica, admin):
        yield ConsoleReplica(replica, admin, ADMIN_TOKEN)
    # the admin token never reaches a log line, whatever the test did
    assert ADMIN_TOKEN not in log_path.read_text(errors="replace")
