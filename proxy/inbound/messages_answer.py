"""Answers for a Messages client from a chat-shaped upstream answer, and Anthropic's error shape.

An OpenAI or Gemini deployment's answer reaches the gateway as a chat completion (the
adapters' common shape); a Messages client needs a `message`. `message_from_completion`
converts a whole answer; `MessagesEncoder` converts a stream chunk by chunk into the
documented event sequence: `message_start`, then per content block `content_block_start`,
its deltas (`text_delta`, or `input_json_delta` whose fragments concatenate to the tool's
JSON input) and `content_block_stop`, then `message_delta` (stop reason and the final usage)
and `message_stop`. Every event carries its `event:` line: the SDKs ignore events without one.
A failure after the commit is one `event: error` and no `message_stop`.

Stop reasons: stop is `end_turn`, length `max_tokens`, tool calls `tool_use`, a content
filter `refusal` (chat protocols do not say which stop sequence ended the text, so a stop
sequence also reads `end_turn`). Usage keeps Anthropic's split: `input_tokens` excludes
cache reads. Tool-call ids go back as `toolu_...` (`call_X` -> `toolu_X`, the inverse of
what the request translation does with them). The upstream's usage arrives after the
finish, so `message_start` carries the gateway's input estimate and `message_delta` the
upstream's counts.
Pure: no I/O.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import FailureClass
from ..providers.anthropic import STOP_REASON, tool_use_id, usage_json
from ..providers.openai import parse_usage
from ..sse import named_frame
from ..usage import Usage

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
               529: "overloaded_error"}
# The code dispatch gives a broken stream (`stream_<failure class>`) -> Anthropic's error type.
_CODE_ERROR_TYPES = {f"stream_{FailureClass.OVERLOADED.value}": "overloaded_error",
                     f"stream_{FailureClass.RATE_LIMITED.value}": "overloaded_error",
                     f"stream_{FailureClass.TIMEOUT.value}": "timeout_error"}


def message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}, "request_id"}`."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return orjson.dumps(body)


def _tool_input(arguments: Any) -> Any:
    try:
        value = orjson.loads(arguments or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def message_from_completion(payload: bytes, input_estimate: int) -> bytes:
    """A chat completion (an adapter's output) -> a Messages `message`. Without the upstream's
    usage, the estimate the decision record bills (as a stream's `message_delta` gives it)."""
    completion = orjson.loads(payload)
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": tool_use_id(call.get("id")), "name": function.get("name") or "",
                        "input": _tool_input(function.get("arguments"))})
    stop = STOP_REASON.get(choice.get("finish_reason") or "stop", "end_turn")
    usage = parse_usage(completion.get("usage"))
    if usage is None:
        chars = len(text or "") + sum(len((c.get("function") or {}).get("arguments") or "")
                                      for c in message.get("tool_calls") or [])
        usage = Usage(input_tokens=input_estimate, output_tokens=(chars + 3) >> 2)
    answer = {"id": message_id(), "type": "message", "role": "assistant", "model": str(completion.get("model") or ""),
              "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage_json(usage)}
    return orjson.dumps(answer)


class MessagesEncoder:
    """The Messages surface's `Encoder` (`proxy.encoding`), one per request: chat chunk
    payloads in, Messages SSE frames out; a native answer (an Anthropic deployment's own)
    goes through as it came.

    The block being written is either text or one tool call; a change of kind (or of
    tool call) closes it and opens the next, indexed from 0.
    """

    __slots__ = ("_id", "_started", "_block", "_open", "_tool_index", "_tool_args", "_stop", "_usage", "_chars",
                 "_input_estimate")
    native: str | None = "anthropic"

    def __init__(self) -> None:
        self._id = message_id()
        self._started = False
        self._block = -1                    # index of the last block opened
        self._open: str | int | None = None  # "text", a chat tool-call index, or None
        self._tool_index: dict[int, int] = {}    # chat tool-call index -> block index
        self._tool_args: dict[int, bool] = {}    # block index -> any argument fragment sent
        self._stop: str | None = None
        self._usage: Usage | None = None
        self._chars = 0                     # output characters, for an estimate when usage never comes
        self._input_estimate = 0            # the router's estimate, until the upstream's count arrives

    def expect_input_tokens(self, tokens: int) -> None:
        self._input_estimate = tokens

    def chunk(self, payload: bytes) -> bytes:
        chunk = orjson.loads(payload)
        out: list[bytes] = []
        if not self._started:
            self._started = True
            # Chat protocols report usage after the finish: message_start carries the router's
            # estimate of the input (as a context-size display reads it), message_delta the counts.
            out.append(self._event("message_start", {"message": {
                "id": self._id, "type": "message", "role": "assistant", "model": str(chunk.get("model") or ""),
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self._input_estimate, "output_tokens": 0}}}))
        if chunk.get("usage"):
            self._usage = parse_usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                out += self._text(text)
            for call in delta.get("tool_calls") or ():
                out += self._tool_call(call)
            if choice.get("finish_reason"):
                self._stop = STOP_REASON.get(choice["finish_reason"], "end_turn")
        return b"".join(out)

    async def end(self, payloads: Sequence[bytes], native: bool) -> bytes:
        """The end of a complete answer: the open block's stop, `message_delta`, `message_stop`
        (a native stream's own end has gone through already)."""
        if native:
            return b""
        out = [self.chunk(p) for p in payloads]
        out += self._close_block()
        usage: dict[str, int] = usage_json(self._usage) if self._usage is not None \
            else {"input_tokens": self._input_estimate, "output_tokens": (self._chars + 3) >> 2}  # no usage came
        out.append(self._event("message_delta", {"delta": {"stop_reason": self._stop or "end_turn",
                                                           "stop_sequence": None}, "usage": usage}))
        out.append(self._event("message_stop", {}))
        return b"".join(out)

    def error(self, message: str, type_: str, code: str | None) -> bytes:
        """After the commit: Anthropic's own `error` event, and no `message_stop`."""
        kind = _CODE_ERROR_TYPES.get(code or "") or ("overloaded_error" if code == "shutting_down" else "api_error")
        return named_frame("error", orjson.dumps({"type": "error", "error": {"type": kind, "message": message}}))

    async def answer(self, body: bytes, native: bool) -> bytes:
        return body if native else message_from_completion(body, self._input_estimate)

    # ------------------------------------------------------------------ blocks

    def _text(self, text: str) -> list[bytes]:
        out = []
        if self._open != "text":
            out = self._close_block()
            out.append(self._start_block({"type": "text", "text": ""}))
            self._open = "text"
        self._chars += len(text)
        out.append(self._event("content_block_delta", {"index": self._block,
                                                       "delta": {"type": "text_delta", "text": text}}))
        return out

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        out = []
        position = call.get("index", 0)
        function = call.get("function") or {}
        if position not in self._tool_index:
            out = self._close_block()
            out.append(self._start_block({"type": "tool_use", "id": tool_use_id(call.get("id")),
                                          "name": str(function.get("name") or ""), "input": {}}))
            self._open = position
            self._tool_index[position] = self._block
            self._tool_args[self._block] = False
        fragment = function.get("arguments")
        if fragment:
            index = self._tool_index[position]
            self._tool_args[index] = True
            self._chars += len(fragment)
            out.append(self._event("content_block_delta", {"index": index, "delta": {
                "type": "input_json_delta", "partial_json": fragment}}))
        return out

    def _start_block(self, block: dict[str, Any]) -> bytes:
        self._block += 1
        return self._event("content_block_start", {"index": self._block, "content_block": block})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._open != "text" and not self._tool_args.get(self._block):
            # A call without arguments: its input must still parse as JSON, so send the empty object.
            out.append(self._event("content_block_delta", {"index": self._block, "delta": {
                "type": "input_json_delta", "partial_json": "{}"}}))
        out.append(self._event("content_block_stop", {"index": self._block}))
        self._open = None
        return out

    @staticmethod
    def _event(name: str, body: dict[str, Any]) -> bytes:
        return named_frame(name, orjson.dumps({"type": name, **body}))
