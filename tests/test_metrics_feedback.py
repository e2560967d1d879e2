"""GET /metrics parses and moves as requests flow; POST /v1/feedback feeds quality per tier.

Real sockets: the simulator and a real gateway. /metrics is read with prometheus_client's
own parser, so a malformed exposition fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import model_entry
from .decision_log_support import read_lines, settled_records

MESSAGES = [{"role": "user", "content": "hello there"}]


async def scrape(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
                 ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample: (name, sorted labels) -> value."""
    async with session.get(url + "/metrics", headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _gateway_config(log: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    models = {"good": model_entry("good-n4"), "flaky": model_entry("flaky-500"),
              "limited": model_entry("limited-n2", deployments=[{"provider": "sim-openai", "model": "limited-n2",
                                                                 "limits": {"rpm": 100}}])}
    routes = {"chains": {"main": ["good"], "rescue": ["flaky", "good"]}, "default": "main",
              "rules": [{"name": "free-rescue", "when": {"tier": "free"}, "chain": "rescue"}],
              "server": {"decision_log": str(log)}}
    return models, routes


async def test_metrics_parse_and_counters_move(make_gateway, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway(*_gateway_config(log))
    async with aiohttp.ClientSession() as s:
        before = await scrape(s, gw.url)
        assert value(before, "llm_proxy_requests_total", model="good", rule="default", tier="standard",
                     outcome="ok") == 0
        for stream in (False, True, False):
            async with s.post(gw.base + "/chat/completions", json={"model": "auto", "messages": MESSAGES,
                                                                   "stream": stream}) as r:
                assert r.status == 200
                await r.read()
        async with s.post(gw.base + "/chat/completions", json={"model": "auto", "messages": MESSAGES},
                          headers={"X-User-Tier": "free"}) as r:
            assert r.status == 200 and r.headers["X-Route-Attempts"] == "3"     # flaky, flaky again, good
        async with s.post(gw.base + "/chat/completions", json={"model": "limited", "messages": MESSAGES}) as r:
            assert r.status == 200
        async with s.post(gw.base + "/chat/completions", json={"model": "auto", "messages": MESSAGES},
                          headers={"X-User-Tier": "made-up-tier-123"}) as r:
            assert r.status == 200
        async with s.post(gw.base + "/chat/completions", data=b"nope") as r:
            assert r.status == 400
        await gw.gateway.decisions.flush()
        after = await scrape(s, gw.url)
    records = {r["request_id"]: r for r in read_lines(log)}

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("llm_proxy_requests_total", model="good", rule="default", tier="standard", outcome="ok") == 3
    assert moved("llm_proxy_requests_total", model="good", rule="free-rescue", tier="free", outcome="ok") == 1
    assert moved("llm_proxy_requests_total", model="none", rule="none", tier="none", outcome="bad_request") == 1
    # A tier the config does not know is not a label value of its own.
    assert moved("llm_proxy_requests_total", model="good", rule="default", tier="other", outcome="ok") == 1
    assert not any("made-up-tier-123" in str(labels) for _, labels in after)
    assert moved("llm_proxy_attempts_total", model="flaky", provider="sim-openai", result="server_error") == 2
    assert moved("llm_proxy_fallbacks_total", rule="free-rescue", tier="free") == 1
    assert moved("llm_proxy_tokens_total", model="good", tier="standard", kind="output") == 3 * 4
    expected_cost = sum(r["cost_usd"] for r in records.values() if r["tier"] == "standard"
                        and r["served_model"] == "good")
    assert moved("llm_proxy_cost_usd_total", model="good", tier="standard") == pytest.approx(expected_cost)
    assert moved("llm_proxy_ttft_ms_count") == 1                    # one streamed request
    assert moved("llm_proxy_overhead_ms_count") == 6                # every request that reached an upstream
    assert moved("llm_proxy_routing_us_count") == 6
    assert moved("llm_proxy_request_duration_ms_count") == 7
    assert value(after, "llm_proxy_breaker_state", deployment="flaky/sim-openai/0") == 0
    level = value(after, "llm_proxy_bucket_level", scope="deployment", id="limited/sim-openai/0", kind="rpm")
    assert 98 <= level < 100                                        # one of 100 requests a minute spent


async def test_breaker_state_shows_an_open_breaker(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway({"down": model_entry("down-500"), "good": model_entry("good-n2")},
                            {"chains": {"main": ["down", "good"]}, "default": "main"})
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(gw.base + "/chat/completions", json={"model": "auto", "messages": MESSAGES}) as r:
                assert r.status == 200
        samples = await scrape(s, gw.url)
    assert value(samples, "llm_proxy_breaker_state", deployment="down/sim-openai/0") == 2     # open
    assert value(samples, "llm_proxy_breaker_state", deployment="good/sim-openai/0") == 0


async def test_feedback_is_recorded_against_tier_model_and_rule(make_gateway, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway(*_gateway_config(log))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/chat/completions", json={"model": "auto", "messages": MESSAGES},
                          headers={"X-User-Tier": "free", "X-Request-Id": "rated-1"}) as r:
            assert r.status == 200
        for score in (0.25, 1):
            async with s.post(gw.base + "/feedback", json={"request_id": "rated-1", "score": score}) as r:
                assert r.status == 200
                assert await r.json() == {"object": "feedback", "request_id": "rated-1", "score": float(score)}
        samples = await scrape(s, gw.url)
    labels = {"tier": "free", "model": "good", "rule": "free-rescue"}
    assert value(samples, "llm_proxy_quality_score_count", **labels) == 2
    assert value(samples, "llm_proxy_quality_score_sum", **labels) == 1.25
    records = await settled_records(gw.gateway, log, 1)
    assert len(records) == 1                                    # feedback is not a decision record
    feedback = [r for r in read_lines(log) if r.get("type") == "feedback"]
    assert [(f["request_id"], f["score"], f["tier"], f["model"], f["rule"]) for f in feedback] == [
        ("rated-1", 0.25, "free", "good", "free-rescue"), ("rated-1", 1.0, "free", "good", "free-rescue")]


@pytest.mark.parametrize("body, status, param", [
    ({"request_id": "nobody", "score": 0.5}, 404, "request_id"),
    ({"request_id": "known", "score": 1.5}, 400, "score"),
    ({"request_id": "known", "score": -0.1}, 400, "score"),
    ({"request_id": "known", "score": "0.5"}, 400, "score"),
    ({"request_id": "known", "score": True}, 400, "score"),
    ({"request_id": "known"}, 400, "score"),
    ({"score": 0.5}, 400, "request_id"),
    ({"request_id": 7, "score": 0.5}, 400, "request_id"),
    ([1, 2], 400, None),
    (b"{not json", 400, None),
    (b'{"request_id": "known", "score": NaN}', 400, None),
])
async def test_feedback_refuses_bad_input_in_openai_shape(make_gateway, tmp_path: Path, body: Any, status: int,
                                                          param: str | None) -> None:
    gw = await make_gateway({"good": model_entry("good-n2")})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/chat/completions", json={"model": "good", "messages": MESSAGES},
                          headers={"X-Request-Id": "known"}) as r:
            assert r.status == 200
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with s.post(gw.base + "/feedback", **kwargs) as r:
            assert r.status == status
            error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


async def test_feedback_needs_the_key_that_made_the_request(make_gateway, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", "key-a-secret-000")
    monkeypatch.setenv("KEY_B", "key-b-secret-000")
    gw = await make_gateway({"good": model_entry("good-n2")}, {
        "chains": {"main": ["good"]}, "default": "main",
        "keys": [{"name": "a", "key_env": "KEY_A", "tier": "standard", "rpm": 50},
                 {"name": "b", "key_env": "KEY_B", "tier": "standard", "admin": True}]})
    a, b = {"Authorization": "Bearer key-a-secret-000"}, {"Authorization": "Bearer key-b-secret-000"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base + "/chat/completions", json={"model": "good", "messages": MESSAGES},
                          headers={**a, "X-Request-Id": "by-a"}) as r:
            assert r.status == 200
        rating = {"request_id": "by-a", "score": 0.9}
        async with s.post(gw.base + "/feedback", json=rating) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        async with s.post(gw.base + "/feedback", json=rating, headers=b) as r:
            assert r.status == 404                      # another key's request is not even acknowledged
        async with s.post(gw.base + "/feedback", json=rating, headers=a) as r:
            assert r.status == 200
        samples = await scrape(s, gw.url, b)
    assert 48 <= value(samples, "llm_proxy_bucket_level", scope="key", id="a", kind="rpm") < 50
    assert not any("key-a-secret" in str(labels) for _, labels in samples)


async def test_feedback_remembers_a_bounded_number_of_requests(make_gateway, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.state.memory.MEMO_LIMIT", 3)
    gw = await make_gateway({"good": model_entry("good-n1")})
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(gw.base + "/chat/completions", json={"model": "good", "messages": MESSAGES},
                              headers={"X-Request-Id": f"n{i}"}) as r:
                assert r.status == 200
        assert list(gw.gateway.state.memos["served"]) == ["n2", "n3", "n4"]     # type: ignore[attr-defined]
        async with s.post(gw.base + "/feedback", json={"request_id": "n0", "score": 1}) as r:
            assert r.status == 404
        async with s.post(gw.base + "/feedback", json={"request_id": "n4", "score": 1}) as r:
            assert r.status == 200
