"""A bounded load test on loopback: 2,000 streamed requests through a mix of faults.

Every request must end in a complete answer ([DONE] and the whole text) or a clean error
(an error status with an OpenAI error body, or an error event and no [DONE]): no hangs,
and nothing truncated that looks complete. Bounded in count (2,000), concurrency (50)
and time (60 s). `pytest -s` prints the counts and the fallback rate.
"""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp

from proxy.breaker import BreakerPolicy
from proxy.decisions import Decision

from .conftest import Fleet, MakeGateway, model_entry
from .streams import expected_text, stream_chat

REQUESTS = 2000
CONCURRENCY = 50
TIME_LIMIT_S = 60.0
TOKENS = 8
TIMEOUTS = {"connect_s": 1, "first_token_s": 1.0, "idle_s": 1.0, "total_s": 10}   # generous: a loaded CI box

# chain -> (models, what every answer on it may be); a mid-stream fault ends in an error
# event until the breaker takes the faulty model out, after which the fallback answers.
CHAINS = {
    "overloaded": (["m503", "ok_a"], {"complete"}),
    "inband": (["minband", "ok_b"], {"complete"}),
    "cut": (["mcut", "ok_a"], {"error", "complete"}),
    "cut-continued": (["mcut", "plain", "prefill_b"], {"complete"}),
    "garbage": (["mgarbage"], {"complete"}),
    "nodone": (["mnodone"], {"complete"}),
    "stall": (["mstall", "ok_b"], {"error", "complete"}),
    "silent": (["mhang", "ok_a"], {"complete"}),
    "limited": (["m429", "ok_b"], {"complete"}),
    "all-fail": (["m503", "m500"], {"error"}),
}


def models() -> dict[str, dict[str, object]]:
    caps = ["code", "json", "tools", "vision"]
    # Two OpenAI accounts, Anthropic and Gemini: every fault is seen through more than one protocol.
    a, b, c, g = "sim-openai", "sim-other", "sim-anthropic", "sim-gemini"
    return {
        "m503": model_entry(f"m-503-n{TOKENS}", a),
        "m500": model_entry(f"m-500-n{TOKENS}", g),
        "minband": model_entry(f"m-inband-n{TOKENS}", c),
        "mcut": model_entry(f"m-cut4-n{TOKENS}", g, capabilities=caps + ["prefill"]),
        "mgarbage": model_entry(f"m-garbage-n{TOKENS}", c),
        "mnodone": model_entry(f"m-nodone-n{TOKENS}", g),
        "mstall": model_entry(f"m-stall4-n{TOKENS}", c),
        "mhang": model_entry("m-hang", b),
        "m429": model_entry(f"m-429-ra0.05-n{TOKENS}", c),
        "ok_a": model_entry(f"oka-n{TOKENS}", a),
        "ok_b": model_entry(f"okb-n{TOKENS}", g),
        "plain": model_entry(f"plain-n{TOKENS}", b, capabilities=caps),
        "prefill_b": model_entry(f"pre-n{TOKENS}", c, capabilities=caps + ["prefill"]),
    }


async def test_two_thousand_streams_through_faults_end_complete_or_clean(fleet: Fleet,
                                                                        make_gateway: MakeGateway) -> None:
    chains = {name: ({"models": ms, "on_stream_failure": "continue"} if name == "cut-continued" else ms)
              for name, (ms, _) in CHAINS.items()}
    other = {"sim-other": {"api": "openai", "base_url": fleet.url("openai"), "api_key_env": "SIM_PROVIDER_KEY",
                           "timeouts": TIMEOUTS}}
    gw = await make_gateway(models(), {"chains": chains, "default": "overloaded"}, timeouts=TIMEOUTS,
                            providers=other)
    records: list[Decision] = []
    gw.gateway.decisions.record = records.append      # type: ignore[method-assign, assignment]
    fleet.sim.record = False
    names = list(CHAINS)
    counts: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    full_text = expected_text(TOKENS)

    async def one(i: int, s: aiohttp.ClientSession) -> None:
        chain = names[i % len(names)]
        async with gate:
            try:
                async with asyncio.timeout(10):
                    r = await stream_chat(s, gw.base, chain)
            except TimeoutError:
                counts["hang"] += 1
                return
        if r.complete and r.text == full_text:
            kind = "complete"
        elif r.complete:
            kind = "truncated_as_complete"
        elif r.clean_error:
            kind = "error"
        else:
            kind = "broken"
        counts[kind] += 1
        counts["status_" + str(r.status)] += 1
        if kind not in CHAINS[chain][1]:
            wrong.append(f"{chain}: {r.describe()}")

    # First half: breakers that never open, so every request walks its chain through the fault.
    # Second half: tight breakers with a short open interval, so faulty models are taken out,
    # probed, and taken out again while traffic flows.
    phases = (BreakerPolicy(consecutive=10**6, min_calls=10**6),
              BreakerPolicy(consecutive=3, open_s=0.1, max_backoff_s=0.3))
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(TIME_LIMIT_S):
            for phase, policy in enumerate(phases):
                gw.gateway.state.set_breaker_policy(policy)
                half = REQUESTS // len(phases)
                await asyncio.gather(*(one(phase * half + i, s) for i in range(half)))
    elapsed = time.monotonic() - started
    await asyncio.sleep(0)

    fell_back = sum(1 for d in records if d.fell_back)
    by_fallback = sum(1 for d in records if d.served_model and d.served_model != d.candidates[0])
    print(f"\nload: {REQUESTS} streamed requests in {elapsed:.1f}s at concurrency {CONCURRENCY}: "
          f"{counts['complete']} complete, {counts['error']} clean errors "
          f"({counts['status_200'] - counts['complete']} error events, {REQUESTS - counts['status_200']} error "
          f"statuses), {counts['hang']} hangs, {counts['truncated_as_complete']} truncated-as-complete, "
          f"{counts['broken']} broken; fallback rate {fell_back / REQUESTS:.1%} ({fell_back} requests "
          f"with more than one attempt, {by_fallback} served by a model after the chain's first)")
    assert counts["hang"] == 0 and counts["broken"] == 0 and counts["truncated_as_complete"] == 0
    assert counts["complete"] + counts["error"] == REQUESTS
    assert not wrong, wrong[:5]
    assert len(records) == REQUESTS                   # one decision record per request
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/healthz") as health:
            assert health.status == 200
