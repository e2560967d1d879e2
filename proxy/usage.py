"""Token usage in one normalised shape, and what it costs.

Providers count differently: OpenAI's `prompt_tokens` include cached tokens, Anthropic's
`input_tokens` exclude cache reads and writes. `Usage` keeps the three input kinds apart
so that each is billed at its own price, and renders OpenAI's usage object for clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Price


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0           # billed at the input price (excludes cached and cache writes)
    output_tokens: int = 0
    cached_input_tokens: int = 0    # cache reads
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0       # part of output_tokens, for information

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_input_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},   # always, as OpenAI does
        }
        return out


def cost_usd(usage: Usage, price: Price) -> float:
    cached = price.cached_input if price.cached_input is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    return (usage.input_tokens * price.input + usage.cached_input_tokens * cached
            + usage.cache_write_tokens * write + usage.output_tokens * price.output) / 1e6
