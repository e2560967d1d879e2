"""The simulator's OpenAI Chat Completions wire format (non-streamed and SSE chunks)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from . import Ask, Frames, Reply

_ERROR_TYPES = {
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "auth": ("authentication_error", "invalid_api_key"),
    "overloaded": ("server_error", "overloaded"),
    "server": ("server_error", None),
    "context_length_exceeded": ("invalid_request_error", "context_length_exceeded"),
    "content_policy": ("invalid_request_error", "content_policy_violation"),
}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class OpenAIWire:
    def read(self, request: web.Request, payload: dict[str, Any]) -> Ask:
        messages = payload.get("messages") or []
        prefill = None
        if messages and messages[-1].get("role") == "assistant":
            prefill = _text(messages[-1].get("content"))
        stop = payload.get("stop") or []
        fmt = (payload.get("response_format") or {}).get("type", "text")
        options = payload.get("stream_options") or {}
        choice = payload.get("tool_choice")
        return Ask(
            model=str(payload.get("model", "")),
            stream=bool(payload.get("stream")),
            prompt_text="".join(_text(m.get("content")) for m in messages),
            max_tokens=payload.get("max_completion_tokens") or payload.get("max_tokens"),
            stop=[stop] if isinstance(stop, str) else list(stop),
            tools=[t["function"]["name"] for t in payload.get("tools") or [] if "function" in t],
            tool_choice_none=choice == "none",
            tool_forced=choice == "required" or isinstance(choice, dict),
            after_tool_result=bool(messages) and messages[-1].get("role") in ("tool", "function"),
            json_output=fmt in ("json_object", "json_schema"),
            prefill=prefill,
            include_usage=bool(options.get("include_usage")),
        )

    def _usage(self, reply: Reply) -> dict[str, Any]:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0}}

    def complete(self, ask: Ask, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if reply.tool_name:
            message["tool_calls"] = [{"id": "call_sim0", "type": "function",
                                      "function": {"name": reply.tool_name, "arguments": reply.text}}]
        else:
            message["content"] = reply.text
        out = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
               "model": ask.model, "system_fingerprint": "fp_sim",
               "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}]}
        if reply.usage:
            out["usage"] = self._usage(reply)
        return out

    def frames(self, ask: Ask, reply: Reply) -> Frames:
        base = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion.chunk",
                "created": int(time.time()), "model": ask.model, "system_fingerprint": "fp_sim"}
        extra = {"usage": None} if ask.include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra}
            return b"data: " + orjson.dumps(body) + b"\n\n"

        head = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if reply.tool_name:
            body = [chunk({"tool_calls": [{"index": 0, "id": "call_sim0", "type": "function",
                                           "function": {"name": reply.tool_name, "arguments": ""}}]})]
            body += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in reply.pieces]
        else:
            body = [chunk({"content": p}) for p in reply.pieces]
        tail = [chunk({}, reply.finish)]
        if ask.include_usage and reply.usage:
            tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": self._usage(reply)}) + b"\n\n")
        return Frames(head, body, tail, [b"data: [DONE]\n\n"])

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        type_, code = _ERROR_TYPES.get(kind, ("server_error", None))
        return {"error": {"message": message, "type": type_, "param": None, "code": code}}

    def error_frame(self, kind: str, message: str) -> bytes:
        return b"data: " + orjson.dumps(self.error_body(500, kind, message)) + b"\n\n"
