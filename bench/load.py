"""A load generator for gateway users: fixed rate or fixed concurrency, bounded, with a summary.

    python -m bench.load http://127.0.0.1:8080 --concurrency 16 --count 2000
    python -m bench.load http://127.0.0.1:8080/v1/chat/completions --rate 200 --duration 10 --stream \\
        -H 'X-Task-Type: code' --model auto --prompt 'Write a haiku' --max-tokens 64

A URL without a path gets /v1/chat/completions. `--rate` sends on a fixed schedule whatever
the answers do (open loop: what a crowd of users does); `--concurrency` keeps that many
requests in flight (closed loop: what a batch job does). Every run stops at `--count`
requests or `--duration` seconds, whichever comes first. Progress goes to stderr as one
line; the summary (count, errors by status, latency and TTFT percentiles, throughput) to
stdout, as a table or with `--json` as JSON. Only loopback URLs unless `--allow-remote`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from .loadgen import Result, Target, closed_loop, is_loopback_url, open_loop, send
from .stats import summary

MAX_DURATION_S = 3600.0


class Progress:
    """One stderr line rewritten in place: a bar, counts, throughput and the running p50."""

    def __init__(self, count: int, duration: float, enabled: bool) -> None:
        self.count, self.duration, self.enabled = count, duration, enabled
        self.started = time.monotonic()
        self.done = 0
        self.errors = 0
        self.recent: list[float] = []

    def add(self, result: Result) -> None:
        self.done += 1
        self.errors += result.status != 200
        if len(self.recent) < 10_000:
            self.recent.append(result.latency_s)

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        fraction = min(1.0, max(self.done / self.count, elapsed / self.duration))
        bar = "#" * int(fraction * 30)
        p50 = summary(self.recent, 1000)["p50"] if self.recent else 0.0
        line = (f"\r[{bar:<30}] {self.done}/{self.count} done  {self.errors} errors  "
                f"{self.done / elapsed if elapsed else 0:.0f} req/s  p50 {p50:.2f} ms  {elapsed:.1f}s ")
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()
        self.recent.clear()

    async def run(self, every_s: float = 0.2) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.draw()


def build_target(args: argparse.Namespace) -> Target:
    url = args.url
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"error: header '{item}' must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    body: dict[str, Any] = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.body:
        body.update(orjson.loads(Path(args.body).read_bytes()))
    if args.stream:
        body["stream"] = True
    return Target(url, orjson.dumps(body), headers, stream=bool(body.get("stream")))


def report(results: list[Result], elapsed: float, target: Target, mode: str) -> dict[str, Any]:
    statuses = Counter(r.status for r in results)
    errors = {("transport" if status == 0 else str(status)): n for status, n in sorted(statuses.items())
              if status != 200}
    ok = [r for r in results if r.status == 200]
    latency = summary([r.latency_s for r in ok], 1000)
    out: dict[str, Any] = {
        "url": target.url, "mode": mode, "stream": target.stream, "count": len(results), "ok": len(ok),
        "errors": errors, "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(ok) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {k: latency[k] for k in ("p50", "p90", "p99", "max")},
    }
    if target.stream:
        ttft = summary([r.ttft_s for r in ok if r.ttft_s is not None], 1000)
        out["ttft_ms"] = {k: ttft[k] for k in ("p50", "p90", "p99", "max")}
    return out


def table(summary_: dict[str, Any]) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in summary_["errors"].items()) or "none"
    rows = [("requests", f"{summary_['count']} ({summary_['ok']} ok)"), ("errors by status", errors),
            ("mode", summary_["mode"]), ("elapsed", f"{summary_['elapsed_s']} s"),
            ("throughput", f"{summary_['throughput_rps']} req/s")]
    for name in ("latency_ms", "ttft_ms"):
        if name in summary_:
            q = summary_[name]
            rows.append((name.replace("_ms", " (ms)"),
                         f"p50 {q['p50']}  p90 {q['p90']}  p99 {q['p99']}  max {q['max']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


async def run(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    progress = Progress(args.count, args.duration, not args.quiet and sys.stderr.isatty() or args.progress)
    limit = 0 if args.rate else max(1, args.concurrency)
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def fire() -> Result:
            result = await send(session, target)
            progress.add(result)
            return result

        ticker = asyncio.create_task(progress.run())
        started = time.monotonic()
        try:
            if args.rate:
                results, _ = await open_loop(fire, args.rate, args.count, args.duration, grace_s=args.timeout)
                mode = f"open loop, {args.rate:g} req/s"
            else:
                results, _ = await closed_loop(fire, args.concurrency, args.count, args.duration,
                                               grace_s=args.timeout)
                mode = f"closed loop, concurrency {args.concurrency}"
        finally:
            ticker.cancel()
        elapsed = time.monotonic() - started
        progress.draw(final=True)
    return report(results, elapsed, target, mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the gateway (http://127.0.0.1:8080) or a full chat completions URL")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, help="requests started per second (open loop)")
    how.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop; default 8)")
    parser.add_argument("--count", type=int, default=1000, help="stop after this many requests (default 1000)")
    parser.add_argument("--duration", type=float, default=30.0, help="stop after this many seconds (default 30)")
    parser.add_argument("--stream", action="store_true", help="stream the answers and measure TTFT")
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--prompt", default="Say something short about gateways.")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--body", help="a JSON file whose fields are merged into the request body")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--progress", action="store_true", help="draw progress even when stderr is not a tty")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--allow-remote", action="store_true", help="allow a URL that is not loopback")
    args = parser.parse_args(argv)
    if not is_loopback_url(args.url) and not args.allow_remote:
        print(f"error: {args.url} is not a loopback address; pass --allow-remote to load a remote host",
              file=sys.stderr)
        return 2
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if args.count < 1 or args.duration <= 0:
        parser.error("--count and --duration must be positive")
    args.duration = min(args.duration, MAX_DURATION_S)
    target = build_target(args)
    import uvloop

    result = uvloop.run(run(args, target))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
