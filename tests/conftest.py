"""Fixtures: a simulator and gateways on real sockets on 127.0.0.1, in the test's event loop.

`fleet` starts the simulated provider fleet; `make_gateway(models=..., routes=...)` writes a
providers.yaml and routes.yaml pointing at it, loads them through the real loader and
serves them with the production app settings (handler cancellation on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy import config as config_module
from proxy.app import create_app
from proxy.gateway import Gateway
from proxy.handlers import GATEWAY
from proxy.simulator import Simulator
from proxy.simulator import start as start_simulator

ROOT = Path(__file__).resolve().parent.parent
PREFIX = {"openai": "/openai/v1", "anthropic": "/anthropic/v1", "gemini": "/gemini/v1beta"}
FAST_TIMEOUTS = {"connect_s": 1, "first_token_s": 1.5, "idle_s": 1.0, "total_s": 30}


@dataclass
class Fleet:
    sim: Simulator
    port: int

    def url(self, protocol: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX[protocol]}"


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    app: web.Application

    @property
    def base(self) -> str:
        return self.url + "/v1"


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    sim, runner, port = await start_simulator()
    yield Fleet(sim, port)
    await runner.cleanup()


def model_entry(upstream: str, provider: str = "sim-openai", **extra: Any) -> dict[str, Any]:
    """A providers.yaml model served by the simulator as `upstream` (its name picks the behaviour)."""
    entry: dict[str, Any] = {
        "tier": 2, "context_window": 128000, "max_output_tokens": 4096,
        "price": {"input": 1.0, "output": 2.0, "cached_input": 0.5},
        "capabilities": ["code", "json", "tools", "vision"],
        "deployments": [{"provider": provider, "model": upstream}],
    }
    entry.update(extra)
    return entry


def write_config(tmp_path: Path, fleet: Fleet, models: dict[str, Any], routes: dict[str, Any] | None = None,
                 timeouts: dict[str, float] | None = None, providers: dict[str, Any] | None = None
                 ) -> tuple[Path, Path]:
    provs = {
        f"sim-{api}": {"api": api, "base_url": fleet.url(api), "api_key_env": "SIM_PROVIDER_KEY",
                       "timeouts": timeouts or FAST_TIMEOUTS}
        for api in ("openai", "anthropic", "gemini")
    }
    provs.update(providers or {})
    routes = routes or {"chains": {"main": list(models)}, "default": "main"}
    routes.setdefault("server", {}).setdefault("decision_log", "off")
    p, r = tmp_path / "providers.yaml", tmp_path / "routes.yaml"
    p.write_text(yaml.safe_dump({"providers": provs, "models": models}, sort_keys=False))
    r.write_text(yaml.safe_dump(routes, sort_keys=False))
    return p, r


async def serve(config: config_module.Config) -> tuple[RunningGateway, web.AppRunner]:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return RunningGateway(f"http://127.0.0.1:{port}", app[GATEWAY], app), runner


MakeGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
                       ) -> AsyncIterator[MakeGateway]:
    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim-provider-secret-0001")
    runners: list[web.AppRunner] = []

    async def make(models: dict[str, Any], routes: dict[str, Any] | None = None, **kw: Any) -> RunningGateway:
        directory = tmp_path / f"gw{len(runners)}"
        directory.mkdir()
        p, r = write_config(directory, fleet, models, routes, **kw)
        running, runner = await serve(config_module.load(p, r))
        runners.append(runner)
        return running

    yield make
    for runner in runners:
        await runner.cleanup()
