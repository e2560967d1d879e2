"""One set of expectations for every state backend: memory, and Redis on a real redis-server.

Both run on a pinned clock (Redis scripts take it instead of the server's TIME), so the
numbers are exact and the Lua mirror of the bucket and breaker arithmetic is held to the
very same expectations as the Python cores.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.breaker import BreakerPolicy
from proxy.state import Admission, BucketSpec, Grant, MemoryState, Option, Outcome, Refusal, StateStore
from proxy.state.redis_store import RedisState, connect

from .redis_support import RedisServer

POLICY = BreakerPolicy(consecutive=3, ratio=0.5, min_calls=6, window_s=10.0, open_s=2.0, max_backoff_s=8.0,
                      cost_factor=4.0, max_open_s=20.0, probes=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    state: StateStore
    clock: Clock


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = Clock()
    if request.param == "memory":
        yield Backend(MemoryState(POLICY, clock=clock), clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    state = RedisState(connect(server.url, None, 1.0), prefix=f"t{os.urandom(6).hex()}", policy=POLICY,
                       timeout_s=1.0, clock=clock)
    await state.start()
    yield Backend(state, clock)
    await state.close()


def option(name: str, *buckets: BucketSpec) -> Option:
    return Option(f"m/{name}/0", buckets)


def rpm(scope: str, limit: int) -> BucketSpec:
    return BucketSpec(f"{scope}:rpm", limit, 1)


def tpm(scope: str, limit: int, tokens: int) -> BucketSpec:
    return BucketSpec(f"{scope}:tpm", limit, tokens, tokens=True)


async def settle(b: Backend, grant: Grant, outcome: Outcome) -> str:
    """The breaker's state once the settle has landed (Redis: sent in the background)."""
    return await b.state.settle(grant, outcome)


async def level(b: Backend, name: str, limit: int) -> float:
    return (await b.state.view([], {name: limit})).buckets[name].level


async def fail(b: Backend, name: str, times: int, open_for: float | None = None, cost_s: float = 0.0) -> None:
    for _ in range(times):
        grant = await b.state.admit(Admission((option(name),)))
        assert isinstance(grant, Grant)
        await settle(b, grant, Outcome(0, "fail", open_for, cost_s=cost_s))


async def test_tokens_are_reserved_and_settled_to_real_usage(backend: Backend) -> None:
    b = backend
    bucket = "deployment:m/a/0"
    grant = await b.state.admit(Admission((option("a", tpm(bucket, 1000, 500)),)))
    assert isinstance(grant, Grant) and not grant.probe
    assert await level(b, bucket + ":tpm", 1000) == pytest.approx(500)
    await settle(b, grant, Outcome(120))                      # spent 120 of 500: 380 come back
    assert await level(b, bucket + ":tpm", 1000) == pytest.approx(880)
    refused = await b.state.admit(Admission((option("a", tpm(bucket, 1000, 5000)),)))
    assert isinstance(refused, Refusal) and refused.reason == "rate_limited"
    assert refused.retry_after == pytest.approx(120 / (1000 / 60))     # larger than the bucket: wait for it full
    b.clock.now += 60
    big = await b.state.admit(Admission((option("a", tpm(bucket, 1000, 5000)),)))
    assert isinstance(big, Grant) and await level(b, bucket + ":tpm", 1000) == pytest.approx(-4000)   # all of it
    await settle(b, big, Outcome(1500))                       # spent 1,500: the rest comes back
    assert await level(b, bucket + ":tpm", 1000) == pytest.approx(-500)
    refused = await b.state.admit(Admission((option("a", tpm(bucket, 1000, 10)),)))
    assert isinstance(refused, Refusal) and refused.retry_after == pytest.approx(510 / (1000 / 60))
    unknown = None
    b.clock.now += 120
    unknown = await b.state.admit(Admission((option("a", tpm(bucket, 1000, 300)),)))
    assert isinstance(unknown, Grant)
    await settle(b, unknown, Outcome(None))                   # usage unknown: the reservation stands
    assert await level(b, bucket + ":tpm", 1000) == pytest.approx(700)


async def test_all_or_nothing_and_the_first_admissible_option_wins(backend: Backend) -> None:
    b = backend
    account = rpm("provider:acct", 2)
    tight = rpm("deployment:m/a/0", 1)
    first = await b.state.admit(Admission((option("a", tight, account), option("b", account))))
    assert isinstance(first, Grant) and first.index == 0 and first.deployment_id == "m/a/0"
    second = await b.state.admit(Admission((option("a", tight, account), option("b", account))))
    assert isinstance(second, Grant) and second.index == 1         # a's own bucket is empty: b
    assert await level(b, "provider:acct:rpm", 2) == pytest.approx(0)
    refused = await b.state.admit(Admission((option("a", tight, account), option("b", account))))
    assert isinstance(refused, Refusal) and refused.reason == "rate_limited"
    assert refused.retry_after == pytest.approx(30.0)                 # the account refills one in 30 s
    b.clock.now += 30
    # The account has room for one, deployment a only for half: refusing a takes nothing from the account.
    refused = await b.state.admit(Admission((option("a", tight, account),)))
    assert isinstance(refused, Refusal) and refused.retry_after == pytest.approx(30.0)
    assert await level(b, "provider:acct:rpm", 2) == pytest.approx(1)
    assert await level(b, "deployment:m/a/0:rpm", 1) == pytest.approx(0.5)


async def test_the_key_is_checked_first_and_charged_only_with_a_grant(backend: Backend) -> None:
    b = backend
    key = BucketSpec("key:batch", 2, 1)
    full = rpm("deployment:m/a/0", 1)
    assert isinstance(await b.state.admit(Admission((option("a", full),), key)), Grant)
    refused = await b.state.admit(Admission((option("a", full),), key))
    assert isinstance(refused, Refusal) and refused.reason == "rate_limited"
    assert await level(b, "key:batch", 2) == pytest.approx(1)          # the refusal cost the key nothing
    assert isinstance(await b.state.admit(Admission((option("b"),), key)), Grant)
    refused = await b.state.admit(Admission((option("b"),), key))
    assert isinstance(refused, Refusal) and refused.reason == "key_limited"
    assert refused.retry_after == pytest.approx(30.0)


async def test_breaker_opens_probes_are_bounded_and_a_success_closes(backend: Backend) -> None:
    b = backend
    await fail(b, "a", 2)
    assert isinstance(await b.state.admit(Admission((option("a"),))), Grant)   # two failures: still closed
    b.clock.now += 1
    await fail(b, "a", 1)
    opened = b.clock.now
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.reason == "breaker_open" and refused.longest_open == 0
    assert refused.open_wait == pytest.approx(2.0)
    view = (await b.state.view(["m/a/0"], {})).breakers["m/a/0"]
    assert view.state == "open"
    b.clock.now = opened + 2.0
    probes = [await b.state.admit(Admission((option("a"),))) for _ in range(3)]
    assert [isinstance(p, Grant) and p.probe for p in probes] == [True, True, False]   # probes=2
    first = probes[0]
    assert isinstance(first, Grant)
    await settle(b, first, Outcome(0))                       # a probe without a verdict frees its slot
    again = await b.state.admit(Admission((option("a"),)))
    assert isinstance(again, Grant) and again.probe
    await settle(b, again, Outcome(10, "ok"))
    assert (await b.state.view(["m/a/0"], {})).breakers["m/a/0"].state == "closed"
    for _ in range(3):
        grant = await b.state.admit(Admission((option("a"),)))
        assert isinstance(grant, Grant) and not grant.probe


async def test_a_probe_slot_is_freed_by_its_own_settle_only(backend: Backend) -> None:
    """Half-open admits `probes` (2 here) in flight, whatever else ends meanwhile: a request
    admitted before the breaker opened that fails now, or one probe failing (and reopening
    the breaker) while the other is still out, frees no slot of a probe still in flight."""
    b = backend
    stale = await b.state.admit(Admission((option("a"),)))      # admitted while closed (a long stream)
    assert isinstance(stale, Grant) and not stale.probe
    await fail(b, "a", 3)
    b.clock.now += 2
    first, second = [await b.state.admit(Admission((option("a"),))) for _ in range(2)]
    assert isinstance(first, Grant) and first.probe and isinstance(second, Grant) and second.probe
    await settle(b, stale, Outcome(0, "fail"))                  # not a probe: frees no probe slot
    b.clock.now += 8
    assert isinstance(await b.state.admit(Admission((option("a"),))), Refusal)     # two are still out
    assert await settle(b, second, Outcome(0, "fail")) == "open"    # a failed probe reopens ...
    b.clock.now += 8
    third = await b.state.admit(Admission((option("a"),)))
    assert isinstance(third, Grant) and third.probe                  # ... and frees its own slot only
    assert isinstance(await b.state.admit(Admission((option("a"),))), Refusal)     # `first` is still out
    await settle(b, first, Outcome(0))                           # ended without a verdict
    fourth = await b.state.admit(Admission((option("a"),)))
    assert isinstance(fourth, Grant) and fourth.probe
    assert await settle(b, third, Outcome(10, "ok")) == "closed"
    await settle(b, fourth, Outcome(0))                          # a slot of before the close: changes nothing
    await fail(b, "a", 3)
    b.clock.now += 2
    again = [await b.state.admit(Admission((option("a"),))) for _ in range(3)]
    assert [isinstance(g, Grant) and g.probe for g in again] == [True, True, False]


async def test_failed_probes_follow_the_policy_schedule(backend: Backend) -> None:
    b = backend
    await fail(b, "a", 3)
    for expected in (POLICY.open_interval(1), POLICY.open_interval(2), POLICY.open_interval(3)):
        refused = await b.state.admit(Admission((option("a"),)))
        assert isinstance(refused, Refusal)
        b.clock.now += refused.open_wait
        probe = await b.state.admit(Admission((option("a"),)))
        assert isinstance(probe, Grant) and probe.probe
        await settle(b, probe, Outcome(0, "fail"))
        refused = await b.state.admit(Admission((option("a"),)))
        assert isinstance(refused, Refusal) and refused.open_wait == pytest.approx(expected)
    assert [POLICY.open_interval(k) for k in range(4)] == [2.0, 4.0, 8.0, 8.0]     # the cap: max_backoff_s
    b.clock.now += 8
    probe = await b.state.admit(Admission((option("a"),)))
    assert isinstance(probe, Grant)
    await settle(b, probe, Outcome(0, "ok"))
    await fail(b, "a", 3)
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.open_wait == pytest.approx(2.0)   # closing reset it


async def test_failure_ratio_over_the_window_and_retry_after(backend: Backend) -> None:
    b = backend
    for ok in (True, False, True, False, True):
        grant = await b.state.admit(Admission((option("a"),)))
        assert isinstance(grant, Grant)
        await settle(b, grant, Outcome(0, "ok" if ok else "fail"))
        b.clock.now += 0.5
    assert isinstance(await b.state.admit(Admission((option("a"),))), Grant)    # five calls: below min_calls
    await fail(b, "a", 1, open_for=5.0)                      # half of six failed; Retry-After 5 s
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.reason == "breaker_open"
    assert refused.open_wait == pytest.approx(5.0)
    # Old calls leave the window: on another deployment, five calls then one failure 20 s later.
    for ok in (True, False, True, False, True):
        grant = await b.state.admit(Admission((option("b"),)))
        assert isinstance(grant, Grant)
        await settle(b, grant, Outcome(0, "ok" if ok else "fail"))
    b.clock.now += 20
    await fail(b, "b", 1)
    assert isinstance(await b.state.admit(Admission((option("b"),))), Grant)


async def test_a_429_hold_is_a_rate_limit_never_probed_early_and_trips_are_capped(backend: Backend) -> None:
    b = backend
    grant = await b.state.admit(Admission((option("a"),)))
    assert isinstance(grant, Grant)
    await settle(b, grant, Outcome(0, None, hold_for=3.0))
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.reason == "rate_limited"
    assert refused.retry_after == pytest.approx(3.0)
    assert isinstance(await b.state.admit(Admission((option("a"),), force=True)), Refusal)  # no probe into it
    view = (await b.state.view(["m/a/0"], {})).breakers["m/a/0"]
    assert view.state == "closed" and view.held_until is not None
    b.clock.now += 3
    grant = await b.state.admit(Admission((option("a"),)))
    assert isinstance(grant, Grant)
    assert await settle(b, grant, Outcome(0, "fail", trip_for=300.0)) == "open"   # bad credentials, capped
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.open_wait == pytest.approx(POLICY.max_open_s)


async def test_a_forced_probe_is_bounded_too(backend: Backend) -> None:
    b = backend
    await fail(b, "a", 3)
    await fail(b, "b", 0)
    b.clock.now += 0.5
    await fail(b, "b", 3)
    refused = await b.state.admit(Admission((option("a"), option("b"))))
    assert isinstance(refused, Refusal) and refused.longest_open == 0 and refused.open_for == pytest.approx(0.5)
    forced = await b.state.admit(Admission((option("a"),), force=True))
    assert isinstance(forced, Grant) and forced.probe
    second = await b.state.admit(Admission((option("a"),), force=True))
    assert isinstance(second, Grant) and second.probe                 # probes=2
    assert isinstance(await b.state.admit(Admission((option("a"),), force=True)), Refusal)
    b.clock.now += 0.1
    await settle(b, forced, Outcome(5, "ok"))
    assert (await b.state.view(["m/a/0", "m/b/0"], {})).breakers["m/a/0"].state == "closed"


async def test_memos_are_scoped_and_expire(backend: Backend) -> None:
    b = backend
    assert await b.state.remember("served", "r1", b"one", 0.3)
    assert await b.state.remember("responses", "r1", b"other", 60)
    assert await b.state.recall("served", "r1") == b"one"
    assert await b.state.recall("responses", "r1") == b"other"
    assert await b.state.recall("served", "r2") is None
    assert await b.state.forget("responses", "r1")
    assert await b.state.recall("responses", "r1") is None
    b.clock.now += 0.5
    await asyncio.sleep(0.5)            # Redis keeps time to live on its own clock
    assert await b.state.recall("served", "r1") is None
    assert await b.state.remember("served", "r3", b"three", 0.3)
    b.clock.now += 0.5
    await asyncio.sleep(0.5)
    assert not await b.state.forget("served", "r3")          # expired: nothing live to forget


async def test_the_view_names_every_breaker_and_bucket_asked_for(backend: Backend) -> None:
    b = backend
    grant = await b.state.admit(Admission((option("a", rpm("deployment:m/a/0", 60)),)))
    assert isinstance(grant, Grant)
    view = await b.state.view(["m/a/0", "m/never/0"], {"deployment:m/a/0:rpm": 60, "key:idle": 30})
    assert view.breakers["m/never/0"].state == "closed" and view.breakers["m/never/0"].opened_at is None
    assert view.buckets["deployment:m/a/0:rpm"].capacity == 60
    assert view.buckets["deployment:m/a/0:rpm"].level == pytest.approx(59)
    assert view.buckets["key:idle"].level == 30


async def test_an_admission_without_options_takes_the_key_alone(backend: Backend) -> None:
    b = backend
    key = BucketSpec("key:counter", 2, 1)
    for _ in range(2):
        grant = await b.state.admit(Admission((), key))
        assert isinstance(grant, Grant) and grant.index == -1
    refused = await b.state.admit(Admission((), key))
    assert isinstance(refused, Refusal) and refused.reason == "key_limited"
    assert refused.retry_after == pytest.approx(30.0)


async def test_a_costly_failure_opens_for_a_multiple_of_its_cost(backend: Backend) -> None:
    """A silent route kept its request waiting 1.5 s: the interval is at least 4 x 1.5 s."""
    b = backend
    await fail(b, "a", 2, cost_s=1.5)
    grant = await b.state.admit(Admission((option("a"),)))
    assert isinstance(grant, Grant)
    assert await settle(b, grant, Outcome(0, "fail", cost_s=1.5)) == "open"
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.open_wait == pytest.approx(6.0)
    b.clock.now += 6
    probe = await b.state.admit(Admission((option("a"),)))
    assert isinstance(probe, Grant) and probe.probe
    await settle(b, probe, Outcome(0, "fail", cost_s=0.1))        # a fast failed probe: the schedule again
    refused = await b.state.admit(Admission((option("a"),)))
    assert isinstance(refused, Refusal) and refused.open_wait == pytest.approx(POLICY.open_interval(1))
