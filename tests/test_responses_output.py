"""Pure: canonical chat chunks and completions -> Responses events and objects (no sockets).

Covers what the simulator never sends: text and two tool calls in one answer, a refusal,
the token limit, and a stream that fails after the commit."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.inbound.responses_output import ResponsesEncoder, ResponseShape
from proxy.sse import SSEParser


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up-1",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}


def encoder(kept: list[dict[str, Any]] | None = None) -> ResponsesEncoder:
    async def remember(response: dict[str, Any], answer: dict[str, Any]) -> None:
        assert kept is not None
        kept.append({"response": response, "answer": answer})
    return ResponsesEncoder(ResponseShape("main", True, {"temperature": 0.3}), remember if kept is not None else None)


def decoded(raw: bytes) -> list[dict[str, Any]]:
    events = [orjson.loads(e.data) for e in SSEParser().feed(raw)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "id": None, "output": [{**item, "id": None} for item in response["output"]]}


async def test_text_and_two_tool_calls_in_order() -> None:
    kept: list[dict[str, Any]] = []
    enc = encoder(kept)
    raw = b"".join(enc.chunk(c) for c in [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}), chunk({"content": "check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "weather", "arguments": '{"c'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ity":"Oslo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls")])
    raw += await enc.end([orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": USAGE})], False)
    events = decoded(raw)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "up-1" and final["temperature"] == 0.3
    assert final["usage"] == {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 7,
                              "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 16}
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check."
    assert final["output"][1]["arguments"] == '{"city":"Oslo"}' and final["output"][1]["call_id"] == "call_a"
    assert kept[0]["response"] == final
    assert kept[0]["answer"] == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}

    plain = orjson.loads(await encoder().answer(orjson.dumps({
        "id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "up-1", "usage": USAGE,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me check.", "tool_calls": kept[0]["answer"]["tool_calls"]}}]}),
        False))
    assert comparable(plain) == comparable(final) | {"created_at": plain["created_at"]}


async def test_refusal_and_the_token_limit() -> None:
    enc = encoder()
    enc.expect_input_tokens(7)
    raw = enc.chunk(chunk({"refusal": "I can't "})) + enc.chunk(chunk({"refusal": "help."}, "length"))
    events = decoded(raw + await enc.end([], False))
    kinds = [e["type"] for e in events]
    assert "response.refusal.delta" in kinds and "response.refusal.done" in kinds
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    assert final["response"]["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't help."}]
    # The upstream reported no usage: the router's input estimate, 4 characters a token of output.
    assert final["response"]["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0},
                                          "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
                                          "total_tokens": 11}


async def test_a_failure_after_the_commit_keeps_the_output_so_far() -> None:
    enc = encoder()
    raw = enc.chunk(chunk({"content": "Half an "})) + enc.chunk(chunk({"content": "answer"}))
    events = decoded(raw + enc.error("upstream stream failed: cut", "upstream_error", "stream_protocol"))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": "server_error",
                                                                "message": "upstream stream failed: cut"}
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "Half an answer"
