"""Failover before the first byte and honest endings after it: one test per fault.

Each test runs a real gateway in front of the simulator on 127.0.0.1; the simulated
upstream's model name picks its fault (see proxy.simulator), and `sim.seen` shows what
really reached the upstream, when, and with which body.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from proxy.commands.chaos import read_sse_answer
from proxy.decisions import Decision

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry
from .streams import expected_text, plain_chat, stream_chat

TIMEOUTS = {"connect_s": 1, "first_token_s": 1.5, "idle_s": 1.5, "total_s": 30}   # generous for a busy CI core


def capture(gw: RunningGateway) -> list[Decision]:
    """The decision records of a gateway, as they are finished."""
    records: list[Decision] = []
    gw.gateway.decisions.record = records.append     # type: ignore[method-assign, assignment]
    return records


async def two_step(make_gateway: MakeGateway, primary: str, backup: str = "b-n5", **kw: Any) -> RunningGateway:
    models = {"primary": model_entry(primary), "backup": model_entry(backup)}
    return await make_gateway(models, {"chains": {"main": ["primary", "backup"]}, "default": "main"},
                              timeouts=kw.pop("timeouts", TIMEOUTS), **kw)


async def test_429_retry_after_is_waited_out_then_same_deployment(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-429once-ra0.4-n5")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(5)
    assert r.headers["X-Route-Model"] == "primary" and r.headers["X-Route-Attempts"] == "2"
    seen = fleet.sim.requests_for("p-429once-ra0.4-n5")
    assert len(seen) == 2
    assert seen[1].at - seen[0].at >= 0.4
    assert not fleet.sim.requests_for("b-n5")


async def test_429_persistent_is_bounded_then_next_candidate(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-429-ra0.1-n5")
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
        assert r.complete and r.headers["X-Route-Model"] == "backup"
        assert len(fleet.sim.requests_for("p-429-ra0.1-n5")) == 2        # the try and one retry
        assert r.headers["X-Route-Attempts"] == "3"
        # Within Retry-After the limited deployment gets no traffic at all.
        r2 = await stream_chat(s, gw.base, "main")
    assert r2.complete and r2.headers["X-Route-Model"] == "backup"
    assert len(fleet.sim.requests_for("p-429-ra0.1-n5")) <= 3
    assert [a.failure for a in records[0].attempts] == ["rate_limited", "rate_limited", None]


async def test_429_retry_after_too_long_moves_on_at_once(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-429-ra30-n5")
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "backup"
    assert len(fleet.sim.requests_for("p-429-ra30-n5")) == 1
    assert time.monotonic() - started < 5


async def test_every_candidate_rate_limited_answers_429_with_retry_after(fleet: Fleet,
                                                                         make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-429-ra30-n5", "b-429-ra20-n5")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.status == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.body["error"]["code"] == "rate_limited"


async def test_500_once_is_retried_on_the_same_deployment(fleet: Fleet, make_gateway: MakeGateway) -> None:
    # Two deployments that both fail their first request: the retry must go to the one that failed.
    entry = model_entry("pa-500once-n5")
    entry["deployments"] = [{"provider": "sim-openai", "model": "pa-500once-n5"},
                            {"provider": "sim-openai", "model": "pb-500once-n5"}]
    gw = await make_gateway({"primary": entry, "backup": model_entry("b-n5")},
                            {"chains": {"main": ["primary", "backup"]}, "default": "main"}, timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "primary" and r.headers["X-Route-Attempts"] == "2"
    counts = sorted(len(fleet.sim.requests_for(m)) for m in ("pa-500once-n5", "pb-500once-n5"))
    assert counts == [0, 2]


async def test_500_once_plain_request(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-500once-n5")
    async with aiohttp.ClientSession() as s:
        status, headers, body = await plain_chat(s, gw.base, "main")
    assert status == 200 and body["choices"][0]["message"]["content"] == expected_text(5)
    assert headers["X-Route-Attempts"] == "2" and headers["X-Route-Model"] == "primary"


async def test_503_persistent_moves_to_next_candidate(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-503-n5")
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(5)
    assert r.headers["X-Route-Model"] == "backup" and r.headers["X-Route-Attempts"] == "3"
    assert len(fleet.sim.requests_for("p-503-n5")) == 2
    assert all(c["model"] == "b-n5" for c in r.chunks)          # the body names the model that served
    assert [(a.model, a.failure) for a in records[0].attempts] == [
        ("primary", "overloaded"), ("primary", "overloaded"), ("backup", None)]


async def test_every_attempt_failing_gives_502_listing_them(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-503-n5", "b-500-n5")
    async with aiohttp.ClientSession() as s:
        status, headers, body = await plain_chat(s, gw.base, "main")
    assert status == 502
    assert "primary via sim-openai: overloaded 503" in body["error"]["message"]
    assert "backup via sim-openai: server_error 500" in body["error"]["message"]
    assert "sk-sim" not in body["error"]["message"]
    assert headers["X-Route-Attempts"] == "4"


async def test_reset_before_headers_is_retried_and_answered(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-resetonce-n5")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(5)
    assert r.headers["X-Route-Model"] == "primary" and r.headers["X-Route-Attempts"] == "2"
    assert not fleet.sim.requests_for("b-n5")


async def test_connection_refused_moves_on(fleet: Fleet, make_gateway: MakeGateway, unused_tcp_port: int) -> None:
    dead = {"sim-dead": {"api": "openai", "base_url": f"http://127.0.0.1:{unused_tcp_port}/v1",
                         "api_key_env": "SIM_PROVIDER_KEY", "timeouts": TIMEOUTS}}
    models = {"primary": model_entry("p-n5", provider="sim-dead"), "backup": model_entry("b-n5")}
    gw = await make_gateway(models, {"chains": {"main": ["primary", "backup"]}, "default": "main"},
                            timeouts=TIMEOUTS, providers=dead)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "backup"
    assert [a.failure for a in records[0].attempts] == ["connect", "connect", None]


async def test_silent_upstream_moves_on_after_first_token_s_without_retry(fleet: Fleet,
                                                                         make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-hang")
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    elapsed = time.monotonic() - started
    assert r.complete and r.headers["X-Route-Model"] == "backup" and r.headers["X-Route-Attempts"] == "2"
    assert len(fleet.sim.requests_for("p-hang")) == 1
    assert TIMEOUTS["first_token_s"] <= elapsed < TIMEOUTS["first_token_s"] + 2


async def test_first_token_slower_than_limit_moves_on(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-ttft3000-n5")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "backup"
    seen = fleet.sim.requests_for("p-ttft3000-n5")
    assert len(seen) == 1 and seen[0].disconnected_at is not None      # abandoned, not left running


async def test_inband_error_before_content_fails_over_unseen(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-inband-n5")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(5) and not r.after_end
    assert r.headers["X-Route-Model"] == "backup"
    assert {c["model"] for c in r.chunks} == {"b-n5"}                # nothing of the failed stream leaked
    assert sum(1 for c in r.chunks if c.get("choices") and c["choices"][0]["delta"].get("role")) == 1


async def test_cut_after_content_ends_with_error_event_and_no_done(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-cut3-n8")
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.status == 200 and not r.done and r.error is not None and not r.after_end
    assert r.text == expected_text(3)
    assert r.error["type"] == "upstream_error"
    assert not fleet.sim.requests_for("b-n5")                       # no continuation on this chain
    assert records[0].outcome == "stream_error"


async def test_stall_after_content_ends_within_idle_and_gateway_stays_healthy(fleet: Fleet,
                                                                             make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-stall3-n8")
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        r = await stream_chat(s, gw.base, "main")
        elapsed = time.monotonic() - started
        assert r.status == 200 and not r.done and r.error is not None
        assert r.text == expected_text(3)
        assert elapsed < TIMEOUTS["idle_s"] + 1.5
        stalled = fleet.sim.requests_for("p-stall3-n8")[0]
        for _ in range(50):                 # the upstream notices the closed socket a moment later
            if stalled.disconnected_at is not None:
                break
            await asyncio.sleep(0.02)
        assert stalled.disconnected_at is not None
        healthy = await stream_chat(s, gw.base, "backup")
        async with s.get(gw.url + "/healthz") as h:
            assert h.status == 200
    assert healthy.complete and healthy.text == expected_text(5)


async def test_malformed_event_is_dropped_and_stream_stays_valid(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-garbage-n6")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and not r.malformed and r.text == expected_text(6)
    assert r.headers["X-Route-Model"] == "primary"


async def test_upstream_without_done_is_finalised_promptly_with_usage(fleet: Fleet,
                                                                      make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-nodone-n5")
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main", stream_options={"include_usage": True})
    assert r.complete and r.text == expected_text(5)
    assert r.usage is not None and r.usage["completion_tokens"] == 5
    assert time.monotonic() - started < TIMEOUTS["idle_s"]


def _prefill_of(body: dict[str, Any]) -> str | None:
    last = body["messages"][-1]
    return last["content"] if last["role"] == "assistant" else None


async def test_cut_stream_is_continued_by_a_prefill_model(fleet: Fleet, make_gateway: MakeGateway) -> None:
    caps = ["code", "json", "tools", "vision"]
    # The model without `prefill` comes first: it restarts the answer, differs (tests/test_verify.py),
    # and the prefill model then continues the text the client has.
    models = {"primary": model_entry("p-cut3-n8", capabilities=caps + ["prefill"]),
              "plain": model_entry("q-n8-differ1", capabilities=caps),
              "prefiller": model_entry("c-n8", capabilities=caps + ["prefill"])}
    routes = {"chains": {"main": {"models": ["primary", "plain", "prefiller"], "on_stream_failure": "continue"}},
              "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(8)
    (restarted,) = fleet.sim.requests_for("q-n8-differ1")
    assert _prefill_of(restarted.body) is None                      # never sent a prefill it cannot take
    (continued,) = fleet.sim.requests_for("c-n8")
    assert _prefill_of(continued.body) == expected_text(3)
    assert records[0].served_model == "prefiller"
    assert [a.failure for a in records[0].attempts] == ["protocol", "diverged", None]


async def test_context_length_exceeded_moves_to_a_larger_window(fleet: Fleet, make_gateway: MakeGateway) -> None:
    models = {"small": model_entry("s-ctx", context_window=8000),
              "same": model_entry("t-n5", context_window=8000),
              "large": model_entry("l-n5", context_window=200000)}
    gw = await make_gateway(models, {"chains": {"main": ["small", "same", "large"]}, "default": "main"},
                            timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "large"
    assert len(fleet.sim.requests_for("s-ctx")) == 1
    assert not fleet.sim.requests_for("t-n5")
    assert any(skip["model"] == "same" for skip in records[0].skipped)


async def test_content_policy_returns_the_providers_reason_after_one_attempt(fleet: Fleet,
                                                                             make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-policy")
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.status == 400
    assert r.body["error"]["message"] == "The request was rejected by the content policy"
    assert r.body["error"]["code"] == "content_policy_violation"
    assert r.headers["X-Route-Attempts"] == "1"
    assert len(fleet.sim.requests_for("p-policy")) == 1 and not fleet.sim.requests_for("b-n5")


async def test_content_policy_falls_back_when_the_chain_opts_in(fleet: Fleet, make_gateway: MakeGateway) -> None:
    models = {"primary": model_entry("p-policy"), "backup": model_entry("b-n5")}
    routes = {"chains": {"main": {"models": ["primary", "backup"], "fallback_on_content_policy": True}},
              "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "backup"


async def test_auth_failure_opens_the_breaker_and_moves_on(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-401-n5")
    async with aiohttp.ClientSession() as s:
        first = await stream_chat(s, gw.base, "main")
        second = await stream_chat(s, gw.base, "main")
    assert first.complete and first.headers["X-Route-Attempts"] == "2"
    assert second.complete and second.headers["X-Route-Attempts"] == "1"
    assert len(fleet.sim.requests_for("p-401-n5")) == 1
    assert gw.gateway.state.breaker("primary/sim-openai/0").state == "open"


async def test_retries_never_cost_a_later_candidate_its_attempt(fleet: Fleet, make_gateway: MakeGateway) -> None:
    models = {"a": model_entry("a-503-n5"), "b": model_entry("b-503-n5"), "c": model_entry("c-n5")}
    routes = {"chains": {"main": ["a", "b", "c"]}, "default": "main", "server": {"max_attempts": 4}}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.headers["X-Route-Model"] == "c" and r.headers["X-Route-Attempts"] == "4"
    assert [a.model for a in records[0].attempts] == ["a", "a", "b", "c"]


async def test_client_leaving_mid_stream_releases_the_upstream(fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await two_step(make_gateway, "p-gap100-n30")
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.base}/chat/completions",
                          json={"model": "main", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                          ) as response:
            assert response.status == 200
            await response.content.readany()
            response.close()                        # the client walks away after the first bytes
        seen = fleet.sim.requests_for("p-gap100-n30")[0]
        for _ in range(100):
            if seen.disconnected_at is not None and records:
                break
            await asyncio.sleep(0.02)
    assert seen.disconnected_at is not None and not seen.completed
    assert [r.outcome for r in records] == ["client_disconnected"]
    assert [a.failure for a in records[0].attempts] == ["client_disconnected"]
    assert gw.gateway.load.stats("primary/sim-openai/0").in_flight == 0
    assert gw.gateway.state.breaker("primary/sim-openai/0").state == "closed"


def test_retry_after_forms() -> None:
    from multidict import CIMultiDict

    from proxy.providers import retry_after_s

    assert retry_after_s(CIMultiDict({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    assert retry_after_s(CIMultiDict({"retry-after": "3"})) == 3.0
    assert retry_after_s(CIMultiDict({"Retry-After": "Fri, 27 Nov 2026 10:00:30 GMT"}), now=1795773600.0) == 30.0
    assert retry_after_s(CIMultiDict({"Retry-After": "soon"})) is None
    assert retry_after_s(CIMultiDict()) is None


async def test_a_cut_tool_call_is_never_continued(fleet: Fleet, make_gateway: MakeGateway) -> None:
    caps = ["code", "json", "tools", "vision", "prefill"]
    models = {"primary": model_entry("p-cut2-n8", capabilities=caps),
              "prefiller": model_entry("c-n8", capabilities=caps)}
    routes = {"chains": {"main": {"models": ["primary", "prefiller"], "on_stream_failure": "continue"}},
              "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main", tools=tools)
    assert r.status == 200 and r.error is not None and not r.done
    assert not fleet.sim.requests_for("c-n8")


async def test_continuation_across_protocols(fleet: Fleet, make_gateway: MakeGateway) -> None:
    caps = ["code", "json", "tools", "vision", "prefill"]
    models = {"primary": model_entry("p-cut3-n8", capabilities=caps),
              "claude": model_entry("c-n8", provider="sim-anthropic", capabilities=caps)}
    routes = {"chains": {"main": {"models": ["primary", "claude"], "on_stream_failure": "continue"}},
              "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(8)
    (continued,) = fleet.sim.requests_for("c-n8")
    assert continued.protocol == "anthropic"
    last = continued.body["messages"][-1]
    text = last["content"] if isinstance(last["content"], str) else "".join(p["text"] for p in last["content"])
    assert last["role"] == "assistant" and text.strip() == expected_text(3).strip()


async def test_a_slow_client_is_not_mistaken_for_a_stalled_upstream(fleet: Fleet, make_gateway: MakeGateway) -> None:
    """A reader that keeps taking bytes, however slowly overall, gets the whole answer: each
    write waits for it (up to idle_s), and a wait for the client never counts as a stall of
    the upstream. (One that takes nothing for idle_s is gone: test_hardening.)"""
    gw = await two_step(make_gateway, "p-n20000")
    records = capture(gw)
    pauses = 0
    async with aiohttp.ClientSession(read_bufsize=2**16) as s:
        async with s.post(f"{gw.base}/chat/completions",
                          json={"model": "main", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                          ) as response:
            raw = b""
            while chunk := await response.content.readany():
                raw += chunk
                if len(raw) // (1 << 20) > pauses:          # after each MiB the client looks away
                    pauses += 1
                    await asyncio.sleep(TIMEOUTS["idle_s"] * 0.6)
    r = read_sse_answer(200, {}, raw)
    assert r.complete and r.text == expected_text(20000)
    assert pauses * 0.6 > 1, "the whole read took longer than idle_s"
    assert records[0].outcome == "ok" and len(records[0].attempts) == 1


async def test_a_request_one_protocol_cannot_express_goes_to_a_candidate_that_can(
        fleet: Fleet, make_gateway: MakeGateway) -> None:
    models = {"claude": model_entry("c-n5", provider="sim-anthropic"), "gpt": model_entry("g-n5")}
    routes = {"chains": {"main": ["claude", "gpt"], "only-claude": ["claude"]}, "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        status, headers, body = await plain_chat(s, gw.base, "main", n=2)
        assert status == 200 and headers["X-Route-Model"] == "gpt" and headers["X-Route-Attempts"] == "1"
        status, headers, body = await plain_chat(s, gw.base, "only-claude", n=2)
    assert status == 400 and body["error"]["code"] == "unsupported_parameter" and "n > 1" in body["error"]["message"]
    assert not fleet.sim.requests_for("c-n5")
    assert records[0].skipped[-1]["model"] == "claude" and not records[1].attempts
    assert gw.gateway.load.stats("claude/sim-anthropic/0").in_flight == 0
