"""`/v1/responses` through the official `openai` SDK, against all three upstream protocols.

`responses.create` (`parse` for JSON schema) and `responses.stream`, async and sync (the
sync client runs in a thread, since the gateway shares the test's event loop), each for
text, a function tool turn and JSON schema output; and `previous_response_id` follow-ups.
The SDK's accumulator is strict (`response.created` first, one identity per item, every
item done before `response.completed`), so a stream it accepts has the complete ordered
lifecycle; the final response it builds must equal the non-streamed one but for ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel

from proxy.simulator import canonical_text

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry

PROTOCOLS = ("openai", "anthropic", "gemini")
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                          "required": ["location"], "additionalProperties": False}}
SIM_ARGUMENTS = {"location": "Paris", "unit": "c"}
Clients = Callable[[RunningGateway], tuple[AsyncOpenAI, OpenAI]]


class Answer(BaseModel):
    answer: str


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    made: list[tuple[AsyncOpenAI, OpenAI]] = []

    def make(gw: RunningGateway) -> tuple[AsyncOpenAI, OpenAI]:
        made.append((AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0),
                     OpenAI(base_url=gw.base, api_key="unused", max_retries=0)))
        return made[-1]

    yield make
    for async_client, sync_client in made:
        await async_client.close()
        sync_client.close()


async def gateway(make_gateway: MakeGateway, protocol: str, upstream: str) -> RunningGateway:
    return await make_gateway({"m0": model_entry(upstream, f"sim-{protocol}")})


def comparable(response: Any) -> dict[str, Any]:
    """A response without what differs between two answers to the same request: the ids the
    gateway draws (response, items; Gemini's call ids too, it has none of its own), time, and
    the spacing of tool arguments (Anthropic and Gemini send a whole answer's arguments as an
    object, which is serialised again)."""
    data = response.model_dump(mode="json", exclude_none=True)
    for name in ("id", "created_at", "completed_at"):
        data.pop(name, None)
    for item in data["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
        item.pop("parsed_arguments", None)
        if "arguments" in item:
            item["arguments"] = json.loads(item["arguments"])
        for part in item.get("content", ()):
            part.pop("parsed", None)
    return data


def stream_sync(client: OpenAI, **kw: Any) -> tuple[list[Any], Any]:
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        return events, stream.get_final_response()


async def stream_async(client: AsyncOpenAI, **kw: Any) -> tuple[list[Any], Any]:
    async with client.responses.stream(**kw) as stream:
        events = [event async for event in stream]
        return events, await stream.get_final_response()


def assert_lifecycle(events: list[Any]) -> None:
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") >= 1


async def test_text_create_and_stream_agree(clients: Clients, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n5")
    async_client, sync_client = clients(gw)
    ask = {"model": "m0", "input": "Say something.", "instructions": "Be brief.", "temperature": 0.5}
    plain = await async_client.responses.create(**ask)
    assert plain.object == "response" and plain.id.startswith("resp_") and plain.status == "completed"
    assert plain.model == "chat-n5" and plain.instructions == "Be brief." and plain.temperature == 0.5
    assert plain.output_text == "".join(canonical_text(5))
    assert plain.usage is not None and plain.usage.output_tokens == 5
    assert plain.usage.total_tokens == plain.usage.input_tokens + 5
    events, final = await stream_async(async_client, **ask)
    assert_lifecycle(events)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    assert comparable(final) == comparable(plain)
    sync_plain = await asyncio.to_thread(sync_client.responses.create, **ask)
    sync_events, sync_final = await asyncio.to_thread(stream_sync, sync_client, **ask)
    assert [e.type for e in sync_events] == [e.type for e in events]
    assert comparable(sync_final) == comparable(sync_plain) == comparable(plain)


async def test_function_tool_turn(clients: Clients, make_gateway: MakeGateway, fleet: Fleet, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "tools")
    async_client, sync_client = clients(gw)
    ask: dict[str, Any] = {"model": "m0", "tools": [WEATHER],
                           "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}]}
    plain = await async_client.responses.create(**ask)
    [call] = plain.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id and json.loads(call.arguments) == SIM_ARGUMENTS
    sync_plain = await asyncio.to_thread(sync_client.responses.create, **ask)
    for events, final in (await stream_async(async_client, **ask),
                          await asyncio.to_thread(stream_sync, sync_client, **ask)):
        assert_lifecycle(events)
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert json.loads(deltas) == SIM_ARGUMENTS
        assert comparable(final) == comparable(plain) == comparable(sync_plain)

    # The tool's result goes back as a function_call_output, once with the whole conversation
    # as input and once as a follow-up of the stored response: the upstream gets both turns.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18}'}
    full = await async_client.responses.create(
        **{**ask, "input": [*ask["input"], call.model_dump(exclude_none=True), result]})
    follow = await async_client.responses.create(model="m0", tools=[WEATHER], previous_response_id=plain.id,
                                                 input=[result])
    assert full.status == follow.status == "completed"
    sent_full, sent_follow = (orjson.dumps(seen.body).decode() for seen in fleet.sim.requests_for("tools")[-2:])
    for sent in (sent_full, sent_follow):
        assert "Weather?" in sent and "get_weather" in sent and "temperature" in sent and "18" in sent
    assert follow.previous_response_id == plain.id


def stream_sync_parsed(client: OpenAI, **kw: Any) -> tuple[Any, Any]:
    return client.responses.parse(**kw), stream_sync(client, **kw)


async def test_json_schema(clients: Clients, make_gateway: MakeGateway, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "json-n4")
    async_client, sync_client = clients(gw)
    ask = {"model": "m0", "input": "Answer in JSON.", "text_format": Answer}
    plain = await async_client.responses.parse(**ask)
    assert plain.output_parsed is not None
    assert plain.output_parsed.answer == "".join(canonical_text(4)).strip()
    assert plain.text is not None and plain.text.format.type == "json_schema"
    sync_plain, sync_streamed = await asyncio.to_thread(stream_sync_parsed, sync_client, **ask)
    for events, final in (await stream_async(async_client, **ask), sync_streamed):
        assert_lifecycle(events)
        assert final.output_parsed == plain.output_parsed == sync_plain.output_parsed
        assert comparable(final) == comparable(plain) == comparable(sync_plain)


async def test_previous_response_id_carries_the_conversation(clients: Clients, make_gateway: MakeGateway,
                                                             fleet: Fleet, protocol: str) -> None:
    gw = await gateway(make_gateway, protocol, "chat-n3")
    async_client, _ = clients(gw)
    first = await async_client.responses.create(model="m0", input="My name is Ada.", instructions="Only once.")
    events, second = await stream_async(async_client, model="m0", input="What is my name?",
                                        previous_response_id=first.id)
    third = await async_client.responses.create(model="m0", input="And again?", previous_response_id=second.id)
    sent = orjson.dumps(fleet.sim.requests_for("chat-n3")[-1].body).decode()
    assert sent.count("My name is Ada.") == 1 and "What is my name?" in sent and "And again?" in sent
    assert sent.count("".join(canonical_text(3)).strip()) == 2       # both earlier answers
    assert "Only once." not in sent             # instructions are not inherited, as in OpenAI's API
    assert third.previous_response_id == second.id
    stored = await async_client.responses.retrieve(second.id)
    assert comparable(stored) == comparable(second)


async def test_an_upstream_without_usage_still_gives_a_finished_response_usage(
        clients: Clients, make_gateway: MakeGateway) -> None:
    """An OpenAI-compatible vendor that ignores stream_options reports no usage; a finished
    response must still carry it (the Vercel AI SDK rejects a response.completed without):
    the router's input estimate and 4 characters a token of output, streamed or not."""
    gw = await gateway(make_gateway, "openai", "mute-n6-nousage")
    async_client, _ = clients(gw)
    ask = {"model": "m0", "input": "Tell me a story about a fox, please."}
    plain = await async_client.responses.create(**ask)
    events, final = await stream_async(async_client, **ask)
    assert_lifecycle(events)
    for response in (plain, final):
        usage = response.usage
        assert usage is not None and usage.input_tokens > 0
        assert usage.output_tokens == (len(response.output_text) + 3) // 4 > 0
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert final.usage == plain.usage
