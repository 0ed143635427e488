"""Headless Chromium for the tests that look at a page as a person would (the search page,
DVC's plots): found on PATH, skipped when missing unless REQUIRE_BROWSER_TEST=1 (CI)."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRE_BROWSER = "REQUIRE_BROWSER_TEST"  # "1": a missing browser fails the test (CI)


def browser_or_skip(chromium: str | None, driver: str | None, required: bool) -> None:
    """Skip, saying what is missing; fail instead where the browser test is required."""
    needed = (("chromium", chromium), ("chromedriver", driver))
    missing = [name for name, path in needed if not path]
    if not missing:
        return
    why = (
        f"the browser test needs {' and '.join(missing)} (Debian: apt-get install chromium "
        "chromium-driver; make test installs them when run as root)"
    )
    if required:
        pytest.fail(f"{REQUIRE_BROWSER}=1 and {why}", pytrace=False)
    pytest.skip(why)


def require_browser() -> None:
    browser_or_skip(CHROMIUM, CHROMEDRIVER, os.environ.get(REQUIRE_BROWSER) == "1")


def chrome(*flags: str):
    """A headless Chromium driven by selenium (the caller quits it)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", *flags):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
