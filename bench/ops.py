"""What the operations page costs the gateway's CPU, without HTTP: per request and per frame.

    python -m bench.ops [--quick] [--rates 200,1000]

  observe   LiveStats.observe on a realistic decision record: the work every request pays
            in Gateway.finish (after its answer has left), page open or not
  frame     building and encoding the page's state once, with the 5-minute window full
            at each rate: the work the feed does once a second while any page is open

Each figure is the median and the minimum over repeated timings in this process (the
minimum is the cost without interference; the median shows the noise). Loopback-free: no
sockets at all; bounded by its repeat counts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import orjson

from proxy.decisions import AttemptRecord, Decision
from proxy.ops.live import WINDOW_S, LiveStats
from proxy.ops.view import OpsSource, page_state

TIERS = ("free", "standard", "premium")


def decision(i: int) -> Decision:
    d = Decision(f"req-{i}", 0.0)
    d.tier, d.key, d.rule = TIERS[i % 3], f"key-{i % 4}", ("short", "code", "default")[i % 3]
    d.served_model, d.served_provider = f"model-{i % 6}", f"provider-{i % 3}"
    if i % 20 == 0:
        d.attempts.append(AttemptRecord("model-x", "model-x/p/0", "provider-x", 0.0, failure="server_error"))
    d.attempts.append(AttemptRecord(d.served_model, f"{d.served_model}/p/0", d.served_provider, 0.0))
    d.cost_usd, d.overhead_ms, d.ttft_ms = 0.0002 + i % 7 * 1e-5, 0.3 + i % 11 * 0.01, 5.0 + i % 13
    return d


def filled(rate: int, now: float) -> LiveStats:
    live = LiveStats()
    live.configure(frozenset(TIERS))
    records = [decision(i) for i in range(rate)]
    for second in range(WINDOW_S):
        at = now - WINDOW_S + second
        for i, d in enumerate(records):
            live.observe(d, at + i / rate)
    return live


def timings(run: Any, repeat: int, number: int) -> dict[str, float]:
    per_call = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            run()
        per_call.append((time.perf_counter() - started) / number)
    return {"median_us": round(statistics.median(per_call) * 1e6, 2), "min_us": round(min(per_call) * 1e6, 2)}


async def frame_cost(rate: int, repeat: int) -> dict[str, Any]:
    now = time.time()
    live = filled(rate, now)
    empty: dict[str, list[dict[str, Any]]] = {"deployments": [], "providers": [], "keys": []}

    async def deployments() -> dict[str, list[dict[str, Any]]]:
        return empty

    source = OpsSource(live=live, deployments=deployments, authorize=lambda _: None, in_flight=lambda: 0,
                       instance="bench", clock=lambda: now)
    per_frame = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        frame = orjson.dumps(await page_state(source))
        per_frame.append(time.perf_counter() - started)
        size = len(frame)
    return {"rate_rps": rate, "median_ms": round(statistics.median(per_frame) * 1e3, 3),
            "min_ms": round(min(per_frame) * 1e3, 3), "frame_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    parser.add_argument("--rates", default="200,1000", help="requests per second filling the window")
    args = parser.parse_args(argv)
    repeat, number = (3, 200) if args.quick else (15, 5000)
    live = LiveStats()
    live.configure(frozenset(TIERS))
    records = [decision(i) for i in range(64)]
    clock = iter(range(10**9))
    observe = timings(lambda: live.observe(records[next(clock) % 64], time.time()), repeat, number)
    frames = [asyncio.run(frame_cost(int(rate), 3 if args.quick else 21)) for rate in args.rates.split(",")]
    result = {"bench": "ops", "observe_per_request": observe, "frame": frames}
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"observe per request: {observe['median_us']} µs (min {observe['min_us']})", file=sys.stderr)
    for f in frames:
        print(f"one frame at {f['rate_rps']} rps, window full: {f['median_ms']} ms (min {f['min_ms']}), "
              f"{f['frame_bytes']} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
