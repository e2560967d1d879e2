"""OpenAI's shape on both sides, for the adapters that translate another protocol.

In: reading an OpenAI chat request's pieces (text, data-URL images, tool arguments).
Out: a client must not be able to tell which provider answered except by `model`, so
every translated chunk and completion is built here, once: ids `chatcmpl-...`, `object`,
`created`, the role chunk first, content or tool-call deltas, the finish chunk, and the
usage chunk with `choices: []` last (only when the client asked for it).
`TranslatedStream` holds the bookkeeping the `StreamTranslator` contract asks for.
Pure: no sockets, no provider names.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from ..errors import FailureClass, UpstreamFailure
from ..usage import Usage
from . import StreamState


def unsupported(message: str) -> UpstreamFailure:
    """A request this protocol cannot express: the caller's fault, with a reason."""
    return UpstreamFailure(FailureClass.CALLER, message, 400, "unsupported_parameter")


def text_of(content: Any) -> str:
    """The text of a message's `content`: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content
                       if isinstance(p, dict) and p.get("type") in ("text", "input_text"))
    return ""


def parse_data_url(url: str) -> tuple[str, str] | None:
    """`data:image/png;base64,AAAA` -> ("image/png", "AAAA"); None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, sep, data = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise unsupported("image data URLs must be base64-encoded")
    return header[:-7] or "application/octet-stream", data


def image_url(part: dict[str, Any]) -> str:
    raw = part.get("image_url")
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str) or not url:
        raise unsupported("an image_url part needs a url")
    return url


def tool_arguments(raw: Any) -> dict[str, Any]:
    """An assistant tool call's `arguments` string as the object other protocols want."""
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError):
        raise unsupported("tool call arguments must be a JSON object") from None
    if not isinstance(value, dict):
        raise unsupported("tool call arguments must be a JSON object")
    return value


def max_tokens(body: Any) -> int | None:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if isinstance(value, int) else None


def stop_sequences(body: Any) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if isinstance(s, str)] if isinstance(stop, list) else []


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:29]


def tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def completion(model: str, text: str | None, tool_calls: list[dict[str, Any]], finish_reason: str,
               usage: Usage | None) -> bytes:
    """A complete `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None,
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage.to_openai()
    return orjson.dumps(body)


def function_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class TranslatedStream(StreamState):
    """The state every translated stream keeps, and the chunks it emits.

    Subclasses decode their protocol's events in `feed` and call the emitters below;
    `close` owes the client the usage chunk, so it is sent exactly once, last.
    """

    def __init__(self, model: str, include_usage: bool, collect_text: bool) -> None:
        super().__init__(include_usage, collect_text)
        self.model = model
        self._id = completion_id()
        self._created = int(time.time())
        self._role_sent = False
        self._usage_sent = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return orjson.dumps({
            "id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        })

    def role(self) -> list[bytes]:
        """The role chunk, once, before anything else."""
        if self._role_sent:
            return []
        self._role_sent = True
        return [self._chunk({"role": "assistant", "content": "", "refusal": None})]

    def content(self, text: str) -> list[bytes]:
        if not text:
            return []
        self.content_seen = True
        if self.collect_text:
            self.text.append(text)
        return [*self.role(), self._chunk({"content": text})]

    def tool_call_start(self, index: int, call_id: str, name: str) -> list[bytes]:
        self.content_seen = True
        return [*self.role(), self._chunk({"tool_calls": [
            {"index": index, **function_call(call_id, name, "")}]})]

    def tool_arguments(self, index: int, fragment: str) -> list[bytes]:
        if not fragment:
            return []
        return [self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})]

    def finish(self, reason: str) -> list[bytes]:
        """The finish chunk; a second finish (a protocol repeating itself) is dropped."""
        if self.finish_reason is not None:
            return []
        self.content_seen = True
        self.finish_reason = reason
        return [*self.role(), self._chunk({}, reason)]

    def close(self) -> Sequence[bytes]:
        if not self.include_usage or self._usage_sent or self.usage is None:
            return ()
        self._usage_sent = True
        return (orjson.dumps({
            "id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
            "system_fingerprint": None, "choices": [], "usage": self.usage.to_openai(),
        }),)
