"""Signals: each one read from the body and headers, and validated."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import GatewayKey
from proxy.errors import GatewayError
from proxy.signals import Signals, extract, text_tokens

USER = [{"role": "user", "content": "hello"}]


def signals(body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
            key: GatewayKey | None = None) -> Signals:
    return extract({"model": "auto", "messages": USER, **(body or {})}, headers or {}, key, "standard", 100)


def key(tier: str, trusted: bool) -> GatewayKey:
    return GatewayKey(name="k", tier=tier, trust_tier_header=trusted, allow=None, rpm=None)


def test_text_tokens_ascii_and_cjk() -> None:
    assert text_tokens("a" * 400) == 100
    assert text_tokens("") == 0
    assert text_tokens("漢" * 300) == 300          # 3 UTF-8 bytes each, about one token each


def test_input_tokens_count_messages_images_and_tools() -> None:
    base = signals().input_tokens
    longer = signals({"messages": [{"role": "user", "content": "x" * 4000}]}).input_tokens
    assert longer - base == 1000 - 2            # "hello" is 2 tokens, 4000 chars are 1000
    parts = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]
    low = signals({"messages": [{"role": "user", "content": parts}]})
    assert low.images and low.input_tokens == base + 85
    parts[1] = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert signals({"messages": [{"role": "user", "content": parts}]}).input_tokens == base + 765
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                         "properties": {"q": {"type": "string"}}}}}
    with_tools = signals({"tools": [tool]})
    assert with_tools.tools and with_tools.input_tokens > base + 10


@pytest.mark.parametrize("body,expected", [
    ({}, None), ({"max_tokens": 300}, 300), ({"max_completion_tokens": 200, "max_tokens": 300}, 200),
])
def test_max_tokens(body: dict[str, Any], expected: int | None) -> None:
    assert signals(body).max_tokens == expected


@pytest.mark.parametrize("fmt,expected", [
    (None, "text"), ({"type": "text"}, "text"), ({"type": "json_object"}, "json_object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, "json_schema"),
])
def test_output_format(fmt: dict[str, Any] | None, expected: str) -> None:
    body = {"response_format": fmt} if fmt else {}
    assert signals(body).output_format == expected


def test_header_signals() -> None:
    s = signals(headers={"X-Task-Type": "code", "X-Latency-Class": "realtime", "X-Region": "eu",
                         "X-Max-Cost-USD": "0.25"})
    assert (s.task_type, s.latency, s.region, s.max_cost_usd) == ("code", "realtime", "eu", 0.25)
    plain = signals()
    assert (plain.task_type, plain.latency, plain.region, plain.max_cost_usd) == (None, None, None, None)
    assert signals({"stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert signals({"stream": True}).stream and not signals({"stream": True}).include_usage


@pytest.mark.parametrize("headers", [{"X-Latency-Class": "instant"}, {"X-Max-Cost-USD": "cheap"},
                                     {"X-Max-Cost-USD": "-1"}, {"X-Max-Cost-USD": "nan"}])
def test_bad_header_values_are_400(headers: dict[str, str]) -> None:
    with pytest.raises(GatewayError) as caught:
        signals(headers=headers)
    assert caught.value.status == 400
    assert caught.value.param in headers


def test_tier_from_key_and_trusted_header() -> None:
    assert signals(key=key("free", trusted=False)).tier == "free"
    assert signals(headers={"X-User-Tier": "premium"}, key=key("free", trusted=False)).tier == "free", \
        "an untrusted key must not raise its own tier"
    assert signals(headers={"X-User-Tier": "premium"}, key=key("free", trusted=True)).tier == "premium"
    assert signals().tier == "standard"
    assert signals(headers={"X-User-Tier": "premium"}).tier == "premium"     # no keys: loopback, trusted
    assert signals(key=key("free", trusted=False)).key == "k"
