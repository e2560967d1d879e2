"""The OpenAI chat protocol, which also covers vLLM, Ollama, Groq, Together, Mistral,
DeepSeek and Azure OpenAI (an `api-key` auth header and an `api-version` query in config).

Passthrough: the client already speaks this protocol, so requests go up with only
`model` and `stream_options` changed, and responses and stream chunks go back as the
upstream's own bytes. Each chunk is decoded once (orjson, about a microsecond) only to
watch for content, the finish, usage and in-band errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from ..config import Deployment
from ..errors import FailureClass, UpstreamFailure
from ..sse import DONE
from ..usage import Usage
from . import StreamState, UpstreamRequest, classify_error_object, error_in_body, json_event, retry_after_s


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    details = raw.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    out_details = raw.get("completion_tokens_details") or {}
    reasoning = int(out_details.get("reasoning_tokens") or 0) if isinstance(out_details, dict) else 0
    return Usage(input_tokens=max(0, prompt - cached), output_tokens=int(raw.get("completion_tokens") or 0),
                 cached_input_tokens=cached, reasoning_tokens=reasoning)


class OpenAIStream(StreamState):
    __slots__ = ()

    def feed(self, name: str | None, data: bytes) -> Sequence[bytes]:
        if data == DONE:
            self.finished = True
            return ()
        chunk = json_event(data)
        if chunk is None:
            return ()
        if "error" in chunk:
            raise classify_error_object(chunk["error"], None, in_stream=True)
        choices = chunk.get("choices")
        usage = chunk.get("usage")
        if usage:
            self.usage = parse_usage(usage)
        if choices:
            for choice in choices:
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content or delta.get("tool_calls") or delta.get("refusal") or delta.get("function_call"):
                    self.content_seen = True
                    if self.collect_text and content:
                        self.text.append(content)
                reason = choice.get("finish_reason")
                if reason:
                    self.content_seen = True
                    self.finish_reason = reason
            return (data,)
        if usage and self.finish_reason is not None:
            self.finished = True                        # the usage chunk is the last by protocol
            return (data,) if self.include_usage else ()
        return (data,) if usage is None or self.include_usage else ()

    def close(self) -> Sequence[bytes]:
        return ()


class OpenAIAdapter:
    def build(self, deployment: Deployment, body: Mapping[str, Any], stream: bool,
              prefill: str | None = None) -> UpstreamRequest:
        provider = deployment.provider
        payload = dict(body)
        payload["model"] = deployment.upstream_model
        if stream:
            options = payload.get("stream_options")
            payload["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) \
                else {"include_usage": True}
        else:
            payload.pop("stream_options", None)
        if prefill:
            payload["messages"] = [*payload["messages"], {"role": "assistant", "content": prefill}]
        headers = {"Content-Type": "application/json", **provider.headers}
        if provider.api_key:
            if provider.auth_header:
                headers[provider.auth_header] = provider.api_key
            else:
                headers["Authorization"] = f"Bearer {provider.api_key}"
        url = f"{provider.base_url}/chat/completions"
        if provider.query:
            url += "?" + urlencode(provider.query)
        return UpstreamRequest(url, headers, orjson.dumps(payload))

    def parse(self, payload: bytes, deployment: Deployment) -> tuple[bytes, Usage | None]:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream sent a body that is not JSON") from None
        if type(body) is not dict or not isinstance(body.get("choices"), list):
            if type(body) is dict and "error" in body:
                raise classify_error_object(body["error"], None, in_stream=True)
            raise UpstreamFailure(FailureClass.PROTOCOL, "upstream response has no 'choices'")
        return payload, parse_usage(body.get("usage"))

    def stream(self, deployment: Deployment, include_usage: bool, collect_text: bool) -> OpenAIStream:
        return OpenAIStream(include_usage, collect_text)

    def classify(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return classify_error_object(error_in_body(status, body), status, in_stream=False,
                                     retry_after=retry_after_s(headers))
