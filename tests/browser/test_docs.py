"""`/docs` in a real browser: the API reference renders from `/openapi.json`,
offline (every request same-origin) and under its strict CSP (a violation is a
console error, which ``browser_page`` turns into a failure), and "Try it out"
calls the API from the page."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.browser.conftest import ConsoleReplica, screenshot

if TYPE_CHECKING:
    from playwright.async_api import Page

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def test_docs_renders_every_operation_from_same_origin_assets(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    origin = urlsplit(console_replica.url).netloc
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    document = (await console_replica.admin.get("/openapi.json")).json()
    operations = sum(
        1 for item in document["paths"].values() for method in item if method in HTTP_METHODS
    )

    await page.goto(f"{console_replica.url}/docs")
    title = page.locator("h1.title")
    await title.wait_for()
    assert await page.title() == "DPP API reference"
    assert document["info"]["title"] in await title.inner_text()
    assert await page.locator(".opblock").count() == operations
    assert await page.locator('.opblock-summary-path[data-path="/v1/runs"]').count() == 2
    await screenshot(page, "docs")

    # offline by construction: nothing but this server was asked for anything
    foreign = [url for url in requested if urlsplit(url).netloc != origin]
    assert not foreign, foreign
    assert f"{console_replica.url}/openapi.json" in requested


async def test_try_it_out_calls_the_api_from_the_page(
    browser_page: Page, console_replica: ConsoleReplica
) -> None:
    page = browser_page
    await page.goto(f"{console_replica.url}/docs")
    readiness = page.locator('.opblock-summary-path[data-path="/readyz"]')
    await readiness.click()
    block = page.locator(".opblock.is-open")
    await block.locator("button.try-out__btn").click()
    await block.locator("button.execute").click()
    status = block.locator(".live-responses-table tbody .response-col_status").first
    await status.wait_for()
    assert (await status.inner_text()).strip() == "200"
    assert '"ready"' in await block.locator(".live-responses-table .microlight").first.inner_text()
    await screenshot(page, "docs-try-it-out")
