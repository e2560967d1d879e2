"""Shared state: token buckets, circuit breakers, 429 holds and memos, behind one interface.

The attempt loop (`dispatch`, through `balancer`) and the gateway talk to a `StateStore`
and cannot tell which backend serves it:

  store     the interface (`StateStore`) and the values that cross it
  bucket    pure: the token bucket arithmetic, time as a parameter
  memory    `MemoryState`: this process only (the default; with `--workers N` each worker
            enforces 1/N of every limit)
  redis_store  `RedisState`: shared by every instance; one atomic script per admission
            (lua/admit.lua) on the server's clock; settles and memo writes in the background
  failover  `SharedState`: Redis while it answers within the bound, local shares while it
            does not (degraded mode), back to Redis on its own
  lua/      the scripts, mirroring bucket.py and breaker.py where atomicity needs it

The contract, for every backend:

- `admit(Admission) -> Grant | Refusal`: one call per admission. It walks the options in
  the order given and admits the first whose breaker admits it (closed, or half-open with a
  probe slot free), that no 429 hold covers, and whose buckets all have room; it reserves
  all of that option's buckets and, when the admission names one, the gateway key's
  bucket, all or nothing. A refusal says why (`key_limited`, `rate_limited`,
  `breaker_open`) and how long to wait. With Redis this is one atomic script call on the
  server's clock.
- `settle(Grant, Outcome)`: exactly once per grant, never waits. Token buckets are
  corrected to the real usage (refund or charge), the breaker gets the verdict (success,
  failure, or none: a probe slot is released), a 429 hold or a trip is recorded. With
  Redis it is sent in the background, so it never delays a client's bytes.
- `view(deployment ids, {bucket name: limit}) -> StateView`: read only. For each deployment
  its breaker (`state`, `opened_at`, `open_until` = the next probe, `held_until`, unix
  times, None when not set) and for each bucket its `capacity` (what this instance
  enforces) and `level` now. Cluster-wide when Redis serves. Metrics and the operations
  page read it; `balancer.watched(config)` lists what to ask for.
- Memos, a small key-value store with a time to live, scoped by a name (`scope` keeps
  users apart: "served" for feedback's recent requests, "responses" for the Responses
  API's `previous_response_id`): `remember(scope, key, value: bytes, ttl_s)`,
  `recall(scope, key) -> bytes | None`, `forget(scope, key)`. `remember` applies at once in
  memory and is sent in the background to Redis; its future resolves to whether the memo
  was stored. `forget`'s future resolves to whether a live memo was there (one bounded
  round trip with Redis). The memory backend keeps at most 100,000 memos and 256 MiB per
  scope (oldest first out); Redis keeps each until its time to live.
- `health`: the backend, its mode (`local`, `shared`, `degraded`) and counters, read by
  /readyz and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..breaker import BreakerPolicy
from .bucket import TokenBucket
from .memory import MemoryState
from .store import (
    Admission,
    BreakerView,
    BucketSpec,
    BucketView,
    Grant,
    Memos,
    Option,
    Outcome,
    Refusal,
    StateHealth,
    StateStore,
    StateView,
)

if TYPE_CHECKING:
    from ..settings import StateSettings


def open_state(settings: StateSettings, policy: BreakerPolicy, *, workers: int = 1,
               clock: Callable[[], float] = time.monotonic) -> StateStore:
    """The backend `server.state` asks for. Without Redis each of `workers` processes enforces
    1/workers of every limit; with it, 1/(instances x workers) while Redis is away."""
    if not settings.shared:
        return MemoryState(policy, clock=clock, share=1.0 / workers)
    from .failover import SharedState  # redis is imported only when it is configured
    from .redis_store import RedisState, connect

    timeout_s = settings.timeout_ms / 1000
    shared = RedisState(connect(settings.url, settings.password, timeout_s), prefix=settings.prefix,
                        policy=policy, timeout_s=timeout_s)
    local = MemoryState(policy, clock=clock, share=1.0 / (settings.instances * workers), mode="degraded")
    return SharedState(shared, local)


__all__ = [
    "Admission", "BreakerView", "BucketSpec", "BucketView", "Grant", "MemoryState", "Memos", "Option", "Outcome",
    "Refusal", "StateHealth", "StateStore", "StateView", "TokenBucket", "open_state",
]
