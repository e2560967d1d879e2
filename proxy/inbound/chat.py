"""`POST /v1/chat/completions`: OpenAI Chat Completions, streamed or not.

The canonical form inside the gateway is this API's own, so decoding is the identity and
the encoder (`encoding.CHAT`) only frames chunks; the lifecycle is `inbound.lifecycle`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import GatewayKey
from ..encoding import CHAT
from ..errors import GatewayError
from ..gateway import Gateway
from .lifecycle import Call, handler


class ChatCompletions:
    name = "chat"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("Authorization")

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call:
        return Call(body, CHAT)         # `routing.decide` validates it as it reads the signals

    def error_body(self, err: GatewayError) -> bytes:
        return err.body()


chat_completions = handler(ChatCompletions())
