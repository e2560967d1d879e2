"""`SharedState` and `RedisState` against a real redis-server: what load, a lost call and a
return from an outage do to the shared limits and the mode.

Each test takes its own key prefix on the session's redis-server; none stops it (the
outage runs are in test_shared_state.py and test_shared_limits.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from proxy.state import Admission, BucketSpec, Grant, MemoryState, Option
from proxy.state.failover import SharedState
from proxy.state.redis_store import MAX_CONNECTIONS, RedisState, connect

from .redis_support import RedisServer

RPM = "deployment:m/a/0:rpm"


def admission(limit: int = 600) -> Admission:
    return Admission((Option("m/a/0", (BucketSpec(RPM, limit, 1),)),))


@pytest.fixture
async def shared(redis_server: RedisServer) -> AsyncIterator[SharedState]:
    # A generous bound: these tests are about what happens within it, not about a slow machine.
    redis = RedisState(connect(redis_server.url, None, 0.5), prefix=f"t{os.urandom(6).hex()}", timeout_s=0.5)
    state = SharedState(redis, MemoryState(share=0.25, mode="degraded"))
    await state.start()
    yield state
    await state.close()


async def test_a_burst_beyond_the_pool_waits_for_a_connection_and_stays_shared(shared: SharedState) -> None:
    """More admissions at once than pooled connections is load, not an outage: each waits its
    turn within the bound, Redis admits them all, and the instance stays shared."""
    burst = 3 * MAX_CONNECTIONS
    answers = await asyncio.gather(*(shared.admit(admission()) for _ in range(burst)))
    assert all(isinstance(a, Grant) and a.owner is shared.shared for a in answers)
    assert shared.health.mode == "shared" and shared.health.errors == {}
    level = (await shared.view([], {RPM: 600})).buckets[RPM].level
    assert 600 - burst <= level < 600 - burst + 5          # every one taken from the shared bucket (10/s refill)
