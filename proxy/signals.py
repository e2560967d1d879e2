"""Pure: a decoded chat request + its headers -> `Signals`, validating the body on the way.

One walk over the messages both checks their shape (a bad request is a 400 naming the
field, never a 500) and estimates the input tokens, because routing must stay far under a
millisecond and a second walk would double the cost for long conversations.

Token estimate: no tokenizer is loaded (it would cost more than the whole routing
decision). ASCII text counts one token per 4 characters, which is within about 15% of
OpenAI's and Anthropic's tokenizers for English prose and code; other text counts one
token per 3 UTF-8 bytes, which is right for CJK (3 bytes, about 1 token per character)
and overestimates accented Latin text by up to a third. Overestimating is the safe side
for the context-window and cost-ceiling checks. Each message adds 4 tokens of framing, an
image 85 tokens at `detail: low` and 765 otherwise (a typical 1024x1024 image at OpenAI's
tile prices), and tool schemas count as their JSON text.

Imports only config and errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .config import LATENCY_CLASSES, GatewayKey
from .errors import bad_request

_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
_IMAGE_LOW, _IMAGE_DEFAULT = 85, 765


@dataclass(slots=True)
class Signals:
    input_tokens: int
    max_tokens: int | None
    task_type: str | None
    tier: str
    latency: str | None
    output_format: str          # text | json_object | json_schema
    tools: bool
    images: bool
    region: str | None
    key: str | None             # the gateway key's name, never the key
    max_cost_usd: float | None
    stream: bool
    include_usage: bool         # the client asked for stream_options.include_usage


def text_tokens(text: str) -> int:
    if text.isascii():
        return (len(text) + 3) >> 2
    return (len(text.encode("utf-8")) + 2) // 3


def _content_tokens(content: Any, index: int) -> tuple[int, bool]:
    """Tokens of one message's content, and whether it holds an image."""
    if type(content) is str:
        return text_tokens(content), False
    if content is None:
        return 0, False
    if not isinstance(content, list):
        raise bad_request(f"messages[{index}].content must be a string, an array of parts or null",
                          f"messages[{index}].content")
    tokens, images = 0, False
    for part in content:
        if not isinstance(part, dict):
            raise bad_request(f"messages[{index}].content parts must be objects", f"messages[{index}].content")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"messages[{index}].content text part needs a string 'text'",
                                  f"messages[{index}].content")
            tokens += text_tokens(text)
        elif kind == "image_url":
            images = True
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            tokens += _IMAGE_LOW if detail == "low" else _IMAGE_DEFAULT
        elif isinstance(kind, str):
            tokens += text_tokens(orjson.dumps(part).decode())   # audio, files: count their payload
        else:
            raise bad_request(f"messages[{index}].content parts need a 'type'", f"messages[{index}].content")
    return tokens, images


def _walk_messages(messages: Any, max_messages: int) -> tuple[int, bool]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    if len(messages) > max_messages:
        raise bad_request(f"too many messages: {len(messages)} > {max_messages}", "messages")
    tokens, images = 3, False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}",
                              f"messages[{i}].role")
        n, has_image = _content_tokens(message.get("content"), i)
        tokens += n + 4
        images = images or has_image
        calls = message.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls)):
            raise bad_request(f"messages[{i}].tool_calls must be an array of objects", f"messages[{i}].tool_calls")
        if calls:
            tokens += text_tokens(orjson.dumps(calls).decode())
    return tokens, images


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise bad_request(f"'{name}' must be a positive integer", name)
    return value


def _output_format(body: Mapping[str, Any]) -> str:
    fmt = body.get("response_format")
    if fmt is None:
        return "text"
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad_request("'response_format.type' must be text, json_object or json_schema",
                          "response_format")
    if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise bad_request("'response_format.json_schema' must be an object", "response_format.json_schema")
    return kind


def _check_types(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise bad_request("'stream' must be a boolean", "stream")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (type(value) not in (int, float)):
            raise bad_request(f"'{name}' must be a number", name)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("function", {}), dict):
            raise bad_request(f"tools[{i}] must be an object whose 'function' is an object", f"tools[{i}]")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise bad_request("'stop' must be a string or an array of strings", "stop")


def _header_float(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise bad_request(f"header {name} must be a non-negative number of US dollars", name)
    return value


def extract(body: Any, headers: Mapping[str, str], key: GatewayKey | None, default_tier: str,
            max_messages: int) -> Signals:
    """Validate a decoded chat body and read every routing signal from it and the headers."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_types(body)
    tokens, images = _walk_messages(body.get("messages"), max_messages)
    tools = body.get("tools")
    if tools:
        tokens += text_tokens(orjson.dumps(tools).decode())
    max_tokens = _optional_int(body, "max_completion_tokens") or _optional_int(body, "max_tokens")

    latency = headers.get("X-Latency-Class")
    if latency is not None and latency not in LATENCY_CLASSES:
        raise bad_request(f"header X-Latency-Class must be one of {', '.join(LATENCY_CLASSES)}",
                          "X-Latency-Class")
    tier = key.tier if key is not None else default_tier
    if key is None or key.trust_tier_header:
        tier = headers.get("X-User-Tier") or tier
    options = body.get("stream_options")
    return Signals(
        input_tokens=tokens,
        max_tokens=max_tokens,
        task_type=headers.get("X-Task-Type") or None,
        tier=tier,
        latency=latency,
        output_format=_output_format(body),
        tools=bool(tools),
        images=images,
        region=headers.get("X-Region") or None,
        key=key.name if key is not None else None,
        max_cost_usd=_header_float(headers, "X-Max-Cost-USD"),
        stream=bool(body.get("stream")),
        include_usage=bool(options and options.get("include_usage")),
    )
