"""The Anthropic Messages protocol behind OpenAI's chat API.

Request: system and developer messages become `system`; user, assistant and tool
messages become alternating turns (consecutive turns of one role are merged, tool results
travel as `tool_result` blocks in a user turn, assistant `tool_calls` as `tool_use`
blocks); images become base64 or url sources; tools, `tool_choice`, `stop`,
`temperature` (clamped to Anthropic's 0..1), `top_p` and `max_tokens` (required here:
DEFAULT_MAX_TOKENS when the caller sets none, which every current Claude model accepts)
are mapped. A continuation's `prefill` is a trailing assistant turn, without trailing
whitespace, which the API rejects; the model's next words usually bring that whitespace
back, and dispatch (which knows the prefill) drops it once at the seam (`trim_seam`).

JSON output: Messages has no `response_format`, so `json_object` and `json_schema` add
a system instruction to answer with one JSON object only (quoting the schema for
`json_schema`). No "{" prefill is used, so the answer's text is the whole JSON document
and the stream translator needs no knowledge of the request.

Response and stream: `message_start` ... `message_stop` become OpenAI chunks (role
first, text, tool calls indexed from 0 in order, the finish chunk, usage last when
asked); `ping` is ignored; an `event: error` raises `UpstreamFailure`. Usage keeps
Anthropic's split: `input_tokens` already excludes cache reads and writes. A thinking
block counts as content for the commit point: the model is answering, and a long think
must not run into `first_token_s`.

Native (`build_native`): a Messages client's own body goes up with only `model` replaced
in its bytes (`proxy.rawjson`), so signed thinking blocks and `cache_control` arrive as
sent; its answer is read by the same `parse` and stream translator, for usage and the
commit point, while the client gets the upstream's own bytes (`proxy.encoding`); the same
bytes go to `/messages/count_tokens` for Messages' count (`build_count`). Every URL carries
the provider's `query`. Pure: never opens a socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from ..config import Deployment
from ..errors import FailureClass, UpstreamFailure
from ..rawjson import replace_string
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
    unsupported,
)

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}
JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else: no prose, no code fences."
_CONTEXT_MARKERS = ("prompt is too long", "too many tokens", "context window")


# The reverse of FINISH, for answers that go to a Messages client: one stop reason per finish.
STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
               "content_filter": "refusal"}
# OpenAI's tool_choice strings and Anthropic's tool_choice types, both ways.
TOOL_CHOICE = {"auto": "auto", "none": "none", "required": "any"}


def call_id(tool_use_id: Any) -> str:
    """`toolu_01A...` -> `call_01A...`: OpenAI's id shape. Anthropic accepts any id matching
    [A-Za-z0-9_-]+ for the tool_use blocks it is sent back, so no reverse mapping is needed."""
    raw = str(tool_use_id or "")
    return "call_" + raw[6:] if raw.startswith("toolu_") else raw


def tool_use_id(call: Any) -> str:
    """The inverse of `call_id`, for tool calls that go to a Messages client: `call_X` -> `toolu_X`,
    so that the ids the client sends back map to the same calls again."""
    raw = str(call or "")
    return "toolu_" + raw[5:] if raw.startswith("call_") else raw


def image_source(url: str) -> dict[str, Any]:
    """An image URL (a data URL or http) -> Anthropic's image `source`."""
    inline = parse_data_url(url)
    return {"type": "base64", "media_type": inline[0], "data": inline[1]} if inline else {"type": "url", "url": url}


def source_url(source: Any) -> str | None:
    """The inverse of `image_source`; None for a source no URL can carry (a file id)."""
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type') or 'application/octet-stream'};base64,{source['data']}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    return None


# ---------------------------------------------------------------------------- request


def _blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content -> Anthropic content blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append({"type": "image", "source": image_source(image_url(part))})
        else:
            raise unsupported(f"content part type '{kind}' is not supported by the Anthropic protocol")
    return blocks


def _turns(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, alternating turns) with consecutive same-role turns merged."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        blocks: list[dict[str, Any]]
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append(text)
            continue
        if role == "tool":
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or ""),
                                     "content": _blocks(message.get("content")) or ""}]
        elif role == "assistant":
            blocks = _blocks(message.get("content"))
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": tool_arguments(fn.get("arguments"))})
        else:
            role, blocks = "user", _blocks(message.get("content"))
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None
    if choice is None:
        choice = "auto"
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, str) and choice in TOOL_CHOICE:
        out: dict[str, Any] = {"type": TOOL_CHOICE[choice]}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise unsupported("tool_choice must be auto, none, required or a named function")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _json_instruction(response_format: Any) -> str | None:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return JSON_INSTRUCTION
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            return f"{JSON_INSTRUCTION} It must conform to this JSON schema: {orjson.dumps(schema).decode()}"
        return JSON_INSTRUCTION
    return None


def request_payload(deployment: Deployment, body: Mapping[str, Any], stream: bool,
                    prefill: str | None = None) -> dict[str, Any]:
    system, turns = _turns(list(body.get("messages") or []))
    instruction = _json_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if prefill and prefill.rstrip():
        turns.append({"role": "assistant", "content": [{"type": "text", "text": prefill.rstrip()}]})
    if body.get("n") not in (None, 1):
        raise unsupported("n > 1 is not supported by the Anthropic protocol")
    payload: dict[str, Any] = {"model": deployment.upstream_model,
                               "max_tokens": max_tokens(body) or DEFAULT_MAX_TOKENS, "messages": turns}
    if system:
        payload["system"] = "\n\n".join(system)
    if stream:
        payload["stream"] = True
    if body.get("temperature") is not None:
        payload["temperature"] = min(1.0, max(0.0, float(body["temperature"])))
    if body.get("top_p") is not None:
        payload["top_p"] = body["top_p"]
    stop = stop_sequences(body)
    if stop:
        payload["stop_sequences"] = stop
    tools = [t["function"] for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    if tools:
        payload["tools"] = [{"name": t.get("name"), "description": t.get("description") or "",
                             "input_schema": t.get("parameters") or {"type": "object", "properties": {}}}
                            for t in tools]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            payload["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        payload["metadata"] = {"user_id": body["user"]}
    return payload


# ---------------------------------------------------------------------------- response


def parse_usage(raw: Any, into: Usage | None = None) -> Usage | None:
    """Anthropic usage (whole, or a `message_delta`'s partial update of `into`)."""
    if not isinstance(raw, dict):
        return into
    base = into or Usage()

    def count(name: str, old: int) -> int:
        value = raw.get(name)
        return int(value) if isinstance(value, int) else old

    return Usage(input_tokens=count("input_tokens", base.input_tokens),
                 output_tokens=count("output_tokens", base.output_tokens),
                 cached_input_tokens=count("cache_read_input_tokens", base.cached_input_tokens),
                 cache_write_tokens=count("cache_creation_input_tokens", base.cache_write_tokens))


def usage_json(usage: Usage | None) -> dict[str, int]:
    """The inverse of `parse_usage`: Anthropic's usage object (input excludes cache reads and writes)."""
    usage = usage or Usage()
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_write_tokens,
            "cache_read_input_tokens": usage.cached_input_tokens}


def classify_error(error: Any, status: int | None, in_stream: bool,
                   retry_after: float | None = None) -> UpstreamFailure:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}` -> a failure."""
    if not isinstance(error, dict):
        error = {"message": str(error or "upstream error")}
    kind = str(error.get("type") or "")
    message = str(error.get("message") or "upstream error")
    lowered = message.lower()
    code = None
    if any(marker in lowered for marker in _CONTEXT_MARKERS):
        code = "context_length_exceeded"
    elif "content filtering" in lowered:
        code = "content_policy_violation"
    if status is None:
        status = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}.get(kind)
    return classify_error_object({"message": message, "type": kind, "code": code}, status, in_stream,
                                 retry_after)


class AnthropicStream(TranslatedStream):
    def __init__(self, model: str, include_usage: bool, collect_text: bool) -> None:
        super().__init__(model, include_usage, collect_text)
        self._tool_index: dict[int, int] = {}    # Anthropic block index -> OpenAI tool_call index

    def feed(self, name: str | None, data: bytes) -> Sequence[bytes]:
        event = json_event(data)
        if event is None:
            return ()
        kind = event.get("type") or name
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self.content(str(delta.get("text") or ""))
            if delta.get("type") == "input_json_delta":
                index = self._tool_index.get(event.get("index", -1))
                return () if index is None else self.tool_arguments(index, str(delta.get("partial_json") or ""))
            return ()                                   # thinking and signature deltas stay upstream
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tool_index[event.get("index", -1)] = len(self._tool_index)
                return self.tool_call_start(index, call_id(block.get("id")), str(block.get("name") or ""))
            if block.get("type") == "text":
                return self.content(str(block.get("text") or ""))
            if block.get("type") in ("thinking", "redacted_thinking"):
                # The model is answering: commit, or a long think would run into first_token_s.
                self.content_seen = True
            return ()
        if kind == "message_start":
            message = event.get("message") or {}
            self.model = str(message.get("model") or self.model)
            self.usage = parse_usage(message.get("usage"))
            return self.role()
        if kind == "message_delta":
            self.usage = parse_usage(event.get("usage"), self.usage)
            reason = (event.get("delta") or {}).get("stop_reason")
            return self.finish(FINISH.get(reason, "stop")) if reason else ()
        if kind == "message_stop":
            self.finished = True
            return ()
        if kind == "error":
            raise classify_error(event.get("error"), None, in_stream=True)
        return ()                                       # ping, content_block_stop, future events


def _url(deployment: Deployment, path: str) -> str:
    provider = deployment.provider
    url = f"{provider.base_url}{path}"
    return url + "?" + urlencode(provider.query) if provider.query else url


def merged_betas(*sources: Mapping[str, str]) -> str:
    """The `anthropic-beta` values of every source, each once, in the order first seen."""
    seen: dict[str, None] = {}
    for headers in sources:
        for name, value in headers.items():
            if name.lower() == "anthropic-beta":
                seen.update((beta.strip(), None) for beta in value.split(",") if beta.strip())
    return ",".join(seen)


class AnthropicAdapter:
    def build(self, deployment: Deployment, body: Mapping[str, Any], stream: bool,
              prefill: str | None = None) -> UpstreamRequest:
        payload = request_payload(deployment, body, stream, prefill)
        return UpstreamRequest(_url(deployment, "/messages"), self._headers(deployment, {}), orjson.dumps(payload))

    def build_native(self, deployment: Deployment, body: bytes, stream: bool,
                     headers: Mapping[str, str], path: str = "/messages") -> UpstreamRequest:
        """A Messages client's own body, only `model` replaced in its bytes (signed thinking
        blocks and cache_control stay as sent); `headers` (`anthropic-version`,
        `anthropic-beta`) override the defaults. `path` `/messages/count_tokens` counts."""
        raw = replace_string(body, "model", deployment.upstream_model)
        return UpstreamRequest(_url(deployment, path), self._headers(deployment, headers), raw, native=True)

    def build_count(self, deployment: Deployment, native_body: bytes, body: Mapping[str, Any],
                    headers: Mapping[str, str]) -> UpstreamRequest:
        """Anthropic's own count of a Messages client's body (`/messages/count_tokens`)."""
        return self.build_native(deployment, native_body, False, headers, "/messages/count_tokens")

    @staticmethod
    def _headers(deployment: Deployment, client: Mapping[str, str]) -> dict[str, str]:
        """The client's `anthropic-version` wins (its body is written for it); betas are the
        union of the operator's (providers.yaml `headers:`) and the client's, so a beta the
        operator turned on is not lost when Claude Code sends its own list."""
        provider = deployment.provider
        headers = {"Content-Type": "application/json", "anthropic-version": API_VERSION, **provider.headers,
                   **client}
        betas = merged_betas(provider.headers, client)
        if betas:
            headers = {k: v for k, v in headers.items() if k.lower() != "anthropic-beta"}
            headers["anthropic-beta"] = betas
        if provider.api_key:
            headers[provider.auth_header or "x-api-key"] = provider.api_key
        return headers

    def parse(self, payload: bytes, deployment: Deployment) -> tuple[bytes, Usage | None]:
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream sent a body that is not JSON") from None
        if type(message) is not dict or not isinstance(message.get("content"), list):
            if type(message) is dict and message.get("type") == "error":
                raise classify_error(message.get("error"), None, in_stream=True)
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream response has no 'content'")
        text, calls = [], []
        for block in message["content"]:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                text.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_use":
                calls.append(function_call(call_id(block.get("id")), str(block.get("name") or ""),
                                           orjson.dumps(block.get("input") or {}).decode()))
        usage = parse_usage(message.get("usage"))
        finish = FINISH.get(message.get("stop_reason") or "end_turn", "stop")
        model = str(message.get("model") or deployment.upstream_model)
        return completion(model, "".join(text), calls, finish, usage), usage

    def stream(self, deployment: Deployment, include_usage: bool, collect_text: bool) -> AnthropicStream:
        return AnthropicStream(deployment.upstream_model, include_usage, collect_text)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return classify_error(error_in_body(status, body), status, in_stream=False, retry_after=retry_after_s(headers))
