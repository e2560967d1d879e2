"""The bench's processes: the simulator and the gateway (and the bare proxy) as pinned child
processes on 127.0.0.1, the config they are started with, and what /proc says about them
(resident memory, CPU time). Used by bench.overhead; every process stops when the fleet does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SIM_KEY_ENV = "BENCH_SIM_KEY"

@dataclass(frozen=True)
class Settings:
    rates: tuple[int, ...] = (200, 1000)
    rate_seconds: float = 3.0
    throughput_seconds: float = 3.0
    concurrency: int = 64
    streams: int = 150
    stream_rate: float = 50.0
    stream_tokens: int = 20
    stream_gap_ms: int = 10
    stream_ttft_ms: int = 5
    open_streams: int = 1000
    hold_seconds: float = 4.0
    warmup: int = 300
    workers: int = 1
    decision_log: str = "file"          # file | off
    pages: int = 2                      # operations pages open in the --page comparison

    @classmethod
    def quick(cls) -> Settings:
        return cls(rates=(200,), rate_seconds=0.3, throughput_seconds=0.3, concurrency=8, streams=6,
                   stream_rate=30, stream_tokens=4, stream_gap_ms=5, open_streams=20, hold_seconds=0.6, warmup=20)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def core_plan(workers: int) -> dict[str, list[int] | None]:
    """Which cores each process gets; None everywhere when pinning is not possible."""
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cores) < 2:
        return {"gateway": None, "simulator": None, "client": None}
    gateway = cores[-workers:] if len(cores) > workers else cores[-1:]
    rest = [c for c in cores if c not in gateway] or cores[:1]
    return {"gateway": gateway, "simulator": rest[:1], "client": rest[-1:]}


def pinned(command: list[str], cores: list[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores)), *command] if cores else command


def rss_kb(pid: int) -> int:
    """Resident memory of a process and its children (the --workers processes)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_ns(pid: int) -> int:
    """CPU time used so far by every thread of a process and its children (schedstat, ns)."""
    total = 0
    for p in [pid, *_children(pid)]:
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def write_config(directory: Path, sim_port: int, s: Settings, state_url: str | None = None) -> tuple[Path, Path]:
    """The bench's config; with `state_url` the same one on Redis (its files get a `redis-` prefix)."""
    base = f"http://127.0.0.1:{sim_port}"
    timeouts = {"connect_s": 5, "first_token_s": 30, "idle_s": 30, "total_s": 120}
    providers = {
        "sim": {"api": "openai", "base_url": f"{base}/openai/v1", "api_key_env": SIM_KEY_ENV, "timeouts": timeouts},
        "stamped": {"api": "openai", "base_url": f"{base}/stamped/v1", "api_key_env": SIM_KEY_ENV,
                    "timeouts": timeouts},
    }

    def model(provider: str, upstream: str) -> dict[str, Any]:
        return {"tier": 2, "context_window": 128000, "max_output_tokens": 4096,
                "price": {"input": 1.0, "output": 2.0}, "capabilities": ["code", "json", "tools"],
                "deployments": [{"provider": provider, "model": upstream}]}

    models = {"instant": model("sim", INSTANT), "paced": model("stamped", paced_model(s)),
              "slow": model("sim", slow_model(s))}
    # Limits far above any rate here, so that every admission reserves buckets as in production
    # (an rpm and a tpm on the deployment and on its account) without ever refusing.
    models["instant"]["deployments"][0]["limits"] = {"rpm": 100_000_000, "tpm": 10_000_000_000}
    providers["sim"]["limits"] = {"rpm": 100_000_000, "tpm": 10_000_000_000}
    routes = {
        "chains": {"to-instant": ["instant"], "to-paced": ["paced"], "to-slow": ["slow"]},
        "rules": [      # the shipped routing guide's shape, with the bench's chains
            {"name": "long-context", "when": {"input_tokens": {"gt": 50000}}, "chain": "to-instant"},
            {"name": "code", "when": {"task_type": "code", "tier": {"in": ["standard", "premium"]}},
             "chain": "to-instant"},
            {"name": "paced", "when": {"task_type": "paced"}, "chain": "to-paced"},
            {"name": "slow", "when": {"task_type": "slow"}, "chain": "to-slow"},
            {"name": "free-tier", "when": {"tier": "free"}, "chain": "to-instant"},
        ],
        "default": "to-instant",
        "server": {"decision_log": str(directory / "decisions.jsonl") if s.decision_log == "file" else "off",
                   "drain_timeout_s": 2},
    }
    prefix = ""
    if state_url is not None:
        prefix = "redis-"
        routes["server"]["state"] = {"url": state_url, "timeout_ms": 50}
        if s.decision_log == "file":
            routes["server"]["decision_log"] = str(directory / "redis-decisions.jsonl")
    p, r = directory / f"{prefix}providers.yaml", directory / f"{prefix}routes.yaml"
    p.write_text(yaml.safe_dump({"providers": providers, "models": models}, sort_keys=False))
    r.write_text(yaml.safe_dump(routes, sort_keys=False))
    return p, r


INSTANT = "bench-instant"


def paced_model(s: Settings) -> str:
    return f"bench-ttft{s.stream_ttft_ms}-gap{s.stream_gap_ms}-n{s.stream_tokens}"


def slow_model(s: Settings) -> str:
    tokens = 5
    return f"bench-ttft10-gap{int(s.hold_seconds * 1000 / (tokens - 1))}-n{tokens}"


class Fleet:
    """The simulator and the gateway as child processes; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, settings: Settings, cores: dict[str, list[int] | None]) -> None:
        self.settings = settings
        self.cores = cores
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-overhead-")
        self.dir = Path(self.tmp.name)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sim_port = 0
        self.gateway_port = 0
        self.gateway: subprocess.Popen[bytes] | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.bare: subprocess.Popen[bytes] | None = None
        self.bare_port = 0
        self.redis_gateway: subprocess.Popen[bytes] | None = None     # the same gateway on Redis state
        self.redis_gateway_port = 0
    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, SIM_KEY_ENV: "sk-bench-not-a-secret", "PYTHONPATH": str(root)}
        self.simulator, self.sim_port = self._spawn_ready("simulator", ["bench.simserver"], env, root)
        self.bare, self.bare_port = self._spawn_ready("bareproxy", [
            "bench.bareproxy", "--upstream", f"http://127.0.0.1:{self.sim_port}/openai/v1/chat/completions"],
            env, root, self.cores["gateway"])
        self.gateway, self.gateway_port = self._gateway("gateway", write_config(self.dir, self.sim_port,
                                                                                self.settings), env)
        redis = shutil.which("redis-server")
        if redis is not None:           # Redis beside the simulator; the second gateway on the gateway's core
            port = free_port()
            self.procs.append(subprocess.Popen(pinned(
                [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")], self.cores["simulator"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            config = write_config(self.dir, self.sim_port, self.settings, f"redis://127.0.0.1:{port}/0")
            self.redis_gateway, self.redis_gateway_port = self._gateway("redis-gateway", config, env)

    def _gateway(self, name: str, config: tuple[Path, Path], env: dict[str, str]
                 ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log = open(self.dir / f"{name}.log", "wb")
        command = [sys.executable, "-m", "proxy", "serve", "--providers", str(config[0]), "--routes",
                   str(config[1]), "--host", "127.0.0.1", "--port", str(port), "--workers",
                   str(self.settings.workers), "--log-level", "warning"]
        proc = subprocess.Popen(pinned(command, self.cores["gateway"]), stdout=subprocess.DEVNULL, stderr=log,
                                env=env, cwd=self.dir)
        self.procs.append(proc)
        return proc, port

    def _spawn_ready(self, name: str, module: list[str], env: dict[str, str], root: Path,
                     cores: list[int] | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """Start a bench server that prints `ready <port>`; its stderr goes to NAME.log."""
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen(pinned([sys.executable, "-m", *module, "--port", "0"],
                                       cores if cores is not None else self.cores["simulator"]),
                                stdout=subprocess.PIPE, stderr=log, env=env, cwd=root)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"{name} did not start: {line!r}; see {self.dir / f'{name}.log'}")
        return proc, int(line.split()[1])

    async def wait_ready(self, limit_s: float = 20.0) -> None:
        await self._ready(self.gateway, self.gateway_port, "gateway", limit_s)
        if self.redis_gateway is not None:
            await self._ready(self.redis_gateway, self.redis_gateway_port, "redis-gateway", limit_s)

    async def _ready(self, gateway: subprocess.Popen[bytes] | None, port: int, name: str, limit_s: float) -> None:
        """Until /readyz answers 200 (and, on Redis, says shared: it starts degraded otherwise)."""
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert gateway is not None
                if gateway.poll() is not None:
                    break
                try:
                    async with session.get(url) as response:
                        ready = await response.json(content_type=None)
                        if response.status == 200 and ready.get("state", {}).get("mode") != "degraded":
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        log = (self.dir / f"{name}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the {name} did not become ready:\n{log}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.tmp.cleanup()
