"""Failover across wire protocols, and cost from each provider's own usage fields.

Real sockets: the simulator speaks all three protocols, a real gateway sits in front,
and the decision log (a file) is read back to check what each request was billed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.simulator import canonical_text

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry

PRICE = {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75}
ASK = [{"role": "user", "content": "Tell me something about foxes, please."}]


async def sse(gw: RunningGateway, body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, list[str]]:
    """The raw frames of a streamed answer (each `data:` payload, `[DONE]` included)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={**body, "stream": True}) as resp:
            raw = (await resp.read()).decode()
    assert "\r" not in raw
    return resp, [frame[6:] for frame in raw.split("\n\n") if frame]


async def decisions(path: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` decision records, once the background writer has flushed them."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} decision records in {path}")


def chain_of(*steps: tuple[str, str]) -> dict[str, Any]:
    """Models `s0`, `s1`, ... each served by (protocol, simulator model name), in one chain."""
    return {f"s{i}": model_entry(upstream, f"sim-{protocol}", price=PRICE)
            for i, (protocol, upstream) in enumerate(steps)}


def assert_one_clean_stream(frames: list[str], text: str) -> None:
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("error" not in c for c in chunks)
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1 and roles[0] is chunks[0]
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


@pytest.mark.parametrize("fault, fallback", [
    ("529", "gemini"),          # overloaded status before any byte
    ("inband", "openai"),       # message_start, then `event: error` overloaded_error before content
    ("inband", "gemini"),
])
async def test_anthropic_overload_is_answered_by_another_protocol(make_gateway: MakeGateway, fleet: Fleet,
                                                                  fault: str, fallback: str) -> None:
    gw = await make_gateway(chain_of(("anthropic", f"claude-{fault}"), (fallback, "backup-n5")))
    resp, frames = await sse(gw, {"model": "main", "messages": ASK})
    assert resp.status == 200
    assert resp.headers["X-Route-Provider"] == f"sim-{fallback}"
    assert_one_clean_stream(frames, "".join(canonical_text(5)))
    assert json.loads(frames[0])["model"] == "backup-n5"
    tried = fleet.sim.requests_for(f"claude-{fault}")
    assert tried and all(s.protocol == "anthropic" for s in tried)


async def test_gemini_unavailable_fails_over_to_anthropic_non_stream(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(chain_of(("gemini", "gem-503"), ("anthropic", "claude-n4")))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={"model": "main", "messages": ASK}) as resp:
            body = await resp.json()
    assert resp.status == 200 and resp.headers["X-Route-Provider"] == "sim-anthropic"
    assert body["model"] == "claude-n4"
    assert body["choices"][0]["message"]["content"] == "".join(canonical_text(4))


@pytest.mark.parametrize("protocol", ["anthropic", "gemini"])
async def test_a_cut_after_content_ends_with_an_error_event(make_gateway: MakeGateway, protocol: str) -> None:
    gw = await make_gateway(chain_of((protocol, "m-cut2-n6")))
    _, frames = await sse(gw, {"model": "main", "messages": ASK})
    assert "[DONE]" not in frames
    assert "error" in json.loads(frames[-1])
    assert "".join(json.loads(f)["choices"][0]["delta"].get("content") or ""
                   for f in frames[:-1]) == "".join(canonical_text(2))


async def test_anthropic_without_message_stop_is_finalised(make_gateway: MakeGateway) -> None:
    """`nodone`: message_delta said end_turn but message_stop never came; the socket closed."""
    gw = await make_gateway(chain_of(("anthropic", "claude-nodone-n3")))
    _, frames = await sse(gw, {"model": "main", "messages": ASK})
    assert_one_clean_stream(frames, "".join(canonical_text(3)))


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_cost_from_each_providers_usage_with_cached_tokens(make_gateway: MakeGateway, tmp_path: Path,
                                                                 protocol: str) -> None:
    log = tmp_path / f"decisions-{protocol}.jsonl"
    models = chain_of((protocol, "m-cache7-n9"))
    gw = await make_gateway(models, {"chains": {"main": list(models)}, "default": "main",
                                     "server": {"decision_log": str(log)}})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={"model": "main", "messages": ASK}) as resp:
            plain = await resp.json()
    _, frames = await sse(gw, {"model": "main", "messages": ASK, "stream_options": {"include_usage": True}})
    streamed_usage = json.loads(frames[-2])["usage"]
    assert streamed_usage == plain["usage"]
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 7
    assert plain["usage"]["completion_tokens"] == 9

    # The simulator counts a quarter token per prompt character plus the cached ones, in every protocol.
    prompt = len(ASK[0]["content"]) // 4 + 7
    assert plain["usage"]["prompt_tokens"] == prompt
    records = await decisions(log, 2)
    assert [r["stream"] for r in records] == [False, True]
    expected = ((prompt - 7) * PRICE["input"] + 7 * PRICE["cached_input"] + 9 * PRICE["output"]) / 1e6
    for record in records:
        assert record["input_tokens"] == prompt and record["cached_input_tokens"] == 7
        assert record["output_tokens"] == 9 and record["cache_write_tokens"] == 0
        assert record["cost_usd"] == pytest.approx(expected, rel=1e-9)
        assert record["attempts"][-1]["cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert records[0]["cost_usd"] == records[1]["cost_usd"]


@pytest.mark.parametrize("protocol", ["anthropic", "gemini"])
async def test_what_a_protocol_cannot_express_is_a_400_naming_it(make_gateway: MakeGateway, fleet: Fleet,
                                                                 protocol: str) -> None:
    gw = await make_gateway(chain_of((protocol, "m-n3")))
    audio = [{"role": "user", "content": [{"type": "input_audio",
                                           "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={"model": "main", "messages": audio}) as resp:
            body = await resp.json()
    assert resp.status == 400 and "input_audio" in body["error"]["message"]
    assert not fleet.sim.requests_for("m-n3")                   # refused before anything was sent
