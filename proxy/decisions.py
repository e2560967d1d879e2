"""One decision record per request, and the log that writes them as JSON lines.

The record is filled as the request moves through the gateway and written once, at the
end, whatever the outcome. Writing happens off the hot path: records are queued and a
background task serialises and writes them in batches. SIGHUP reopens the file (log
rotation); `close` drains the queue so nothing is lost on shutdown.

Never holds a secret: the key's name is recorded, never the key.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from .usage import Usage


@dataclass(slots=True)
class AttemptRecord:
    model: str
    deployment: str
    provider: str
    started: float                      # monotonic seconds
    failure: str | None = None          # FailureClass value, None when it served
    status: int | None = None
    message: str | None = None
    ttfb_s: float | None = None
    duration_s: float | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    served: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "deployment": self.deployment, "provider": self.provider,
            "failure": self.failure, "status": self.status, "message": self.message,
            "ttfb_ms": None if self.ttfb_s is None else round(self.ttfb_s * 1000, 3),
            "duration_ms": None if self.duration_s is None else round(self.duration_s * 1000, 3),
            "input_tokens": self.usage.prompt_tokens if self.usage else None,
            "output_tokens": self.usage.output_tokens if self.usage else None,
            "cost_usd": round(self.cost_usd, 10),
        }


@dataclass(slots=True)
class Decision:
    request_id: str
    started: float                      # monotonic
    time: float = field(default_factory=time.time)
    key: str | None = None
    tier: str | None = None
    requested_model: str | None = None
    stream: bool = False
    signals: dict[str, Any] | None = None
    rule: str | None = None
    reason: str | None = None
    chain: str | None = None
    candidates: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    attempts: list[AttemptRecord] = field(default_factory=list)
    served_model: str | None = None
    served_provider: str | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    cost_estimated: bool = False
    wasted_cost_usd: float = 0.0
    outcome: str = "ok"                 # ok | bad_request | ... | client_disconnected | stream_error
    status: int = 200
    error: str | None = None
    routing_us: float | None = None
    overhead_ms: float | None = None    # gateway time before the upstream request left
    ttft_ms: float | None = None
    duration_ms: float | None = None

    @property
    def fell_back(self) -> bool:
        return len(self.attempts) > 1

    def to_json(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "time": round(self.time, 6), "request_id": self.request_id, "key": self.key, "tier": self.tier,
            "requested_model": self.requested_model, "stream": self.stream, "signals": self.signals,
            "rule": self.rule, "reason": self.reason, "chain": self.chain, "candidates": self.candidates,
            "skipped": self.skipped, "attempts": [a.to_json() for a in self.attempts],
            "served_model": self.served_model, "served_provider": self.served_provider,
            "input_tokens": usage.prompt_tokens if usage else None,
            "cached_input_tokens": usage.cached_input_tokens if usage else None,
            "cache_write_tokens": usage.cache_write_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "cost_usd": round(self.cost_usd, 10), "cost_estimated": self.cost_estimated,
            "wasted_cost_usd": round(self.wasted_cost_usd, 10),
            "outcome": self.outcome, "status": self.status, "error": self.error,
            "routing_us": self.routing_us, "overhead_ms": self.overhead_ms, "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
        }


class DecisionLog:
    """Queue + background writer. Destination: "stdout", "off", or a file path."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self._queue: asyncio.Queue[Decision | None] = asyncio.Queue()
        self._file: IO[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def start(self) -> None:
        self._open()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _open(self) -> None:
        if self.destination == "stdout":
            self._file = sys.stdout.buffer
        elif self.destination != "off":
            self._file = open(self.destination, "ab")

    def reopen(self) -> None:
        """For log rotation: the next batch goes to a fresh file at the same path."""
        if self._file is not None and self.destination not in ("stdout", "off"):
            old, self._file = self._file, open(self.destination, "ab")
            old.close()

    def record(self, decision: Decision) -> None:
        self._queue.put_nowait(decision)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            batch = [item]
            while not queue.empty():
                batch.append(queue.get_nowait())
            stop = None in batch
            lines = [orjson.dumps(d.to_json()) + b"\n" for d in batch if d is not None]
            if lines and self._file is not None:
                self._file.write(b"".join(lines))
                self._file.flush()
            self.written += len(lines)
            if stop:
                return

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            await self._task
        if self._file is not None and self.destination not in ("stdout", "off"):
            self._file.close()
        self._file = None
