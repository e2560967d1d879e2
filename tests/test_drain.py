"""The drain in-process: readiness, and what a request still running at the deadline gets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import config as config_module
from proxy.server.app import create_app, drain, listen, make_runner
from proxy.server.edge import GATEWAY

from .conftest import Fleet, model_entry, write_config

TIMEOUTS = {"connect_s": 1, "first_token_s": 10, "idle_s": 10, "total_s": 60}


@pytest.fixture
async def served(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[web.AppRunner, str]]:
    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim")
    models = {"slowstart": model_entry("slowstart-ttft3000-n2"), "quick": model_entry("quick-n3-gap50"),
              "slowcount": model_entry("slowcount-ttft3000", "sim-anthropic")}
    p, r = write_config(tmp_path, fleet, models, {"chains": {"main": ["quick"]}, "default": "main"},
                        timeouts=TIMEOUTS)
    app = create_app(config_module.load(p, r))
    runner = make_runner(app)
    await runner.setup()
    port = (await listen(runner, app[GATEWAY], "127.0.0.1", 0)).port
    try:
        yield runner, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_readyz_turns_503_when_draining(served: tuple[web.AppRunner, str]) -> None:
    runner, url = served
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/readyz") as resp:
            assert resp.status == 200
        runner.app[GATEWAY].draining = True
        async with session.get(url + "/readyz") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "draining"


async def test_a_request_not_yet_answering_at_the_deadline_gets_503(served: tuple[web.AppRunner, str]) -> None:
    runner, url = served
    gateway = runner.app[GATEWAY]
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(
            url + "/v1/chat/completions", json={"model": "slowstart", "messages": [{"role": "user", "content": "x"}]}))
        async with asyncio.timeout(5):
            while not gateway.in_flight:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await drain(gateway, runner, 0.3)
        assert time.monotonic() - started < 3
        async with asyncio.timeout(5):
            resp = await request
        body = orjson.loads(await resp.read())
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "shutting_down"
    assert not gateway.in_flight


async def test_a_token_count_still_waiting_at_the_deadline_gets_503_in_anthropics_shape(
        served: tuple[web.AppRunner, str]) -> None:
    """count_tokens waits on the provider's count like any model request: the drain waits for
    it too, and answers it at the deadline rather than closing its connection."""
    runner, url = served
    gateway = runner.app[GATEWAY]
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(url + "/v1/messages/count_tokens", json={
            "model": "slowcount", "messages": [{"role": "user", "content": "x"}]}))
        async with asyncio.timeout(5):
            while not gateway.in_flight:
                await asyncio.sleep(0.01)
        await drain(gateway, runner, 0.3)
        async with asyncio.timeout(5):
            resp = await request
        body = orjson.loads(await resp.read())
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    assert not gateway.in_flight


async def test_requests_finishing_within_the_deadline_are_untouched(served: tuple[web.AppRunner, str]) -> None:
    runner, url = served
    gateway = runner.app[GATEWAY]
    async with aiohttp.ClientSession() as session:
        body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        resp = await session.post(url + "/v1/chat/completions", json=body)
        first = await resp.content.readany()
        await drain(gateway, runner, 5)
        text = (first + await resp.content.read()).decode()
    assert text.rstrip().endswith("data: [DONE]") and not gateway.cut_off
