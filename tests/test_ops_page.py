"""The operations page in a real browser (Debian's chromium via Playwright), on a real gateway
in front of the simulated fleet: it loads clean and stays on loopback, its counters follow
the traffic, a failing deployment shows an open breaker with a probe countdown, and a
request id from a response header opens that request's record.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from .browser import artifacts_dir, chromium, expect
from .conftest import Fleet, MakeGateway, model_entry

FLAKY = "flaky-n4"                  # the simulator's model name; a fault is set on it at run time
WITHIN_MS = 2000                    # the bound for the page to show a change


async def _chat(session: aiohttp.ClientSession, url: str, model: str = "auto", **headers: str
                ) -> aiohttp.ClientResponse:
    async with session.post(url + "/v1/chat/completions", headers=headers,
                            json={"model": model, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        await resp.read()
        return resp


async def _text(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text())


async def test_the_page_follows_traffic_breakers_and_finds_a_request(make_gateway: MakeGateway, fleet: Fleet) -> None:
    gw = await make_gateway(
        {"flaky": model_entry(FLAKY), "steady": model_entry("steady-n4")},
        {"chains": {"main": ["flaky", "steady"]}, "default": "main",
         "server": {"breaker": {"consecutive": 2, "open_s": 30, "max_open_s": 60}}})
    shots = artifacts_dir()
    async with chromium() as browser, aiohttp.ClientSession() as session:
        page = await browser.page()
        await page.goto(gw.url + "/dashboard")
        await expect(page.locator("#link")).to_have_text("live", timeout=5000)
        assert await _text(page, "#total-requests") == "0"

        # Traffic moves the counters within 2 s.
        for _ in range(3):
            assert (await _chat(session, gw.url)).status == 200
        await expect(page.locator("#total-requests")).to_have_text("3", timeout=WITHIN_MS)
        assert await _text(page, "#by-model tbody") == "flaky\t3\t0.05"

        # A deployment that fails opens its breaker on the page, with the time to its next probe.
        async with session.post(f"http://127.0.0.1:{fleet.port}/_sim/faults", json={"model": FLAKY, "fault": "500"}):
            pass
        for _ in range(2):
            assert (await _chat(session, gw.url)).status == 200       # steady serves after flaky fails
        assert (await gw.gateway.state_view()).breakers["flaky/sim-openai/0"].state == "open"
        row = 'tr[data-deployment="flaky/sim-openai/0"]'
        await page.wait_for_selector(row + '[data-breaker="open"]', timeout=WITHIN_MS)
        first = await _text(page, row + " .probe")
        assert re.fullmatch(r"\d+\.\d s", first), first
        await page.wait_for_timeout(600)
        later = await _text(page, row + " .probe")
        assert 0 < float(later.split()[0]) < float(first.split()[0]) <= 30      # it counts down
        assert await _text(page, 'tr[data-deployment="steady/sim-openai/0"] .breaker') == "closed"
        await page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

        # A request id from a response header finds the request and opens its full record.
        wanted = await _chat(session, gw.url, **{"X-Task-Type": "chat"})
        request_id = wanted.headers["X-Request-Id"]
        await page.fill("#find-id", request_id)
        await page.press("#find-id", "Enter")
        await page.wait_for_selector("#record:not([hidden])", timeout=WITHIN_MS)
        record = await _text(page, "#record-body")
        assert f'"request_id": "{request_id}"' in record
        assert '"served_model": "steady"' in record and '"failure": "server_error"' not in record
        await page.screenshot(path=str(shots / "dashboard-record.png"), full_page=True)

        # What callers send is shown as text, never run as HTML: this model name would make a
        # request to another loopback host if it were.
        bait = '<img src="http://127.0.0.2:9/bait.png">'
        assert (await _chat(session, gw.url, model=bait)).status == 404
        await expect(page.locator("#total-requests")).to_have_text("7", timeout=WITHIN_MS)
        assert await page.locator("img").count() == 0
        await page.wait_for_timeout(300)

        assert browser.errors == []
        assert browser.left_loopback() == []
        page_origin = gw.url + "/dashboard"
        assert all(u.startswith(page_origin) for u in browser.requests), browser.requests


async def test_a_browser_signs_in_with_the_admin_key(make_gateway: MakeGateway, monkeypatch: Any) -> None:
    monkeypatch.setenv("OPS_ADMIN_KEY", "gw-admin-page-0123456789")
    monkeypatch.setenv("OPS_APP_KEY", "gw-app-page-9876543210")
    gw = await make_gateway({"steady": model_entry("steady-n4")}, {
        "chains": {"main": ["steady"]}, "default": "main",
        "keys": [{"name": "ops", "key_env": "OPS_ADMIN_KEY", "tier": "standard", "admin": True},
                 {"name": "app", "key_env": "OPS_APP_KEY", "tier": "standard"}]})
    async with chromium() as browser:           # the gateway asks for credentials, and this browser has none
        page = await browser.page()
        with pytest.raises(Exception, match="ERR_INVALID_AUTH_CREDENTIALS"):
            await page.goto(gw.url + "/dashboard")
    async with chromium({"username": "ops", "password": "gw-app-page-9876543210"}) as browser:
        page = await browser.page()
        assert (await page.goto(gw.url + "/dashboard")).status == 403      # a key, but not an admin key
    async with chromium({"username": "ops", "password": "gw-admin-page-0123456789"}) as browser:
        page = await browser.page()
        assert (await page.goto(gw.url + "/dashboard")).status == 200
        await expect(page.locator("#link")).to_have_text("live", timeout=5000)     # the stream signed in too
        async with aiohttp.ClientSession() as session:
            assert (await _chat(session, gw.url, Authorization="Bearer gw-app-page-9876543210")).status == 200
        await expect(page.locator("#total-requests")).to_have_text("1", timeout=WITHIN_MS)
        assert await _text(page, "#by-key tbody") == "app\t1\t$0.000009\t$0.000009"
        assert browser.errors == [] and browser.left_loopback() == []
