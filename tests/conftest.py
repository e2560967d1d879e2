"""Fixtures: a simulator and gateways on real sockets on 127.0.0.1, in the test's event loop.

`fleet` starts the simulated provider fleet; `make_gateway(models=..., routes=...)` writes a
providers.yaml and routes.yaml pointing at it, loads them through the real loader and
serves them with the production app settings (handler cancellation on).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from proxy import config as config_module
from proxy.gateway import Gateway
from proxy.server.app import create_app, listen, make_runner
from proxy.server.edge import GATEWAY
from proxy.simulator import Simulator
from proxy.simulator import start as start_simulator

from .redis_support import RedisServer, started_redis

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
    runner = make_runner(app)
    await runner.setup()
    site = await listen(runner, app[GATEWAY], "127.0.0.1", 0)
    port = site.port
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


# --------------------------------------------------------------------------- a real `python -m proxy serve`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    """`python -m proxy serve` in a subprocess; its JSON log lines land in `log_path`."""

    proc: asyncio.subprocess.Process
    url: str
    log_path: Path

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_bytes().splitlines()
        return [orjson.loads(line) for line in lines if line.startswith(b"{")]

    async def wait_ready(self, timeout_s: float = 15.0) -> None:
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()}")
                try:
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    async def exit_code(self, timeout_s: float) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()


SpawnGateway = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def spawn_gateway(tmp_path: Path) -> AsyncIterator[SpawnGateway]:
    """Start gateways as subprocesses; every one is killed at the end, whatever happened."""
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(providers: Path, routes: Path, *args: str, env: dict[str, str] | None = None,
                    host: str = "127.0.0.1", ready: bool = True, open_files: tuple[int, int] | None = None,
                    stdout: Path | None = None) -> GatewayProcess:
        """`open_files`: the (soft, hard) RLIMIT_NOFILE the gateway starts with; `stdout`: a file
        for its decision records (else they are discarded)."""
        port = free_port()
        log_path = tmp_path / f"gateway{len(procs)}.log"

        def limit_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        with open(log_path, "wb") as log_file, open(stdout or os.devnull, "wb") as out_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--providers", str(providers), "--routes", str(routes),
                "--host", host, "--port", str(port), *args, cwd=ROOT,
                env={**os.environ, "SIM_PROVIDER_KEY": "sk-sim-provider-secret-0001", **(env or {})},
                stdin=asyncio.subprocess.DEVNULL, stdout=out_file, stderr=log_file, preexec_fn=limit_files)
        procs.append(proc)
        running = GatewayProcess(proc, f"http://127.0.0.1:{port}", log_path)
        if ready:
            await running.wait_ready()
        return running

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.returncode is None:
                for child in child_pids(proc.pid):      # --workers: never leave a worker behind
                    os.kill(child, signal.SIGKILL)
                proc.kill()
                await proc.wait()


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --------------------------------------------------------------------------- a real redis-server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix."""
    server = started_redis()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, pause and start again."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
