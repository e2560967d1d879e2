"""The canonical answer -> OpenAI Responses: the response object and its stream events.

`ResponsesEncoder` is this surface's `Encoder` (`proxy.encoding`). A plain answer
(`chat.completion`) becomes one `response` object. A stream's `chat.completion.chunk`
payloads become the Responses event lifecycle, every event numbered by
`sequence_number` from 0:

  response.created, response.in_progress        with the first content (the commit point)
  per output item, in order:
    response.output_item.added
    a message:  response.content_part.added, response.output_text.delta (or
                response.refusal.delta) ..., response.output_text.done (refusal.done),
                response.content_part.done
    a function call:  response.function_call_arguments.delta ...,
                response.function_call_arguments.done
    response.output_item.done                   when the next item starts, or at the end
  response.completed, or response.incomplete (the token limit, a content filter)

The final response of a stream is built by the same code as a plain answer, so a
client's accumulated stream equals the non-streamed response but for ids. A failure
after the commit ends the stream, as OpenAI's own do, with an `error` event and then
`response.failed` (status `failed`, `error`, the output so far); never with a silent
close. The `error` event carries its fields both inside `error` (what OpenAI sends, and
what the Vercel AI SDK reads) and at the top level (the shape in OpenAI's API spec); the
`openai` SDKs raise an APIError on it.

Before the final bytes leave, `remember` (when the request is stored) keeps what a
follow-up needs, so a client that sends `previous_response_id` the instant it sees the
end finds it. Per chunk the encoder decodes the payload once (orjson) and dumps the
events it emits; nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from ..sse import named_frame

Remember = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]   # (response, assistant message)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_DEFAULTS: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "metadata": {}, "parallel_tool_calls": True,
    "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
    "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
    "truncation": "disabled", "user": None,
}


def new_id(prefix: str) -> str:
    return prefix + os.urandom(24).hex()


class ResponseShape:
    """The parts of a response object that do not depend on the answer."""

    __slots__ = ("id", "created_at", "requested_model", "store", "echo")

    def __init__(self, requested_model: str, store: bool, echo: dict[str, Any]) -> None:
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        self.requested_model = requested_model
        self.store = store
        self.echo = echo

    def render(self, model: str | None, status: str, output: list[dict[str, Any]],
               usage: dict[str, Any] | None = None, incomplete: str | None = None,
               error: dict[str, Any] | None = None) -> dict[str, Any]:
        response = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            **_DEFAULTS, **self.echo,
            "model": model or self.requested_model, "output": output, "store": self.store, "usage": usage,
        }
        return response


def response_usage(usage: Any) -> dict[str, Any] | None:
    """A chat `usage` object -> the Responses one."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    out_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(out_details.get("reasoning_tokens") or 0)},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def estimated_usage(input_tokens: int, output: list[dict[str, Any]]) -> dict[str, Any]:
    """Usage for an answer whose upstream reported none (OpenAI-compatible vendors that ignore
    `stream_options`): the router's input estimate and 4 characters a token of the output, the
    same estimate the decision record bills (and marks `cost_estimated`). A finished response
    always carries usage: clients such as the Vercel AI SDK reject a `response.completed`
    without it."""
    chars = 0
    for item in output:
        chars += len(item.get("arguments") or "")
        for part in item.get("content") or ():
            chars += len(part.get("text") or part.get("refusal") or "")
    output_tokens = (chars + 3) >> 2
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id, "name": name}


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output as the chat assistant message a follow-up's history holds."""
    text = "".join(part.get("text") or part.get("refusal") or ""
                   for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def status_of(finish_reason: str | None) -> tuple[str, str | None]:
    """(response status, incomplete reason) for a chat finish reason."""
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", reason) if reason else ("completed", None)


class ResponsesEncoder:
    """One Responses request's encoding; see the module docstring."""

    native: str | None = None

    def __init__(self, shape: ResponseShape, remember: Remember | None) -> None:
        self.shape = shape
        self.remember = remember
        self.sequence = 0
        self.model: str | None = None
        self.output: list[dict[str, Any]] = []      # items in output order, as they stand now
        self.open: dict[str, Any] | None = None     # the item still receiving deltas
        self.part: dict[str, Any] | None = None     # the open message's content part
        self.pieces: list[str] = []                 # the open part's text or call's arguments so far
        self.calls: dict[int, dict[str, Any]] = {}  # the chat tool-call index -> its item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.input_estimate = 0                     # the router's, for an upstream that reports no usage
        self.started = False

    def expect_input_tokens(self, tokens: int) -> None:
        self.input_estimate = tokens

    # ------------------------------------------------------------------ plain

    async def answer(self, body: bytes, native: bool) -> bytes:
        completion = orjson.loads(body)
        choice = (completion.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        output: list[dict[str, Any]] = []
        status, incomplete = status_of(choice.get("finish_reason"))
        parts = []
        if message.get("content"):
            parts.append(text_part(message["content"]))
        if message.get("refusal"):
            parts.append(refusal_part(message["refusal"]))
        if parts:
            output.append(message_item(new_id("msg_"), parts, status))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            output.append(call_item(new_id("fc_"), call.get("id") or new_id("call_"), function.get("name") or "",
                                    function.get("arguments") or "", "completed"))
        usage = response_usage(completion.get("usage")) or estimated_usage(self.input_estimate, output)
        response = self.shape.render(completion.get("model"), status, output, usage, incomplete)
        if self.remember is not None:
            await self.remember(response, assistant_message(output))
        return orjson.dumps(response)

    # ------------------------------------------------------------------ stream

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        """One event, framed; encoded at once, so the items it names may change afterwards."""
        fields["type"] = kind
        fields["sequence_number"] = self.sequence
        self.sequence += 1
        return named_frame(kind, orjson.dumps(fields))

    def _start(self, out: list[bytes]) -> None:
        self.started = True
        snapshot = self.shape.render(self.model, "in_progress", [])
        out.append(self._event("response.created", {"response": snapshot}))
        out.append(self._event("response.in_progress", {"response": snapshot}))

    def chunk(self, payload: bytes) -> bytes:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return b""
        out: list[bytes] = []
        if not self.started:
            self.model = chunk.get("model") if isinstance(chunk.get("model"), str) else None
            self._start(out)
        if chunk.get("usage"):
            self.usage = response_usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text(out, "output_text", delta["content"])
            if delta.get("refusal"):
                self._text(out, "refusal", delta["refusal"])
            for call in delta.get("tool_calls") or ():
                self._call(out, call)
            if choice.get("finish_reason") and self.finish_reason is None:
                self.finish_reason = choice["finish_reason"]
        return b"".join(out)

    def _text(self, out: list[bytes], kind: str, delta: str) -> None:
        item = self.open
        if item is None or item["type"] != "message":
            self._close(out)
            item = self.open = message_item(new_id("msg_"), [], "in_progress")
            self.output.append(item)
            out.append(self._event("response.output_item.added", {"output_index": len(self.output) - 1,
                                                                   "item": item}))
        part = self.part
        if part is None or part["type"] != kind:
            self._close_part(out)
            part = self.part = text_part("") if kind == "output_text" else refusal_part("")
            item["content"].append(part)
            out.append(self._event("response.content_part.added", {**self._where(), "part": part}))
        self.pieces.append(delta)
        if kind == "output_text":
            out.append(self._event("response.output_text.delta", {**self._where(), "delta": delta, "logprobs": []}))
        else:
            out.append(self._event("response.refusal.delta", {**self._where(), "delta": delta}))

    def _where(self) -> dict[str, Any]:
        assert self.open is not None and self.part is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1,
                "content_index": len(self.open["content"]) - 1}

    def _call(self, out: list[bytes], call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        function = call.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            self._close(out)
            item = self.calls[index] = self.open = call_item(
                new_id("fc_"), call.get("id") or new_id("call_"), function.get("name") or "", "", "in_progress")
            self.output.append(item)
            out.append(self._event("response.output_item.added",
                                   {"output_index": len(self.output) - 1, "item": item}))
        fragment = function.get("arguments")
        if not fragment:
            return
        if item is self.open:
            self.pieces.append(fragment)
            out.append(self._event("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": len(self.output) - 1, "delta": fragment}))
        else:                           # a late fragment for a call already closed stays out of the events
            item["arguments"] += fragment

    def _flush(self) -> None:
        """The open part's or call's pieces into its text (joined once, not grown per delta)."""
        if self.pieces:
            target, field = (self.part, "text" if self.part["type"] == "output_text" else "refusal") \
                if self.part is not None else (self.open, "arguments")
            if target is not None:
                target[field] += "".join(self.pieces)
            self.pieces = []

    def _close_part(self, out: list[bytes]) -> None:
        part = self.part
        if part is None:
            return
        self._flush()
        where = self._where()
        if part["type"] == "output_text":
            out.append(self._event("response.output_text.done", {**where, "text": part["text"], "logprobs": []}))
        else:
            out.append(self._event("response.refusal.done", {**where, "refusal": part["refusal"]}))
        out.append(self._event("response.content_part.done", {**where, "part": part}))
        self.part = None

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        item = self.open
        if item is None:
            return
        index = len(self.output) - 1       # the open item is always the last
        if item["type"] == "message":
            self._close_part(out)
        else:
            self._flush()
            out.append(self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "arguments": item["arguments"]}))
        item["status"] = status
        out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
        self.open = None

    async def end(self, payloads: Sequence[bytes], native: bool) -> bytes:
        out = [self.chunk(p) for p in payloads]
        events: list[bytes] = []
        if not self.started:
            self._start(events)
        status, incomplete = status_of(self.finish_reason)
        self._close(events, "incomplete" if incomplete and self.open is not None
                    and self.open["type"] == "message" else "completed")
        usage = self.usage or estimated_usage(self.input_estimate, self.output)
        response = self.shape.render(self.model, status, self.output, usage, incomplete)
        if self.remember is not None:
            await self.remember(response, assistant_message(self.output))
        events.append(self._event(f"response.{status}", {"response": response}))
        return b"".join(out) + b"".join(events)

    def error(self, message: str, type_: str, code: str | None) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        self._flush()
        if self.open is not None:
            self.open["status"] = "incomplete"
        detail = {"type": type_, "code": code or "server_error", "message": message, "param": None}
        out.append(self._event("error", {**detail, "error": detail}))
        failed = {"code": "server_error", "message": message}
        out.append(self._event("response.failed", {
            "response": self.shape.render(self.model, "failed", self.output, self.usage, error=failed)}))
        return b"".join(out)
