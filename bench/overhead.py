"""What the gateway adds to a request: direct-to-simulator vs through the gateway, in one run.

    python -m bench.overhead [--runs 3] [--quick] [--workers 1] [--page] [--json-out FILE]

Starts the simulator (`python -m bench.simserver`) and the gateway (`python -m proxy serve`
with config files written to a temp dir, pointing at the simulator) as separate processes,
pinned with `taskset` when there are cores for it: the gateway alone on the last core, the
simulator and this load generator on the first. Then, for both paths, with the same
aiohttp client (a keep-alive pool on uvloop):

  latency      non-streamed p50/p99 at fixed rates (open loop: 200 and 1,000 rps), also
               through a second gateway whose state is in Redis (`server.state`, a
               redis-server beside the simulator), when redis-server is installed: what
               the shared state's round trip per admission costs, against memory in the
               same run
  throughput   the most requests per second at concurrency 64 (closed loop)
  streaming    time to first token, and each chunk's transit from the upstream's write to
               the client's read (chunks are stamped with CLOCK_MONOTONIC by the simulator)
  memory       gateway RSS with 1,000 streams held open vs idle, per open stream

`--page` measures instead what an open operations page costs: the same fixed-rate latency
and streaming phases, direct, through the gateway with no page open, and through the
gateway while `pages` /dashboard SSE streams are open and reading their frame a second,
all in the same run (the order reverses from run to run).

Direct and gateway phases alternate in order from run to run so drift hits both; with
`--runs N` each figure is the median over the runs with its [min, max] spread. Prints JSON
on stdout and a markdown table on stderr. Loopback only; every phase is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .fleet import INSTANT, Fleet, Settings, core_plan, cpu_ns, paced_model, rss_kb, slow_model
from .loadgen import Result, Target, closed_loop, open_loop, send
from .stats import across_runs, ratio, summary

TARGETS = {   # figure -> (target, how it is read); the README's table is built from these
    "routing_p99_us": 50, "added_p50_ms_200": 0.5, "added_p99_ms_200": 2.0, "added_ttft_p50_ms": 1.0,
    "added_chunk_p99_ms": 1.0, "gateway_rps_c64": 3000, "kb_per_stream": 50,
}


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
        self.pids = {"gateway": fleet.gateway.pid}
        if fleet.redis_gateway is not None:
            self.plain["redis"] = Target(f"http://127.0.0.1:{fleet.redis_gateway_port}/v1/chat/completions",
                                         body("auto", False), json)
            self.pids["redis"] = fleet.redis_gateway.pid
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
    if "redis" in paths.plain:          # the Redis-backed gateway too, first or last by turns
        order = [*order, "redis"] if order[0] == "direct" else ["redis", *order]
    for path in order:
        target = paths.plain[path]
        pid = paths.pids.get(path)
        cpu = cpu_ns(pid) if pid else 0
        results, lateness = await open_loop(lambda t=target: send(session, t), rate, int(rate * s.rate_seconds) + 1,
                                            s.rate_seconds)
        out[path] = {**_ms(results), "send_lateness_ms": round(lateness * 1000, 3)}
        if pid:
            out[path]["cpu_us_per_request"] = _cpu_per_request(pid, cpu, results)
    out["added_p50_ms"] = round(out["gateway"]["p50_ms"] - out["direct"]["p50_ms"], 3)
    out["added_p99_ms"] = round(out["gateway"]["p99_ms"] - out["direct"]["p99_ms"], 3)
    if "redis" in out:
        out["redis_added_p50_ms"] = round(out["redis"]["p50_ms"] - out["direct"]["p50_ms"], 3)
        out["redis_added_p99_ms"] = round(out["redis"]["p99_ms"] - out["direct"]["p99_ms"], 3)
        out["redis_minus_memory_p50_ms"] = round(out["redis"]["p50_ms"] - out["gateway"]["p50_ms"], 3)
        out["redis_minus_memory_p99_ms"] = round(out["redis"]["p99_ms"] - out["gateway"]["p99_ms"], 3)
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


async def one_run(s: Settings, cores: dict[str, list[int] | None], index: int, page: bool = False
                  ) -> dict[str, Any]:
    """One run on fresh processes, so that no run inherits another's heap."""
    fleet = Fleet(s, cores)
    try:
        fleet.start()
        await fleet.wait_ready()
        if page:
            return await measure_page(fleet, Paths(fleet, s), s, index)
        return await measure(fleet, Paths(fleet, s), s, index)
    finally:
        fleet.stop()


async def _warm(session: aiohttp.ClientSession, paths: Paths, order: list[str], s: Settings) -> None:
    if "redis" in paths.plain:
        target = paths.plain["redis"]
        await closed_loop(lambda t=target: send(session, t), 8, s.warmup, 10)
    for path in order:         # warm the pools, the caches and both servers
        target = paths.plain[path]
        await closed_loop(lambda t=target: send(session, t), 8, s.warmup, 10)
        stream_target = paths.paced[path]
        await closed_loop(lambda t=stream_target: send(session, t), 4, 8, 10)


async def measure_page(fleet: Fleet, paths: Paths, s: Settings, index: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await _warm(session, paths, ["direct", "gateway"], s)
        return {"page": await phase_page(session, fleet, paths, index, s)}


async def measure(fleet: Fleet, paths: Paths, s: Settings, index: int) -> dict[str, Any]:
    order = ["direct", "gateway"] if index % 2 == 0 else ["gateway", "direct"]
    result: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await _warm(session, paths, order, s)
        # Memory first: later phases leave freed heap behind that would hide what streams cost.
        result["memory"] = await phase_memory(fleet, paths, s)
        for rate in s.rates:
            result[f"latency_{rate}rps"] = await phase_latency(session, paths, order, rate, s)
        result["throughput"] = await phase_throughput(session, paths, order, s)
        result["streaming"] = await phase_streaming(session, paths, order, s)
    return result


async def _watch_page(url: str, frames: list[int], stop: asyncio.Event) -> None:
    """One open operations page: read its SSE feed until told to stop, counting frames."""
    async with aiohttp.ClientSession() as session, session.get(url + "/dashboard/events") as resp:
        if resp.status != 200:
            raise RuntimeError(f"/dashboard/events answered {resp.status}")
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(resp.content.readline(), 0.5)
            except TimeoutError:
                continue
            if not line:
                return
            if line.startswith(b"data: "):
                orjson.loads(line[6:])          # what a browser does with each frame
                frames.append(1)


async def phase_page(session: aiohttp.ClientSession, fleet: Fleet, paths: Paths, index: int,
                     s: Settings) -> dict[str, Any]:
    """Direct, gateway with no page open, gateway with `s.pages` pages streaming: same run."""
    gateway_url = f"http://127.0.0.1:{fleet.gateway_port}"
    rate = s.rates[0]
    order = ["direct", "closed", "open"] if index % 2 == 0 else ["open", "closed", "direct"]
    out: dict[str, Any] = {}
    for state in order:
        stop = asyncio.Event()
        frames: list[int] = []
        watchers = [asyncio.create_task(_watch_page(gateway_url, frames, stop))
                    for _ in range(s.pages if state == "open" else 0)]
        if watchers:
            await asyncio.sleep(1.5)            # the feed is running and every page has had a frame
        path = "direct" if state == "direct" else "gateway"
        target, stream_target = paths.plain[path], paths.paced[path]
        cpu = cpu_ns(paths.gateway_pid)
        results, _ = await open_loop(lambda t=target: send(session, t), rate, int(rate * s.rate_seconds) + 1,
                                     s.rate_seconds)
        figures = _ms(results)
        if path == "gateway":
            figures["cpu_us_per_request"] = _cpu_per_request(paths.gateway_pid, cpu, results)
        streams, _ = await open_loop(lambda t=stream_target: send(session, t), s.stream_rate, s.streams,
                                     s.streams / s.stream_rate + 1)
        ttft = summary([r.ttft_s for r in streams if r.ttft_s is not None], 1000)
        figures.update({"ttft_p50_ms": ttft["p50"], "ttft_p99_ms": ttft["p99"], "stream_errors": _errors(streams)})
        stop.set()
        await asyncio.gather(*watchers)
        if watchers:
            figures["page_frames"] = len(frames)
        out[state] = figures
    d, closed, opened = out["direct"], out["closed"], out["open"]
    for name, g in (("closed", closed), ("open", opened)):
        out[f"added_p50_ms_{name}"] = round(g["p50_ms"] - d["p50_ms"], 3)
        out[f"added_p99_ms_{name}"] = round(g["p99_ms"] - d["p99_ms"], 3)
        out[f"added_ttft_p50_ms_{name}"] = round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 3)
    out["page_minus_no_page_p50_ms"] = round(opened["p50_ms"] - closed["p50_ms"], 3)
    out["page_minus_no_page_p99_ms"] = round(opened["p99_ms"] - closed["p99_ms"], 3)
    out["page_minus_no_page_ttft_p50_ms"] = round(opened["ttft_p50_ms"] - closed["ttft_p50_ms"], 3)
    return out


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


async def run(s: Settings, runs: int, page: bool = False) -> dict[str, Any]:
    cores = core_plan(s.workers)
    if cores["client"]:
        os.sched_setaffinity(0, set(cores["client"]))
    results = [await one_run(s, cores, i, page) for i in range(runs)]
    folded = across_runs(results) if runs > 1 else results[0]
    return {"bench": "overhead", "runs": runs, "machine": machine(cores),
            "settings": {k: v for k, v in vars(s).items()}, **folded}


# --------------------------------------------------------------------------- report


def _spread(section: dict[str, Any], key: str) -> str:
    spread = section.get(f"{key}_spread")
    return f" [{spread[0]:g}, {spread[1]:g}]" if spread else ""


def page_markdown(result: dict[str, Any]) -> str:
    """The --page table: the gateway's added latency with no page open and with pages streaming."""
    p = result["page"]
    rows = ["| figure | direct | gateway, no page | gateway, pages open | page minus no page |",
            "|---|---|---|---|---|"]
    rate = result["settings"]["rates"][0]
    for q, label in (("p50", f"latency p50 at {rate} rps (ms)"), ("p99", f"latency p99 at {rate} rps (ms)"),
                     ("ttft_p50", "stream TTFT p50 (ms)")):
        key = f"{q}_ms" if q != "ttft_p50" else "ttft_p50_ms"
        rows.append(f"| {label} | {p['direct'][key]:g} | {p['closed'][key]:g} (added "
                    f"{p[f'added_{key}_closed']:+g}) | {p['open'][key]:g} (added {p[f'added_{key}_open']:+g}) | "
                    f"{p[f'page_minus_no_page_{key}']:+g}{_spread(p, f'page_minus_no_page_{key}')} |")
    rows.append(f"| gateway CPU per request (µs) | | {p['closed']['cpu_us_per_request']:g} | "
                f"{p['open']['cpu_us_per_request']:g} | |")
    rows.append(f"| page frames received | | | {p['open']['page_frames']:g} | |")
    return "\n".join(rows)


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
            if "redis" in section:
                rd = section["redis"]
                target = "<= 0.3 ms over memory" if rate == "200rps" and q == "p50" else ""
                rows.append(f"| latency {q} at {rate[:-3]} rps, state in Redis (ms) | {d[f'{q}_ms']:g} | "
                            f"{rd[f'{q}_ms']:g} | {section[f'redis_added_{q}_ms']:+g}"
                            f"{_spread(section, f'redis_added_{q}_ms')}; Redis minus memory "
                            f"{section[f'redis_minus_memory_{q}_ms']:+g}"
                            f"{_spread(section, f'redis_minus_memory_{q}_ms')} | {target} |")
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
    parser.add_argument("--page", action="store_true",
                        help="measure the gateway with and without operations pages open (same run)")
    parser.add_argument("--pages", type=int, help="pages open in the --page comparison (default 2)")
    parser.add_argument("--json-out", help="also write the JSON here")
    args = parser.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    overrides = {"workers": args.workers, "rate_seconds": args.rate_seconds,
                 "throughput_seconds": args.throughput_seconds, "streams": args.streams,
                 "open_streams": args.open_streams, "decision_log": args.decision_log, "pages": args.pages}
    s = Settings(**{**vars(s), **{k: v for k, v in overrides.items() if v is not None}})
    import uvloop

    result = uvloop.run(run(s, max(1, args.runs), args.page))
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
    sys.stdout.buffer.write(data)
    if args.json_out:
        Path(args.json_out).write_bytes(data)
    print(page_markdown(result) if args.page else markdown(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
