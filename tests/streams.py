"""Test clients for chat answers: streamed ones are read by `proxy.commands.chaos.read_sse_answer`,
the same strict reader `llm-proxy chaos` uses (it records [DONE], error events, malformed
frames and anything after the end, and hides nothing)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from proxy.commands.chaos import Answer, read_sse_answer
from proxy.simulator import canonical_text

StreamResult = Answer


def expected_text(tokens: int) -> str:
    return "".join(canonical_text(tokens))


def chat_body(model: str, stream: bool = True, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}], **extra}


async def stream_chat(session: aiohttp.ClientSession, base: str, model: str, **extra: Any) -> Answer:
    async with session.post(f"{base}/chat/completions", json=chat_body(model, **extra)) as response:
        return read_sse_answer(response.status, dict(response.headers), await response.read())


async def plain_chat(session: aiohttp.ClientSession, base: str, model: str, **extra: Any
                     ) -> tuple[int, dict[str, str], Any]:
    async with session.post(f"{base}/chat/completions", json=chat_body(model, stream=False, **extra)) as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())
