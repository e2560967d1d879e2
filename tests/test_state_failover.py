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

from proxy.breaker import BreakerPolicy
from proxy.state import Admission, BucketSpec, Grant, MemoryState, Option, Outcome, Refusal
from proxy.state.failover import SharedState
from proxy.state.redis_store import MAX_CONNECTIONS, DirectLane, RedisState, StateUnavailable, connect

from .redis_support import RedisServer

RPM = "deployment:m/a/0:rpm"
TPM = "deployment:m/a/0:tpm"


class Clock:
    """A pinned clock for the scripts (they take it instead of the server's TIME)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(limit: int = 600) -> Admission:
    return Admission((Option("m/a/0", (BucketSpec(RPM, limit, 1),)),))


@pytest.fixture
async def shared(redis_server: RedisServer) -> AsyncIterator[SharedState]:
    # A generous bound (a burst opens 64 connections, on a machine that may be busy): this test is
    # about what happens within it. Without the fix the pool refused at once, whatever the bound.
    redis = RedisState(connect(redis_server.url, None, 5.0), prefix=f"t{os.urandom(6).hex()}", timeout_s=5.0)
    state = SharedState(redis, MemoryState(share=0.25, mode="degraded"))
    await state.start()
    yield state
    await state.close()


async def test_a_burst_beyond_the_pool_waits_for_a_connection_and_stays_shared(shared: SharedState) -> None:
    """More admissions at once than pooled connections is load, not an outage: each waits its
    turn within the bound, Redis admits them all, and the instance stays shared."""
    burst = 3 * MAX_CONNECTIONS
    answers = await asyncio.gather(*(shared.admit(admission()) for _ in range(burst)))
    assert shared.health.mode == "shared" and shared.health.errors == {}
    assert all(isinstance(a, Grant) and a.owner is shared.shared for a in answers)
    level = (await shared.view([], {RPM: 600})).buckets[RPM].level
    assert 600 - burst <= level < 600 - burst + 5          # every one taken from the shared bucket (10/s refill)


async def test_an_admission_its_caller_stopped_waiting_for_hands_back_its_probe_slot(own_redis: RedisServer) -> None:
    """Redis answers after the bound (or the client left meanwhile): the script ran all the
    same and took the half-open probe slot. Its grant is handed back when it comes, so the
    next request probes at once instead of after the slot's lease (the request's time budget)."""
    clock = Clock()
    policy = BreakerPolicy(consecutive=1, open_s=1.0, max_backoff_s=1.0, probes=1)
    redis = RedisState(connect(own_redis.url, None, 0.5), prefix="late", policy=policy, timeout_s=0.5, clock=clock)
    await redis.start()
    probe = Admission((Option("m/a/0", (BucketSpec(TPM, 6000, 1000, tokens=True),)),), probe_lease_s=600)

    async def probe_again() -> Grant:
        async with asyncio.timeout(2):
            while not isinstance(answer := await redis.admit(probe), Grant):
                assert isinstance(answer, Refusal) and answer.reason == "breaker_open"
                await asyncio.sleep(0.02)
        return answer

    try:
        grant = await redis.admit(probe)
        assert isinstance(grant, Grant)
        assert await redis.settle(grant, Outcome(0, "fail")) == "open"
        for way in ("past the bound", "the client left"):
            clock.now += 1.0                                # the interval is over: the next admission probes
            own_redis.pause()
            try:
                if way == "past the bound":
                    with pytest.raises(StateUnavailable, match="timed out"):
                        await redis.admit(probe)
                else:
                    task = asyncio.ensure_future(redis.admit(probe))
                    await asyncio.sleep(0.02)               # the script is on its way
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
            finally:
                own_redis.resume()
            again = await probe_again()
            assert again.probe
            view = await redis.view([], {TPM: 6000})
            assert view.buckets[TPM].level == pytest.approx(5000)       # the late grant's tokens came back
            assert await redis.settle(again, Outcome(0, "fail")) == "open"
    finally:
        await redis.close()


class FirstAdmissionFails(RedisState):
    """One admission that never reached the server (say it waited for a connection past the bound)."""

    failed = False

    async def admit(self, admission: Admission) -> Grant | Refusal:
        if not self.failed:
            self.failed = True
            raise StateUnavailable("redis admit: timed out", True)
        return await super().admit(admission)


async def test_an_admission_served_locally_while_shared_is_charged_to_redis(redis_server: RedisServer) -> None:
    """One call timing out is not an outage: the request is admitted from the local share at
    once, the instance stays shared, and the shared buckets are charged for it afterwards, so
    what it took counts against the cluster's limit."""
    redis = FirstAdmissionFails(connect(redis_server.url, None, 0.5), prefix=f"t{os.urandom(6).hex()}",
                                timeout_s=0.5, clock=Clock())
    state = SharedState(redis, MemoryState(share=0.25, mode="degraded"))
    await state.start()
    key = BucketSpec("key:batch", 60, 1)
    local = Admission((Option("m/a/0", (BucketSpec(RPM, 60, 1), BucketSpec(TPM, 6000, 1000, tokens=True))),), key)
    try:
        grant = await state.admit(local)
        assert isinstance(grant, Grant) and grant.owner is state.local and state.health.mode == "shared"
        await state.remember("sync", "barrier", b"", 5)            # the background writes have gone out
        view = await state.view([], {RPM: 60, TPM: 6000, "key:batch": 60})
        assert [view.buckets[name].level for name in (RPM, TPM, "key:batch")] == pytest.approx([59, 5000, 59])
    finally:
        await state.close()


class AdmissionsDuringTheCharge(RedisState):
    """Requests that the local shares admit while the hand-back's round trip is under way."""

    during: list[Admission] = []
    local: SharedState | None = None

    async def charge(self, amounts: dict[str, tuple[int, float]]) -> None:        # type: ignore[override]
        await super().charge(amounts)
        assert self.local is not None and self.local.degraded
        for admission in self.during:
            assert isinstance(await self.local.admit(admission), Grant)


async def test_the_return_to_shared_charges_every_local_admission(redis_server: RedisServer) -> None:
    """What the local shares admitted is handed to the shared buckets on the way back, also
    what they admitted while that hand-back was on its way."""
    redis = AdmissionsDuringTheCharge(connect(redis_server.url, None, 0.5), prefix=f"t{os.urandom(6).hex()}",
                                      timeout_s=0.5, clock=Clock())
    state = SharedState(redis, MemoryState(share=0.5, mode="degraded"), recovery_interval_s=0.01)
    redis.local = state
    one = Admission((Option("m/a/0", (BucketSpec(RPM, 12, 1),)),))
    redis.during = [one, one]
    await state.start()
    try:
        state.degrade("a test")
        assert all(isinstance(g, Grant) for g in [await state.admit(one) for _ in range(2)])   # a share: 6 of 12
        async with asyncio.timeout(2):
            while state.degraded:
                await asyncio.sleep(0.01)
        await state.remember("sync", "barrier", b"", 5)            # the background writes have gone out
        view = await state.view([], {RPM: 12})
        assert view.buckets[RPM].level == pytest.approx(12 - 4, abs=0.01)
    finally:
        await state.close()


async def test_a_flushed_script_cache_is_loaded_again_on_every_path(redis_server: RedisServer) -> None:
    """SCRIPT FLUSH (or a Redis restarted empty) before each kind of call: the admission, the
    background settle and the view each load the scripts again and answer; nothing degrades."""
    redis = RedisState(connect(redis_server.url, None, 0.5), prefix=f"t{os.urandom(6).hex()}", timeout_s=0.5,
                       clock=Clock())
    await redis.start()
    spend = Admission((Option("m/a/0", (BucketSpec(TPM, 6000, 1000, tokens=True),)),))
    try:
        await redis.client.script_flush()
        grant = await redis.admit(spend)
        assert isinstance(grant, Grant)
        await redis.client.script_flush()
        assert await redis.settle(grant, Outcome(100, "ok")) == "closed"
        await redis.client.script_flush()
        assert (await redis.view([], {TPM: 6000})).buckets[TPM].level == pytest.approx(5900)
        assert redis.health.errors == {}
    finally:
        await redis.close()


async def test_a_probe_that_ends_while_redis_is_away_frees_its_slot_on_the_return(redis_server: RedisServer) -> None:
    """A half-open probe granted by Redis ends during an outage: its settle cannot be sent then,
    and is sent on the return, so the shared breaker does not wait out the slot's lease (the
    request's whole time budget) before any instance may probe again."""
    clock = Clock()
    policy = BreakerPolicy(consecutive=1, open_s=1.0, max_backoff_s=1.0, probes=1)
    redis = RedisState(connect(redis_server.url, None, 0.5), prefix=f"t{os.urandom(6).hex()}", policy=policy,
                       timeout_s=0.5, clock=clock)
    state = SharedState(redis, MemoryState(policy, share=0.5, mode="degraded"), recovery_interval_s=0.01)
    probe = Admission((Option("m/a/0"),), probe_lease_s=600)
    await state.start()
    try:
        grant = await state.admit(probe)
        assert isinstance(grant, Grant) and await state.settle(grant, Outcome(0, "fail")) == "open"
        clock.now += 1.0
        out = await state.admit(probe)
        assert isinstance(out, Grant) and out.probe and out.owner is state.shared
        state.degrade("a test")
        await state.settle(out, Outcome(0))                 # its client left while Redis was away
        async with asyncio.timeout(2):
            while state.degraded:
                await asyncio.sleep(0.01)
        await state.remember("sync", "barrier", b"", 5)    # the background writes have gone out
        again = await state.admit(probe)
        assert isinstance(again, Grant) and again.probe
    finally:
        await state.close()


async def test_the_admissions_own_connections_survive_a_restart_and_never_read_a_stale_answer(
        own_redis: RedisServer) -> None:
    """The admission borrows its connections outside the client's pool (`DirectLane`): one
    Redis closed is replaced before use, and one whose answer never came before its call was
    given up is never lent again (its late answer would reach the next admission instead)."""
    clock = Clock()
    redis = RedisState(connect(own_redis.url, None, 0.5), prefix="lane", timeout_s=0.3, clock=clock)
    await redis.start()

    def take(amount: int) -> Admission:
        return Admission((Option("m/a/0", (BucketSpec(TPM, 6000, amount, tokens=True),)),))

    try:
        assert isinstance(await redis.admit(take(1)), Grant)
        killer = connect(own_redis.url, None, 0.5)
        await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")   # as a restart would
        await killer.aclose()
        await asyncio.sleep(0.05)                           # the close has reached this side
        assert isinstance(await redis.admit(take(1)), Grant), "a closed connection is replaced, not failed on"

        own_redis.pause()
        try:
            with pytest.raises(StateUnavailable, match="timed out"):
                await redis.admit(take(1000))
            await asyncio.sleep(1.3)                        # past LATE_S: the call is given up mid-read
        finally:
            own_redis.resume()
        await asyncio.sleep(0.1)                            # its answer arrives on that connection
        # 6000 tokens: 1000 went to the late call. Each answer must be its own: a Grant for 4000, then a
        # refusal for 2000 (nothing left). A stale answer would read the late Grant first, then this Grant.
        assert isinstance(await redis.admit(take(4000)), Grant)
        refused = await redis.admit(take(2000))
        assert isinstance(refused, Refusal) and refused.reason == "rate_limited", refused
    finally:
        await redis.close()


async def test_a_call_in_flight_when_the_lane_closes_leaves_no_connection_open(own_redis: RedisServer) -> None:
    """Closed at shutdown or after an outage: a call still running then finishes, and its
    connection is closed rather than kept in a lane nothing will use (no socket left behind)."""
    lane = DirectLane(connect(own_redis.url, None, 0.5).connection_pool)
    watcher = connect(own_redis.url, None, 0.5)
    try:
        await lane.call("PING")
        await lane.drop_idle()                              # after an outage: the lane goes on lending
        await lane.call("PING")
        clients = (await watcher.execute_command("CLIENT", "LIST")).decode().strip().splitlines()
        assert len(clients) == 2, clients                   # the watcher's and the one the lane keeps
        in_flight = asyncio.ensure_future(lane.call("BLPOP", "lane:nothing", "0.3"))    # answers nil after 0.3 s
        await asyncio.sleep(0.1)
        await lane.close()
        assert await in_flight is None
        await asyncio.sleep(0.05)
        clients = (await watcher.execute_command("CLIENT", "LIST")).decode().strip().splitlines()
        assert len(clients) == 1, clients                   # the watcher's own
    finally:
        await watcher.aclose()
