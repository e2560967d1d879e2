"""/v1/route and `llm-proxy explain` give exactly the decision the real request then takes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import config as config_module
from proxy.commands.demo import simulated

from .conftest import ROOT, Fleet, serve

REQUESTS: list[tuple[dict[str, str], dict[str, Any]]] = [
    ({}, {"messages": [{"role": "user", "content": "hi there"}]}),
    ({}, {"messages": [{"role": "user", "content": "word " * 4000}]}),
    ({"X-Task-Type": "code"}, {"messages": [{"role": "user", "content": "fix " * 2000}]}),
    ({}, {"messages": [{"role": "user", "content": "long " * 50_000}]}),
    ({"X-User-Tier": "premium"}, {"messages": [{"role": "user", "content": "plan " * 1000}], "stream": True}),
    ({"X-User-Tier": "free"}, {"messages": [{"role": "user", "content": "summarise " * 500}],
                               "response_format": {"type": "json_object"}}),
    ({"X-Max-Cost-USD": "0.05"}, {"messages": [{"role": "user", "content": "cheap " * 1500}], "max_tokens": 200}),
]


@pytest.fixture
async def shipped_gateway(fleet: Fleet):
    config = simulated(config_module.load(ROOT / "providers.yaml", ROOT / "routes.yaml", env={}), fleet.port)
    running, runner = await serve(config)
    yield running
    await runner.cleanup()


@pytest.mark.parametrize("headers,body", REQUESTS, ids=[str(i) for i in range(len(REQUESTS))])
async def test_route_then_real_call_agree(shipped_gateway, headers: dict[str, str], body: dict[str, Any],
                                          tmp_path: Path) -> None:
    body = {"model": "auto", **body}
    async with aiohttp.ClientSession() as session:
        async with session.post(shipped_gateway.base + "/route", json=body, headers=headers) as r:
            assert r.status == 200
            decision = await r.json()
        async with session.post(shipped_gateway.base + "/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
            real = r.headers
    assert real["X-Route-Rule"] == decision["rule"]
    assert real["X-Route-Model"] == decision["candidates"][0]["model"]
    assert real["X-Route-Attempts"] == "1"
    served = decision["candidates"][0]["deployments"][0]
    assert real["X-Route-Provider"] == served.split("/")[1]

    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps(body))
    args = [sys.executable, "-m", "proxy", "explain", str(body_file)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == decision


@pytest.mark.parametrize("headers,body", [
    ({}, {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
    ({"X-Max-Cost-USD": "0"}, {"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100}),
    ({}, {"model": "auto", "messages": "not a list"}),
], ids=["unknown-model", "no-candidate", "bad-body"])
async def test_route_refuses_as_the_real_call_does(shipped_gateway, headers: dict[str, str], body: dict[str, Any]
                                                   ) -> None:
    """A refusal too: the same status, error and X-Route-* headers as the chat answer."""
    seen = []
    async with aiohttp.ClientSession() as session:
        for path in ("/route", "/chat/completions"):
            async with session.post(shipped_gateway.base + path, json=body, headers=headers) as r:
                routed = {name: value for name, value in r.headers.items() if name.startswith("X-Route-")}
                seen.append((r.status, (await r.json())["error"]["code"], routed))
    assert seen[0] == seen[1]
    assert seen[0][0] >= 400 and len(seen[0][2]) == 4


async def test_explain_reports_no_candidate(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 100}))
    result = subprocess.run([sys.executable, "-m", "proxy", "explain", "-H", "X-Max-Cost-USD: 0", str(body)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "no_candidate" and "cost ceiling" in error["message"]
