"""The Messages surface's pure parts: request checks and translation, answer and stream
encoding (read back by the official `anthropic` SDK's own accumulator), and the raw-byte
model swap of the passthrough."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message

from proxy.errors import FailureClass, GatewayError
from proxy.inbound.messages_answer import MessagesEncoder, error_body, message_from_completion
from proxy.inbound.messages_request import check, to_chat
from proxy.providers.anthropic import request_payload
from proxy.rawjson import NotFound, replace_string
from proxy.sse import SSEParser

from .test_translation import CLAUDE

SIGNED = {"type": "thinking", "thinking": "Let me look.", "signature": "EqQBCkYIBxgCKkA+sig=="}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?", "cache_control": {"type": "ephemeral"}},
                                 {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                              "data": "iVBORw0KGgo="}}]},
    {"role": "assistant", "content": [SIGNED, {"type": "text", "text": "Checking."},
                                      {"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A",
                                  "content": [{"type": "text", "text": "18C"}]},
                                 {"type": "text", "text": "And tomorrow?"}]},
]
TOOLS = [{"name": "get_weather", "description": "Weather for a city", "cache_control": {"type": "ephemeral"},
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 1024, "messages": CONVERSATION, **extra}


# ---------------------------------------------------------------------------- checks


@pytest.mark.parametrize("bad, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0"),
    ({"stream": "yes"}, "stream"),
    ({"tools": [{"description": "no name"}]}, "tools.0"),
    ({"tool_choice": {"type": "required"}}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"thinking": "on"}, "thinking"),
    ({"stop_sequences": "END"}, "stop_sequences"),
])
def test_check_names_the_bad_field(bad: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        check({k: v for k, v in body(**bad).items() if v is not None})
    assert caught.value.status == 400 and caught.value.param == param
    assert param.split(".")[0] in caught.value.message


def test_count_tokens_needs_no_max_tokens() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert check(request, count_only=True) is request
    with pytest.raises(GatewayError):
        check(request)


# ---------------------------------------------------------------------------- request translation


def test_to_chat_maps_every_turn_and_names_what_it_drops() -> None:
    translated = to_chat(body(system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
                              tools=TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                              thinking={"type": "enabled", "budget_tokens": 2000}, metadata={"user_id": "u1"},
                              context_management={"edits": []}, stop_sequences=["END"], temperature=0.5, top_k=5,
                              stream=True))
    chat = translated.body
    assert translated.unsendable is None
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Paris?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_01A", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_01A", "content": "18C"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": TOOLS[0]["input_schema"]}}]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert chat["max_completion_tokens"] == 1024 and chat["stop"] == ["END"] and chat["temperature"] == 0.5
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert set(translated.dropped) == {"cache_control", "thinking blocks signed by anthropic", "thinking",
                                       "metadata", "context_management", "top_k"}


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_round_trips_through_the_anthropic_adapter(choice: dict[str, Any], expected: Any) -> None:
    chat = to_chat(body(tools=TOOLS, tool_choice=choice)).body
    assert chat["tool_choice"] == expected
    # The adapter's chat -> Anthropic direction gives the client's own choice back.
    assert request_payload(CLAUDE, chat, False)["tool_choice"] == choice


def test_a_tool_error_and_what_chat_cannot_carry() -> None:
    errored = to_chat(body(messages=[*CONVERSATION[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01A", "is_error": True, "content": "no such city"}]}]))
    assert errored.body["messages"][-1] == {"role": "tool", "tool_call_id": "call_01A",
                                            "content": "Error: no such city"}
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    for request in (body(messages=[{"role": "user", "content": [document]}]),
                    body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
                    body(mcp_servers=[{"type": "url", "url": "https://mcp.example", "name": "x"}])):
        translated = to_chat(request)
        assert translated.unsendable and "cannot be sent through a chat protocol" in translated.unsendable
        assert translated.extra_tokens > 0


# ---------------------------------------------------------------------------- answers


def completion(message: dict[str, Any], finish: str, usage: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 30, "completion_tokens": 7,
                           "prompt_tokens_details": {"cached_tokens": 10}}})


def test_message_from_completion_is_a_valid_message() -> None:
    raw = message_from_completion(completion({"content": "Hi.", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        "tool_calls"), 99)
    message = Message.model_validate_json(raw)
    assert message.model == "gpt-x" and message.id.startswith("msg_")
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].id == "toolu_9" and message.content[1].input == {"city": "Rome"}  # type: ignore[union-attr]
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (20, 10, 7)


@pytest.mark.parametrize("finish, stop", [("stop", "end_turn"), ("length", "max_tokens"),
                                          ("content_filter", "refusal")])
def test_stop_reasons(finish: str, stop: str) -> None:
    raw = message_from_completion(completion({"content": "x"}, finish), 1)
    assert Message.model_validate_json(raw).stop_reason == stop


def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "gpt-x", "choices": choices,
                         "usage": usage})


def replay(frames: bytes) -> tuple[list[str], Message]:
    """The event names, and the message the SDK's own stream accumulator builds from them."""
    names: list[str] = []
    snapshot: Any = None
    buffers: dict[int, bytes] = {}
    for event in SSEParser().feed(frames):
        assert event.name is not None          # the SDKs skip events without an `event:` line
        data = json.loads(event.data)
        assert data["type"] == event.name
        names.append(event.name)
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    return names, Message.model_validate(snapshot.model_dump())


async def test_stream_encoder_text_then_two_tool_calls() -> None:
    encoder = MessagesEncoder()
    parts = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}), chunk({"content": "check."}),
             chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]}),
             chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                    "function": {"name": "now", "arguments": ""}}]}),
             chunk({}, "tool_calls"),
             chunk(None, usage={"prompt_tokens": 40, "completion_tokens": 12})]
    frames = b"".join(encoder.chunk(p) for p in parts[:-1]) + await encoder.end(parts[-1:], native=False)
    names, message = replay(frames)
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert message.model == "gpt-x" and message.stop_reason == "tool_use"
    assert message.content[0].text == "Let me check."  # type: ignore[union-attr]
    calls = message.content[1:]
    assert [c.id for c in calls] == ["toolu_a", "toolu_b"]  # type: ignore[union-attr]
    assert [c.input for c in calls] == [{"city": "Paris"}, {}]  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (40, 12)


async def test_stream_without_usage_estimates_and_errors_are_anthropic_events() -> None:
    encoder = MessagesEncoder()
    frames = encoder.chunk(chunk({"content": "abcdefgh"})) + encoder.chunk(chunk({}, "length"))
    _, message = replay(frames + await encoder.end((), native=False))
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (0, 2)     # unknown input, output estimated
    assert await encoder.end((), native=True) == b""           # a native stream's own end went through
    (event,) = SSEParser().feed(encoder.error("upstream stream failed: went away", "upstream_error",
                                              f"stream_{FailureClass.OVERLOADED.value}"))
    assert event.name == "error"
    assert json.loads(event.data) == {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "upstream stream failed: went away"}}
    (timeout,) = SSEParser().feed(encoder.error("x", "upstream_error", "stream_timeout"))
    assert json.loads(timeout.data)["error"]["type"] == "timeout_error"
    assert json.loads(error_body(504, "slow", "req_1")) == {
        "type": "error", "error": {"type": "timeout_error", "message": "slow"}, "request_id": "req_1"}


# ---------------------------------------------------------------------------- passthrough


def test_replace_model_touches_only_the_top_level_model() -> None:
    raw = (b'{ "max_tokens" : 64,\n  "messages": [{"role": "user", "content": [{"type": "text", "text": '
           b'"say \\"model\\": \\"x\\" \\u00e9", "cache_control": {"type": "ephemeral"}}]}],\n'
           b'  "tools": [{"name": "t", "input_schema": {"properties": {"model": {"type": "string"}}}}],\n'
           b'  "model"  :  "claude-opus-5-5", "metadata": {"model": "keep"}, "m\\u006fdel": "dup"}')
    out = replace_string(raw, "model", "claude-opus-4-1-20250805")
    assert out == raw.replace(b'"claude-opus-5-5"', b'"claude-opus-4-1-20250805"').replace(
        b'"dup"', b'"claude-opus-4-1-20250805"')
    assert orjson.loads(out)["model"] == "claude-opus-4-1-20250805"
    with pytest.raises(NotFound):
        replace_string(b'{"messages": [{"model": "nested"}]}', "model", "x")
