"""A Messages request served by an Anthropic deployment: the client's own bytes, both ways.

The request body goes up as the client sent it with only the top-level `model` value
replaced by the deployment's upstream id, spliced into the raw bytes (`replace_model`), so
signed thinking blocks, `cache_control` markers and every field the gateway does not know
arrive untouched. The client's `anthropic-version` and `anthropic-beta` go along (the body
was written for them); `beta=true` in the client's query string too. The answer comes back
as the upstream's bytes: a whole message unchanged, a stream event by event as it arrives.

`NativeWatch` reads the stream beside the bytes, for what dispatch needs and nothing
else: the commit point (the first content block of any kind: a thinking block counts, or
a long think would run into `first_token_s`), the end (`message_stop`), usage for the
bill, and an in-band `error` event (before the commit: the next attempt, unseen).
Pure: never opens a socket.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from ..config import Deployment
from ..errors import FailureClass, UpstreamFailure
from ..providers import StreamState, UpstreamRequest, json_event
from ..providers.anthropic import API_VERSION, classify_error, parse_usage

FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
# A JSON string, or one structural character: strings are skipped whole by the regex engine, so
# a body of long texts costs a few tokens per block, not a step per byte.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]')


class NotFound(ValueError):
    """The body has no top-level string `model` to replace."""


def model_spans(raw: bytes) -> list[tuple[int, int]]:
    """(start, end) of each top-level `"model"` string value in a JSON object's bytes (all of
    them: with a duplicated key, the upstream must not read a model the router did not)."""
    spans = []
    depth = 0
    key: bytes | None = None            # the top-level key whose value comes next
    expect_key = False
    for token in _TOKEN.finditer(raw):
        first = raw[token.start()]
        if first == 0x22:                                   # a string
            if depth == 1:
                if expect_key:
                    text = token.group()
                    key = orjson.loads(text).encode() if b"\\" in text else text[1:-1]
                    expect_key = False
                elif key == b"model":
                    spans.append(token.span())
        elif first in b"{[":
            depth += 1
            if depth == 1:
                expect_key = first == 0x7B
        elif first in b"}]":
            depth -= 1
        elif first == 0x2C and depth == 1:                  # a comma between top-level members
            expect_key, key = True, None
    if not spans:
        raise NotFound("no top-level string 'model'")
    return spans


def replace_model(raw: bytes, model: str) -> bytes:
    """`raw` with every top-level `model` value set to `model`; every other byte as it was."""
    new = orjson.dumps(model)
    out, last = [], 0
    for start, end in model_spans(raw):
        out += [raw[last:start], new]
        last = end
    out.append(raw[last:])
    return b"".join(out)


def build(deployment: Deployment, raw: bytes, headers: Mapping[str, str], query: Mapping[str, str],
          path: str = "/messages") -> UpstreamRequest:
    """The upstream request for the client's raw body (`path` is `/messages/count_tokens` for counts)."""
    provider = deployment.provider
    sent = {"Content-Type": "application/json", "anthropic-version": API_VERSION, **provider.headers}
    for name in FORWARDED_HEADERS:
        value = headers.get(name)
        if value:
            sent[name] = value
    if provider.api_key:
        sent[provider.auth_header or "x-api-key"] = provider.api_key
    params = {**provider.query}
    if query.get("beta"):
        params["beta"] = query["beta"]
    url = f"{provider.base_url}{path}" + (f"?{urlencode(params)}" if params else "")
    return UpstreamRequest(url, sent, replace_model(raw, deployment.upstream_model))


def plain_usage(payload: bytes) -> Any:
    """The usage of a whole Messages answer, for the bill; raises like an adapter's `parse`."""
    message = json_event(payload)
    if message is None or not isinstance(message.get("content"), list):
        if message is not None and message.get("type") == "error":
            raise classify_error(message.get("error"), None, in_stream=True)
        raise UpstreamFailure(FailureClass.PROTOCOL, "upstream response is not a Messages answer")
    return parse_usage(message.get("usage"))


class NativeWatch(StreamState):
    """Watches an Anthropic stream that passes through untouched; `feed` returns nothing
    because the bytes go to the client as they came."""

    __slots__ = ()

    def feed(self, name: str | None, data: bytes) -> Sequence[bytes]:
        event = json_event(data)
        if event is None:
            return ()
        kind = event.get("type") or name
        if kind == "content_block_delta":
            self.content_seen = True
            delta = event.get("delta") or {}
            if self.collect_text and delta.get("type") == "text_delta":
                self.text.append(str(delta.get("text") or ""))
        elif kind == "content_block_start":
            self.content_seen = True
        elif kind == "message_start":
            self.usage = parse_usage((event.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            self.usage = parse_usage(event.get("usage"), self.usage)
            if (event.get("delta") or {}).get("stop_reason"):
                self.content_seen = True
                self.finish_reason = str(event["delta"]["stop_reason"])
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            raise classify_error(event.get("error"), None, in_stream=True)
        return ()

    def close(self) -> Sequence[bytes]:
        return ()
