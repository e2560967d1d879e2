"""The state interface every backend implements, and the values that cross it.

The attempt loop talks to `StateStore` only; which backend serves it (this process's
memory, or Redis shared by every instance) it cannot tell. Names of buckets are the
caller's (`balancer` builds them); a backend only keeps levels under those names.
Imports breaker only (for `BreakerPolicy`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..breaker import BreakerPolicy


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """One bucket an admission takes from: its name, its limit, and how much this request takes."""

    name: str               # "deployment:<id>:rpm|tpm", "provider:<name>:rpm|tpm", "key:<name>"
    per_minute: int         # the configured limit (a backend applies its share)
    amount: float           # 1 for a request bucket, the reserved tokens for a token bucket
    tokens: bool = False    # a token bucket: settled to the real usage


@dataclass(frozen=True, slots=True)
class Option:
    """A deployment an admission may take, with every bucket it must reserve."""

    deployment_id: str
    buckets: tuple[BucketSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Admission:
    """One call: admit the first option (in this order) whose breaker admits it, that no 429
    holds, and whose buckets all have room, and reserve them all (and `key`) at once.

    `force` probes the single option although its breaker is open (every candidate was
    open): still bounded by the half-open probe slots, still never into a 429 hold. With no
    options the key's bucket alone is taken (a request that calls no deployment); that grant
    (index -1) needs no settle.
    """

    options: Sequence[Option]
    key: BucketSpec | None = None       # the gateway key's rpm, until the request's first grant
    force: bool = False
    probe_lease_s: float = 60.0         # a probe slot never settled (its instance died) frees after this


@dataclass(slots=True)
class Grant:
    """What an admission reserved; hand it back to `settle` exactly once."""

    index: int                          # which option of the admission
    deployment_id: str
    probe: bool                         # it holds a half-open probe slot
    token_buckets: tuple[BucketSpec, ...]
    epoch: int = 0                      # the breaker epoch a probe slot belongs to
    owner: object | None = None         # the backend that granted it (failover routes the settle)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no option could be admitted right now."""

    reason: str                     # "key_limited" | "rate_limited" | "breaker_open" | "excluded"
    retry_after: float = 0.0        # key_limited / rate_limited: seconds until there is room
    longest_open: int | None = None     # breaker_open: the option open longest
    open_for: float = 0.0           # ... how long it has been open
    open_wait: float = 0.0          # ... seconds until it may be probed (open interval or hold)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, for its settle: usage for the buckets, a verdict for the breaker."""

    used_tokens: int | None         # None: usage unknown, the reservation stands
    verdict: str | None = None      # "ok" | "fail" | None (no verdict: a probe slot is released)
    open_for: float | None = None   # a failure's Retry-After: the open interval if it trips
    trip_for: float | None = None   # open now for this long whatever the counts (bad credentials)
    hold_for: float | None = None   # a 429: no traffic for this long, not a failure
    cost_s: float = 0.0             # how long a failure kept its request waiting (the interval's floor)


@dataclass(frozen=True, slots=True)
class BreakerView:
    state: str                      # "closed" | "open" | "half_open"
    opened_at: float | None         # unix time it opened (None while closed)
    open_until: float | None        # unix time of the next probe (None while closed)
    held_until: float | None        # unix time a 429 hold ends (None when none holds)


@dataclass(frozen=True, slots=True)
class BucketView:
    capacity: float                 # what this instance enforces: the limit, or its share of it
    level: float                    # units left now (requests or tokens; below zero after a debt)


@dataclass(frozen=True, slots=True)
class StateView:
    """A read-only picture: every breaker and bucket asked for, cluster-wide when Redis serves."""

    breakers: Mapping[str, BreakerView]     # by deployment id
    buckets: Mapping[str, BucketView]       # by bucket name
    mode: str                               # "local" | "shared" | "degraded"


ROUND_TRIP_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250)


@dataclass(slots=True)
class StateHealth:
    """How the backend is doing, for /readyz, logs and metrics (metrics read it at scrape)."""

    backend: str                            # "memory" | "redis"
    mode: str                               # "local" | "shared" | "degraded"
    since: float                            # unix time of the last switch
    reason: str | None = None               # why degraded
    switches: dict[str, int] = field(default_factory=dict)      # mode switched to -> count
    errors: dict[str, int] = field(default_factory=dict)        # operation -> failed calls
    round_trip_counts: list[int] = field(default_factory=lambda: [0] * (len(ROUND_TRIP_BUCKETS_MS) + 1))
    round_trip_sum_ms: float = 0.0

    def observe(self, ms: float) -> None:
        counts = self.round_trip_counts
        for i, bound in enumerate(ROUND_TRIP_BUCKETS_MS):
            if ms <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.round_trip_sum_ms += ms

    def detail(self) -> dict[str, object]:
        out: dict[str, object] = {"backend": self.backend, "mode": self.mode, "since": round(self.since, 3)}
        if self.reason:
            out["reason"] = self.reason
        return out


class Memos(Protocol):
    """A key-value store with a time to live, scoped by a name (see the package docstring)."""

    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]: ...
    async def recall(self, scope: str, key: str) -> bytes | None: ...
    def forget(self, scope: str, key: str) -> asyncio.Future[bool]: ...


class StateStore(Memos, Protocol):
    """Buckets, breakers, 429 holds and memos; see the package docstring for the contract."""

    health: StateHealth

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def set_breaker_policy(self, policy: BreakerPolicy) -> None: ...

    async def admit(self, admission: Admission) -> Grant | Refusal: ...
    def settle(self, grant: Grant, outcome: Outcome) -> asyncio.Future[str]: ...

    async def view(self, breakers: Iterable[str], buckets: Mapping[str, int]) -> StateView: ...
