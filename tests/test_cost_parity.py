"""The same simulated usage costs the same streamed and not, for every registered protocol.

The cost comes from the provider's own usage (with cached input at its own price), never
from an estimate, and it matches the usage the client was shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.providers import registry
from proxy.simulator import canonical_text

from .conftest import model_entry
from .decision_log_support import settled_records

PRICE = {"input": 3.0, "output": 15.0, "cached_input": 0.3}


def _cost(usage: dict[str, Any]) -> float:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return ((usage["prompt_tokens"] - cached) * PRICE["input"] + cached * PRICE["cached_input"]
            + usage["completion_tokens"] * PRICE["output"]) / 1e6


def _stream_usage(text: str) -> dict[str, Any]:
    """The usage object of the last chunk that carried one."""
    usage = None
    for line in text.splitlines():
        if line.startswith("data: {"):
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
    assert usage is not None, text
    return usage


@pytest.mark.parametrize("protocol", sorted(registry()))
async def test_streamed_and_plain_requests_cost_the_same(make_gateway, tmp_path: Path, protocol: str) -> None:
    log = tmp_path / "decisions.jsonl"
    models = {"m": model_entry("parity-n9-cache4", provider=f"sim-{protocol}", price=PRICE)}
    gw = await make_gateway(models, {"chains": {"main": ["m"]}, "default": "main",
                                     "server": {"decision_log": str(log)}})
    body = {"model": "m", "messages": [{"role": "user", "content": "Price this answer for me, please."}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/chat/completions", json=body, headers={"X-Request-Id": "plain"}) as r:
            assert r.status == 200
            shown_plain = (await r.json())["usage"]
        async with s.post(gw.base + "/chat/completions", headers={"X-Request-Id": "stream"},
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200
            shown_stream = _stream_usage(await r.text())
    by_id = {r["request_id"]: r for r in await settled_records(gw.gateway, log, 2)}
    plain, stream = by_id["plain"], by_id["stream"]

    assert shown_plain["prompt_tokens_details"]["cached_tokens"] == 4       # cached input is in play
    assert shown_plain["completion_tokens"] == 9
    for record, shown in ((plain, shown_plain), (stream, shown_stream)):
        assert not record["cost_estimated"]
        assert record["cost_usd"] == pytest.approx(_cost(shown), rel=1e-9)
        assert (record["input_tokens"], record["cached_input_tokens"], record["output_tokens"]) == (
            shown["prompt_tokens"], shown["prompt_tokens_details"]["cached_tokens"], shown["completion_tokens"])
    assert plain["cost_usd"] == stream["cost_usd"] > 0


@pytest.mark.parametrize("protocol", sorted(registry()))
async def test_a_stream_cut_after_content_is_billed_for_what_arrived(make_gateway, tmp_path: Path,
                                                                     protocol: str) -> None:
    log = tmp_path / "decisions.jsonl"
    models = {"m": model_entry("parity-n9-cut3", provider=f"sim-{protocol}", price=PRICE)}
    gw = await make_gateway(models, {"chains": {"main": ["m"]}, "default": "main",
                                     "server": {"decision_log": str(log)}})
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "Price a broken answer."}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/chat/completions", json=body) as r:
            assert r.status == 200
            assert '"error"' in await r.text()
    [record] = await settled_records(gw.gateway, log, 1)
    [attempt] = record["attempts"]
    arrived = len("".join(canonical_text(3)))
    assert record["outcome"] == "stream_error" and attempt["wasted"] and record["cost_estimated"]
    assert attempt["output_tokens"] == (arrived + 3) // 4
    assert attempt["input_tokens"] > 0
    assert record["cost_usd"] == record["wasted_cost_usd"] == pytest.approx(
        (attempt["input_tokens"] * PRICE["input"] + attempt["output_tokens"] * PRICE["output"]) / 1e6)
