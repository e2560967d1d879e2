"""Request, response and stream translation, against samples shaped as the providers document them.

The samples are written here by hand after the Anthropic Messages and Gemini
generateContent references (event order, field names, usage fields, error bodies), so
these tests pin the adapters to the documented formats, not to our own simulator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.config import Deployment, Limits, Price, Provider, Timeouts, load
from proxy.errors import FailureClass, UpstreamFailure
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter
from proxy.sse import SSEParser
from proxy.usage import Usage

PNG = "data:image/png;base64,iVBORw0KGgo="
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                   "properties": {"city": {"type": "string"}, "unit": {"type": ["string", "null"],
                                                                       "enum": ["c", "f", None]}},
                   "required": ["city"], "additionalProperties": False}}}]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome? See:"},
                                 {"type": "image_url", "image_url": {"url": PNG}},
                                 {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg"}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 21}'},
    {"role": "user", "content": "Which is warmer?"},
]


def deployment(api: str, upstream: str, headers: dict[str, str] | None = None) -> Deployment:
    provider = Provider(name=f"p-{api}", api=api, base_url=f"https://{api}.example/v1", api_key_env="K",
                        region=None, limits=Limits(), timeouts=Timeouts(), headers=headers or {}, query={},
                        auth_header=None, api_key="sk-test-secret")
    return Deployment(f"m/p-{api}/0", provider, upstream, 1.0, Limits(), Price(1.0, 2.0))


def feed_sse(translator: Any, raw: str) -> list[dict[str, Any]]:
    out: list[bytes] = []
    for event in SSEParser().feed(raw.encode()):
        out.extend(translator.feed(event.name, event.data))
    out.extend(translator.close())
    return [orjson.loads(chunk) for chunk in out]


def deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]]


# =========================================================================== Anthropic

ANTHROPIC = AnthropicAdapter()
CLAUDE = deployment("anthropic", "claude-sonnet-4-5-20250929", {"anthropic-version": "2023-06-01"})


def anthropic_request(body: dict[str, Any], stream: bool = False, prefill: str | None = None,
                      dep: Deployment = CLAUDE) -> tuple[Any, dict[str, Any]]:
    request = ANTHROPIC.build(dep, body, stream, prefill)
    return request, json.loads(request.body)


def test_anthropic_request_messages_tools_and_images() -> None:
    request, payload = anthropic_request({"model": "x", "messages": CONVERSATION, "tools": TOOLS,
                                          "tool_choice": "required", "stop": "END", "temperature": 1.6,
                                          "top_p": 0.9, "max_completion_tokens": 300})
    assert request.url == "https://anthropic.example/v1/messages"
    assert request.headers["x-api-key"] == "sk-test-secret" and request.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in request.headers
    assert payload["model"] == "claude-sonnet-4-5-20250929" and payload["max_tokens"] == 300
    assert payload["system"] == "You are terse.\n\nUse metric units."
    assert payload["stop_sequences"] == ["END"] and payload["temperature"] == 1.0 and payload["top_p"] == 0.9
    assert "stream" not in payload
    assert [t["role"] for t in payload["messages"]] == ["user", "assistant", "user"]
    first = payload["messages"][0]["content"]
    assert first[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": "iVBORw0KGgo="}}
    assert first[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/sky.jpg"}}
    assert payload["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}]
    # Both tool results and the next user message share one user turn, in order.
    last = payload["messages"][2]["content"]
    assert [b["type"] for b in last] == ["tool_result", "tool_result", "text"]
    assert last[0]["tool_use_id"] == "call_1" and last[0]["content"] == [{"type": "text", "text": "18C"}]
    assert payload["tools"][0]["input_schema"] == TOOLS[0]["function"]["parameters"]
    assert payload["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, None, None),
])
def test_anthropic_tool_choice(choice: Any, parallel: Any, expected: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": choice,
            "parallel_tool_calls": parallel}
    assert anthropic_request(body)[1].get("tool_choice") == expected


def test_anthropic_defaults_json_prefill_and_headers() -> None:
    plain = {"role": "user", "content": "hi"}
    _, payload = anthropic_request({"messages": [plain]}, stream=True, prefill="The quick \n")
    assert payload["max_tokens"] == 4096 and payload["stream"] is True
    assert payload["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "The quick"}]}
    assert "system" not in payload
    _, payload = anthropic_request({"messages": [plain], "response_format": {"type": "json_object"}})
    assert "JSON" in payload["system"]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    _, payload = anthropic_request({"messages": [plain], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert json.dumps(schema, separators=(",", ":")) in payload["system"]
    request, _ = anthropic_request({"messages": [plain]}, dep=deployment("anthropic", "claude"))
    assert request.headers["anthropic-version"] == "2023-06-01"      # defaulted when config sets none


def test_anthropic_rejects_what_it_cannot_express() -> None:
    with pytest.raises(UpstreamFailure) as caught:
        anthropic_request({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]})
    assert caught.value.kind is FailureClass.CALLER and "input_audio" in caught.value.message


ANTHROPIC_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "I'll check both."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"city": "Paris"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 120, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 1000,
              "output_tokens": 45},
}


def test_anthropic_response() -> None:
    body, usage = ANTHROPIC.parse(orjson.dumps(ANTHROPIC_MESSAGE), CLAUDE)
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "claude-sonnet-4-5-20250929"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "I'll check both."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "call_01A09q90qw90lq917835lq9" and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert usage == Usage(input_tokens=120, output_tokens=45, cached_input_tokens=1000, cache_write_tokens=30)
    assert out["usage"]["prompt_tokens"] == 1150 and out["usage"]["prompt_tokens_details"]["cached_tokens"] == 1000


@pytest.mark.parametrize("stop_reason, finish", [("end_turn", "stop"), ("stop_sequence", "stop"),
                                                 ("max_tokens", "length"), ("refusal", "content_filter")])
def test_anthropic_stop_reasons(stop_reason: str, finish: str) -> None:
    message = {**ANTHROPIC_MESSAGE, "content": [{"type": "text", "text": "Hi"}], "stop_reason": stop_reason}
    body, _ = ANTHROPIC.parse(orjson.dumps(message), CLAUDE)
    assert json.loads(body)["choices"][0]["finish_reason"] == finish


def sse_events(*events: tuple[str, dict[str, Any]]) -> str:
    """Named SSE events rendered as Anthropic sends them: `event:` then `data:`, a blank line after."""
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


ANTHROPIC_STREAM = sse_events(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "stop_sequence": None, "content": [], "stop_reason": None,
        "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 200,
                  "output_tokens": 2}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Okay, let's check"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": " the weather."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": 'is"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_02", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 2,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 2}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
)


@pytest.mark.parametrize("include_usage", [True, False])
def test_anthropic_stream(include_usage: bool) -> None:
    translator = ANTHROPIC.stream(CLAUDE, include_usage, collect_text=True)
    chunks = feed_sse(translator, ANTHROPIC_STREAM)
    assert translator.finished and translator.finish_reason == "tool_calls"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"claude-sonnet-4-5-20250929"}
    d = deltas(chunks)
    assert d[0]["role"] == "assistant" and sum("role" in x for x in d) == 1
    assert "".join(x.get("content") or "" for x in d) == "Okay, let's check the weather."
    assert translator.text == ["Okay, let's check", " the weather."]
    calls = [tc for x in d for tc in x.get("tool_calls") or []]
    assert [(tc["index"], tc.get("id")) for tc in calls if "id" in tc] == [
        (0, "call_01T1x1fJ34qAmk2tNTrN7Up6"), (1, "call_02")]
    for index, city in ((0, "Paris"), (1, "Rome")):
        args = "".join(tc["function"].get("arguments") or "" for tc in calls if tc["index"] == index)
        assert json.loads(args) == {"city": city}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert translator.usage == Usage(input_tokens=472, output_tokens=89, cached_input_tokens=200)
    usage_chunks = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1]["usage"]["prompt_tokens"] == 672 and chunks[-1]["usage"]["completion_tokens"] == 89
    else:
        assert usage_chunks == []


def test_anthropic_stream_commit_point_and_in_band_error() -> None:
    translator = ANTHROPIC.stream(CLAUDE, True, False)
    head = ANTHROPIC_STREAM.split("event: content_block_delta")[0]
    feed_sse(translator, head)
    assert not translator.content_seen                          # lifecycle only: nothing to commit yet
    error = ('event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
             '"message": "Overloaded"}}\n\n')
    with pytest.raises(UpstreamFailure) as caught:
        feed_sse(translator, error)
    assert caught.value.kind is FailureClass.OVERLOADED and caught.value.in_stream
    thinking = ANTHROPIC.stream(CLAUDE, True, False)
    feed_sse(thinking, 'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
                       '"delta": {"type": "thinking_delta", "thinking": "Let me see"}}\n\n')
    assert not thinking.content_seen


@pytest.mark.parametrize("status, error, headers, kind, code", [
    (529, {"type": "overloaded_error", "message": "Overloaded"}, {}, FailureClass.OVERLOADED, None),
    (429, {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your rate limit"},
     {"retry-after": "7"}, FailureClass.RATE_LIMITED, None),
    (400, {"type": "invalid_request_error", "message": "prompt is too long: 208310 tokens > 200000 maximum"}, {},
     FailureClass.CONTEXT_LENGTH, "context_length_exceeded"),
    (400, {"type": "invalid_request_error", "message": "messages: roles must alternate"}, {},
     FailureClass.CALLER, None),
    (401, {"type": "authentication_error", "message": "invalid x-api-key"}, {}, FailureClass.AUTH, None),
    (403, {"type": "permission_error", "message": "no access"}, {}, FailureClass.AUTH, None),
    (500, {"type": "api_error", "message": "Internal server error"}, {}, FailureClass.SERVER, None),
])
def test_anthropic_errors(status: int, error: dict[str, Any], headers: dict[str, str], kind: FailureClass,
                          code: str | None) -> None:
    body = orjson.dumps({"type": "error", "error": error, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"})
    failure = ANTHROPIC.classify(status, headers, body)
    assert failure.kind is kind and failure.message == error["message"] and failure.status == status
    assert failure.code == code
    assert failure.retry_after == (7.0 if headers else None)


# =========================================================================== Gemini

GEMINI = GeminiAdapter()
FLASH = deployment("gemini", "gemini-2.5-flash")


def test_gemini_request_urls_and_key_header() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    plain = GEMINI.build(FLASH, body, False)
    streamed = GEMINI.build(FLASH, body, True)
    assert plain.url == "https://gemini.example/v1/models/gemini-2.5-flash:generateContent"
    assert streamed.url == "https://gemini.example/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    for request in (plain, streamed):
        assert request.headers["x-goog-api-key"] == "sk-test-secret"
        assert "sk-test-secret" not in request.url and "key=" not in request.url


def test_gemini_request_contents_tools_and_config() -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"answer": {"type": "string"}, "tags": {"type": "array", "items": {
                  "type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}}},
              "required": ["answer"], "additionalProperties": False}
    payload = json.loads(GEMINI.build(FLASH, {
        "messages": CONVERSATION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {
            "name": "get_weather"}}, "temperature": 0.2, "top_p": 0.8, "max_tokens": 64, "stop": ["END"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
        False).body)
    assert payload["systemInstruction"] == {"parts": [{"text": "You are terse.\n\nUse metric units."}]}
    assert [c["role"] for c in payload["contents"]] == ["user", "model", "user"]
    first = payload["contents"][0]["parts"]
    assert first[1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert first[2] == {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/sky.jpg"}}
    assert payload["contents"][1]["parts"] == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                               {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]
    answers = payload["contents"][2]["parts"]
    assert answers[0] == {"functionResponse": {"name": "get_weather", "response": {"content": "18C"}}}
    assert answers[1] == {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}
    assert answers[2] == {"text": "Which is warmer?"}
    declaration = payload["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "get_weather"
    assert declaration["parameters"] == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "nullable": True, "enum": ["c", "f", None]}}}
    assert payload["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames":
                                                               ["get_weather"]}}
    config = payload["generationConfig"]
    assert config["temperature"] == 0.2 and config["topP"] == 0.8 and config["maxOutputTokens"] == 64
    assert config["stopSequences"] == ["END"] and config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {"type": "object", "required": ["answer"], "properties": {
        "answer": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}}


@pytest.mark.parametrize("choice, expected", [
    ("auto", None), ("none", {"functionCallingConfig": {"mode": "NONE"}}),
    ("required", {"functionCallingConfig": {"mode": "ANY"}}),
])
def test_gemini_tool_choice(choice: str, expected: Any) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": choice}
    assert json.loads(GEMINI.build(FLASH, body, False).body).get("toolConfig") == expected


GEMINI_RESPONSE = {
    "candidates": [{"content": {"parts": [{"text": "Let me look.", "thoughtSignature": "Cs4BA..."},
                                          {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
                                "role": "model"},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 1200, "candidatesTokenCount": 30, "totalTokenCount": 1330,
                      "cachedContentTokenCount": 1000, "thoughtsTokenCount": 100,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1200}]},
    "modelVersion": "gemini-2.5-flash", "responseId": "mP3TaKqXNKmQ_uMP0r2M0Qs",
}


def test_gemini_response() -> None:
    body, usage = GEMINI.parse(orjson.dumps(GEMINI_RESPONSE), FLASH)
    out = json.loads(body)
    assert out["object"] == "chat.completion" and out["model"] == "gemini-2.5-flash"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert usage == Usage(input_tokens=200, output_tokens=130, cached_input_tokens=1000, reasoning_tokens=100)
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 100


@pytest.mark.parametrize("response, finish", [
    ({"candidates": [{"content": {"parts": [{"text": "Partial"}], "role": "model"}, "finishReason": "MAX_TOKENS",
                      "index": 0}]}, "length"),
    ({"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}]}, "content_filter"),
    ({"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": "RECITATION",
                      "index": 0}]}, "content_filter"),
    ({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
      "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}}, "content_filter"),
])
def test_gemini_finish_reasons_and_safety_blocks(response: dict[str, Any], finish: str) -> None:
    body, _ = GEMINI.parse(orjson.dumps(response), FLASH)
    assert json.loads(body)["choices"][0]["finish_reason"] == finish
    translator = GEMINI.stream(FLASH, False, False)
    chunks = feed_sse(translator, "data: " + json.dumps(response) + "\r\n\r\n")
    assert translator.finish_reason == finish and chunks[-1]["choices"][0]["finish_reason"] == finish


GEMINI_STREAM = "".join("data: " + json.dumps(chunk) + "\r\n\r\n" for chunk in [
    {"candidates": [{"content": {"parts": [{"text": "The weather"}], "role": "model"}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2, "totalTokenCount": 11},
     "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
    {"candidates": [{"content": {"parts": [{"text": " is nice."},
                                           {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                           {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}],
                                 "role": "model"}, "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 20, "totalTokenCount": 29,
                       "cachedContentTokenCount": 4},
     "modelVersion": "gemini-2.5-flash", "responseId": "r1"},
])


def test_gemini_stream() -> None:
    translator = GEMINI.stream(FLASH, True, collect_text=True)
    chunks = feed_sse(translator, GEMINI_STREAM)
    assert translator.finished and translator.finish_reason == "tool_calls"
    d = deltas(chunks)
    assert d[0]["role"] == "assistant" and sum("role" in x for x in d) == 1
    assert "".join(x.get("content") or "" for x in d) == "The weather is nice."
    calls = [tc for x in d for tc in x.get("tool_calls") or []]
    starts = [tc for tc in calls if "id" in tc]
    assert [tc["index"] for tc in starts] == [0, 1] and len({tc["id"] for tc in starts}) == 2
    assert all(tc["id"].startswith("call_") for tc in starts)
    for index, city in ((0, "Paris"), (1, "Rome")):
        args = "".join(tc["function"].get("arguments") or "" for tc in calls if tc["index"] == index)
        assert json.loads(args) == {"city": city}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 9
    assert translator.usage == Usage(input_tokens=5, output_tokens=20, cached_input_tokens=4)


def test_gemini_stream_in_band_error() -> None:
    translator = GEMINI.stream(FLASH, True, False)
    error = {"error": {"code": 503, "message": "The model is overloaded. Please try again later.",
                       "status": "UNAVAILABLE"}}
    with pytest.raises(UpstreamFailure) as caught:
        feed_sse(translator, "data: " + json.dumps(error) + "\r\n\r\n")
    assert caught.value.kind is FailureClass.OVERLOADED and caught.value.in_stream


@pytest.mark.parametrize("status, error, kind, retry_after", [
    (429, {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
           "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]},
     FailureClass.RATE_LIMITED, 30.0),
    (503, {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"},
     FailureClass.OVERLOADED, None),
    (400, {"code": 400, "message": "The input token count (1200000) exceeds the maximum number of tokens allowed "
           "(1048576).", "status": "INVALID_ARGUMENT"}, FailureClass.CONTEXT_LENGTH, None),
    (400, {"code": 400, "message": "* GenerateContentRequest.contents: contents is not specified",
           "status": "INVALID_ARGUMENT"}, FailureClass.CALLER, None),
    (403, {"code": 403, "message": "Method doesn't allow unregistered callers.", "status": "PERMISSION_DENIED"},
     FailureClass.AUTH, None),
    (401, {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"},
     FailureClass.AUTH, None),
    (500, {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"},
     FailureClass.SERVER, None),
])
def test_gemini_errors(status: int, error: dict[str, Any], kind: FailureClass, retry_after: float | None) -> None:
    failure = GEMINI.classify(status, {}, orjson.dumps({"error": error}))
    assert failure.kind is kind and failure.message == error["message"] and failure.status == status
    assert failure.retry_after == retry_after


# =========================================================================== vendors as config

def test_readme_vendor_examples_load_and_address_their_servers(tmp_path: Path) -> None:
    """The README's OpenAI-compatible vendors are config entries: they load, and Azure's
    request carries its `api-key` header and `api-version` query, never a Bearer token."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Providers", 1)[1].split("\n## ", 1)[0]
    providers = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])["providers"]
    assert {"vllm", "ollama", "groq", "together", "mistral", "deepseek", "azure"} <= set(providers)
    models = {f"m-{name}": {"tier": 1, "context_window": 8000, "price": {"input": 1, "output": 1},
                            "deployments": [{"provider": name, "model": "some-model"}]} for name in providers}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"providers": providers, "models": models}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"chains": {"all": list(models)}, "default": "all"}))
    config = load(tmp_path / "p.yaml", tmp_path / "r.yaml", env={"AZURE_OPENAI_API_KEY": "azure-secret"})
    assert {p.api for p in config.providers.values()} == {"openai"}
    request = OpenAIAdapter().build(config.models["m-azure"].deployments[0],
                                    {"messages": [{"role": "user", "content": "hi"}]}, False)
    assert request.url == ("https://my-resource.openai.azure.com/openai/deployments/gpt-4o-prod"
                           "/chat/completions?api-version=2024-10-21")
    assert request.headers["api-key"] == "azure-secret" and "Authorization" not in request.headers
