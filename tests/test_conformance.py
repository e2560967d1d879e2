"""One conformance suite, run against each wire protocol through a real gateway.

The official `openai` SDK talks to the gateway, which talks to the simulator speaking
OpenAI, Anthropic Messages or Gemini. Every test asserts what the client sees, and the
client must not be able to tell the protocols apart except by the `model` field.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from openai import APIStatusError, AsyncOpenAI

from proxy.simulator import canonical_text

from .conftest import MakeGateway, RunningGateway, model_entry

PROTOCOLS = ("openai", "anthropic", "gemini")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["location"], "additionalProperties": False}}}
SIM_ARGUMENTS = '{"location": "Paris", "unit": "c"}'        # the pieces every simulated tool call streams
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something please."}]


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def gateway(make_gateway: MakeGateway, protocol: str, *upstreams: str, **kw: Any) -> RunningGateway:
    """A gateway whose chain `main` is the given simulator models, all on `protocol`."""
    models = {f"m{i}": model_entry(name, f"sim-{protocol}") for i, name in enumerate(upstreams)}
    return await make_gateway(models, **kw)


SDK = Callable[[RunningGateway], AsyncOpenAI]


@pytest.fixture
async def sdk() -> AsyncIterator[SDK]:
    """The official SDK pointed at a gateway; closed with the test's event loop still running."""
    made: list[AsyncOpenAI] = []

    def client(gw: RunningGateway) -> AsyncOpenAI:
        made.append(AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0))
        return made[-1]

    yield client
    for c in made:
        await c.close()


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def assert_chunk_shape(chunks: list[Any], model: str) -> None:
    """Every chunk looks like OpenAI's own: one id, the right object, the upstream's model."""
    assert chunks
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {model}
    assert all(isinstance(c.created, int) and c.created > 0 for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.role for c in with_choices].count("assistant") == 1
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert len(finishes) == 1 and with_choices[-1].choices[0].finish_reason == finishes[0]


async def test_text_non_stream(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n5")
    resp = await sdk(gw).chat.completions.create(model="m0", messages=HELLO)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.model == "chat-n5"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "".join(canonical_text(5))
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5


async def test_text_stream_without_usage(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n6")
    chunks = await collect(await sdk(gw).chat.completions.create(model="m0", messages=HELLO, stream=True))
    assert_chunk_shape(chunks, "chat-n6")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(canonical_text(6))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks)       # not asked: no usage chunk


async def test_stream_usage_chunk_matches_non_stream(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n4")
    api = sdk(gw)
    chunks = await collect(await api.chat.completions.create(
        model="m0", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    assert_chunk_shape(chunks, "chat-n4")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    plain = await api.chat.completions.create(model="m0", messages=HELLO)
    assert plain.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens > 0


async def test_tool_call_stream(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "tools")
    chunks = await collect(await sdk(gw).chat.completions.create(
        model="m0", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
        stream=True))
    assert_chunk_shape(chunks, "tools")
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls and {tc.index for tc in calls} == {0}
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    assert [tc.id for tc in calls if tc.id] == [calls[0].id]
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    if protocol == "gemini":        # Gemini sends arguments as an object: the text is re-serialised
        assert json.loads(arguments) == json.loads(SIM_ARGUMENTS)
    else:
        assert arguments == SIM_ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


async def test_tool_call_non_stream_and_round_trip(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "tools")
    api = sdk(gw)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    resp = await api.chat.completions.create(model="m0", messages=ask, tools=[WEATHER_TOOL])
    assert resp.choices[0].finish_reason == "tool_calls"
    call = resp.choices[0].message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(SIM_ARGUMENTS)
    # The tool's answer goes back: the provider must accept the assistant turn and the tool result.
    follow = [*ask, resp.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    # After a tool result the model answers with text, as a real one does...
    answer = await api.chat.completions.create(model="m0", messages=follow, tools=[WEATHER_TOOL])
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    # ...unless the request forces a tool call, which every protocol expresses in its own way.
    forced = await api.chat.completions.create(model="m0", messages=follow, tools=[WEATHER_TOOL],
                                               tool_choice="required")
    assert forced.choices[0].finish_reason == "tool_calls"
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"


async def test_toolloop_calls_a_tool_even_after_a_tool_result(sdk: SDK, make_gateway: MakeGateway,
                                                              protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "tools-toolloop")
    api = sdk(gw)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = await api.chat.completions.create(model="m0", messages=ask, tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    follow = [*ask, first.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    again = await api.chat.completions.create(model="m0", messages=follow, tools=[WEATHER_TOOL])
    assert again.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}}},
])
async def test_json_output(sdk: SDK, make_gateway: MakeGateway, protocol: str, response_format: dict[str, Any]) -> None:
    gw = await gateway(make_gateway, protocol, "json-n5")
    api = sdk(gw)
    ask = [{"role": "user", "content": "Answer in JSON."}]
    resp = await api.chat.completions.create(model="m0", messages=ask, response_format=response_format)
    assert json.loads(resp.choices[0].message.content)["answer"]
    chunks = await collect(await api.chat.completions.create(model="m0", messages=ask,
                                                             response_format=response_format, stream=True))
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks)) == \
        json.loads(resp.choices[0].message.content)


async def test_stop_sequence(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n10")
    api = sdk(gw)
    resp = await api.chat.completions.create(model="m0", messages=HELLO, stop=["fox"])
    assert resp.choices[0].message.content == "The quick brown "
    assert resp.choices[0].finish_reason == "stop"
    chunks = await collect(await api.chat.completions.create(model="m0", messages=HELLO, stop=["jumps"],
                                                             stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The quick brown fox "
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_length_finish(sdk: SDK, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n10")
    api = sdk(gw)
    resp = await api.chat.completions.create(model="m0", messages=HELLO, max_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "".join(canonical_text(3))
    chunks = await collect(await api.chat.completions.create(model="m0", messages=HELLO, max_tokens=2,
                                                             stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(canonical_text(2))


@pytest.mark.parametrize("stream", [False, True])
async def test_caller_error_passes_the_providers_reason(sdk: SDK, make_gateway: MakeGateway, protocol: str,
                                                        fleet: Any, stream: bool) -> None:
    gw = await gateway(make_gateway, protocol, "chat-policy", "chat-ok")
    with pytest.raises(APIStatusError) as caught:
        await sdk(gw).chat.completions.create(model="main", messages=HELLO, stream=stream)
    expected = fleet.sim.wires[protocol].error_body(400, "content_policy", "The request was rejected by the "
                                                    "content policy")
    reason = expected["error"]["message"]
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == reason
    assert caught.value.body["code"] == "content_policy_violation"
    assert not fleet.sim.requests_for("chat-ok")            # a caller fault does not fall over


@pytest.mark.parametrize("fault", ["429-ra0", "503", "529"])
@pytest.mark.parametrize("stream", [False, True])
async def test_overload_and_rate_limit_fail_over(sdk: SDK, make_gateway: MakeGateway, protocol: str, fleet: Any,
                                                 fault: str, stream: bool) -> None:
    gw = await gateway(make_gateway, protocol, f"chat-{fault}", "chat-n3")
    resp = await sdk(gw).chat.completions.with_raw_response.create(model="main", messages=HELLO, stream=stream)
    assert resp.headers["X-Route-Model"] == "m1"
    if stream:
        chunks = await collect(resp.parse())
        assert_chunk_shape(chunks, "chat-n3")
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        text = resp.parse().choices[0].message.content
    assert text == "".join(canonical_text(3))
    assert len(fleet.sim.requests_for(f"chat-{fault}")) == 2    # retried once, then the next candidate


def shape(value: Any) -> Any:
    """What a client's parser sees: keys and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k != "system_fingerprint"}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


async def raw_exchange(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    if not body.get("stream"):
        return json.loads(raw)
    frames = [f[6:] for f in raw.decode().split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


async def test_the_client_sees_one_shape_whoever_answers(make_gateway: MakeGateway) -> None:
    """Byte-level check beyond the SDK: every key and value type is the same for all three
    (`system_fingerprint` aside: a fingerprint only OpenAI has, null for the others)."""
    gw = await make_gateway({p: model_entry("shape-n3", f"sim-{p}") for p in PROTOCOLS})
    ask = [{"role": "user", "content": "Hello there"}]
    bodies = {
        "plain": {"messages": ask},
        "stream": {"messages": ask, "stream": True, "stream_options": {"include_usage": True}},
        "tool": {"messages": ask, "tools": [WEATHER_TOOL]},
        "tool_stream": {"messages": ask, "tools": [WEATHER_TOOL], "stream": True},
    }
    seen: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as session:
        for protocol in PROTOCOLS:
            answers = {}
            for name, body in bodies.items():
                answer = await raw_exchange(session, gw.base + "/chat/completions", {"model": protocol, **body})
                # Gemini sends tool arguments whole: compare the distinct chunk shapes for tool streams.
                answers[name] = sorted(set(map(repr, map(shape, answer)))) if name == "tool_stream" else shape(answer)
            seen[protocol] = answers
    assert seen["anthropic"] == seen["openai"]
    assert seen["gemini"] == seen["openai"]
