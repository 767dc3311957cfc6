"""Fixtures of the playground tests: a real headless browser (Debian's chromium driven by Playwright).

Browser tests skip with the reason when chromium is missing, except when
IMAGINE_REQUIRE_BROWSER=1 (CI installs chromium and sets it): then that is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.playground.harness import CHROMIUM, CHROMIUM_ARGS


def browser_unavailable_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    return None


@pytest.fixture
async def browser():
    reason = browser_unavailable_reason()
    if reason is not None:
        if os.environ.get("IMAGINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"IMAGINE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(30_000)
    yield page
    await context.close()
