"""The adapter contract and the registry: one pure translator per wire protocol.

An adapter builds the upstream request from an OpenAI chat body, parses a complete
response into OpenAI's shape, translates a stream event by event, and classifies a
failure into a `FailureClass`. It never opens a socket: transport, timeouts and
exception mapping live in `proxy.transport`, and the policy in `proxy.dispatch`.
A vendor is a config entry, never a branch: vLLM, Groq or Azure are the `openai` protocol
with another base URL and headers.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..config import Deployment
from ..errors import FailureClass, UpstreamFailure
from ..usage import Usage


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes
    native: bool = False        # the client's own body in this protocol: the answer goes back untouched


class StreamTranslator(Protocol):
    """Turns upstream SSE events into OpenAI chunk payloads (JSON bytes without framing).

    `feed` raises `UpstreamFailure` for an in-band error event and drops a malformed one.
    `content_seen` turns true at the first content-bearing event (text, tool call or
    finish): the commit point. `finished` turns true when the upstream's stream is complete
    by its protocol, even if the socket stays open.
    """

    content_seen: bool
    finished: bool
    finish_reason: str | None
    usage: Usage | None
    text: list[str]

    def feed(self, name: str | None, data: bytes) -> Sequence[bytes]: ...

    def close(self) -> Sequence[bytes]:
        """Frames still owed to the client once the upstream has ended (usage, a last chunk)."""
        ...


class StreamState:
    """The state every `StreamTranslator` keeps and dispatch reads; translators extend it."""

    __slots__ = ("include_usage", "collect_text", "content_seen", "finished", "finish_reason", "usage", "text")

    def __init__(self, include_usage: bool, collect_text: bool) -> None:
        self.include_usage = include_usage
        self.collect_text = collect_text
        self.content_seen = False
        self.finished = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.text: list[str] = []


class Adapter(Protocol):
    def build(self, deployment: Deployment, body: Mapping[str, Any], stream: bool,
              prefill: str | None = None) -> UpstreamRequest: ...

    def parse(self, payload: bytes, deployment: Deployment) -> tuple[bytes, Usage | None]:
        """A complete response -> (OpenAI chat.completion JSON, usage). Raises UpstreamFailure."""
        ...

    def stream(self, deployment: Deployment, include_usage: bool, collect_text: bool) -> StreamTranslator: ...

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure: ...


class NativeAdapter(Protocol):
    """An adapter that can also send a client's own request in its protocol (see `proxy.encoding`)."""

    def build_native(self, deployment: Deployment, body: bytes, stream: bool,
                     headers: Mapping[str, str]) -> UpstreamRequest:
        """The client's body with only `model` replaced (and the usage a stream needs asked
        for), with the client's protocol headers it needs (`headers`: the surface picks them);
        the result has `native=True`. Its answer is still read by `parse` and `stream`."""
        ...


class CountingAdapter(Protocol):
    """An adapter whose protocol counts a request's input tokens (Messages' count_tokens)."""

    def build_count(self, deployment: Deployment, native_body: bytes, body: Mapping[str, Any],
                    headers: Mapping[str, str]) -> UpstreamRequest:
        """The counting request for a Messages client's bytes (`native_body`, sent as they are
        by the protocol they belong to, with its `headers`) or their chat translation (`body`)."""
        ...


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def json_event(data: bytes) -> dict[str, Any] | None:
    """One stream event's JSON object, or None for a malformed or non-object event (which
    every translator drops, so the client's stream stays valid)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event if type(event) is dict else None


def error_in_body(status: int, body: bytes) -> Any:
    """The `error` member of an error answer's JSON body (a bare object, or the first item
    of a JSON array as Gemini's array streams send it); a stand-in naming the status when
    the body holds none."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and parsed:
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if error is not None else {"message": f"upstream answered HTTP {status}"}


_CONTEXT_CODES = frozenset(("context_length_exceeded", "string_above_max_length"))
_POLICY_CODES = frozenset(("content_policy_violation", "content_filter"))
_CANONICAL_CODES = {FailureClass.CONTEXT_LENGTH: "context_length_exceeded",
                    FailureClass.CONTENT_POLICY: "content_policy_violation"}


def classify_error_object(error: Any, status: int | None, in_stream: bool,
                          retry_after: float | None = None) -> UpstreamFailure:
    """An OpenAI-shaped `error` object (from a body or an in-band event) -> a failure.

    The other protocols normalise their errors into this shape first, so one table of
    codes, types and statuses classifies all three.
    """
    message, code, kind = "upstream error", None, ""
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        code = error.get("code")
        code = str(code) if code is not None else None
        kind = str(error.get("type") or "")
    elif isinstance(error, str):
        message = error
    lowered = message.lower()
    if code in _CONTEXT_CODES or "maximum context length" in lowered or "context length" in lowered:
        cls = FailureClass.CONTEXT_LENGTH
    elif code in _POLICY_CODES or "content management policy" in lowered or "content policy" in lowered:
        cls = FailureClass.CONTENT_POLICY
    elif status == 429 or code == "rate_limit_exceeded" or kind == "rate_limit_error":
        cls = FailureClass.RATE_LIMITED
    elif status in (401, 403) or kind in ("authentication_error", "permission_error"):
        cls = FailureClass.AUTH
    elif status in (503, 529) or "overloaded" in kind or "overloaded" in lowered:
        cls = FailureClass.OVERLOADED
    elif status == 408:
        cls = FailureClass.TIMEOUT
    elif status is not None and status >= 500 or kind == "server_error":
        cls = FailureClass.SERVER
    elif status is not None and 400 <= status < 500:
        cls = FailureClass.CALLER
    else:
        cls = FailureClass.PROTOCOL
    if code is None:            # one code per kind, whichever protocol reported it
        code = _CANONICAL_CODES.get(cls)
    # Whole: dispatch redacts the provider key and then cuts it (errors.redact).
    return UpstreamFailure(cls, message, status, code, retry_after, in_stream)


def registry() -> dict[str, Adapter]:
    from .anthropic import AnthropicAdapter
    from .gemini import GeminiAdapter
    from .openai import OpenAIAdapter

    return {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter(), "gemini": GeminiAdapter()}
