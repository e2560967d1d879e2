"""A real headless browser for the page tests: Debian's chromium driven by Playwright.

Playwright never downloads a browser here: it launches the system's /usr/bin/chromium with
a fresh profile and the flags that keep it from calling home (the machine has no network
but loopback). Every request the page makes is recorded, and any request to a host other
than loopback is aborted before it leaves, so a broken page cannot send traffic out; the
test then fails on the record. Console errors and uncaught exceptions are recorded too.

Screenshots go to `artifacts_dir()` (LLM_PROXY_ARTIFACTS, else a folder in the temp dir),
kept after the run for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def expect(locator: Any) -> Any:
    """Playwright's `expect` (its checks run outside the page, so the page's CSP holds)."""
    from playwright.async_api import expect as playwright_expect

    return playwright_expect(locator)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("LLM_PROXY_ARTIFACTS") or Path(tempfile.gettempdir()) / "llm-proxy-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_browser() -> None:
    """Skip where there is no browser, except in CI (.ci/run installs both and sets the flag)."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append("chromium (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        if os.environ.get("LLM_PROXY_REQUIRE_BROWSER"):
            pytest.fail(f"missing although .ci/run installs them: {', '.join(missing)}")
        pytest.skip(f"no browser here: {', '.join(missing)}")


@dataclass
class Browser:
    context: Any                    # playwright BrowserContext
    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)     # requests aborted for leaving loopback
    errors: list[str] = field(default_factory=list)       # console errors and uncaught exceptions

    async def page(self) -> Any:
        page = await self.context.new_page()
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        return page

    def left_loopback(self) -> list[str]:
        return self.refused + [u for u in self.requests if not _local(u)]


def _local(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("file", "data", "about", "blob"):
        return True
    return parts.hostname in LOOPBACK_HOSTS or (parts.hostname or "").startswith("127.")


@asynccontextmanager
async def chromium(http_credentials: dict[str, str] | None = None) -> AsyncIterator[Browser]:
    require_browser()
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="llm-proxy-chromium-")
    try:
        async with async_playwright() as p:
            context = await p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1400, "height": 1000}, http_credentials=http_credentials)
            browser = Browser(context)

            async def guard(route: Any) -> None:
                url = route.request.url
                browser.requests.append(url)
                if _local(url):
                    await route.continue_()
                else:
                    browser.refused.append(url)
                    await route.abort()

            await context.route("**/*", guard)
            try:
                yield browser
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
