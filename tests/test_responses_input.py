"""Pure: a Responses request -> the canonical chat body (no sockets)."""

from __future__ import annotations

from proxy.inbound.responses_input import parse_request
from proxy.signals import extract


def test_items_become_chat_messages_in_order() -> None:
    request = parse_request({
        "model": "m", "instructions": "Be terse.", "stream": True,
        "input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "Use metric units."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Look: "},
                                         {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                                          "detail": "low"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "call_1", "output": "12 C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "10:00"}]},
        ],
    })
    body = request.chat_body([{"role": "user", "content": "earlier"}])
    assert body["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "earlier"},
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "10:00"},
    ]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    signals = extract(body, {}, None, "standard", 100)      # the chat body passes the router's own checks
    assert signals.images and signals.include_usage


def test_options_map_to_their_chat_names() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = parse_request({
        "model": "m", "input": "hi", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "tools": [{"type": "function", "name": "f", "parameters": schema, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        "reasoning": {"effort": "low"}, "safety_identifier": "user-7", "metadata": {"k": "v"}, "store": False,
    })
    body = request.chat_body([])
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}],
        "parallel_tool_calls": False, "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
        "user": "user-7", "reasoning_effort": "low",
    }
    assert extract(body, {}, None, "standard", 100).output_format == "json_schema"
    assert request.store is False and request.echo["metadata"] == {"k": "v"} and "store" not in request.echo
    assert parse_request({"model": "m", "input": "hi", "text": {"format": {"type": "json_object"}}}
                         ).options["response_format"] == {"type": "json_object"}
    assert "tool_choice" not in parse_request({"model": "m", "input": "hi", "tool_choice": "none"}).options
