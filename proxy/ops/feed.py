"""The live feed: one producer, every open page, a bounded rate.

While at least one page listens, a single task builds the page's state and encodes it as
one SSE frame every `interval_s`; each page's stream sends the newest frame it has not
sent yet. So the work per second is the same for one page or many, a page that reads
slowly skips frames instead of queueing them, and with no page open nothing runs at all.
`max_listeners` caps the pages open at once (more get 503). `close` ends every stream
(the server's shutdown), so a drain never waits on an open page.

Imports nothing from the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger("proxy.ops")

INTERVAL_S = 1.0
MAX_LISTENERS = 8


class Feed:
    def __init__(self, build: Callable[[], Awaitable[bytes]], interval_s: float = INTERVAL_S,
                 max_listeners: int = MAX_LISTENERS) -> None:
        self._build = build
        self.interval_s = interval_s
        self.max_listeners = max_listeners
        self.listeners = 0
        self.frames_built = 0
        self._frame = b""
        self._fresh = asyncio.Event()       # set, and replaced, at every new frame
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def join(self) -> bool:
        """Take a place for one more page; False when the feed is full or closed."""
        if self.closed or self.listeners >= self.max_listeners:
            return False
        self.listeners += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    def leave(self) -> None:
        self.listeners -= 1

    async def frames(self) -> AsyncIterator[bytes]:
        """Every new frame from now on, until the feed closes; the caller has joined."""
        seen = -1
        while not self.closed:
            if seen == self.frames_built:
                await self._fresh.wait()
                continue
            seen = self.frames_built
            yield self._frame

    async def _run(self) -> None:
        while self.listeners > 0 and not self.closed:
            try:
                self._frame = await self._build()
            except Exception:            # a bug in the page must not end the feed for good
                log.exception("could not build the operations page's state")
            else:
                self.frames_built += 1
                fresh, self._fresh = self._fresh, asyncio.Event()
                fresh.set()
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        self.closed = True
        self._fresh.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
