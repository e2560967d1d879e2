"""One decision record per request, and the log that writes them as JSON lines.

The record is filled as the request moves through the gateway and settled once, at the
end, whatever the outcome (`Decision.settle` prices every attempt). Writing happens off
the hot path: records are queued, and a background task serialises each batch and hands
it to a thread for the blocking write, so a slow disk or a full stdout pipe never stalls
the event loop. SIGHUP (`reopen`) opens the path again, so a rename-then-HUP rotation
loses nothing; `close` drains the queue on shutdown.

Billing: an attempt is billed once content came back from the upstream. Its cost uses the
provider's own usage; without it, the cost is estimated from the request's input-token
estimate and the length of the text that came back, and marked `cost_estimated` (also
when a stream cut short reported fewer output tokens than the text that arrived). A
failure before any content is not billed. Wasted cost is every billed attempt the gateway
abandoned, plus, for a restart that served after reproducing a broken stream's text
(`proxy.verify`), the share of its output tokens that repeated that text.

Never holds a secret: the key's name is recorded, never the key.
Imports only config and usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import Price
from .usage import Usage, cost_usd

log = logging.getLogger("proxy.decisions")

CLIENT_DISCONNECTED = "client_disconnected"     # an outcome, and the failure of the attempt it cut short
CLOSE_TIMEOUT_S = 30.0          # a writer stuck on a full pipe must not keep the process from exiting
QUEUE_LIMIT = 100_000           # records waiting for the writer; beyond it they are counted as dropped
_PIPE_CHUNK = 4096              # PIPE_BUF: writes this small never interleave between workers
_FILE_CHUNK = 1 << 20
BATCH_WINDOW_S = 0.02           # records gather this long, so the thread hop is per batch, not per request
# Text a client chose may be megabytes (a model name of any length, and the reason and error
# that quote it): the record, and the operations page's ring of recent ones, keep this much.
MAX_MODEL_CHARS = 256
MAX_TEXT_CHARS = 4096           # a reason or an error: room for every attempt's message (500 each)


def _clip(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit - 3] + "..."


def _stdout_fd() -> int:
    """The process's standard output, even when sys.stdout was swapped for an object without a file."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return 1


def iso_time(epoch: float) -> str:
    """UTC ISO-8601 with milliseconds, the `time` of every record."""
    whole = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((epoch - whole) * 1000):03d}Z"


@dataclass(frozen=True, slots=True)
class Served:
    """What feedback on a finished request is recorded against."""

    tier: str | None
    model: str | None
    rule: str | None
    key: str | None             # the key's name: only the same key may score the request


@dataclass(slots=True)
class AttemptRecord:
    model: str
    deployment: str
    provider: str
    started: float                      # monotonic seconds
    price: Price | None = None          # the deployment's price, to bill the attempt
    failure: str | None = None          # FailureClass value, None when it served
    status: int | None = None
    message: str | None = None
    ttfb_s: float | None = None
    duration_s: float | None = None
    usage: Usage | None = None          # the provider's own usage, when it sent one
    content_seen: bool = False          # content came back: the provider bills this attempt
    output_chars: int = 0               # length of the text that came back, to estimate without usage
    served: bool = False                # it completed the answer
    cost_usd: float = 0.0
    cost_estimated: bool = False
    wasted: bool = False                # billed, but abandoned by the gateway (broken stream)
    regenerated_chars: int = 0          # a restart's text that repeated what the client had (proxy.verify)
    regenerated_cost_usd: float = 0.0   # ...its share of the cost: wasted, even when the attempt served
    dropped: tuple[str, ...] | None = None  # what the translated request left out of the client's

    @property
    def billed(self) -> bool:
        return self.usage is not None or self.content_seen

    def settle(self, input_tokens: int) -> None:
        """Price this attempt once, from the provider's usage or an estimate."""
        if not self.billed or self.price is None:
            return
        output_estimate = (self.output_chars + 3) >> 2      # the router's own estimate: 4 characters a token
        if self.usage is None:
            self.usage = Usage(input_tokens=input_tokens, output_tokens=output_estimate)
            self.cost_estimated = True
        elif not self.served and output_estimate > self.usage.output_tokens:
            # Cut short: the usage so far (Anthropic's message_start, Gemini's running count) may not
            # count all the output that did arrive; keep its input tokens, estimate the output.
            self.usage = dataclasses.replace(self.usage, output_tokens=output_estimate)
            self.cost_estimated = True
        self.cost_usd = cost_usd(self.usage, self.price)
        self.wasted = self.failure is not None and self.failure != CLIENT_DISCONNECTED   # the client chose to leave
        if self.regenerated_chars and self.output_chars:
            share = min(1.0, self.regenerated_chars / self.output_chars)
            self.regenerated_cost_usd = cost_usd(Usage(output_tokens=round(self.usage.output_tokens * share)),
                                                 self.price)

    def to_json(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "model": self.model, "deployment": self.deployment, "provider": self.provider,
            "failure": self.failure, "status": self.status, "message": self.message,
            "ttfb_ms": None if self.ttfb_s is None else round(self.ttfb_s * 1000, 3),
            "duration_ms": None if self.duration_s is None else round(self.duration_s * 1000, 3),
            "input_tokens": usage.prompt_tokens if usage else None,
            "cached_input_tokens": usage.cached_input_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "cost_usd": round(self.cost_usd, 10), "cost_estimated": self.cost_estimated,
            "wasted": self.wasted, "dropped": list(self.dropped) if self.dropped else None,
            "regenerated_chars": self.regenerated_chars or None,
        }


@dataclass(slots=True)
class Decision:
    request_id: str
    started: float                      # monotonic
    time: float = field(default_factory=time.time)
    api: str = "chat"                   # the client API it came in by: chat | responses | messages
    instance: str | None = None         # the gateway process that served it (`host:pid`)
    key: str | None = None              # the gateway key's name
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
    served_model: str | None = None     # the model whose answer the client got (X-Route-Model)
    served_provider: str | None = None
    usage: Usage | None = None          # the serving attempt's usage
    cost_usd: float = 0.0               # every billed attempt, wasted ones included
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

    def settle(self) -> None:
        """Bill every attempt and sum them up, and bound the text a client chose; called once,
        by `Gateway.finish`."""
        self.requested_model = _clip(self.requested_model, MAX_MODEL_CHARS)
        self.reason, self.error = _clip(self.reason, MAX_TEXT_CHARS), _clip(self.error, MAX_TEXT_CHARS)
        input_tokens = int((self.signals or {}).get("input_tokens") or 0)
        total = wasted = 0.0
        for attempt in self.attempts:
            attempt.settle(input_tokens)
            total += attempt.cost_usd
            if attempt.wasted:
                wasted += attempt.cost_usd
            else:
                wasted += attempt.regenerated_cost_usd      # the prefix a verified restart repeated
            if attempt.billed:
                self.cost_estimated = self.cost_estimated or attempt.cost_estimated
                if attempt.model == self.served_model:
                    self.usage = attempt.usage
        self.cost_usd, self.wasted_cost_usd = total, wasted

    def to_json(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "type": "decision", "time": iso_time(self.time), "request_id": self.request_id, "api": self.api,
            "instance": self.instance, "key": self.key,
            "tier": self.tier, "requested_model": self.requested_model, "stream": self.stream,
            "signals": self.signals, "rule": self.rule, "reason": self.reason, "chain": self.chain,
            "candidates": self.candidates, "skipped": self.skipped,
            "attempts": [a.to_json() for a in self.attempts],
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


Record = Decision | dict[str, Any]


class DecisionLog:
    """Queue + background writer. Destination: "stdout", "off", or a file path."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.written = 0
        self.dropped = 0
        self._queue: asyncio.Queue[Record | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._next_fd: int | None = None    # opened by `reopen`, taken up by the writer's next batch
        self._swap = threading.Lock()       # guards `_next_fd` between the loop and the writer thread
        self._chunk = _FILE_CHUNK
        self._warned = False

    @property
    def is_file(self) -> bool:
        return self.destination not in ("stdout", "off")

    def problem(self) -> str | None:
        """Why the destination cannot be written (checked before serving), or None."""
        if not self.is_file:
            return None
        try:
            os.close(self._open())
        except OSError as exc:
            return f"server.decision_log: cannot open '{self.destination}' for appending: {exc.strerror}"
        return None

    def start(self) -> None:
        if self.destination == "off":
            return
        self._fd = _stdout_fd() if self.destination == "stdout" else self._open()
        if stat.S_ISFIFO(os.fstat(self._fd).st_mode):
            self._chunk = _PIPE_CHUNK
        self._queue = asyncio.Queue(QUEUE_LIMIT)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _open(self) -> int:
        return os.open(self.destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """Log rotation: after the file was renamed, the next batch goes to a fresh file at the path."""
        if not self.is_file or self._fd is None:
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("cannot reopen the decision log; writing on to the old file",
                      extra={"path": self.destination, "reason": exc.strerror})
            return
        with self._swap:
            unused, self._next_fd = self._next_fd, fd
        if unused is not None:
            os.close(unused)

    def record(self, record: Record) -> None:
        """Queue a Decision (or a feedback dict). Never blocks, never raises."""
        queue = self._queue
        if queue is None:
            return
        if self._task is None or self._task.done():
            self._write(self._encode([record]))     # after close (a request that outlived the drain)
            return
        try:
            queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1

    @staticmethod
    def _encode(batch: list[Record]) -> list[bytes]:
        return [orjson.dumps(r.to_json() if isinstance(r, Decision) else r) + b"\n" for r in batch]

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            if batch[0] is not None:
                await asyncio.sleep(BATCH_WINDOW_S)
            while not queue.empty():
                batch.append(queue.get_nowait())
            records = [r for r in batch if r is not None]
            try:
                if records:
                    await asyncio.to_thread(self._write, self._encode(records))
            finally:
                for _ in batch:
                    queue.task_done()
            if len(records) < len(batch):
                return

    def _write(self, lines: list[bytes]) -> None:
        """Blocking: whole lines, in writes small enough not to interleave with other workers."""
        with self._swap:
            fresh, self._next_fd = self._next_fd, None
        if fresh is not None:
            old, self._fd = self._fd, fresh
            if old is not None:
                os.close(old)
        late = self._fd is None and self.is_file      # after close: open, append, close
        try:
            if late:
                self._fd = self._open()
            if self._fd is None:
                return
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                if chunk and size + len(line) > self._chunk:
                    self._write_all(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write_all(b"".join(chunk))
            self.written += len(lines)
        except OSError as exc:
            self.dropped += len(lines)
            if not self._warned:
                self._warned = True
                log.error("cannot write the decision log", extra={"reason": exc.strerror})
        finally:
            if late and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            assert self._fd is not None
            view = view[os.write(self._fd, view):]

    async def flush(self) -> None:
        """Wait until every queued record is written (tests, shutdown)."""
        if self._queue is not None and self._task is not None and not self._task.done():
            await self._queue.join()

    async def close(self) -> None:
        if self._queue is not None and self._task is not None and not self._task.done():
            await self._queue.put(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.error("the decision log writer is stuck; exiting without the last records",
                          extra={"queued": self._queue.qsize()})
        if self.is_file:
            for fd in (self._fd, self._next_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._next_fd = None
