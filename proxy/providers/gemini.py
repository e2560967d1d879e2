"""The Gemini generateContent protocol behind OpenAI's chat API.

Request: `POST {base_url}/models/{model}:generateContent`, or
`:streamGenerateContent?alt=sse` for a stream (SSE `data:` frames, each a whole
GenerateContentResponse, no terminal frame: the stream ends when the socket does). The key
travels in the `x-goog-api-key` header, never in the URL, so it cannot leak into access
logs. System and developer messages become `systemInstruction`; turns become `contents`
with roles user and model; data-URL images become `inlineData` and http URLs `fileData`;
tools become `functionDeclarations`, `tool_choice` a `toolConfig`, and sampling options
and JSON output (`responseMimeType`, `responseSchema` reduced to the OpenAPI subset Gemini
accepts) a `generationConfig`.

Response: Gemini sends a function call whole, so it becomes a tool-call chunk with a
generated id followed by one arguments chunk. Safety blocks (a blocking finishReason or
`promptFeedback.blockReason`) finish with `content_filter`. `promptTokenCount` includes
cached tokens and `candidatesTokenCount` excludes thinking, so Usage subtracts the
first and adds the second. `build_count` asks `countTokens` (Messages' count_tokens).
Pure: never opens a socket.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from ..config import Deployment
from ..errors import FailureClass, UpstreamFailure
from ..usage import Usage
from . import UpstreamRequest, classify_error_object, error_in_body, json_event, retry_after_s
from .shape import (
    TranslatedStream,
    completion,
    function_call,
    image_url,
    max_tokens,
    parse_data_url,
    stop_sequences,
    text_of,
    tool_arguments,
    tool_call_id,
    unsupported,
)

FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
          "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter", "LANGUAGE": "content_filter"}
SCHEMA_KEYS = frozenset(("type", "format", "title", "description", "nullable", "enum", "items", "maxItems",
                         "minItems", "properties", "required", "minProperties", "maxProperties", "minLength",
                         "maxLength", "pattern", "minimum", "maximum", "anyOf", "propertyOrdering", "default"))
_STATUS_KIND = {"RESOURCE_EXHAUSTED": "rate_limit_error", "UNAVAILABLE": "overloaded",
                "PERMISSION_DENIED": "permission_error", "UNAUTHENTICATED": "authentication_error",
                "INTERNAL": "server_error", "DEADLINE_EXCEEDED": "server_error"}
_CONTEXT_MARKERS = ("exceeds the maximum number of tokens", "input token count", "too many tokens")


# ---------------------------------------------------------------------------- request


def gemini_schema(schema: Any) -> Any:
    """A JSON schema reduced to the keys Gemini accepts (no additionalProperties, $schema, ...)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: gemini_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = gemini_schema(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [gemini_schema(sub) for sub in value]
        elif key == "type" and isinstance(value, list):       # ["string", "null"] -> nullable string
            kinds = [k for k in value if k != "null"]
            out[key] = kinds[0] if kinds else "string"
            if "null" in value:
                out["nullable"] = True
        else:
            out[key] = value
    return out


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            url = image_url(part)
            inline = parse_data_url(url)
            if inline:
                parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}})
            else:
                mime = mimetypes.guess_type(url.split("?")[0])[0] or "image/jpeg"
                parts.append({"fileData": {"mimeType": mime, "fileUri": url}})
        else:
            raise unsupported(f"content part type '{kind}' is not supported by the Gemini protocol")
    return parts


def _function_response(message: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    text = text_of(message.get("content"))
    try:
        result = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = None
    name = names.get(str(message.get("tool_call_id"))) or str(message.get("name") or "function")
    return {"functionResponse": {"name": name, "response": result if isinstance(result, dict)
                                 else {"content": text}}}


def _contents(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, contents) with consecutive same-role turns merged."""
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}              # tool_call_id -> function name, for functionResponse
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "tool":
            role, parts = "user", [_function_response(message, names)]
        elif role == "assistant":
            role, parts = "model", _parts(message.get("content"))
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                names[str(call.get("id"))] = str(fn.get("name"))
                parts.append({"functionCall": {"name": fn.get("name"), "args": tool_arguments(fn.get("arguments"))}})
        else:
            role, parts = "user", _parts(message.get("content"))
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None or choice == "auto":
        return None
    if choice == "none":
        mode: dict[str, Any] = {"mode": "NONE"}
    elif choice == "required":
        mode = {"mode": "ANY"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        mode = {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name")]}
    else:
        raise unsupported("tool_choice must be auto, none, required or a named function")
    return {"functionCallingConfig": mode}


def _generation_config(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                         ("n", "candidateCount")):
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    if config.get("candidateCount", 1) != 1:
        raise unsupported("n > 1 is not supported through the gateway's Gemini protocol")
    limit = max_tokens(body)
    if limit:
        config["maxOutputTokens"] = limit
    stop = stop_sequences(body)
    if stop:
        config["stopSequences"] = stop
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if isinstance(fmt, dict) and kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        if schema:
            config["responseSchema"] = gemini_schema(schema)
    return config


def request_payload(body: Mapping[str, Any], prefill: str | None = None) -> dict[str, Any]:
    system, contents = _contents(list(body.get("messages") or []))
    if prefill:
        contents.append({"role": "model", "parts": [{"text": prefill}]})
    payload: dict[str, Any] = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    tools = [t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    if tools:
        declarations = []
        for tool in tools:
            declaration = {"name": tool.get("name"), "description": tool.get("description") or ""}
            if tool.get("parameters") and tool["parameters"].get("properties"):
                declaration["parameters"] = gemini_schema(tool["parameters"])
            declarations.append(declaration)
        payload["tools"] = [{"functionDeclarations": declarations}]
        config = _tool_config(body.get("tool_choice"))
        if config:
            payload["toolConfig"] = config
    generation = _generation_config(body)
    if generation:
        payload["generationConfig"] = generation
    return payload


# ---------------------------------------------------------------------------- response


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("promptTokenCount") or 0)
    cached = int(raw.get("cachedContentTokenCount") or 0)
    thoughts = int(raw.get("thoughtsTokenCount") or 0)
    return Usage(input_tokens=max(0, prompt - cached), output_tokens=int(raw.get("candidatesTokenCount") or 0)
                 + thoughts, cached_input_tokens=cached, reasoning_tokens=thoughts)


def _retry_delay(error: dict[str, Any]) -> float | None:
    """`google.rpc.RetryInfo.retryDelay` ("30s") from an error's details."""
    for detail in error.get("details") or []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return float(delay[:-1])
            except ValueError:
                return None
    return None


def classify_error(error: Any, status: int | None, in_stream: bool,
                   retry_after: float | None = None) -> UpstreamFailure:
    """Google's `{"error": {"code", "message", "status"}}` -> a failure."""
    if not isinstance(error, dict):
        error = {"message": str(error or "upstream error")}
    message = str(error.get("message") or "upstream error")
    if status is None and isinstance(error.get("code"), int):
        status = error["code"]
    code = "context_length_exceeded" if any(m in message.lower() for m in _CONTEXT_MARKERS) else None
    kind = _STATUS_KIND.get(str(error.get("status") or ""), "")
    return classify_error_object({"message": message, "type": kind, "code": code}, status, in_stream,
                                 retry_after if retry_after is not None else _retry_delay(error))


def _finish(reason: Any, has_calls: bool) -> str:
    finish = FINISH.get(str(reason), "stop")
    return "tool_calls" if has_calls and finish == "stop" else finish


def _candidate(response: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """(parts, finishReason) of the first candidate; a blocked prompt finishes as SAFETY."""
    candidates = response.get("candidates")
    if not candidates:
        blocked = (response.get("promptFeedback") or {}).get("blockReason")
        return [], ("SAFETY" if blocked else None)
    first = candidates[0] if isinstance(candidates[0], dict) else {}
    parts = (first.get("content") or {}).get("parts") or []
    return [p for p in parts if isinstance(p, dict) and not p.get("thought")], first.get("finishReason")


class GeminiStream(TranslatedStream):
    def __init__(self, model: str, include_usage: bool, collect_text: bool) -> None:
        super().__init__(model, include_usage, collect_text)
        self._calls = 0

    def feed(self, name: str | None, data: bytes) -> Sequence[bytes]:
        response = json_event(data)
        if response is None:
            return ()
        if "error" in response:
            raise classify_error(response["error"], None, in_stream=True)
        if response.get("modelVersion"):
            self.model = str(response["modelVersion"])
        if response.get("usageMetadata"):
            self.usage = parse_usage(response["usageMetadata"])
        parts, reason = _candidate(response)
        out: list[bytes] = []
        for part in parts:
            if "text" in part:
                out += self.content(str(part["text"] or ""))
            elif isinstance(part.get("functionCall"), dict):
                call = part["functionCall"]
                index, self._calls = self._calls, self._calls + 1
                out += self.tool_call_start(index, tool_call_id(), str(call.get("name") or ""))
                out += self.tool_arguments(index, orjson.dumps(call.get("args") or {}).decode())
        if reason:
            out += self.finish(_finish(reason, self._calls > 0))
            # The last response carries the finish and the usage together: the stream is complete.
            self.finished = self.usage is not None
        return out


class GeminiAdapter:
    def build(self, deployment: Deployment, body: Mapping[str, Any], stream: bool,
              prefill: str | None = None) -> UpstreamRequest:
        method = "streamGenerateContent" if stream else "generateContent"
        return UpstreamRequest(_url(deployment, method, {"alt": "sse"} if stream else {}), _headers(deployment),
                               orjson.dumps(request_payload(body, prefill)))

    def build_count(self, deployment: Deployment, native_body: bytes, body: Mapping[str, Any],
                    headers: Mapping[str, str]) -> UpstreamRequest:
        """`countTokens` for what `generateContent` would be sent for `body` (generation
        settings aside: the endpoint refuses them)."""
        payload = request_payload(body)
        payload.pop("generationConfig", None)
        payload["model"] = f"models/{deployment.upstream_model}"
        return UpstreamRequest(_url(deployment, "countTokens", {}), _headers(deployment),
                               orjson.dumps({"generateContentRequest": payload}))

    def parse(self, payload: bytes, deployment: Deployment) -> tuple[bytes, Usage | None]:
        try:
            response = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream sent a body that is not JSON") from None
        if type(response) is not dict:
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream response is not an object")
        if "error" in response:
            raise classify_error(response["error"], None, in_stream=True)
        if "candidates" not in response and "promptFeedback" not in response:
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream response has no 'candidates'")
        parts, reason = _candidate(response)
        text = "".join(str(p["text"] or "") for p in parts if "text" in p)
        calls = [function_call(tool_call_id(), str(p["functionCall"].get("name") or ""),
                               orjson.dumps(p["functionCall"].get("args") or {}).decode())
                 for p in parts if isinstance(p.get("functionCall"), dict)]
        usage = parse_usage(response.get("usageMetadata"))
        model = str(response.get("modelVersion") or deployment.upstream_model)
        return completion(model, text, calls, _finish(reason or "STOP", bool(calls)), usage), usage

    def stream(self, deployment: Deployment, include_usage: bool, collect_text: bool) -> GeminiStream:
        return GeminiStream(deployment.upstream_model, include_usage, collect_text)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return classify_error(error_in_body(status, body), status, in_stream=False,
                              retry_after=retry_after_s(headers))


def _url(deployment: Deployment, method: str, query: Mapping[str, str]) -> str:
    provider = deployment.provider
    url = f"{provider.base_url}/models/{deployment.upstream_model}:{method}"
    merged = {**query, **provider.query}
    return url + "?" + urlencode(merged) if merged else url


def _headers(deployment: Deployment) -> dict[str, str]:
    provider = deployment.provider
    headers = {"Content-Type": "application/json", **provider.headers}
    if provider.api_key:
        headers[provider.auth_header or "x-goog-api-key"] = provider.api_key
    return headers
