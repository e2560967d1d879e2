"""Browser clients: preflight, a streamed answer readable from fetch, and no CORS for strangers."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry
from .decision_log_support import settled_records

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


async def test_disallowed_origin_gets_no_cors_headers(browser_gateway: RunningGateway, fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.options(browser_gateway.base + "/chat/completions",
                                   headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
                                   ) as resp:
            assert resp.status == 403
            assert not any(h.startswith("Access-Control-") for h in resp.headers)
        # A page may still send a simple POST (text/plain needs no preflight); on a gateway without
        # keys the browser is the only guard, so the request is refused, never served and billed.
        async with session.post(browser_gateway.base + "/chat/completions", data=orjson.dumps(BODY),
                                headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "cors_origin_not_allowed"
            assert "Access-Control-Allow-Origin" not in resp.headers
    assert fleet.sim.requests_for("fast-n4-gap20") == []


async def test_a_rebinding_domain_cannot_reach_a_gateway_without_keys(browser_gateway: RunningGateway,
                                                                      fleet: Fleet) -> None:
    """evil.example resolving to 127.0.0.1 makes its page same-origin with the gateway for the
    browser: the Host header is the tell."""
    async with aiohttp.ClientSession() as session:
        for path, method in (("/chat/completions", "POST"), ("/models", "GET")):
            async with session.request(method, browser_gateway.base + path, json=BODY,
                                       headers={"Host": "evil.example:8080"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["code"] == "host_not_allowed"
        for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "app.localhost"):
            async with session.get(browser_gateway.base + "/models", headers={"Host": host}) as resp:
                assert resp.status == 200, host
    assert fleet.sim.requests_for("fast-n4-gap20") == []


async def test_each_refused_browser_request_leaves_its_record_in_its_apis_shape(
        make_gateway: MakeGateway, fleet: Fleet, tmp_path: Path) -> None:
    """The guard's 403 is a refusal like a 401: one decision record, the API's own error shape."""
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway({"fast": model_entry("fast-n2")},
                            {"chains": {"main": ["fast"]}, "default": "main", "server": {"decision_log": str(log)}})
    cross_site = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    rebinding = {"Host": "evil.example:8080"}
    messages = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    cases = [("/chat/completions", BODY, cross_site, "chat", "cors_origin_not_allowed"),
             ("/messages", messages, rebinding, "messages", "host_not_allowed"),
             ("/messages/count_tokens", messages, cross_site, "messages.count_tokens", "cors_origin_not_allowed"),
             ("/responses", {"model": "fast", "input": "hi"}, rebinding, "responses", "host_not_allowed")]
    seen = {}
    async with aiohttp.ClientSession() as session:
        for path, body, headers, api, code in cases:
            async with session.post(gw.base + path, data=orjson.dumps(body), headers=headers) as resp:
                assert resp.status == 403, path
                answer = await resp.json()
                if api.startswith("messages"):
                    assert answer["type"] == "error" and answer["error"]["type"] == "permission_error", answer
                else:
                    assert answer["error"]["code"] == code, answer
                seen[resp.headers["X-Request-Id"]] = api
    records = await settled_records(gw.gateway, log, len(cases))
    assert {r["request_id"]: r["api"] for r in records} == seen
    assert {(r["status"], r["outcome"]) for r in records} == {(403, "forbidden")}
    assert fleet.sim.requests_for("fast-n2") == []


async def test_with_keys_the_key_is_the_guard(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_TEST_KEY", "gw-cors-test-key-1")
    routes = {"chains": {"main": ["fast"]}, "default": "main", "server": {"cors_origins": [APP]},
              "keys": [{"name": "app", "key_env": "CORS_TEST_KEY", "tier": "standard"}]}
    gw = await make_gateway({"fast": model_entry("fast-n2")}, routes)
    async with aiohttp.ClientSession() as session, session.post(
            gw.base + "/chat/completions", json=BODY,
            headers={"Origin": "https://evil.example", "Host": "gateway.internal",
                     "Authorization": "Bearer gw-cors-test-key-1"}) as resp:
        assert resp.status == 200           # a server-side caller with the key: no browser matter
        assert "Access-Control-Allow-Origin" not in resp.headers
        await resp.read()


async def test_no_origins_configured_means_no_cors(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n2")})
    async with aiohttp.ClientSession() as session, session.options(
            gw.base + "/chat/completions", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
