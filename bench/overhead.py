"""What the gateway adds to a request: direct-to-simulator vs through the gateway, in one run.

    python -m bench.overhead [--runs 3] [--quick] [--workers 1] [--json-out FILE]

Starts the simulator (`python -m bench.simserver`) and the gateway (`python -m proxy serve`
with config files written to a temp dir, pointing at the simulator) as separate processes,
pinned with `taskset` when there are cores for it: the gateway alone on the last core, the
simulator and this load generator on the first. Then, for both paths, with the same
aiohttp client (a keep-alive pool on uvloop):

  latency      non-streamed p50/p99 at fixed rates (open loop: 200 and 1,000 rps)
  throughput   the most requests per second at concurrency 64 (closed loop)
  streaming    time to first token, and each chunk's transit from the upstream's write to
               the client's read (chunks are stamped with CLOCK_MONOTONIC by the simulator)
  memory       gateway RSS with 1,000 streams held open vs idle, per open stream

Direct and gateway phases alternate in order from run to run so drift hits both; with
`--runs N` each figure is the median over the runs with its [min, max] spread. Prints JSON
on stdout and a markdown table on stderr. Loopback only; every phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
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
import orjson
import yaml

from .loadgen import Result, Target, closed_loop, open_loop, send
from .stats import across_runs, ratio, summary

SIM_KEY_ENV = "BENCH_SIM_KEY"
TARGETS = {   # figure -> (target, how it is read); the README's table is built from these
    "routing_p99_us": 50, "added_p50_ms_200": 0.5, "added_p99_ms_200": 2.0, "added_ttft_p50_ms": 1.0,
    "added_chunk_p99_ms": 1.0, "gateway_rps_c64": 3000, "kb_per_stream": 50,
}


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


def write_config(directory: Path, sim_port: int, s: Settings) -> tuple[Path, Path]:
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
    p, r = directory / "providers.yaml", directory / "routes.yaml"
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

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, SIM_KEY_ENV: "sk-bench-not-a-secret", "PYTHONPATH": str(root)}
        self.simulator, self.sim_port = self._spawn_ready("simulator", ["bench.simserver"], env, root)
        self.bare, self.bare_port = self._spawn_ready("bareproxy", [
            "bench.bareproxy", "--upstream", f"http://127.0.0.1:{self.sim_port}/openai/v1/chat/completions"],
            env, root, self.cores["gateway"])
        providers, routes = write_config(self.dir, self.sim_port, self.settings)
        self.gateway_port = free_port()
        gw_log = open(self.dir / "gateway.log", "wb")
        command = [sys.executable, "-m", "proxy", "serve", "--providers", str(providers), "--routes", str(routes),
                   "--host", "127.0.0.1", "--port", str(self.gateway_port), "--workers",
                   str(self.settings.workers), "--log-level", "warning"]
        self.gateway = subprocess.Popen(pinned(command, self.cores["gateway"]), stdout=subprocess.DEVNULL,
                                        stderr=gw_log, env=env, cwd=self.dir)
        self.procs.append(self.gateway)

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
        url = f"http://127.0.0.1:{self.gateway_port}/readyz"
        deadline = time.monotonic() + limit_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.gateway is not None
                if self.gateway.poll() is not None:
                    break
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        log = (self.dir / "gateway.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the gateway did not become ready:\n{log}")

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


# --------------------------------------------------------------------------- phases


def body(model: str, stream: bool) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say something short about gateways."}], "max_tokens": 64}
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


class Paths:
    """The same request, sent direct to the simulator and through the gateway."""

    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        assert fleet.gateway is not None
        self.gateway_pid = fleet.gateway.pid
        assert fleet.bare is not None
        self.bare_pid = fleet.bare.pid
        sim, gw = f"http://127.0.0.1:{fleet.sim_port}", f"http://127.0.0.1:{fleet.gateway_port}"
        json = {"Content-Type": "application/json"}
        self.plain = {"direct": Target(f"{sim}/openai/v1/chat/completions", body(INSTANT, False), json),
                      "gateway": Target(f"{gw}/v1/chat/completions", body("auto", False), json),
                      "bare": Target(f"http://127.0.0.1:{fleet.bare_port}/v1/chat/completions",
                                     body(INSTANT, False), json)}
        self.paced = {"direct": Target(f"{sim}/stamped/v1/chat/completions", body(paced_model(settings), True),
                                       json, stream=True),
                      "gateway": Target(f"{gw}/v1/chat/completions", body("auto", True),
                                        {**json, "X-Task-Type": "paced"}, stream=True)}
        self.slow = {"direct": Target(f"{sim}/openai/v1/chat/completions", body(slow_model(settings), True),
                                      json, stream=True),
                     "gateway": Target(f"{gw}/v1/chat/completions", body("auto", True),
                                       {**json, "X-Task-Type": "slow"}, stream=True)}


def _errors(results: list[Result]) -> int:
    return sum(1 for r in results if r.status != 200)


def _ms(results: list[Result]) -> dict[str, float]:
    s = summary([r.latency_s for r in results if r.status == 200], 1000)
    return {"p50_ms": s["p50"], "p99_ms": s["p99"], "n": s["n"], "errors": _errors(results)}


def _cpu_per_request(pid: int, before_ns: int, results: list[Result]) -> float:
    """The gateway's CPU time per request over a phase: unlike latency and throughput it
    hardly moves when other processes compete for the cores, so it compares code changes."""
    return round((cpu_ns(pid) - before_ns) / 1000 / max(1, len(results)), 1)


async def phase_latency(session: aiohttp.ClientSession, paths: Paths, order: list[str], rate: int,
                        s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in order:
        target = paths.plain[path]
        cpu = cpu_ns(paths.gateway_pid)
        results, lateness = await open_loop(lambda t=target: send(session, t), rate, int(rate * s.rate_seconds) + 1,
                                            s.rate_seconds)
        out[path] = {**_ms(results), "send_lateness_ms": round(lateness * 1000, 3)}
        if path == "gateway":
            out[path]["cpu_us_per_request"] = _cpu_per_request(paths.gateway_pid, cpu, results)
    out["added_p50_ms"] = round(out["gateway"]["p50_ms"] - out["direct"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["gateway"]["p99_ms"] - out["direct"]["p99_ms"], 3)
    return out


async def phase_throughput(session: aiohttp.ClientSession, paths: Paths, order: list[str],
                           s: Settings) -> dict[str, Any]:
    """Direct and gateway, then the bare aiohttp proxy on the gateway's core: the framework's floor."""
    out: dict[str, Any] = {}
    for path in [*order, "bare"]:
        target = paths.plain[path]
        pid = paths.bare_pid if path == "bare" else paths.gateway_pid
        if path == "bare":
            await closed_loop(lambda t=target: send(session, t), 8, s.warmup, 10)
        cpu = cpu_ns(pid)
        results, elapsed = await closed_loop(lambda t=target: send(session, t), s.concurrency, 10_000_000,
                                             s.throughput_seconds)
        ok = len(results) - _errors(results)
        out[path] = {"rps": round(ok / elapsed, 1), "errors": _errors(results)}
        if path != "direct":
            out[path]["cpu_us_per_request"] = _cpu_per_request(pid, cpu, results)
    out["ratio"] = ratio(out["gateway"]["rps"], out["direct"]["rps"])
    return out


async def phase_streaming(session: aiohttp.ClientSession, paths: Paths, order: list[str],
                          s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in order:
        target = paths.paced[path]
        results, _ = await open_loop(lambda t=target: send(session, t), s.stream_rate, s.streams,
                                     s.streams / s.stream_rate + 1)
        ttft = summary([r.ttft_s for r in results if r.ttft_s is not None], 1000)
        transit = summary([t for r in results for t in r.transits_ns], 1e-6)
        out[path] = {"ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"],
                     "chunk_transit_p50_ms": transit["p50"], "chunk_transit_p99_ms": transit["p99"],
                     "chunks": transit["n"], "streams": len(results), "errors": _errors(results)}
    d, g = out["direct"], out["gateway"]
    out["added_ttft_p50_ms"] = round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 3)
    out["added_ttft_p99_ms"] = round(g["ttft_p99_ms"] - d["ttft_p99_ms"], 3)
    out["added_chunk_p50_ms"] = round(g["chunk_transit_p50_ms"] - d["chunk_transit_p50_ms"], 3)
    out["added_chunk_p99_ms"] = round(g["chunk_transit_p99_ms"] - d["chunk_transit_p99_ms"], 3)
    return out


async def phase_memory(fleet: Fleet, paths: Paths, s: Settings) -> dict[str, Any]:
    """Gateway RSS while `open_streams` slow streams are open at once, against idle."""
    assert fleet.gateway is not None and fleet.simulator is not None
    await asyncio.sleep(0.3)
    idle = rss_kb(fleet.gateway.pid)
    sim_idle = rss_kb(fleet.simulator.pid)
    opened = 0
    all_open = asyncio.Event()

    def on_content() -> None:
        nonlocal opened
        opened += 1
        if opened >= s.open_streams:
            all_open.set()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        target = paths.slow["gateway"]
        tasks = [asyncio.create_task(send(session, target, on_content)) for _ in range(s.open_streams)]
        try:
            await asyncio.wait_for(all_open.wait(), timeout=max(10.0, s.hold_seconds * 3))
        except TimeoutError:
            pass
        held = opened
        peak = max(rss_kb(fleet.gateway.pid) for _ in range(3))
        sim_peak = rss_kb(fleet.simulator.pid)
        done, pending = await asyncio.wait(tasks, timeout=s.hold_seconds * 3 + 10)
        for task in pending:
            task.cancel()
        errors = sum(1 for t in done if t.result().status != 200) + len(pending)
    per = (peak - idle) / held if held else float("nan")
    return {"open_streams": held, "rss_idle_kb": idle, "rss_streams_kb": peak, "kb_per_stream": round(per, 2),
            "simulator_kb_per_stream": round((sim_peak - sim_idle) / held, 2) if held else float("nan"),
            "errors": errors}


async def one_run(s: Settings, cores: dict[str, list[int] | None], index: int) -> dict[str, Any]:
    """One run on fresh processes, so that no run inherits another's heap."""
    fleet = Fleet(s, cores)
    try:
        fleet.start()
        await fleet.wait_ready()
        return await measure(fleet, Paths(fleet, s), s, index)
    finally:
        fleet.stop()


async def measure(fleet: Fleet, paths: Paths, s: Settings, index: int) -> dict[str, Any]:
    order = ["direct", "gateway"] if index % 2 == 0 else ["gateway", "direct"]
    result: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path in order:         # warm the pools, the caches and both servers
            target = paths.plain[path]
            await closed_loop(lambda t=target: send(session, t), 8, s.warmup, 10)
            stream_target = paths.paced[path]
            await closed_loop(lambda t=stream_target: send(session, t), 4, 8, 10)
        # Memory first: later phases leave freed heap behind that would hide what streams cost.
        result["memory"] = await phase_memory(fleet, paths, s)
        for rate in s.rates:
            result[f"latency_{rate}rps"] = await phase_latency(session, paths, order, rate, s)
        result["throughput"] = await phase_throughput(session, paths, order, s)
        result["streaming"] = await phase_streaming(session, paths, order, s)
    return result


def machine(cores: dict[str, list[int] | None]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()[0], "cores": cores}


async def run(s: Settings, runs: int) -> dict[str, Any]:
    cores = core_plan(s.workers)
    if cores["client"]:
        os.sched_setaffinity(0, set(cores["client"]))
    results = [await one_run(s, cores, i) for i in range(runs)]
    folded = across_runs(results) if runs > 1 else results[0]
    return {"bench": "overhead", "runs": runs, "machine": machine(cores),
            "settings": {k: v for k, v in vars(s).items()}, **folded}


# --------------------------------------------------------------------------- report


def _spread(section: dict[str, Any], key: str) -> str:
    spread = section.get(f"{key}_spread")
    return f" [{spread[0]:g}, {spread[1]:g}]" if spread else ""


def markdown(result: dict[str, Any]) -> str:
    """The table for the README: each figure for both paths and what the gateway adds."""
    rows = ["| figure | direct | gateway | added / ratio | target |", "|---|---|---|---|---|"]
    for key, section in result.items():
        if not key.startswith("latency_"):
            continue
        rate = key.removeprefix("latency_")
        d, g = section["direct"], section["gateway"]
        for q in ("p50", "p99"):
            target = {"p50": "<= 0.5 ms", "p99": "<= 2 ms"}[q] if rate == "200rps" else ""
            rows.append(f"| latency {q} at {rate[:-3]} rps (ms) | {d[f'{q}_ms']:g} | {g[f'{q}_ms']:g} | "
                        f"{section[f'added_{q}_ms']:+g}{_spread(section, f'added_{q}_ms')} | {target} |")
    t = result["throughput"]
    rows.append(f"| throughput at concurrency {result['settings']['concurrency']} (rps) | {t['direct']['rps']:g} | "
                f"{t['gateway']['rps']:g}{_spread(t['gateway'], 'rps')} | x{t['ratio']:g} | >= 3000 |")
    rows.append(f"| gateway CPU per request at concurrency {result['settings']['concurrency']} (µs) | | "
                f"{t['gateway']['cpu_us_per_request']:g}{_spread(t['gateway'], 'cpu_us_per_request')} | "
                f"bare aiohttp proxy: {t['bare']['cpu_us_per_request']:g} µs, {t['bare']['rps']:g} rps | |")
    st = result["streaming"]
    d, g = st["direct"], st["gateway"]
    rows.append(f"| stream TTFT p50 (ms) | {d['ttft_p50_ms']:g} | {g['ttft_p50_ms']:g} | "
                f"{st['added_ttft_p50_ms']:+g}{_spread(st, 'added_ttft_p50_ms')} | <= 1 ms added |")
    rows.append(f"| stream chunk transit p50 (ms) | {d['chunk_transit_p50_ms']:g} | {g['chunk_transit_p50_ms']:g} | "
                f"{st['added_chunk_p50_ms']:+g}{_spread(st, 'added_chunk_p50_ms')} | |")
    rows.append(f"| stream chunk transit p99 (ms) | {d['chunk_transit_p99_ms']:g} | {g['chunk_transit_p99_ms']:g} | "
                f"{st['added_chunk_p99_ms']:+g}{_spread(st, 'added_chunk_p99_ms')} | <= 1 ms added |")
    m = result["memory"]
    rows.append(f"| memory per open stream (KB), {m['open_streams']:g} streams | "
                f"{m['simulator_kb_per_stream']:g} (simulator) | {m['kb_per_stream']:g}{_spread(m, 'kb_per_stream')} "
                f"| idle {m['rss_idle_kb'] / 1024:.1f} MB -> {m['rss_streams_kb'] / 1024:.1f} MB | <= 50 KB |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repeat; report medians with [min, max] spreads")
    parser.add_argument("--quick", action="store_true", help="tiny bounded settings (smoke test)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--rate-seconds", type=float, help="seconds per fixed-rate phase (default 3)")
    parser.add_argument("--throughput-seconds", type=float, help="seconds per throughput phase (default 3)")
    parser.add_argument("--streams", type=int, help="paced streams per path (default 150)")
    parser.add_argument("--open-streams", type=int, help="streams held open for the memory figure (default 1000)")
    parser.add_argument("--decision-log", choices=("file", "off"), help="the gateway's decision log (default file)")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    overrides = {"workers": args.workers, "rate_seconds": args.rate_seconds,
                 "throughput_seconds": args.throughput_seconds, "streams": args.streams,
                 "open_streams": args.open_streams, "decision_log": args.decision_log}
    s = Settings(**{**vars(s), **{k: v for k, v in overrides.items() if v is not None}})
    import uvloop

    result = uvloop.run(run(s, max(1, args.runs)))
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
    sys.stdout.buffer.write(data)
    if args.json_out:
        Path(args.json_out).write_bytes(data)
    print(markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
