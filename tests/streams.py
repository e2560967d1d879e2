"""A small SSE client for tests: reads a streamed chat answer the way a strict client would.

It records every data payload, whether `[DONE]` came, any error event, and the text; it
never hides a malformed frame (a test asserts there is none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy.simulator import canonical_text


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: dict[str, Any] | None = None
    malformed: list[bytes] = field(default_factory=list)
    body: Any = None                    # the JSON body of a non-200 answer
    after_done: bool = False            # anything after [DONE] or after an error event

    @property
    def text(self) -> str:
        return "".join((c.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                       for c in self.chunks if c.get("choices"))

    @property
    def usage(self) -> dict[str, Any] | None:
        found = [c["usage"] for c in self.chunks if c.get("usage")]
        return found[-1] if found else None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and self.error is None and not self.malformed


def expected_text(tokens: int) -> str:
    return "".join(canonical_text(tokens))


def chat_body(model: str, stream: bool = True, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}], **extra}


async def stream_chat(session: aiohttp.ClientSession, base: str, model: str, **extra: Any) -> StreamResult:
    async with session.post(f"{base}/chat/completions", json=chat_body(model, **extra)) as response:
        result = StreamResult(response.status, dict(response.headers))
        if response.status != 200:
            result.body = orjson.loads(await response.read())
            return result
        raw = await response.read()
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        if result.done or result.error is not None:
            result.after_done = True
        if not block.startswith(b"data: "):
            result.malformed.append(block)
            continue
        data = block[6:]
        if data == b"[DONE]":
            result.done = True
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            result.malformed.append(block)
            continue
        if "error" in payload:
            result.error = payload["error"]
        else:
            result.chunks.append(payload)
    return result


async def plain_chat(session: aiohttp.ClientSession, base: str, model: str, **extra: Any
                     ) -> tuple[int, dict[str, str], Any]:
    async with session.post(f"{base}/chat/completions", json=chat_body(model, stream=False, **extra)) as response:
        return response.status, dict(response.headers), orjson.loads(await response.read())
