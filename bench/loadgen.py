"""The load-generation core shared by `bench.overhead` and `bench.load`: one request with
its timings, an open loop at a fixed rate and a closed loop at a fixed concurrency.

Both loops are bounded by a count AND a time limit and stop by themselves. Latency is
taken from just before the request is written to when its body (or stream) ends;
streams also record the first content's arrival and, for chunks stamped by
`bench.simserver`, each chunk's transit time from the upstream's write to this read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

_CONTENT = re.compile(rb'"content":"[^"]')
_STAMP = re.compile(rb'"system_fingerprint":"t(\d+)"')
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in LOOPBACK or host.startswith("127.")


@dataclass(slots=True)
class Result:
    status: int                     # HTTP status, 0 for a transport error or timeout
    latency_s: float
    ttft_s: float | None = None     # streams: until the first content-bearing frame
    transits_ns: list[int] = field(default_factory=list)   # stamped chunks after the first
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    body: bytes
    headers: dict[str, str]
    stream: bool = False


async def send(session: aiohttp.ClientSession, target: Target,
               on_content: Callable[[], None] | None = None) -> Result:
    """One request; never raises for an HTTP or transport failure (the status says)."""
    clock = time.perf_counter
    started = clock()
    ttft = None
    transits: list[int] = []
    try:
        async with session.post(target.url, data=target.body, headers=target.headers) as response:
            if not target.stream or response.status != 200:
                await response.read()
                return Result(response.status, clock() - started)
            first_stamp_seen = False
            async for chunk in response.content.iter_any():
                now_ns = time.perf_counter_ns()
                if ttft is None and _CONTENT.search(chunk):
                    ttft = now_ns / 1e9 - started
                    if on_content is not None:
                        on_content()
                for match in _STAMP.finditer(chunk):
                    if first_stamp_seen:        # the first chunk carries the commit: TTFT covers it
                        transits.append(now_ns - int(match.group(1)))
                    first_stamp_seen = True
            return Result(response.status, clock() - started, ttft, transits)
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        return Result(0, clock() - started, ttft, transits, type(exc).__name__)


async def open_loop(fire: Callable[[], Awaitable[Result]], rate: float, count: int, max_seconds: float,
                    grace_s: float = 30.0) -> tuple[list[Result], float]:
    """Start requests at `rate` per second whatever the answers do (open loop), up to
    `count` of them or `max_seconds` of sending. Returns the results and the worst lateness
    of a start against its schedule, in seconds (a check that the generator kept up)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[Result]] = []
    lateness = 0.0
    for i in range(count):
        at = start + i / rate
        if at - start >= max_seconds:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lateness = max(lateness, -delay)
        tasks.append(loop.create_task(fire()))
    return await _gather_bounded(tasks, grace_s), lateness


async def closed_loop(fire: Callable[[], Awaitable[Result]], concurrency: int, count: int, max_seconds: float,
                      on_result: Callable[[Result], None] | None = None,
                      grace_s: float = 30.0) -> tuple[list[Result], float]:
    """`concurrency` workers each send the next request as soon as theirs is answered, until
    `count` have started or `max_seconds` have passed. Returns results and elapsed seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    results: list[Result] = []
    started = 0

    async def worker() -> None:
        nonlocal started
        while started < count and loop.time() < deadline:
            started += 1
            result = await fire()
            results.append(result)
            if on_result is not None:
                on_result(result)

    begin = loop.time()
    workers = [loop.create_task(worker()) for _ in range(max(1, concurrency))]
    await _gather_bounded(workers, max_seconds + grace_s)
    return results, loop.time() - begin


async def _gather_bounded(tasks: list[asyncio.Task[Result]] | list[asyncio.Task[None]], limit_s: float) -> list:
    """Wait for every task, cancelling whatever is still running after `limit_s`."""
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    return [t.result() for t in tasks if t in done and not t.cancelled()]
