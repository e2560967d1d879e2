"""The simulator's Gemini wire format: models/{model}:generateContent and
:streamGenerateContent?alt=sse.

A stream is `data:` frames (CRLF-separated, as Google's servers send them), each a whole
GenerateContentResponse: one per token with `candidates[0].content.parts`, then a last one
with `finishReason` and the final `usageMetadata`. Gemini has no terminal frame (the
stream ends when the socket closes), so `nodone` is a no-op here. A function call arrives
whole, in one frame. Errors are `{"error": {"code", "message", "status"}}`, in a body or
as a `data:` frame. A key in the URL is rejected: the gateway must send `x-goog-api-key`.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from . import Ask, Frames, Reply

_STATUS = {"rate_limit": "RESOURCE_EXHAUSTED", "auth": "UNAUTHENTICATED", "overloaded": "UNAVAILABLE",
           "server": "INTERNAL", "context_length_exceeded": "INVALID_ARGUMENT", "content_policy": "INVALID_ARGUMENT"}
_MESSAGES = {"context_length_exceeded": "The input token count (1200) exceeds the maximum number of tokens "
                                        "allowed (1000).",
             "content_policy": "The request was blocked by the content policy."}


def _text(parts: Any) -> str:
    out = []
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict):
            if "text" in part:
                out.append(str(part["text"]))
            elif isinstance(part.get("functionResponse"), dict):
                response = part["functionResponse"].get("response") or {}
                out.append(str(response["content"]) if set(response) == {"content"}
                           else orjson.dumps(response).decode())
    return "".join(out)


_REJECTED_SCHEMA_KEYS = ("additionalProperties", "$schema", "$ref", "$defs", "const")


def _rejected_key(schema: Any) -> str | None:
    """A JSON-schema key the real API refuses ("Unknown name ..."), anywhere in `schema`."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in _REJECTED_SCHEMA_KEYS:
                return key
            found = _rejected_key(value)
            if found:
                return found
    elif isinstance(schema, list):
        for item in schema:
            found = _rejected_key(item)
            if found:
                return found
    return None


def _reject(message: str) -> web.HTTPBadRequest:
    body = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
    return web.HTTPBadRequest(body=orjson.dumps(body), content_type="application/json")


def _frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\r\n\r\n"


class GeminiWire:
    def read(self, request: web.Request, payload: dict[str, Any]) -> Ask:
        model, _, method = request.match_info["target"].partition(":")
        if "key" in request.query:
            raise _reject("API keys belong in the x-goog-api-key header, not the URL")
        stream = method == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            raise _reject("this simulator streams only with alt=sse")
        contents = payload.get("contents") or []
        if any(c.get("role") not in ("user", "model") for c in contents):
            raise _reject("contents[].role must be 'user' or 'model'")
        config = payload.get("generationConfig") or {}
        bad = _rejected_key([config.get("responseSchema"), payload.get("tools")])
        if bad:
            raise _reject(f'Invalid JSON payload received. Unknown name "{bad}": Cannot find field.')
        prefill = _text(contents[-1].get("parts")) if contents and contents[-1].get("role") == "model" else None
        names = [str(d.get("name")) for tool in payload.get("tools") or []
                 for d in tool.get("functionDeclarations") or []]
        mode = ((payload.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
        return Ask(
            model=model,
            stream=stream,
            prompt_text=_text((payload.get("systemInstruction") or {}).get("parts"))
            + "".join(_text(c.get("parts")) for c in contents),
            max_tokens=config.get("maxOutputTokens"),
            stop=list(config.get("stopSequences") or []),
            tools=names,
            tool_choice_none=mode == "NONE",
            tool_forced=mode == "ANY",
            after_tool_result=bool(contents) and any(isinstance(p, dict) and "functionResponse" in p
                                                     for p in contents[-1].get("parts") or []),
            json_output=config.get("responseMimeType") == "application/json",
            prefill=prefill,
        )

    def _usage(self, reply: Reply, output: int | None = None) -> dict[str, Any]:
        output = reply.completion_tokens if output is None else output
        usage = {"promptTokenCount": reply.prompt_tokens, "candidatesTokenCount": output,
                 "totalTokenCount": reply.prompt_tokens + output}
        if reply.cached_tokens:
            usage["cachedContentTokenCount"] = reply.cached_tokens
        return usage

    def _finish(self, reply: Reply) -> str:
        return "MAX_TOKENS" if reply.finish == "length" else "STOP"

    def _response(self, ask: Ask, parts: list[dict[str, Any]], usage: dict[str, Any], finish: str | None,
                  response_id: str) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = finish
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": ask.model,
                "responseId": response_id}

    def complete(self, ask: Ask, reply: Reply) -> dict[str, Any]:
        parts = ([{"functionCall": {"name": reply.tool_name, "args": orjson.loads(reply.text)}}] if reply.tool_name
                 else [{"text": reply.text}])
        return self._response(ask, parts, self._usage(reply), self._finish(reply), uuid.uuid4().hex[:22])

    def frames(self, ask: Ask, reply: Reply) -> Frames:
        rid = uuid.uuid4().hex[:22]
        if reply.tool_name:
            body = [_frame(self._response(ask, [{"functionCall": {"name": reply.tool_name,
                                                                  "args": orjson.loads(reply.text)}}],
                                          self._usage(reply, 0), None, rid))]
        else:
            body = [_frame(self._response(ask, [{"text": p}], self._usage(reply, i + 1), None, rid))
                    for i, p in enumerate(reply.pieces)]
        tail = [_frame(self._response(ask, [{"text": ""}], self._usage(reply), self._finish(reply), rid))]
        return Frames([], body, tail, [])

    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]:
        return {"error": {"code": status, "message": _MESSAGES.get(kind, message),
                          "status": _STATUS.get(kind, "INTERNAL")}}

    def error_frame(self, kind: str, message: str) -> bytes:
        return _frame(self.error_body(503, kind, message))
