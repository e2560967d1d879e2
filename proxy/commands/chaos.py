"""`llm-proxy chaos`: prove that every configured fallback step really triggers.

The configured fallback paths (the shipped routes.yaml by default): every chain, and
every `fallbacks:` entry (a model named directly, then its fallbacks), run in front of an
in-process simulated fleet on 127.0.0.1. For each path and each step k, the first k usable
models are made to fail and one streamed request must be served, completely, by model k+1.
The faults rotate through 503, 429 with Retry-After, a silent route, a reset, an in-band
error and 500, continuing from path to path, so every kind is exercised. Then every model
fails at once (the client must get a clean error status), and the primary is cut
mid-stream (the client must get an error event without `[DONE]`, or the whole text when
the chain opted into continuation and another model follows: continued from a prefill, or
restarted and verified against the text already sent, as the simulator's models answer
deterministically).

Each step runs on a fresh gateway (fresh breakers and buckets), so steps do not leak
into each other. Models whose wire protocol has no registered adapter are reported as
skipped, not failed. Everything is bounded: tight upstream timeouts, a time limit per
request and one for the whole run. Exit status 1 when any step failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..config import Chain, Config, Model, Timeouts, replace_providers
from ..providers import registry
from ..simulator import Behaviour, Simulator, canonical_text
from ..simulator import start as start_simulator
from . import load_or_exit

TOKENS = 6
CHAOS_TIMEOUTS = Timeouts(connect_s=1.0, first_token_s=1.0, idle_s=1.0, total_s=30.0)
STEP_FAULTS = ("503", "429-ra0.2", "hang", "reset", "inband", "500")
REQUEST_LIMIT_S = 30.0


# ---------------------------------------------------------------------- what a client saw


@dataclass
class Answer:
    """A chat answer as a strict client reads it."""

    status: int
    headers: dict[str, str]
    body: Any = None                        # the JSON body of a non-200 answer
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: dict[str, Any] | None = None
    malformed: list[bytes] = field(default_factory=list)
    after_end: bool = False                 # frames after [DONE] or after an error event

    @property
    def text(self) -> str:
        return "".join((c.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                       for c in self.chunks if c.get("choices"))

    @property
    def usage(self) -> dict[str, Any] | None:
        found = [c["usage"] for c in self.chunks if c.get("usage")]
        return found[-1] if found else None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and self.error is None and not self.malformed \
            and not self.after_end

    @property
    def clean_error(self) -> bool:
        """An honest failure: an error status with an OpenAI error body, or an error event and no [DONE]."""
        if self.status != 200:
            return isinstance(self.body, dict) and isinstance(self.body.get("error"), dict)
        return self.error is not None and not self.done and not self.malformed and not self.after_end

    def describe(self) -> str:
        served = self.headers.get("X-Route-Model", "-")
        attempts = self.headers.get("X-Route-Attempts", "?")
        if self.status != 200:
            code = (self.body or {}).get("error", {}).get("code") if isinstance(self.body, dict) else None
            return f"HTTP {self.status} {code or ''} after {attempts} attempts".replace("  ", " ")
        if self.complete:
            return f"complete stream from {served} ({len(self.text.split())} words) after {attempts} attempts"
        if self.clean_error:
            return f"error event after {len(self.text.split())} words, no [DONE] ({served}, {attempts} attempts)"
        return f"BROKEN stream from {served}: done={self.done} error={self.error is not None} " \
               f"malformed={len(self.malformed)}"


def read_sse_answer(status: int, headers: dict[str, str], raw: bytes) -> Answer:
    answer = Answer(status, headers)
    if status != 200:
        try:
            answer.body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer.body = raw
        return answer
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        if answer.done or answer.error is not None:
            answer.after_end = True
        if not block.startswith(b"data: "):
            answer.malformed.append(block)
            continue
        data = block[6:]
        if data == b"[DONE]":
            answer.done = True
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer.malformed.append(block)
            continue
        if isinstance(payload, dict) and "error" in payload:
            answer.error = payload["error"]
        elif isinstance(payload, dict):
            answer.chunks.append(payload)
        else:
            answer.malformed.append(block)
    return answer


# ---------------------------------------------------------------------- the steps


@dataclass
class Step:
    chain: str
    name: str
    expect: str
    saw: str = ""
    ok: bool = False
    skipped: bool = False
    seconds: float = 0.0


def chaos_config(config: Config, sim_port: int) -> Config:
    """The config in front of the simulator: tight timeouts, no keys, no decision log."""
    from .demo import simulated

    fleet = simulated(config, sim_port)
    fleet = replace_providers(fleet, lambda p: dataclasses.replace(p, timeouts=CHAOS_TIMEOUTS))
    server = dataclasses.replace(fleet.server, decision_log="off")
    return dataclasses.replace(fleet, keys=(), auth_required=False, server=server)


def usable(model: Model, protocols: set[str]) -> bool:
    return any(d.provider.api in protocols for d in model.deployments)


def upstream_names(model: Model) -> list[str]:
    return [d.upstream_model for d in model.deployments]


def paths(config: Config, only: list[str] | None) -> list[tuple[str, str, Chain]]:
    """(label, the request's model, the models in order) of every configured fallback path."""
    found = [(name, name, chain) for name, chain in config.chains.items()]
    found += [(f"fallbacks.{model}", model, Chain(model, (model, *targets)))
              for model, targets in config.fallbacks.items()]
    return [p for p in found if only is None or p[0] in only]


def plan_steps(chain: Chain, config: Config, protocols: set[str], first_fault: int = 0
               ) -> list[tuple[str, str, dict[str, str], Any]]:
    """(name, expectation, faults by upstream model, check) for one path."""
    models = [config.models[m] for m in chain.models]
    live = [m for m in models if usable(m, protocols)]
    steps: list[tuple[str, str, dict[str, str], Any]] = []
    for k in range(1, len(live)):
        fault = STEP_FAULTS[(first_fault + k - 1) % len(STEP_FAULTS)]
        faults = {name: fault for m in live[:k] for name in upstream_names(m)}
        target = live[k].name
        failing = ", ".join(m.name for m in live[:k])
        steps.append((f"{failing} fail ({fault})", f"complete stream from {target}", faults,
                      lambda a, target=target: a.complete and a.headers.get("X-Route-Model") == target
                      and a.text == "".join(canonical_text(TOKENS))))
    if live:
        faults = {name: "503" for m in live for name in upstream_names(m)}
        steps.append(("every model fails (503)", "a clean error status", faults,
                      lambda a: a.status != 200 and a.clean_error))
        primary = live[0]
        cut = {name: "cut2" for name in upstream_names(primary)}
        continues = chain.on_stream_failure == "continue" and len(live) > 1
        if continues:
            steps.append((f"{primary.name} cut mid-stream", "the whole text, continued", cut,
                          lambda a: a.complete and a.text == "".join(canonical_text(TOKENS))))
        else:
            steps.append((f"{primary.name} cut mid-stream", "an error event and no [DONE]", cut,
                          lambda a: a.clean_error and a.status == 200))
    return steps


async def run_step(config: Config, sim: Simulator, chain: str, faults: dict[str, str]) -> Answer:
    from ..server.app import create_app

    sim.faults.clear()
    sim.faults.update(faults)
    runner = web.AppRunner(create_app(config), access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        body = {"model": chain, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "chaos probe"}]}
        timeout = aiohttp.ClientTimeout(total=REQUEST_LIMIT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as response:
                return read_sse_answer(response.status, dict(response.headers), await response.read())
    finally:
        await runner.cleanup()
        sim.faults.clear()


async def run_chaos(config: Config, only: list[str] | None, limit_s: float) -> list[Step]:
    """Every step of every path (or of the paths named in `only`); bounded by `limit_s` in total."""
    protocols = set(registry())
    sim, sim_runner, port = await start_simulator("127.0.0.1", 0, Behaviour(tokens=TOKENS))
    sim.record = False
    fleet = chaos_config(config, port)
    results: list[Step] = []
    try:
        async with asyncio.timeout(limit_s):
            rotation = 0
            for name, requested, chain in paths(fleet, only):
                for model in chain.models:
                    if not usable(fleet.models[model], protocols):
                        apis = sorted({d.provider.api for d in fleet.models[model].deployments})
                        results.append(Step(name, model, "-", f"no adapter registered for {', '.join(apis)}",
                                            ok=True, skipped=True))
                steps = plan_steps(chain, fleet, protocols, rotation)
                rotation += max(0, len(chain.models) - 1)
                for step_name, expect, faults, check in steps:
                    step = Step(name, step_name, expect)
                    started = time.monotonic()
                    try:
                        answer = await run_step(fleet, sim, requested, faults)
                        step.saw, step.ok = answer.describe(), bool(check(answer))
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        step.saw = f"no answer: {type(exc).__name__}"
                    step.seconds = time.monotonic() - started
                    results.append(step)
    except TimeoutError:
        results.append(Step("-", "time limit", f"all steps within {limit_s:g}s", "time limit reached"))
    finally:
        await sim_runner.cleanup()
    return results


# ---------------------------------------------------------------------- command line


def report(results: list[Step]) -> str:
    lines, current = [], None
    for step in results:
        if step.chain != current:
            current = step.chain
            lines.append(f"{'path' if current.startswith('fallbacks.') else 'chain'} {current}")
        if step.skipped:
            lines.append(f"  skip {step.name}: {step.saw}")
            continue
        mark = "ok  " if step.ok else "FAIL"
        lines.append(f"  {mark} {step.name}: expected {step.expect}; client saw {step.saw} [{step.seconds:.2f}s]")
    failed = sum(1 for s in results if not s.ok)
    ran = sum(1 for s in results if not s.skipped)
    lines.append(f"{ran - failed}/{ran} steps passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def cmd_chaos(args: argparse.Namespace) -> int:
    config = load_or_exit(args)
    known = [label for label, _, _ in paths(config, None)]
    unknown = [c for c in args.chain or () if c not in known]
    if unknown:
        print(f"error: unknown chain {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    results = asyncio.run(run_chaos(config, args.chain, args.time_limit))
    if args.json:
        print(orjson.dumps([dataclasses.asdict(s) for s in results], option=orjson.OPT_INDENT_2).decode())
    else:
        print(report(results))
    return 0 if all(s.ok for s in results) else 1


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain", action="append",
                        help="only this path: a chain name or fallbacks.MODEL (repeatable; default: all)")
    parser.add_argument("--time-limit", type=_positive_seconds, default=300.0, help="seconds for the whole run")
    parser.add_argument("--json", action="store_true", help="the results as JSON")
    parser.set_defaults(func=cmd_chaos)
