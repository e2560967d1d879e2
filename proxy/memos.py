"""Memos: a small key-value store with a time to live, for state a later request needs.

The Responses API keeps what a `previous_response_id` follow-up needs here. The shape is
the state store's memo interface (issue 12's `proxy/state/`, memory and Redis backends):
`remember(scope, key, value, ttl_s)` and `forget(scope, key)` return a future that
resolves to whether the write was stored (for a caller that must know before it
answers), `recall(scope, key)` is awaited. This in-process backend stands in until that
store lands; then the gateway's state store serves these calls and this module goes.

Bounded: at most `MEMO_LIMIT` memos and `BYTES_LIMIT` bytes per scope, oldest first out,
so a busy gateway cannot grow without bound however long the TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

MEMO_LIMIT = 100_000
BYTES_LIMIT = 256 * 1024 * 1024


class Memos(Protocol):
    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]: ...

    async def recall(self, scope: str, key: str) -> bytes | None: ...

    def forget(self, scope: str, key: str) -> asyncio.Future[bool]: ...


def _done(value: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class MemoryMemos:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._scopes: dict[str, OrderedDict[str, tuple[float, bytes]]] = {}
        self._sizes: dict[str, int] = {}

    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]:
        memos = self._scopes.setdefault(scope, OrderedDict())
        size = self._sizes.get(scope, 0) + len(value)
        old = memos.pop(key, None)
        if old is not None:
            size -= len(old[1])
        memos[key] = (self.clock() + ttl_s, value)
        while memos and (len(memos) > MEMO_LIMIT or size > BYTES_LIMIT):
            size -= len(memos.popitem(last=False)[1][1])
        self._sizes[scope] = size
        return _done(key in memos)

    async def recall(self, scope: str, key: str) -> bytes | None:
        memos = self._scopes.get(scope)
        entry = None if memos is None else memos.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._drop(scope, key)
            return None
        return entry[1]

    def forget(self, scope: str, key: str) -> asyncio.Future[bool]:
        memos = self._scopes.get(scope)
        entry = None if memos is None else memos.get(key)
        live = entry is not None and entry[0] > self.clock()
        if entry is not None:
            self._drop(scope, key)
        return _done(live)

    def _drop(self, scope: str, key: str) -> None:
        _, value = self._scopes[scope].pop(key)
        self._sizes[scope] -= len(value)
