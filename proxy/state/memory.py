"""The state of one process, in memory: the default backend, and the local fallback of Redis.

`share` scales every limit: with `--workers N` and no Redis each worker enforces 1/N of
each limit, so the total never exceeds what is configured; while Redis is unreachable an
instance enforces 1/(instances x workers). Every operation completes before it returns
(no await inside), so an admission is atomic within the event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from ..breaker import CLOSED, BreakerPolicy, CircuitBreaker
from .bucket import TokenBucket
from .store import (
    Admission,
    BreakerView,
    BucketSpec,
    BucketView,
    Grant,
    Outcome,
    Refusal,
    StateHealth,
    StateView,
)

T = TypeVar("T")
MEMO_LIMIT = 100_000            # entries per scope: the oldest go first ...
BYTES_LIMIT = 256 * 1024 * 1024     # ... and bytes per scope, so no TTL can grow memory without bound


def done(result: T) -> asyncio.Future[T]:
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class MemoryState:
    """Buckets, breakers, holds and memos of this process. Keys are stable names, so a config
    reload keeps them; a bucket whose limit changed starts afresh."""

    def __init__(self, policy: BreakerPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 share: float = 1.0, mode: str = "local") -> None:
        self.policy = policy or BreakerPolicy()
        self.clock = clock
        self.share = share
        self.breakers: dict[str, CircuitBreaker] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.memos: dict[str, OrderedDict[str, tuple[float, bytes]]] = {}
        self._memo_bytes: dict[str, int] = {}
        self.health = StateHealth("memory", mode, time.time())

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def set_breaker_policy(self, policy: BreakerPolicy) -> None:
        """From `server.breaker` at start and on reload; breakers keep their state."""
        self.policy = policy
        for breaker in self.breakers.values():
            breaker.policy = policy

    # ------------------------------------------------------------------ buckets and breakers

    def breaker(self, deployment_id: str) -> CircuitBreaker:
        breaker = self.breakers.get(deployment_id)
        if breaker is None:
            breaker = self.breakers[deployment_id] = CircuitBreaker(self.policy)
        return breaker

    def bucket(self, spec: BucketSpec, now: float) -> TokenBucket:
        capacity = spec.per_minute * self.share
        bucket = self.buckets.get(spec.name)
        if bucket is None or bucket.capacity != capacity:
            bucket = self.buckets[spec.name] = TokenBucket(capacity, now)
        return bucket

    async def admit(self, admission: Admission) -> Grant | Refusal:
        return self.admit_now(admission)

    def admit_now(self, admission: Admission) -> Grant | Refusal:
        now = self.clock()
        key = admission.key
        key_bucket = None
        if key is not None:
            key_bucket = self.bucket(key, now)
            if not key_bucket.available(key.amount, now):
                return Refusal("key_limited", retry_after=key_bucket.wait_s(key.amount, now))
            if not admission.options:           # a request that calls no deployment: the key alone
                key_bucket.take(key.amount, now)
                return Grant(-1, "", False, ())
        wait = math.inf
        longest: int | None = None
        for i, option in enumerate(admission.options):
            breaker = self.breaker(option.deployment_id)
            if not admission.force and breaker.state != CLOSED and now < breaker.open_until:
                longest = self._older(admission, longest, i)
                continue
            if now < breaker.held_until:            # the provider's own Retry-After
                wait = min(wait, breaker.held_until - now)
                continue
            buckets = [self.bucket(spec, now) for spec in option.buckets]
            short = max((b.wait_s(spec.amount, now) for b, spec in zip(buckets, option.buckets)), default=0.0)
            if short > 0:
                wait = min(wait, short)
                continue
            if not (breaker.force_probe(now) if admission.force else breaker.allows(now)):
                longest = self._older(admission, longest, i)    # half-open, its probe slots taken
                continue
            for bucket, spec in zip(buckets, option.buckets):
                bucket.take(spec.amount, now)
            if key_bucket is not None and key is not None:
                key_bucket.take(key.amount, now)
            return Grant(i, option.deployment_id, breaker.state != CLOSED,
                         tuple(s for s in option.buckets if s.tokens), epoch=breaker.epoch)
        if wait < math.inf:
            return Refusal("rate_limited", retry_after=wait)
        if longest is not None:
            oldest = self.breaker(admission.options[longest].deployment_id)
            return Refusal("breaker_open", longest_open=longest, open_for=now - oldest.opened_at,
                           open_wait=max(0.0, max(oldest.open_until, oldest.held_until) - now))
        return Refusal("excluded")

    def _older(self, admission: Admission, current: int | None, other: int) -> int:
        if current is None:
            return other
        opened = self.breaker(admission.options[other].deployment_id).opened_at
        return other if opened < self.breaker(admission.options[current].deployment_id).opened_at else current

    def settle(self, grant: Grant, outcome: Outcome) -> asyncio.Future[str]:
        now = self.clock()
        if outcome.used_tokens is not None:
            for spec in grant.token_buckets:
                self.bucket(spec, now).settle(spec.amount, outcome.used_tokens, now)
        breaker = self.breaker(grant.deployment_id)
        if outcome.trip_for is not None:
            breaker.trip(now, outcome.trip_for)
        if outcome.hold_for is not None:
            breaker.hold(now, outcome.hold_for)
        probe = grant.epoch if grant.probe else None
        if outcome.verdict == "ok":
            breaker.record_success(now, probe)
        elif outcome.verdict == "fail":
            breaker.record_failure(now, outcome.open_for, outcome.cost_s, probe)
        else:
            breaker.release_probe(probe)    # a probe that ended without a verdict frees its slot
        return done(breaker.state)

    async def view(self, breakers: Iterable[str], buckets: Mapping[str, int]) -> StateView:
        now = self.clock()
        offset = time.time() - now          # monotonic -> unix time

        def unix(t: float) -> float | None:
            return t + offset if t > now else None

        breaker_views = {}
        for deployment_id in breakers:
            b = self.breakers.get(deployment_id)
            if b is None:
                breaker_views[deployment_id] = BreakerView(CLOSED, None, None, None)
            else:
                is_closed = b.state == CLOSED
                breaker_views[deployment_id] = BreakerView(
                    b.state, None if is_closed else b.opened_at + offset, None if is_closed else b.open_until + offset,
                    unix(b.held_until))
        bucket_views = {}
        for name, per_minute in buckets.items():
            capacity = per_minute * self.share
            bucket = self.buckets.get(name)
            level = bucket.level_at(now) if bucket is not None and bucket.capacity == capacity else capacity
            bucket_views[name] = BucketView(capacity, level)
        return StateView(breaker_views, bucket_views, self.health.mode)

    # ------------------------------------------------------------------ memos

    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]:
        memos = self.memos.get(scope)
        if memos is None:
            memos = self.memos[scope] = OrderedDict()
        size = self._memo_bytes.get(scope, 0) + len(value)
        old = memos.pop(key, None)
        if old is not None:
            size -= len(old[1])
        memos[key] = (self.clock() + ttl_s, value)
        while memos and (len(memos) > MEMO_LIMIT or size > BYTES_LIMIT):
            size -= len(memos.popitem(last=False)[1][1])
        self._memo_bytes[scope] = size
        return done(key in memos)

    async def recall(self, scope: str, key: str) -> bytes | None:
        return self.recall_now(scope, key)

    def recall_now(self, scope: str, key: str) -> bytes | None:
        memos = self.memos.get(scope)
        entry = None if memos is None else memos.get(key)
        if memos is None or entry is None:
            return None
        if entry[0] <= self.clock():
            self._drop(scope, key)
            return None
        return entry[1]

    def forget(self, scope: str, key: str) -> asyncio.Future[bool]:
        """Resolves to whether a live memo was there."""
        memos = self.memos.get(scope)
        entry = None if memos is None else memos.get(key)
        if entry is None:
            return done(False)
        self._drop(scope, key)
        return done(entry[0] > self.clock())

    def _drop(self, scope: str, key: str) -> None:
        _, value = self.memos[scope].pop(key)
        self._memo_bytes[scope] -= len(value)
