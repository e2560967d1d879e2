"""A Messages request, checked, and its translation into the gateway's chat shape.

`check` validates a decoded `POST /v1/messages` (or `count_tokens`) body the way the API
does, so a bad request is a 400 naming the field before anything is routed. `to_chat`
turns it into an OpenAI chat body: the shape the router reads its signals from and the
OpenAI and Gemini adapters translate from. An Anthropic deployment never sees that body
(it gets the client's own bytes), so the translation only has to be right for the others.

What chat cannot say is dropped and named in `Translated.dropped`, which lands in the
decision record: thinking and redacted-thinking blocks (their signatures are Anthropic's;
another provider cannot check them and must not see forged ones), `thinking`,
`context_management`, `metadata`, `top_k`, `service_tier`, `cache_control` markers, images
inside tool results, and any other top-level field. What chat cannot carry at all (documents,
server tools, search results, MCP servers, file references) makes the body `unsendable`:
only an Anthropic deployment can serve it, and the others are skipped with that reason.

Mapping: `system` becomes a system message; `tool_result` blocks become `tool` messages
ahead of the rest of their user turn (`is_error` prefixes the text with "Error: ");
`tool_use` blocks become assistant `tool_calls` with OpenAI-shaped ids (`toolu_X` ->
`call_X`, reversed on the way back); `tool_choice` any/tool/none/auto and
`disable_parallel_tool_use` map to `tool_choice` and `parallel_tool_calls`; `max_tokens`
becomes `max_completion_tokens` (the field every current OpenAI model accepts; reasoning
models reject `max_tokens`); `stop_sequences` becomes `stop`; structured output
(`output_config.format`, or the beta's top-level `output_format`: a JSON schema the answer
must follow, what the SDKs' `messages.parse` and the Vercel AI SDK's `generateObject` send)
becomes `response_format` `json_schema`, so the router sees JSON output too; other
`output_config` members are dropped and named.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import bad_request
from ..providers.anthropic import TOOL_CHOICE, call_id, source_url
from ..signals import text_tokens

_ROLES = ("user", "assistant")
_CHOICE_TO_CHAT = {theirs: ours for ours, theirs in TOOL_CHOICE.items()}
# Top-level fields chat has a place for; anything else is dropped and named.
_TRANSLATED = frozenset(("model", "messages", "system", "max_tokens", "stream", "stop_sequences", "temperature",
                         "top_p", "tools", "tool_choice", "output_format"))
# Top-level fields whose meaning lives only on Anthropic's side: a chat deployment cannot serve them.
_ANTHROPIC_ONLY = ("mcp_servers", "container")
_SENDABLE_BLOCKS = frozenset(("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"))


@dataclass(slots=True)
class Translated:
    body: dict[str, Any]                                # an OpenAI chat body
    dropped: list[str] = field(default_factory=list)    # what the chat body leaves out, for the record
    unsendable: str | None = None                       # why no chat deployment can serve the request
    extra_tokens: int = 0                               # the estimate of what the chat body could not carry


# ---------------------------------------------------------------------------- validation


def check(body: Any, *, count_only: bool = False) -> dict[str, Any]:
    """The body if it is a well-formed Messages request, else a 400 naming the field
    (`count_tokens` needs no `max_tokens`)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: a non-empty string is required", "model")
    if not count_only:
        limit = body.get("max_tokens")
        if type(limit) is not int:
            raise bad_request("max_tokens: Field required (a positive integer)", "max_tokens")
        if limit < 1:
            raise bad_request("max_tokens: must be at least 1", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: a non-empty array is required", "messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: must be an object", where)
        if message.get("role") not in _ROLES:
            raise bad_request(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
        _check_content(message.get("content"), f"{where}.content")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _check_content(system, "system")
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise bad_request("stream: must be a boolean", "stream")
    for name in ("temperature", "top_p", "top_k"):
        value = body.get(name)
        if value is not None and type(value) not in (int, float):
            raise bad_request(f"{name}: must be a number", name)
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise bad_request("stop_sequences: must be an array of strings", "stop_sequences")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools: must be an array", "tools")
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools.{i}: must be an object with a 'name'", f"tools.{i}")
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none")):
        raise bad_request("tool_choice.type: must be one of auto, any, tool, none", "tool_choice")
    if isinstance(choice, dict) and choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise bad_request("tool_choice.name: required when type is 'tool'", "tool_choice.name")
    for name in ("thinking", "metadata", "context_management", "output_config"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad_request(f"{name}: must be an object", name)
    output_format(body)
    return body


def output_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The structured-output format a checked body asks for (`output_config.format`, or the
    beta's top-level `output_format`), or None; a 400 naming the field when it is malformed."""
    for where, fmt in (("output_config.format", (body.get("output_config") or {}).get("format")),
                       ("output_format", body.get("output_format"))):
        if fmt is None:
            continue
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise bad_request(f"{where}.type: must be 'json_schema'", f"{where}.type")
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request(f"{where}.schema: a JSON schema object is required", f"{where}.schema")
        return fmt
    return None


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(f"{where}: must be a string or an array of content blocks", where)
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad_request(f"{where}.{j}: must be a content block object with a 'type'", f"{where}.{j}")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise bad_request(f"{where}.{j}.text: Field required", f"{where}.{j}.text")


# ---------------------------------------------------------------------------- translation


class _Notes:
    """Collects what the translation leaves out, each reason once, in order."""

    def __init__(self) -> None:
        self.dropped: list[str] = []
        self.unsendable: str | None = None
        self.extra_tokens = 0

    def drop(self, what: str) -> None:
        if what not in self.dropped:
            self.dropped.append(what)

    def cannot(self, what: str, block: Any = None) -> None:
        self.unsendable = self.unsendable or f"{what} cannot be sent through a chat protocol"
        if block is not None:
            self.extra_tokens += text_tokens(orjson.dumps(block).decode())


def _text_of(blocks: Any, notes: _Notes, where: str) -> str:
    """The text of a string or of text blocks (tool results, system); other blocks are dropped."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for block in blocks if isinstance(blocks, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("cache_control") is not None:
            notes.drop("cache_control")
        if block.get("type") == "text":
            parts.append(str(block.get("text") or ""))
        else:
            notes.drop(f"{block.get('type')} blocks in {where}")
    return "\n\n".join(parts) if where == "system" else "".join(parts)


def _user_turn(content: Any, notes: _Notes) -> list[dict[str, Any]]:
    """One user turn -> `tool` messages for its tool results, then a user message for the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block["type"]
        if block.get("cache_control") is not None:
            notes.drop("cache_control")
        if kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            url = source_url(block.get("source"))
            if url is None:
                notes.cannot("an image given by file reference", block)
            else:
                parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_result":
            text = _text_of(block.get("content") or "", notes, "tool results")
            if block.get("is_error"):
                text = "Error: " + text
            results.append({"role": "tool", "tool_call_id": call_id(block.get("tool_use_id")), "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            notes.drop("thinking blocks signed by anthropic")
        else:
            notes.cannot(f"a '{kind}' content block", block)
    if parts:
        results.append({"role": "user", "content": parts})
    return results


def _assistant_turn(content: Any, notes: _Notes) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block["type"]
        if kind == "text":
            text.append(block["text"])
        elif kind == "tool_use":
            calls.append({"id": call_id(block.get("id")), "type": "function", "function": {
                "name": str(block.get("name") or ""), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            notes.drop("thinking blocks signed by anthropic")
        else:
            notes.cannot(f"a '{kind}' content block", block)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return [message] if text or calls else []


def _tools(tools: list[dict[str, Any]], notes: _Notes) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        if tool.get("type") not in (None, "custom"):        # web_search_..., bash_..., text_editor_...
            notes.cannot(f"the server tool '{tool.get('type')}'", tool)
            continue
        if tool.get("cache_control") is not None:
            notes.drop("cache_control")
        function: dict[str, Any] = {"name": tool["name"], "description": str(tool.get("description") or ""),
                                    "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Mapping[str, Any]) -> Any:
    if choice["type"] == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return _CHOICE_TO_CHAT[choice["type"]]


def to_chat(body: Mapping[str, Any]) -> Translated:
    """A checked Messages body -> the chat body chat deployments get, and what it leaves out."""
    notes = _Notes()
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = _text_of(system, notes, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for message in body["messages"]:
        turn = _user_turn if message["role"] == "user" else _assistant_turn
        messages.extend(turn(message["content"], notes))
    if all(m["role"] == "system" for m in messages):
        # Every turn was something chat cannot carry (a lone document): routing still needs a
        # turn to read; no chat deployment will be sent this body (it is unsendable).
        messages.append({"role": "user", "content": ""})
    if body["messages"][-1]["role"] == "assistant":
        notes.drop("continuing a final assistant turn (it is sent as an earlier turn)")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_tokens") is not None:
        chat["max_completion_tokens"] = body["max_tokens"]
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}   # the usage for message_delta
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        tools = _tools(body["tools"], notes)
        if tools:
            chat["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None and "tools" in chat:
        chat["tool_choice"] = _tool_choice(choice)
        if choice.get("disable_parallel_tool_use") is True and choice["type"] != "none":
            chat["parallel_tool_calls"] = False
    fmt = output_format(body)
    if fmt is not None:
        # No `strict`: OpenAI's strict mode refuses schemas Anthropic accepts (optional properties).
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    for name in body.get("output_config") or ():
        if name != "format":
            notes.drop(f"output_config.{name}")
    for name in _ANTHROPIC_ONLY:
        if body.get(name):
            notes.cannot(f"'{name}'", body[name])
    for name in body:
        if name not in _TRANSLATED and name not in _ANTHROPIC_ONLY and name != "output_config":
            notes.drop(name)
    return Translated(chat, notes.dropped, notes.unsendable, notes.extra_tokens)

