"""Browser clients: preflight, a streamed answer readable from fetch, and no CORS for strangers."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import MakeGateway, RunningGateway, model_entry

APP = "https://chat.example.com"
BODY = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def browser_gateway(make_gateway: MakeGateway) -> RunningGateway:
    routes = {"chains": {"main": ["fast"]}, "default": "main",
              "server": {"cors_origins": [APP, "http://localhost:5173"]}}
    return await make_gateway({"fast": model_entry("fast-n4-gap20")}, routes)


async def test_preflight_from_an_allowed_origin(browser_gateway: RunningGateway) -> None:
    asked = "authorization, content-type, x-task-type, x-stainless-os"
    async with aiohttp.ClientSession() as session, session.options(
            browser_gateway.base + "/chat/completions",
            headers={"Origin": APP, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": asked}) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-task-type", "x-user-tier", "x-request-id",
                "x-stainless-os"} <= allowed
        assert "Origin" in resp.headers.getall("Vary")


async def test_streamed_answer_carries_cors_headers(browser_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            browser_gateway.base + "/chat/completions", json=BODY, headers={"Origin": APP}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"X-Request-Id", "X-Route-Model", "X-Route-Rule", "X-Route-Provider", "X-Route-Attempts"} <= exposed
        assert resp.headers["X-Route-Model"] == "fast"
        text = (await resp.read()).decode()
    assert text.rstrip().endswith("data: [DONE]")


async def test_errors_are_readable_by_the_browser_too(browser_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.post(
            browser_gateway.base + "/chat/completions", json={**BODY, "model": "nope"},
            headers={"Origin": APP}) as resp:
        assert resp.status == 404
        assert resp.headers["Access-Control-Allow-Origin"] == APP


async def test_disallowed_origin_gets_no_cors_headers(browser_gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.options(browser_gateway.base + "/chat/completions",
                                   headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
                                   ) as resp:
            assert resp.status == 403
            assert not any(h.startswith("Access-Control-") for h in resp.headers)
        async with session.post(browser_gateway.base + "/chat/completions", json=BODY,
                                headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 200           # not a browser matter: curl works, the browser refuses
            assert "Access-Control-Allow-Origin" not in resp.headers
            await resp.read()


async def test_no_origins_configured_means_no_cors(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n2")})
    async with aiohttp.ClientSession() as session, session.options(
            gw.base + "/chat/completions", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
