"""The operator console in a real browser: what a person sees, and money moving once.

Each test starts a real ``dpp serve`` (``console_replica``), signs in through
the sign-in page with the admin token, and compares what the page shows with
what the admin API answers. Screenshots of every page: tests/artifacts/.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

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
