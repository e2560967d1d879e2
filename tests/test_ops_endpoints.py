"""The operations page's endpoints over HTTP: the admin key guards all of them (401 without a
key or with an unknown one, 403 for a key that is not an admin key), no answer ever holds a
secret, the SSE feed keeps its rate and its cap, and an open page never holds up shutdown."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from proxy import config as config_module
from proxy.ops import pages
from proxy.ops.feed import MAX_LISTENERS
from proxy.server.connections import Listener

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry, serve, write_config
from .redis_support import RedisServer

PROVIDER_KEY = "sk-sim-provider-secret-0001"        # what the fleet fixture exports for the providers
ADMIN_KEY = "gw-admin-0123456789abcdef"
APP_KEY = "gw-app-fedcba9876543210"
ENDPOINTS = ("/dashboard", "/dashboard/state", "/dashboard/events", "/dashboard/assets/dashboard.js",
             "/dashboard/requests/anything")


@pytest.fixture
async def keyed(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> RunningGateway:
    monkeypatch.setenv("OPS_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("OPS_APP_KEY", APP_KEY)
    return await make_gateway(
        {"fast": model_entry("fast-n3"), "leaky": model_entry("leaky-401")},
        {"chains": {"main": ["fast"], "leak": ["leaky", "fast"]}, "default": "main",
         "keys": [{"name": "ops", "key_env": "OPS_ADMIN_KEY", "tier": "standard", "admin": True},
                  {"name": "app", "key_env": "OPS_APP_KEY", "tier": "standard", "rpm": 50}]})


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"operator:{key}".encode()).decode()}


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as resp:
        body = await resp.content.read(64 * 1024) if "event-stream" in resp.content_type else await resp.read()
        return resp.status, dict(resp.headers), body


async def test_every_endpoint_needs_the_admin_key(keyed: RunningGateway) -> None:
    for path in ENDPOINTS:
        status, headers, body = await _get(keyed.url + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic "), path        # the browser asks for it
        assert b'"type":"authentication_error"' in body
        for wrong in (_bearer("gw-not-a-key"), _basic("gw-not-a-key"), {"Authorization": "Basic !!"}):
            assert (await _get(keyed.url + path, wrong))[0] == 401, (path, wrong)
        for not_admin in (_bearer(APP_KEY), _basic(APP_KEY)):
            status, _, body = await _get(keyed.url + path, not_admin)
            assert status == 403, path
            assert APP_KEY.encode() not in body
    for path in ("/dashboard", "/dashboard/state", "/dashboard/assets/dashboard.js"):
        assert (await _get(keyed.url + path, _bearer(ADMIN_KEY)))[0] == 200, path
        assert (await _get(keyed.url + path, _basic(ADMIN_KEY)))[0] == 200, path


async def test_no_answer_shows_a_secret(keyed: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        # The upstream answers 401 and echoes the provider key it was sent; the app key is used.
        async with session.post(keyed.base + "/chat/completions", headers=_bearer(APP_KEY),
                                json={"model": "leak", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200
            request_id = resp.headers["X-Request-Id"]
    seen = b""
    for path in ("/dashboard", "/dashboard/state", f"/dashboard/requests/{request_id}", "/dashboard/events"):
        status, _, body = await _get(keyed.url + path, _bearer(ADMIN_KEY))
        assert status == 200, path
        seen += body
    assert request_id.encode() in seen and b'"key":"app"' in seen and b'"failure":"auth"' in seen
    for secret in (PROVIDER_KEY, APP_KEY, ADMIN_KEY):
        assert secret.encode() not in seen


async def test_state_and_records(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n3")})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            request_id = resp.headers["X-Request-Id"]
        async with session.get(gw.url + "/dashboard/state") as resp:
            state = await resp.json()
        async with session.get(gw.url + f"/dashboard/requests/{request_id}") as resp:
            record = await resp.json()
        async with session.get(gw.url + "/dashboard/requests/req_unknown") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "request_not_found"
        async with session.get(gw.url + "/dashboard/assets/../../config.py") as resp:
            assert resp.status == 404
    assert state["totals"]["requests"] == 1 and state["minute"]["by_model"] == {"fast": 1}
    assert state["decisions"][0]["request_id"] == request_id
    assert state["state"]["deployments"][0]["breaker"] == "closed"
    assert record["request_id"] == request_id and record["instance"] == gw.gateway.instance
    assert record["served_model"] == "fast" and record["attempts"][0]["deployment"] == "fast/sim-openai/0"


async def _read_events(session: aiohttp.ClientSession, url: str, seconds: float) -> int:
    count = 0
    async with session.get(url + "/dashboard/events") as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                line = await asyncio.wait_for(resp.content.readline(), left)
            except TimeoutError:
                break
            count += line == b"event: state\n"
    return count


async def test_the_feed_sends_a_frame_a_second_and_caps_open_pages(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n3")})
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        counts = await asyncio.gather(*(_read_events(session, gw.url, 2.5) for _ in range(MAX_LISTENERS)),
                                      _late_refused(session, gw.url))
    for count in counts[:-1]:
        assert 2 <= count <= 4, counts              # 1 per second: the first at once, then every second


async def _late_refused(session: aiohttp.ClientSession, url: str) -> int:
    await asyncio.sleep(1.0)                         # the others are open by now
    async with session.get(url + "/dashboard/events") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "10"
        assert (await resp.json())["error"]["code"] == "too_many_pages"
    return 0


async def test_an_open_page_does_not_hold_up_shutdown(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n3")})
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/dashboard/events") as resp:
        assert resp.status == 200
        await resp.content.readline()
        started = time.monotonic()
        await gw.app.shutdown()                      # what runner.cleanup() runs before waiting for handlers
        rest = await asyncio.wait_for(resp.content.read(), 5)
        assert time.monotonic() - started < 2.0
        assert rest.count(b"event: state") <= 1      # the stream ended rather than going on


async def test_a_page_that_stops_reading_is_let_go(fleet: Fleet, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the write bound its connection is broken, not left open holding the frames
    already buffered for a reader that may never come back."""
    async def large_frame(source: object) -> bytes:     # one of these fills every buffer on the way
        return b"event: state\ndata: " + b"x" * (4 << 20) + b"\n\n"

    monkeypatch.setattr(pages, "_frame", large_frame)
    monkeypatch.setattr(pages, "WRITE_TIMEOUT_S", 0.3)
    gw, runner = await serve(config_module.load(*write_config(tmp_path, fleet, {"fast": model_entry("fast-n3")})))
    (site,) = runner.sites
    assert isinstance(site, Listener)
    connections = site.connections
    loop = asyncio.get_running_loop()
    try:
        with socket.socket() as page:
            page.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            page.setblocking(False)
            await loop.sock_connect(page, ("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
            await loop.sock_sendall(page, b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            async with asyncio.timeout(5):
                while not gw.app[pages.FEED].frames_built:
                    await asyncio.sleep(0.01)           # the page is open, its first frame on its way
            deadline = time.monotonic() + 5
            while connections.open and time.monotonic() < deadline:
                await asyncio.sleep(0.05)               # the page reads nothing all along
            assert connections.open == 0, "the gateway still holds a page that stopped reading"
            assert gw.app[pages.FEED].listeners == 0
    finally:
        await runner.cleanup()


async def test_the_page_is_never_shared_with_another_origin(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n3")},
                            {"chains": {"main": ["fast"]}, "default": "main", "server": {"cors_origins": ["*"]}})
    origin = {"Origin": "http://127.0.0.1:9"}
    _, headers, _ = await _get(gw.url + "/v1/models", origin)
    assert headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:9"      # the API is, as configured
    for path in ("/dashboard", "/dashboard/state", "/dashboard/requests/x"):
        _, headers, _ = await _get(gw.url + path, origin)
        assert "Access-Control-Allow-Origin" not in headers, path


async def test_with_shared_state_a_page_shows_what_another_instance_saw(make_gateway: MakeGateway, fleet: Fleet,
                                                                       redis_server: RedisServer) -> None:
    """A breaker opened by the failures one instance saw is open, with its probe countdown, on
    the page of another; each instance lists the requests it served, by instance id."""
    prefix = f"ops{os.urandom(6).hex()}"
    models = {"flaky": model_entry("flakyshared-n3"), "steady": model_entry("steadyshared-n3")}
    routes = {"chains": {"main": ["flaky", "steady"]}, "default": "main",
              "server": {"state": {"url": redis_server.url, "prefix": prefix, "instances": 2},
                         "breaker": {"consecutive": 2, "open_s": 30, "max_open_s": 60}}}
    one = await make_gateway(models, routes)
    two = await make_gateway(models, {**routes})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{fleet.port}/_sim/faults",
                                json={"model": "flakyshared-n3", "fault": "500"}):
            pass
        async with session.post(one.base + "/chat/completions",
                                json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200 and resp.headers["X-Route-Model"] == "steady"
            request_id = resp.headers["X-Request-Id"]
        deadline = time.monotonic() + 2
        while True:                                     # the trip is written to Redis in the background
            async with session.get(two.url + "/dashboard/state") as resp:
                state = await resp.json()
            flaky = next(d for d in state["state"]["deployments"] if d["id"] == "flaky/sim-openai/0")
            if flaky["breaker"] == "open" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        async with session.get(one.url + "/dashboard/state") as resp:
            served_here = (await resp.json())["decisions"]
    assert state["state"]["mode"] == "shared"
    assert flaky["breaker"] == "open" and 0 < flaky["probe_in_s"] <= 30
    assert state["decisions"] == []                     # instance two served nothing
    assert [(d["request_id"], d["instance"]) for d in served_here] == [(request_id, one.gateway.instance)]
