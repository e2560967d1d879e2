"""Routing time without HTTP: `proxy.signals.extract` + `Router.plan` per request.

    python -m bench.routing [--iterations N] [--max-seconds S] [--runs N] [--quick]

Times a realistic request mix (short chats, ~60k-token contexts, code tasks, JSON output,
tools, images, cost ceilings, regions, tiers) on two configs: the shipped providers.yaml
and routes.yaml at the repository root, and a stress config of 50 rules and 20 models
generated here, where most requests walk past dozens of rules before one matches. Prints
p50, p99 and max in microseconds per config as JSON. Each request is timed on its own
with perf_counter_ns after a warm-up; a run stops at its iteration count or its time
bound, whichever comes first.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from proxy import config as config_module
from proxy.config import Config
from proxy.errors import GatewayError
from proxy.router import Router
from proxy.signals import extract

from .stats import across_runs, summary

ROOT = Path(__file__).resolve().parent.parent
PROSE = ("The gateway reads each request once, estimates its size and routes it by the rules "
         "in order; the first rule whose conditions all hold names the chain. ")
CODE = "def handler(request):\n    body = await request.json()\n    return web.json_response(body)\n"


@dataclass(frozen=True)
class Sample:
    kind: str
    body: dict[str, Any]
    headers: Mapping[str, str]
    weight: int


def _text(chars: int, unit: str = PROSE) -> str:
    return (unit * (chars // len(unit) + 1))[:chars]


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": f"{name} for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city"]}}}


def request_mix() -> list[Sample]:
    """What a busy gateway sees, weighted roughly by how often each kind arrives."""
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    conversation = [{"role": "system", "content": _text(600)}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": _text(400 + 37 * i)} for i in range(12)]
    long_doc = [{"role": "user", "content": "Summarise this report:\n" + _text(240_000)}]     # ~60k tokens
    code = [{"role": "user", "content": "Fix the bug:\n" + _text(3000, CODE)}]
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}]}]
    return [
        Sample("short-chat", {"model": "auto", "messages": chat}, {}, 30),
        Sample("short-chat-stream", {"model": "auto", "messages": chat, "stream": True,
                                     "stream_options": {"include_usage": True}}, {"X-Latency-Class": "realtime"}, 15),
        Sample("conversation", {"model": "auto", "messages": conversation, "max_tokens": 800}, {}, 15),
        Sample("long-context", {"model": "auto", "messages": long_doc, "max_tokens": 2000},
               {"X-Task-Type": "summarization", "X-Latency-Class": "batch"}, 3),
        Sample("code", {"model": "auto", "messages": code, "temperature": 0.2},
               {"X-Task-Type": "code", "X-User-Tier": "premium"}, 10),
        Sample("json-output", {"model": "auto", "messages": conversation[:4],
                               "response_format": {"type": "json_object"}}, {"X-Task-Type": "extraction"}, 8),
        Sample("tools", {"model": "auto", "messages": chat, "tools": [_tool("get_weather"), _tool("get_time")],
                         "tool_choice": "auto"}, {}, 6),
        Sample("image", {"model": "auto", "messages": image}, {"X-User-Tier": "free"}, 4),
        Sample("cost-ceiling", {"model": "auto", "messages": conversation, "max_tokens": 1000},
               {"X-Max-Cost-USD": "0.002"}, 4),
        Sample("region-eu", {"model": "auto", "messages": conversation[:3]}, {"X-Region": "eu"}, 2),
        Sample("free-tier", {"model": "auto", "messages": conversation}, {"X-User-Tier": "free"}, 2),
        Sample("named-model", {"model": "gpt-5-mini", "messages": chat}, {}, 1),
    ]


# --------------------------------------------------------------------------- stress config

_CAPS = ["code", "json", "tools", "vision", "prefill", "reasoning"]


def stress_files(directory: Path, rules: int = 50, models: int = 20) -> tuple[Path, Path]:
    """Write a providers.yaml of `models` models over 3 providers in 2 regions and a
    routes.yaml of `rules` rules, most of which never match the mix, so that a request
    walks past most of them: the worst realistic case for the rule loop."""
    providers = {
        f"p{i}": {"api": api, "base_url": f"http://127.0.0.1:9/{api}", "region": region}
        for i, (api, region) in enumerate([("openai", "us"), ("anthropic", "us"), ("gemini", "eu"),
                                           ("openai", "eu")])
    }
    model_entries = {}
    for i in range(models):
        model_entries[f"m{i:02d}"] = {
            "tier": 1 + i % 4,
            "context_window": [32_000, 128_000, 200_000, 1_000_000][i % 4],
            "max_output_tokens": [4096, 16_384, 32_000, 65_536][i % 4],
            "price": {"input": 0.1 + i * 0.4, "output": 0.4 + i * 1.6},
            "capabilities": [c for j, c in enumerate(_CAPS) if (i + j) % 3],
            "deployments": [{"provider": f"p{i % 4}", "model": f"up-{i}"},
                            {"provider": f"p{(i + 1) % 4}", "model": f"up-{i}"}],
        }
    names = list(model_entries)
    chains = {f"c{i}": [names[(i * 3 + k) % models] for k in range(4)] for i in range(10)}
    tasks = ["translation", "classification", "rewrite", "qa", "math", "agent", "search", "vision-qa"]
    rule_list: list[dict[str, Any]] = []
    for i in range(rules - 5):
        when: dict[str, Any]
        shape = i % 5
        if shape == 0:
            when = {"task_type": tasks[i % len(tasks)], "tier": {"in": ["standard", "premium"]}}
        elif shape == 1:
            when = {"key": f"team-{i}"}
        elif shape == 2:
            when = {"max_tokens": {"gt": 100_000 + i}, "latency": "batch"}
        elif shape == 3:
            when = {"region": "ap", "tools": True}
        else:
            when = {"tier": f"enterprise-{i}", "input_tokens": {"lt": 500}}
        rule_list.append({"name": f"r{i:02d}", "when": when, "chain": f"c{i % 10}"})
    rule_list += [      # the rules the mix actually reaches, last
        {"name": "long", "when": {"input_tokens": {"gt": 50_000}}, "chain": "c1"},
        {"name": "code", "when": {"task_type": "code", "tier": {"in": ["standard", "premium"]}}, "chain": "c2"},
        {"name": "json", "when": {"output_format": {"in": ["json_object", "json_schema"]}}, "chain": "c3"},
        {"name": "short", "when": {"input_tokens": {"lt": 1000}, "images": False}, "chain": "c4"},
        {"name": "free", "when": {"tier": "free"}, "chain": "c5"},
    ]
    p, r = directory / "providers.yaml", directory / "routes.yaml"
    p.write_text(yaml.safe_dump({"providers": providers, "models": model_entries}, sort_keys=False))
    r.write_text(yaml.safe_dump({"chains": chains, "rules": rule_list, "default": "c0",
                                 "fallbacks": {n: [names[(j + 1) % models]] for j, n in enumerate(names)},
                                 "server": {"decision_log": "off"}}, sort_keys=False))
    return p, r


def stress_config(rules: int = 50, models: int = 20) -> Config:
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        return config_module.load(*stress_files(Path(tmp), rules, models), env={})


def shipped_config() -> Config:
    return config_module.load(ROOT / "providers.yaml", ROOT / "routes.yaml", env={})


# --------------------------------------------------------------------------- timing


def adapt(mix: list[Sample], config: Config) -> list[Sample]:
    """Requests naming a model get one this config has."""
    first = next(iter(config.models))
    return [s if s.body["model"] == "auto" or s.body["model"] in config.models
            else Sample(s.kind, {**s.body, "model": first}, s.headers, s.weight) for s in mix]


def time_config(config: Config, mix: list[Sample], iterations: int, max_seconds: float, seed: int
                ) -> dict[str, Any]:
    """Time `iterations` requests drawn from the weighted mix; stop early at `max_seconds`."""
    router = Router(config)
    server = config.server
    rng = random.Random(seed)
    order = rng.choices(mix, weights=[s.weight for s in mix], k=iterations)
    clock = time.perf_counter_ns

    def route_one(sample: Sample) -> str:
        signals = extract(sample.body, sample.headers, None, server.default_tier, server.max_messages)
        try:
            return router.plan(signals, sample.body["model"]).rule
        except GatewayError:
            return "no_candidate"

    for sample in mix * 200:                     # warm-up: caches, branch predictors, allocator
        route_one(sample)
    gc.collect()
    gc.freeze()             # as `serve` does: the long-lived heap is not rescanned by full collections
    rules = {s.kind: route_one(s) for s in mix}
    samples: list[int] = []
    by_kind: dict[str, list[int]] = {s.kind: [] for s in mix}
    deadline = clock() + int(max_seconds * 1e9)
    for sample in order:
        started = clock()
        route_one(sample)
        elapsed = clock() - started
        samples.append(elapsed)
        by_kind[sample.kind].append(elapsed)
        if started > deadline:
            break
    result: dict[str, Any] = {
        "rules": len(config.rules), "models": len(config.models),
        **{f"{k}_us": v for k, v in summary(samples, 1e-3).items() if k != "n"},
        "iterations": len(samples),
        "by_kind": {kind: {"rule": rules[kind], "p50_us": summary(v, 1e-3)["p50"], "p99_us": summary(v, 1e-3)["p99"]}
                    for kind, v in by_kind.items() if v},
    }
    return result


def run(iterations: int, max_seconds: float, runs: int, seed: int = 7) -> dict[str, Any]:
    mix = request_mix()
    configs = {"shipped": shipped_config(), "stress": stress_config()}
    per_config: dict[str, Any] = {}
    for name, config in configs.items():
        results = [time_config(config, adapt(mix, config), iterations, max_seconds, seed + i) for i in range(runs)]
        per_config[name] = across_runs(results) if runs > 1 else results[0]
    return {
        "bench": "routing",
        "what": "proxy.signals.extract + Router.plan per request, microseconds",
        "runs": runs,
        "python": sys.version.split()[0],
        "mix": {s.kind: s.weight for s in mix},
        "configs": per_config,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="timed requests per config and run")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time bound per config and run")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians with [min, max] spreads")
    parser.add_argument("--quick", action="store_true", help="a few thousand iterations (smoke test)")
    args = parser.parse_args(argv)
    iterations, max_seconds = (2000, 1.0) if args.quick else (args.iterations, args.max_seconds)
    result = run(max(1, iterations), max_seconds, max(1, args.runs))
    sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
