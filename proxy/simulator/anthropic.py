"""The simulator's Anthropic Messages wire format (POST /v1/messages, streamed or not).

A stream is the documented event sequence: `message_start`, `content_block_start`,
`ping`, one `content_block_delta` per token (`text_delta`, or `input_json_delta` for a
tool call), `content_block_stop`, `message_delta` (stop_reason, usage.output_tokens) and
`message_stop`, which `nodone` leaves out. Errors are `{"type": "error", "error":
{"type": "overloaded_error", ...}}`, in a body or as an `event: error` frame.
Requests the real API rejects (no max_tokens, a system role inside messages, a final
assistant turn ending in whitespace) get its 400, so adapter mistakes show up in tests.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from aiohttp import web

from . import Ask, Frames, Reply

_ERROR_TYPES = {"rate_limit": "rate_limit_error", "auth": "authentication_error", "overloaded": "overloaded_error",
                "server": "api_error", "context_length_exceeded": "invalid_request_error",
                "content_policy": "invalid_request_error"}
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_MESSAGES = {"context_length_exceeded": "prompt is too long: 1200 tokens > 1000 maximum",
             "content_policy": "Output blocked by content filtering policy"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict):
            if block.get("type") == "text":
                out.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_result":
                out.append(_text(block.get("content")))
    return "".join(out)


def _has_block(message: dict[str, Any], kind: str) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == kind for b in content)


def _reject(message: str) -> web.HTTPBadRequest:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    return web.HTTPBadRequest(body=orjson.dumps(body), content_type="application/json")


def _check_tool_ids(messages: list[dict[str, Any]]) -> None:
    """Each tool_result answers an earlier tool_use; ids match ^[a-zA-Z0-9_-]+$, as the API checks."""
    seen: set[str] = set()
    for message in messages:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "tool_use":
                if not _TOOL_ID.match(str(block.get("id"))):
                    raise _reject("tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
                seen.add(block["id"])
            elif block.get("type") == "tool_result" and block.get("tool_use_id") not in seen:
                raise _reject("unexpected `tool_use_id` found in `tool_result` blocks")


def _event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **body}) + b"\n\n"


class AnthropicWire:
    def read(self, request: web.Request, payload: dict[str, Any]) -> Ask:
        messages = payload.get("messages") or []
        if not isinstance(payload.get("max_tokens"), int):
            raise _reject("max_tokens: Field required")
        roles = {m.get("role") for m in messages}
        if not roles <= {"user", "assistant"}:
            raise _reject("messages: roles must be 'user' or 'assistant'; put system text in 'system'")
        prefill = None
        if messages and messages[-1].get("role") == "assistant":
            prefill = _text(messages[-1].get("content"))
            if prefill != prefill.rstrip():
                raise _reject("messages: final assistant content cannot end with trailing whitespace")
        _check_tool_ids(messages)
        system = _text(payload.get("system"))
        tool_choice = payload.get("tool_choice") or {}
        return Ask(
            model=str(payload.get("model", "")),
            stream=bool(payload.get("stream")),
            prompt_text=system + "".join(_text(m.get("content")) for m in messages),
            max_tokens=payload["max_tokens"],
            stop=list(payload.get("stop_sequences") or []),
            tools=[str(t.get("name")) for t in payload.get("tools") or []],
            tool_choice_none=tool_choice.get("type") == "none",
            tool_forced=tool_choice.get("type") in ("any", "tool"),
            after_tool_result=bool(messages) and _has_block(messages[-1], "tool_result"),
            # The model follows an instruction to answer in JSON, or structured output's schema.
            json_output="json" in system.lower() or bool((payload.get("output_config") or {}).get("format")
                                                          or payload.get("output_format")),
            prefill=prefill,
        )

    def _usage(self, reply: Reply) -> dict[str, Any]:
        return {"input_tokens": reply.prompt_tokens - reply.cached_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": reply.cached_tokens, "output_tokens": reply.completion_tokens}

    def _stop(self, reply: Reply) -> dict[str, Any]:
        reason = {"length": "max_tokens", "tool_calls": "tool_use"}.get(reply.finish)
        if reason is None:
            reason = "stop_sequence" if reply.stop_sequence else "end_turn"
        return {"stop_reason": reason, "stop_sequence": reply.stop_sequence if reason == "stop_sequence" else None}

    def complete(self, ask: Ask, reply: Reply) -> dict[str, Any]:
        if reply.tool_name:
            content = [{"type": "tool_use", "id": "toolu_sim0", "name": reply.tool_name,
                        "input": orjson.loads(reply.text)}]
        else:
            content = [{"type": "text", "text": reply.text}]
        return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": ask.model,
                "content": content, **self._stop(reply), "usage": self._usage(reply)}

    def frames(self, ask: Ask, reply: Reply) -> Frames:
        start_usage = {**self._usage(reply), "output_tokens": 1}
        head = [_event("message_start", {"message": {
            "id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "content": [],
            "model": ask.model, "stop_reason": None, "stop_sequence": None, "usage": start_usage}})]
        if reply.tool_name:
            head.append(_event("ping", {}))
            body = [_event("content_block_start", {"index": 0, "content_block": {
                "type": "tool_use", "id": "toolu_sim0", "name": reply.tool_name, "input": {}}})]
            body += [_event("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                          "partial_json": p}}) for p in reply.pieces]
        else:
            head.append(_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
            head.append(_event("ping", {}))
            body = [_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}})
                    for p in reply.pieces]
        tail = [_event("content_block_stop", {"index": 0}),
                _event("message_delta", {"delta": self._stop(reply),
                                         "usage": {"output_tokens": reply.completion_tokens}})]
        return Frames(head, body, tail, [_event("message_stop", {})])

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES.get(kind, "api_error"),
                                           "message": _MESSAGES.get(kind, message)},
                "request_id": "req_sim" + uuid.uuid4().hex[:16]}

    def error_frame(self, kind: str, message: str) -> bytes:
        body = self.error_body(500, kind, message)
        return _event("error", {"error": body["error"]})
