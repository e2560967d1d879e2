"""`/v1/messages` and `/v1/messages/count_tokens` with the official `anthropic` SDK, against
all three upstream protocols on the simulator: an Anthropic deployment passes the client's
bytes through, OpenAI and Gemini deployments are translated both ways, and the client
cannot tell them apart except by `model`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pydantic
import pytest

from proxy.simulator import canonical_text
from proxy.sse import SSEParser

from .conftest import FAST_TIMEOUTS, Fleet, MakeGateway, RunningGateway, model_entry
from .decision_log_support import settled_records

PROTOCOLS = ("anthropic", "openai", "gemini")
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"location": {"type": "string"},
                                                             "unit": {"type": "string"}}, "required": ["location"]}}
SIM_INPUT = {"location": "Paris", "unit": "c"}          # what every simulated tool call sends
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Client = Callable[[RunningGateway], anthropic.AsyncAnthropic]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    made: list[anthropic.AsyncAnthropic] = []

    def make(gw: RunningGateway, **kw: Any) -> anthropic.AsyncAnthropic:
        made.append(anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0, **kw))
        return made[-1]

    yield make
    for c in made:
        await c.close()


async def gateway(make_gateway: MakeGateway, protocol: str, *upstreams: str, tmp_path: Path | None = None,
                  **routes: Any) -> RunningGateway:
    models = {f"m{i}": model_entry(name, f"sim-{protocol}") for i, name in enumerate(upstreams)}
    config: dict[str, Any] = {"chains": {"main": list(models)}, "default": "main", **routes}
    if tmp_path is not None:
        config["server"] = {"decision_log": str(tmp_path / "decisions.jsonl")}
    return await make_gateway(models, config)


# ---------------------------------------------------------------------------- done-when 1: the SDK


async def test_text_create_and_stream_agree(client: Client, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n5")
    api = client(gw)
    plain = await api.messages.create(model="m0", max_tokens=64, system="Be brief.", messages=ASK)
    assert plain.type == "message" and plain.role == "assistant" and plain.id.startswith("msg_")
    assert plain.model == "chat-n5" and plain.stop_reason == "end_turn"
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == "".join(canonical_text(5))
    assert plain.usage.output_tokens == 5 and plain.usage.input_tokens > 0
    async with api.messages.stream(model="m0", max_tokens=64, system="Be brief.", messages=ASK) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == plain.content[0].text
    assert final.model_dump(exclude={"id"}) == plain.model_dump(exclude={"id"})


async def test_message_start_carries_an_input_count_on_every_protocol(client: Client, make_gateway: MakeGateway,
                                                                      protocol: str) -> None:
    """A context-size display reads `message_start`: a translated stream, whose upstream counts
    only at the end, gives the router's estimate there rather than 0."""
    gw = await gateway(make_gateway, protocol, "chat-n3")
    async with client(gw).messages.stream(model="m0", max_tokens=64, messages=ASK) as stream:
        events = [event async for event in stream]
    [start] = [e for e in events if e.type == "message_start"]
    assert start.message.usage.input_tokens > 0


async def test_an_upstream_without_usage_gives_the_billed_estimate_plain_or_streamed(
        client: Client, make_gateway: MakeGateway) -> None:
    """An OpenAI-compatible vendor that reports no usage: a plain answer carries the same
    estimate as a stream's `message_delta` (what the decision record bills), not zeros."""
    gw = await gateway(make_gateway, "openai", "quiet-n8-nousage")
    api = client(gw)
    plain = await api.messages.create(model="m0", max_tokens=64, messages=ASK)
    async with api.messages.stream(model="m0", max_tokens=64, messages=ASK) as stream:
        final = await stream.get_final_message()
    assert plain.content[0].text == final.content[0].text == "".join(canonical_text(8))     # type: ignore[union-attr]
    assert plain.usage.input_tokens == final.usage.input_tokens > 0
    assert plain.usage.output_tokens == final.usage.output_tokens == (len(plain.content[0].text) + 3) // 4  # type: ignore[union-attr]


async def test_a_tool_turn_streams_input_json_and_the_result_gets_text(client: Client, make_gateway: MakeGateway,
                                                                       protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "tools")
    api = client(gw)
    fragments: list[str] = []
    async with api.messages.stream(model="m0", max_tokens=64, tools=[WEATHER], messages=ASK) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                fragments.append(event.delta.partial_json)
        final = await stream.get_final_message()
    assert fragments and json.loads("".join(fragments)) == SIM_INPUT
    assert final.stop_reason == "tool_use"
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == SIM_INPUT and call.id.startswith("toolu_")
    plain = await api.messages.create(model="m0", max_tokens=64, tools=[WEATHER], messages=ASK)
    assert plain.stop_reason == "tool_use" and plain.content[-1].input == SIM_INPUT  # type: ignore[union-attr]
    # The tool's result goes back (the id the client got maps to the upstream's own call again).
    follow = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}]
    answer = await api.messages.create(model="m0", max_tokens=64, tools=[WEATHER], messages=follow)
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    forced = await api.messages.create(model="m0", max_tokens=64, tools=[WEATHER], messages=follow,
                                       tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use"


class Answer(pydantic.BaseModel):
    answer: str


async def test_structured_output_reaches_every_protocol(client: Client, make_gateway: MakeGateway, fleet: Fleet,
                                                        protocol: str) -> None:
    """`messages.parse` (and the Vercel AI SDK's `generateObject`) send `output_config.format`, a
    JSON schema: a chat deployment gets it as `response_format`, not dropped, so the answer parses."""
    gw = await gateway(make_gateway, protocol, "json-n4")
    parsed = await client(gw).messages.parse(model="m0", max_tokens=64, messages=ASK, output_format=Answer)
    assert parsed.parsed_output == Answer(answer="The quick brown fox")
    sent = fleet.sim.requests_for("json-n4")[-1].body
    if protocol == "openai":
        assert sent["response_format"]["type"] == "json_schema"
        assert list(sent["response_format"]["json_schema"]["schema"]["properties"]) == ["answer"]
    elif protocol == "gemini":
        assert sent["generationConfig"]["responseMimeType"] == "application/json"
    else:                                   # the client's own bytes: Claude enforces the schema itself
        assert sent["output_config"]["format"]["type"] == "json_schema"


async def test_stop_reasons_and_usage(client: Client, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n10-cache3")
    api = client(gw)
    short = await api.messages.create(model="m0", max_tokens=2, messages=ASK)
    assert short.stop_reason == "max_tokens" and short.content[0].text == "".join(canonical_text(2))
    assert short.usage.output_tokens == 2 and short.usage.cache_read_input_tokens == 3
    async with api.messages.stream(model="m0", max_tokens=2, messages=ASK) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == \
        (short.usage.input_tokens, 2, 3)
    stopped = await api.messages.create(model="m0", max_tokens=64, messages=ASK, stop_sequences=["fox"])
    assert stopped.content[0].text == "The quick brown "
    # Only Anthropic says which stop sequence ended the text; chat protocols report end_turn.
    assert (stopped.stop_reason, stopped.stop_sequence) == \
        (("stop_sequence", "fox") if protocol == "anthropic" else ("end_turn", None))


async def test_count_tokens(client: Client, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n3")
    api = client(gw)
    ask = [{"role": "user", "content": "Tell me about the weather in Paris tomorrow."}]
    counted = await api.messages.with_raw_response.count_tokens(model="m0", system="Be brief.", messages=ask,
                                                                tools=[WEATHER])
    tokens = (await counted.parse()).input_tokens
    bare = await api.messages.count_tokens(model="m0", messages=ask)
    if protocol == "openai":                # no counting endpoint: the gateway's estimate, marked
        assert counted.headers["X-Token-Count-Source"] == "estimate"
        assert tokens > bare.input_tokens + 20          # the system prompt and the tool schema count
    else:                                   # the provider's own count: what its usage reports
        assert counted.headers["X-Token-Count-Source"] == "provider"
        served = await api.messages.create(model="m0", max_tokens=8, system="Be brief.", messages=ask)
        assert tokens == served.usage.input_tokens


async def test_a_providers_query_goes_on_every_url_native_translated_and_counted(
        client: Client, make_gateway: MakeGateway, fleet: Fleet) -> None:
    """`query:` in providers.yaml is added to every URL (an `api-version`, say): also to a
    Messages client's own bytes sent to Anthropic, and to both protocols' token counts."""
    providers = {f"sim-{api}": {"api": api, "base_url": fleet.url(api), "api_key_env": "SIM_PROVIDER_KEY",
                                "timeouts": FAST_TIMEOUTS, "query": {"api-version": "2025-01-01"}}
                 for api in ("anthropic", "gemini")}
    gw = await make_gateway({"claude": model_entry("q-claude-n3", "sim-anthropic"),
                             "gem": model_entry("q-gem-n3", "sim-gemini")},
                            {"chains": {"main": ["claude"]}, "default": "main"}, providers=providers)
    api = client(gw)
    for model in ("claude", "gem"):
        await api.messages.create(model=model, max_tokens=8, messages=ASK)        # native to Claude
        counted = await api.messages.with_raw_response.count_tokens(model=model, messages=ASK)
        assert counted.headers["X-Token-Count-Source"] == "provider"
    async with aiohttp.ClientSession() as session, session.post(        # chat, translated to Anthropic
            gw.base + "/chat/completions", json={"model": "claude", "messages": ASK}) as response:
        assert response.status == 200
    seen = [(s.path.rsplit("/", 1)[-1], s.query) for s in fleet.sim.seen]
    assert seen == [("messages", "api-version=2025-01-01"), ("count_tokens", "api-version=2025-01-01"),
                    ("q-gem-n3:generateContent", "api-version=2025-01-01"),
                    ("q-gem-n3:countTokens", "api-version=2025-01-01"), ("messages", "api-version=2025-01-01")]


async def test_a_refused_count_costs_the_key_nothing(make_gateway: MakeGateway,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As on every other path, a key's rpm pays only for requests it may make: a count the key
    is not allowed (403) or that is malformed (400) leaves its one request a minute."""
    monkeypatch.setenv("COUNT_KEY", KEY)
    gw = await make_gateway({"gpt": model_entry("c-n3"), "claude": model_entry("c-n3", "sim-anthropic")}, {
        "chains": {"main": ["gpt"]}, "default": "main",
        "keys": [{"name": "counter", "key_env": "COUNT_KEY", "tier": "standard", "allow": ["gpt"], "rpm": 1}]})
    api = anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        await api.messages.count_tokens(model="claude", messages=ASK)       # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        await api.messages.count_tokens(model="gpt", messages=[])
    assert (await api.messages.count_tokens(model="gpt", messages=ASK)).input_tokens > 0    # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):                           # the one was spent there
        await api.messages.count_tokens(model="gpt", messages=ASK)          # type: ignore[arg-type]
    await api.close()


async def test_a_client_that_leaves_a_count_is_recorded_as_gone(make_gateway: MakeGateway, tmp_path: Path) -> None:
    """Every request leaves one true record: a count the client gave up on while the provider
    was counting is `client_disconnected`, not `ok`."""
    gw = await make_gateway({"claude": model_entry("count-ttft2000", "sim-anthropic")},
                            {"chains": {"main": ["claude"]}, "default": "main",
                             "server": {"decision_log": str(tmp_path / "decisions.jsonl")}})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(TimeoutError):
            await session.post(gw.url + "/v1/messages/count_tokens", json={"model": "claude", "messages": ASK})
    [record] = await settled_records(gw.gateway, tmp_path / "decisions.jsonl", 1)
    assert (record["api"], record["outcome"], record["status"]) == ("messages.count_tokens", "client_disconnected",
                                                                    499)


# ---------------------------------------------------------------------------- done-when 2: bytes


async def test_an_anthropic_deployment_gets_the_clients_bytes_and_the_client_gets_its_answer(
        make_gateway: MakeGateway, fleet: Fleet) -> None:
    gw = await make_gateway({"claude": model_entry("claude-n4", "sim-anthropic")},
                            {"chains": {"main": ["claude"]}, "default": "main",
                             "aliases": {"claude-opus-5-5": "main"}})
    thinking = {"type": "thinking", "thinking": "The user wants \u00e9t\u00e9 data.",
                "signature": "ErUBCkYIBxgCIkB+/sig=="}
    for stream in (False, True):
        # Odd spacing, escapes and key order on purpose: only `model` may change on the way up.
        raw = (b'{"max_tokens": 64 ,"messages":[{"role":"user","content":[{"type":"text","text":"Hi \\u00e9",'
               b'"cache_control":{"type":"ephemeral"}}]},{"role":"assistant","content":['
               + orjson.dumps(thinking) + b',{"type":"text","text":"Hello."}]},{"role":"user","content":"More"}],'
               b'\n  "model" : "claude-opus-5-5", "thinking": {"type": "enabled", "budget_tokens": 1024},'
               b' "metadata": {"user_id": "u-1"}, "stream": ' + (b"true" if stream else b"false") + b"}")
        headers = {"Content-Type": "application/json", "x-api-key": "unused", "anthropic-version": "2023-06-01",
                   "anthropic-beta": "interleaved-thinking-2025-05-14,context-management-2025-06-27",
                   "x-claude-code-session-id": "s-1"}
        async with aiohttp.ClientSession() as session, \
                session.post(gw.url + "/v1/messages?beta=true", data=raw, headers=headers) as response:
            assert response.status == 200
            answer = await response.read()
        seen = fleet.sim.requests_for("claude-n4")[-1]
        assert seen.raw == raw.replace(b'"claude-opus-5-5"', b'"claude-n4"')
        assert seen.headers["anthropic-beta"] == headers["anthropic-beta"]
        assert seen.headers["anthropic-version"] == "2023-06-01"
        assert answer == bytes(seen.answer) and answer     # the upstream's own bytes, to the byte


async def test_the_operators_betas_and_the_clients_both_reach_an_anthropic_deployment(
        make_gateway: MakeGateway, fleet: Fleet) -> None:
    """A beta the operator turns on in providers.yaml is not lost when Claude Code sends its
    own list; the client's anthropic-version wins, since its body is written for it."""
    operator = {"api": "anthropic", "base_url": fleet.url("anthropic"), "api_key_env": "SIM_PROVIDER_KEY",
                "headers": {"anthropic-beta": "operator-beta-1, shared-beta", "anthropic-version": "2099-01-01"}}
    gw = await make_gateway({"claude": model_entry("betas-n2", "ops-anthropic")},
                            {"chains": {"main": ["claude"]}, "default": "main"}, providers={"ops-anthropic": operator})
    headers = {"x-api-key": "unused", "anthropic-version": "2023-06-01", "anthropic-beta": "shared-beta,client-beta"}
    body = {"model": "claude", "max_tokens": 16, "messages": ASK}
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            async with session.post(gw.url + "/v1/messages", json={**body, "stream": stream},
                                    headers=headers) as response:
                assert response.status == 200
                await response.read()
            seen = fleet.sim.requests_for("betas-n2")[-1]
            assert seen.headers["anthropic-beta"] == "operator-beta-1,shared-beta,client-beta"
            assert seen.headers["anthropic-version"] == "2023-06-01"


async def test_translated_requests_drop_what_chat_cannot_say_and_the_record_says_so(
        client: Client, make_gateway: MakeGateway, fleet: Fleet, tmp_path: Path) -> None:
    models = {"gpt": model_entry("gpt-n3", "sim-openai"), "claude": model_entry("cl-n3", "sim-anthropic")}
    gw = await make_gateway(models,
                            {"chains": {"main": ["gpt"], "doc": ["gpt", "claude"]}, "default": "main",
                             "server": {"decision_log": str(tmp_path / "decisions.jsonl")}})
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "hm", "signature": "sig=="}, {"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?", "cache_control": {"type": "ephemeral"}}]}]
    api = client(gw)
    answer = await api.messages.create(model="gpt", max_tokens=64, messages=history, metadata={"user_id": "u"},
                                       thinking={"type": "enabled", "budget_tokens": 1024})
    assert answer.content[0].type == "text"
    sent = fleet.sim.requests_for("gpt-n3")[-1].body
    assert sent["messages"][1] == {"role": "assistant", "content": "Sunny."}    # no thinking block went there
    assert "thinking" not in sent and "metadata" not in sent
    # A document no chat protocol can carry: the OpenAI deployment is skipped, Claude serves.
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
    served = await api.messages.with_raw_response.create(
        model="doc", max_tokens=64, messages=[{"role": "user", "content": [document, {"type": "text", "text": "?"}]}])
    assert served.headers["X-Route-Model"] == "claude"
    alone = await api.messages.with_raw_response.create(model="doc", max_tokens=64,     # nothing chat can carry
                                                        messages=[{"role": "user", "content": [document]}])
    assert alone.headers["X-Route-Model"] == "claude"
    records = await settled_records(gw.gateway, tmp_path / "decisions.jsonl", 3)
    first, second, _ = records
    assert first["api"] == "messages"
    assert first["attempts"][0]["dropped"] == ["thinking blocks signed by anthropic", "cache_control", "metadata",
                                               "thinking"]
    assert second["skipped"][0]["model"] == "gpt" and "document" in second["skipped"][0]["reason"]
    assert second["attempts"][0]["dropped"] is None         # the native request left nothing out


# ---------------------------------------------------------------------------- done-when 3: failures


async def raw_stream(gw: RunningGateway, model: str) -> tuple[aiohttp.ClientResponse, list[Any]]:
    body = {"model": model, "max_tokens": 64, "stream": True, "messages": ASK}
    async with aiohttp.ClientSession() as session, \
            session.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": "unused"}) as response:
        return response, SSEParser().feed(await response.read())


async def test_failover_before_content_is_invisible(make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "pre-500", "pre-inband", "pre-n3")
    response, events = await raw_stream(gw, "main")
    assert response.status == 200 and response.headers["X-Route-Model"] == "m2"
    names = [e.name for e in events]
    assert names.count("message_start") == 1 and names[0] == "message_start" and names[-1] == "message_stop"
    assert "error" not in names
    text = "".join(json.loads(e.data)["delta"].get("text", "") for e in events if e.name == "content_block_delta")
    assert text == "".join(canonical_text(3))


async def test_a_cut_after_content_ends_with_an_error_event_and_no_message_stop(make_gateway: MakeGateway,
                                                                                protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "mid-n8-cut3", "mid-n3")
    response, events = await raw_stream(gw, "main")
    names = [e.name for e in events]
    assert response.status == 200 and names[0] == "message_start"
    assert names[-1] == "error" and "message_stop" not in names
    error = json.loads(events[-1].data)
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "upstream stream failed" in error["error"]["message"]


# ---------------------------------------------------------------------------- done-when 4: bad input, keys

KEY = "gw-messages-0123456789"


@pytest.fixture
async def keyed(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunningGateway:
    monkeypatch.setenv("MESSAGES_KEY", KEY)
    monkeypatch.setenv("OTHER_KEY", KEY + "-other")
    models = {"claude": model_entry("ok-n3", "sim-anthropic"), "gpt": model_entry("ok-n3", "sim-openai"),
              "down": model_entry("down-500", "sim-openai"), "slow": model_entry("slow-ttft3000", "sim-openai"),
              "busy": model_entry("busy-429-ra30", "sim-anthropic")}
    return await make_gateway(models, {
        "chains": {"main": ["claude", "gpt"], "broken": ["down"], "stalled": ["slow"], "limited": ["busy"]},
        "default": "main",
        "keys": [{"name": "coder", "key_env": "MESSAGES_KEY", "tier": "standard", "rpm": 30},
                 {"name": "narrow", "key_env": "OTHER_KEY", "tier": "standard", "allow": ["gpt"]}],
        "server": {"max_body_bytes": 4096, "decision_log": str(tmp_path / "decisions.jsonl")}})


GOOD = {"model": "main", "max_tokens": 16, "messages": ASK}
COUNT = {"model": "main", "messages": ASK}


@pytest.mark.parametrize("path, headers, body, status, kind", [
    ("/v1/messages", {}, GOOD, 401, "authentication_error"),
    ("/v1/messages", {"x-api-key": "gw-wrong"}, GOOD, 401, "authentication_error"),
    ("/v1/messages/count_tokens", {}, GOOD, 401, "authentication_error"),
    ("/v1/messages", {"x-api-key": KEY}, b"{not json", 400, "invalid_request_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "max_tokens": None}, 400, "invalid_request_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "messages": [{"role": "system", "content": "x"}]}, 400,
     "invalid_request_error"),
    ("/v1/messages", {"Authorization": f"Bearer {KEY}"}, {**GOOD, "model": "nope"}, 404, "not_found_error"),
    ("/v1/messages/count_tokens", {"x-api-key": KEY}, {"model": "nope", "messages": ASK}, 404, "not_found_error"),
    ("/v1/messages/count_tokens", {"x-api-key": "gw-wrong"}, COUNT, 401, "authentication_error"),
    ("/v1/messages/count_tokens", {"x-api-key": KEY}, b'{"model": "main", "messages": [', 400,
     "invalid_request_error"),
    ("/v1/messages/count_tokens", {"x-api-key": KEY}, {**COUNT, "messages": "hi"}, 400, "invalid_request_error"),
    ("/v1/messages/count_tokens", {"x-api-key": KEY + "-other"}, COUNT, 403, "permission_error"),
    ("/v1/messages/count_tokens", {"x-api-key": KEY}, {**COUNT, "system": "x" * 5000}, 413, "request_too_large"),
    ("/v1/messages", {"x-api-key": KEY + "-other"}, GOOD, 403, "permission_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "output_config": {"format": {"type": "json"}}}, 400,
     "invalid_request_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "system": "x" * 5000}, 413, "request_too_large"),
    ("/v1/messages/batches", {"x-api-key": KEY}, GOOD, 404, "not_found_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "model": "broken"}, 502, "api_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "model": "limited"}, 429, "rate_limit_error"),
    ("/v1/messages", {"x-api-key": KEY}, {**GOOD, "model": "stalled", "stream": True}, 504, "timeout_error"),
])
async def test_errors_in_anthropics_shape(keyed: RunningGateway, path: str, headers: dict[str, str], body: Any,
                                          status: int, kind: str) -> None:
    data = body if isinstance(body, bytes) else orjson.dumps({k: v for k, v in body.items() if v is not None})
    async with aiohttp.ClientSession() as session, \
            session.post(keyed.url + path, data=data, headers={"Content-Type": "application/json", **headers}
                         ) as response:
        answer = await response.json(content_type=None)
    assert response.status == status
    if status == 429:
        assert int(response.headers["Retry-After"]) > 0
    assert answer["type"] == "error" and answer["error"]["type"] == kind and answer["error"]["message"]
    assert set(answer) <= {"type", "error", "request_id"}
    assert KEY not in json.dumps(answer)


async def test_keys_as_x_api_key_or_bearer_and_the_sdks_own_errors(keyed: RunningGateway) -> None:
    # The key as `x-api-key` explicitly: this SDK's `api_key` goes as a Bearer token, older ones'
    # (and Claude Code's ANTHROPIC_API_KEY) as x-api-key.
    for api in (anthropic.AsyncAnthropic(base_url=keyed.url, api_key=None, default_headers={"x-api-key": KEY},
                                         max_retries=0),
                anthropic.AsyncAnthropic(base_url=keyed.url, auth_token=KEY, max_retries=0)):
        answer = await api.messages.create(model="claude", max_tokens=16, messages=ASK)
        assert answer.content[0].text == "".join(canonical_text(3))
        with pytest.raises(anthropic.NotFoundError):
            await api.messages.create(model="nope", max_tokens=16, messages=ASK)
        await api.close()
    api = anthropic.AsyncAnthropic(base_url=keyed.url, api_key="gw-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await api.messages.create(model="claude", max_tokens=16, messages=ASK)
    assert caught.value.body["error"]["type"] == "authentication_error"   # type: ignore[index]
    await api.close()
    records = await settled_records(keyed.gateway, Path(keyed.gateway.decisions.destination), 5)
    assert [r["api"] for r in records] == ["messages"] * 5


async def test_what_claude_code_sends_is_accepted_on_every_protocol(client: Client, make_gateway: MakeGateway,
                                                                    protocol: str, fleet: Fleet) -> None:
    """The beta client with Claude Code's shape: ?beta=true, a list of betas, thinking,
    context_management, metadata, a dozen tools, a signed thinking block and a tool loop in
    the history, its session header; streamed."""
    gw = await gateway(make_gateway, protocol, "cc-n4", aliases={"claude-opus-5-5": "main"})
    tools = [{"name": f"Tool{i}", "description": f"tool {i}", "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["path"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}
        for i in range(12)]
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Read it.", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Use Tool0.", "signature": "Eq0Bsig=="},
                                          {"type": "tool_use", "id": "toolu_01X", "name": "Tool0",
                                           "input": {"path": "a.py"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01X", "content": "print(1)"}]}]
    api = client(gw)
    async with api.beta.messages.stream(
            model="claude-opus-5-5", max_tokens=2048, messages=history, tools=tools,  # type: ignore[arg-type]
            system=[{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "user_abc_session_1"},
            context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
            betas=["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27"],
            extra_headers={"x-claude-code-session-id": "5f1c"}) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert final.content[-1].text == "".join(canonical_text(4))  # type: ignore[union-attr]
    seen = fleet.sim.requests_for("cc-n4")[-1]
    if protocol == "anthropic":
        assert seen.body["context_management"] and seen.body["thinking"] and len(seen.body["tools"]) == 12
        assert "context-management-2025-06-27" in seen.headers["anthropic-beta"]
    else:
        assert "thinking" not in orjson.dumps(seen.body).decode()
