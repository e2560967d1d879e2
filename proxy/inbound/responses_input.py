"""A Responses API request -> the canonical chat body every adapter reads. Pure.

What maps: `input` as a string or as items (messages with `input_text`, `input_image`,
`output_text` and `refusal` parts; `function_call` and `function_call_output` turns;
`reasoning` items are dropped, an upstream cannot use another model's reasoning;
`item_reference` items name an output item of a stored response, which the caller looks
up and passes in: the Vercel AI SDK sends earlier assistant turns that way by default),
`instructions` (a system message first; as in OpenAI's API they are not carried into a
follow-up), function `tools`, `tool_choice`, `parallel_tool_calls`, `text.format` (text,
`json_object`, `json_schema`), `max_output_tokens`, `temperature`, `top_p`, `user`,
`reasoning.effort`, `stream`. A stream always asks for usage: the completed response
carries it.

What does not: OpenAI's hosted tools (web search, file search, code interpreter, ...),
`background`, `conversation`, `prompt` templates and file inputs need OpenAI's own
servers; each is a 400 naming the field, never a silent drop. Every other field is
accepted and echoed in the response where OpenAI's response object has it. An
`item_reference` to an item the caller could not find is a 404 naming the item.

Every error names the Responses field (`input[2].content`), never a chat one, so the
chat body built here always passes the signal extractor's own checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import GatewayError, bad_request

_ROLES = frozenset(("user", "assistant", "system", "developer"))
_HOSTED = "is a tool hosted by OpenAI's Responses API; the gateway serves function tools only"
_UNSUPPORTED = {
    "background": "background responses are not supported by the gateway; send the request without it",
    "conversation": "conversations are not supported by the gateway; use previous_response_id",
    "prompt": "prompt templates are not supported by the gateway; send the input itself",
}
_ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id",
           "reasoning", "service_tier", "temperature", "text", "tool_choice", "tools", "top_p", "truncation",
           "user", "safety_identifier", "prompt_cache_key")


@dataclass(slots=True)
class ResponsesRequest:
    """A validated Responses request: the chat pieces and what the response object echoes."""

    model: str
    stream: bool
    store: bool
    previous_response_id: str | None
    instructions: str | None
    messages: list[dict[str, Any]]      # this request's input as chat messages (no instructions)
    options: dict[str, Any]             # chat fields other than model, messages and stream
    echo: dict[str, Any]                # the request's fields the response object repeats

    def chat_body(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The chat body: instructions, then an earlier response's conversation, then this input."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        body: dict[str, Any] = {"model": self.model, "messages": [*system, *history, *self.messages],
                                **self.options, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


def item_references(body: Any) -> list[str]:
    """The ids the request's `item_reference` items name, for the caller to look up."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return []
    return [item["id"] for item in items if isinstance(item, dict) and item.get("type") == "item_reference"
            and isinstance(item.get("id"), str) and item["id"]]


def parse_request(body: Any, referenced: Mapping[str, dict[str, Any]] | None = None) -> ResponsesRequest:
    """Validate a decoded `POST /v1/responses` body; 400 naming the field at fault.
    `referenced` holds the output items its `item_reference`s name (`item_references`)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    for name, why in _UNSUPPORTED.items():
        if body.get(name):
            raise unsupported(why, name)
    stream = _optional(body, "stream", bool, "a boolean") or False
    store = _optional(body, "store", bool, "a boolean")
    previous = _optional(body, "previous_response_id", str, "a string")
    instructions = _optional(body, "instructions", str, "a string")
    if "input" not in body or body["input"] is None:
        raise bad_request("'input' is required: a string or an array of input items", "input")
    return ResponsesRequest(
        model=model, stream=stream, store=True if store is None else store, previous_response_id=previous or None,
        instructions=instructions or None, messages=input_messages(body["input"], referenced or {}),
        options=_options(body),
        echo={name: body[name] for name in _ECHOED if body.get(name) is not None})


def unsupported(message: str, param: str) -> GatewayError:
    return bad_request(message, param, code="unsupported_parameter")


def _optional(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and type(value) is not kind:
        raise bad_request(f"'{name}' must be {what}", name)
    return value


# --------------------------------------------------------------------------- input items


def input_messages(raw: Any, referenced: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` -> chat messages. Consecutive assistant text and function calls become one
    assistant message with `tool_calls`, as the chat protocol wants them."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise bad_request("'input' must be a string or an array of input items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "item_reference":
            item = _referenced(item, referenced, where)
            kind = item.get("type")
        if kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and _open_assistant(messages):
                messages[-1]["content"] = (messages[-1].get("content") or "") + message["content"]
            else:
                messages.append(message)
        elif kind == "function_call":
            call = _function_call(item, where)
            if _open_assistant(messages):
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_output(item, where))
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(f"{where}.type '{kind}' is not an input item the gateway can send: use message, "
                              "function_call or function_call_output", f"{where}.type")
    return messages


def _referenced(item: dict[str, Any], referenced: Mapping[str, dict[str, Any]], where: str) -> dict[str, Any]:
    item_id = item.get("id")
    found = referenced.get(item_id) if isinstance(item_id, str) else None
    if found is None:
        raise GatewayError(404, f"{where}: item '{item_id}' not found: it was not stored by this gateway "
                           "for this key (store: false), or has expired or was deleted; send the item itself",
                           "invalid_request_error", "item_not_found", f"{where}.id", outcome="not_found")
    return found


def _open_assistant(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and messages[-1]["role"] == "assistant"


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of user, assistant, system, developer", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        parts.append(_part(part, role, f"{where}.content[{j}]"))
    if role == "user" and any(p["type"] == "image_url" for p in parts):
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(p["text"] for p in parts)}


def _part(part: Any, role: str, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object", where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "refusal"):
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise bad_request(f"{where} needs a string '{'refusal' if kind == 'refusal' else 'text'}'", where)
        return {"type": "text", "text": text}
    if kind == "input_image" and role == "user":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise unsupported("an input_image needs an image_url (a URL or a data URL); file ids need OpenAI's "
                              "file store", f"{where}.image_url")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind in ("input_file", "input_audio", "input_image"):
        raise unsupported(f"{where}: {kind} parts cannot be sent through the gateway"
                          + (" in this role" if kind == "input_image" else ""), f"{where}.type")
    raise bad_request(f"{where}.type '{kind}' is not a content part: use input_text, input_image or output_text",
                      f"{where}.type")


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    for field, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
        if not isinstance(value, str) or (field != "arguments" and not value):
            raise bad_request(f"{where}.{field} must be a{' non-empty' if field != 'arguments' else ''} string",
                              f"{where}.{field}")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where}.call_id must be a non-empty string", f"{where}.call_id")
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") != "input_text" or not isinstance(part.get("text"), str):
                raise unsupported(f"{where}.output[{j}]: only input_text parts can be sent as a function's output",
                                  f"{where}.output[{j}]")
            texts.append(part["text"])
        output = "".join(texts)
    if not isinstance(output, str):
        raise bad_request(f"{where}.output must be a string or an array of input_text parts", f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


# --------------------------------------------------------------------------- options


def _options(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if type(value) not in (int, float):
                raise bad_request(f"'{name}' must be a number", name)
            out[name] = value
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise bad_request("'max_output_tokens' must be a positive integer", "max_output_tokens")
        out["max_completion_tokens"] = limit
    parallel = _optional(body, "parallel_tool_calls", bool, "a boolean")
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    choice = _tool_choice(body.get("tool_choice"))
    if choice is not None and tools:        # chat refuses a tool_choice without tools
        out["tool_choice"] = choice
    response_format = _text_format(body.get("text"))
    if response_format is not None:
        out["response_format"] = response_format
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["user"] = user
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad_request("'reasoning' must be an object", "reasoning")
    if reasoning and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    return out


def _tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request("'tools' must be an array", "tools")
    tools = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"{where} must be an object", where)
        if tool.get("type") != "function":
            raise unsupported(f"{where}: '{tool.get('type')}' {_HOSTED}", f"{where}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.name must be a non-empty string", f"{where}.name")
        function: dict[str, Any] = {"name": name}
        for field, kind in (("description", str), ("parameters", dict), ("strict", bool)):
            value = tool.get(field)
            if value is not None:
                if not isinstance(value, kind):
                    raise bad_request(f"{where}.{field} has the wrong type", f"{where}.{field}")
                function[field] = value
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(raw: Any) -> Any:
    if raw is None or raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    raise unsupported("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
                      "tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request("'text.format.type' must be text, json_object or json_schema", "text.format.type")
    assert isinstance(fmt, dict)
    name, schema = fmt.get("name"), fmt.get("schema")
    if not isinstance(name, str) or not name:
        raise bad_request("'text.format.name' must be a non-empty string", "text.format.name")
    if not isinstance(schema, dict):
        raise bad_request("'text.format.schema' must be a JSON schema object", "text.format.schema")
    spec: dict[str, Any] = {"name": name, "schema": schema}
    for field in ("strict", "description"):
        if fmt.get(field) is not None:
            spec[field] = fmt[field]
    return {"type": "json_schema", "json_schema": spec}
