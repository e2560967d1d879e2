"""Token buckets and the balancer: exact with an injected clock, then an rpm burst on real sockets."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import pytest

from proxy.balancer import Balancer, MemoryState, Refusal, Reservation, TokenBucket, reservation_tokens
from proxy.breaker import BreakerPolicy
from proxy.config import Deployment, Limits, Price, Provider, Timeouts

from .conftest import Fleet, MakeGateway, model_entry
from .streams import plain_chat


def provider(name: str = "acct", limits: Limits = Limits()) -> Provider:
    return Provider(name, "openai", "http://127.0.0.1:9/v1", None, None, limits, Timeouts(), {}, {}, None)


def deployment(name: str, weight: float = 1.0, limits: Limits = Limits(), price: float = 1.0,
               account: Provider | None = None) -> Deployment:
    return Deployment(f"m/{name}/0", account or provider(), name, weight, limits, Price(price, price))


def test_bucket_refills_at_its_rate_and_never_above_capacity() -> None:
    b = TokenBucket(60, now=0.0)
    for _ in range(60):
        assert b.available(1, 0.0)
        b.take(1, 0.0)
    assert not b.available(1, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(1.0)
    assert b.available(1, 1.0) and not b.available(2, 1.0)
    assert b.wait_s(1, 1000.0) == 0.0 and b.level == 60.0


def test_reservation_is_capped_at_the_bucket_size_and_settled_with_real_usage() -> None:
    state = MemoryState()
    balancer = Balancer(state)
    d = deployment("a", limits=Limits(tpm=1000))
    tokens = reservation_tokens(100, 400)
    assert tokens == 500
    r = balancer.choose([d], "weighted", tokens, 0.0, set())
    assert isinstance(r, Reservation)
    bucket = state.buckets["deployment:m/a/0:tpm"]
    assert bucket.level == 500
    balancer.settle(r, 120, 0.0)                     # spent 120 of 500: 380 come back
    assert bucket.level == pytest.approx(880)
    assert isinstance(balancer.choose([d], "weighted", 5000, 0.0, set()), Refusal)   # needs a full bucket
    big = balancer.choose([d], "weighted", 5000, 60.0, set())     # full again: takes all of it
    assert isinstance(big, Reservation) and bucket.level == pytest.approx(0)
    balancer.settle(big, 1500, 60.0)                 # spent more than it could reserve: the bucket owes it
    assert bucket.level == pytest.approx(-500)
    refused = balancer.choose([d], "weighted", 10, 60.0, set())
    assert isinstance(refused, Refusal) and refused.reason == "rate_limited"
    assert refused.retry_after == pytest.approx((500 + 10) / (1000 / 60))


def test_unknown_usage_keeps_the_reservation() -> None:
    state = MemoryState()
    balancer = Balancer(state)
    d = deployment("a", limits=Limits(tpm=1000))
    r = balancer.choose([d], "weighted", 300, 0.0, set())
    assert isinstance(r, Reservation)
    balancer.settle(r, None, 0.0)
    assert state.buckets["deployment:m/a/0:tpm"].level == 700


def test_provider_account_bucket_is_shared_by_its_deployments() -> None:
    state = MemoryState()
    balancer = Balancer(state)
    account = provider(limits=Limits(rpm=2))
    a, b = deployment("a", account=account), deployment("b", account=account)
    for _ in range(2):
        assert isinstance(balancer.choose([a, b], "weighted", 1, 0.0, set()), Reservation)
    refusal = balancer.choose([a, b], "weighted", 1, 0.0, set())
    assert isinstance(refusal, Refusal) and refusal.reason == "rate_limited"
    assert refusal.retry_after == pytest.approx(30.0)


def test_weighted_choice_follows_weights() -> None:
    balancer = Balancer(MemoryState(), random.Random(7))
    heavy, light = deployment("heavy", weight=3), deployment("light", weight=1)
    picks = []
    for _ in range(2000):
        r = balancer.choose([heavy, light], "weighted", 1, 0.0, set())
        assert isinstance(r, Reservation)
        picks.append(r.deployment.upstream_model)
        balancer.settle(r, 1, 0.0)
    assert 0.70 < picks.count("heavy") / len(picks) < 0.80


def test_weighted_choice_prefers_the_less_loaded() -> None:
    state = MemoryState()
    balancer = Balancer(state, random.Random(1))
    a, b = deployment("a"), deployment("b")
    state.stats(a.id).in_flight = 9                   # weight share 1/10 against 1/1
    to_a = 0
    for _ in range(300):
        r = balancer.choose([a, b], "weighted", 1, 0.0, set())
        assert isinstance(r, Reservation)
        to_a += r.deployment is a
        balancer.settle(r, 1, 0.0)
    assert to_a < 60                                  # about 1 in 11


def test_least_loaded_cheapest_and_lowest_latency() -> None:
    state = MemoryState()
    balancer = Balancer(state)
    a, b = deployment("a", price=5.0), deployment("b", price=1.0)
    state.stats(b.id).in_flight = 2
    pick = balancer.choose([a, b], "least_loaded", 1, 0.0, set())
    assert isinstance(pick, Reservation) and pick.deployment is a
    balancer.settle(pick, 1, 0.0)
    pick = balancer.choose([a, b], "cheapest", 1, 0.0, set())
    assert isinstance(pick, Reservation) and pick.deployment is b
    balancer.settle(pick, 1, 0.0)
    for seconds in (0.9, 0.8):
        state.stats(a.id).observe_ttft(seconds)
    for seconds in (0.1, 2.0):                        # EWMA 0.48: still faster than a's 0.88
        state.stats(b.id).observe_ttft(seconds)
    pick = balancer.choose([a, b], "lowest_latency", 1, 0.0, set())
    assert isinstance(pick, Reservation) and pick.deployment is b


def test_open_breakers_are_skipped_and_the_oldest_is_named() -> None:
    state = MemoryState(policy=BreakerPolicy(consecutive=1, open_s=10.0))
    balancer = Balancer(state)
    a, b, c = deployment("a"), deployment("b"), deployment("c")
    state.breaker(b.id).record_failure(1.0)
    state.breaker(a.id).record_failure(2.0)
    pick = balancer.choose([a, b, c], "weighted", 1, 3.0, set())
    assert isinstance(pick, Reservation) and pick.deployment is c
    refusal = balancer.choose([a, b, c], "weighted", 1, 3.0, {c.id})
    assert isinstance(refusal, Refusal) and refusal.reason == "breaker_open" and refusal.longest_open is b


async def test_rpm_burst_overflows_to_the_fallback_without_a_429(fleet: Fleet, make_gateway: MakeGateway) -> None:
    primary = model_entry("p-n3")
    primary["deployments"][0]["limits"] = {"rpm": 60}
    gw = await make_gateway({"primary": primary, "backup": model_entry("b-n3")},
                            {"chains": {"main": ["primary", "backup"]}, "default": "main"})
    limit = asyncio.Semaphore(20)

    async def one(s: aiohttp.ClientSession) -> tuple[int, str]:
        async with limit:
            status, headers, _ = await plain_chat(s, gw.base, "main")
            return status, headers.get("X-Route-Model", "")

    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(one(s) for _ in range(100)))
    elapsed = time.monotonic() - started
    assert all(status == 200 for status, _ in results)
    to_primary = len(fleet.sim.requests_for("p-n3"))
    allowed = 60 + int(elapsed) + 1                   # the bucket refills at 1/s during the burst
    assert 55 <= to_primary <= allowed
    assert sum(1 for _, m in results if m == "primary") == to_primary
    assert len(fleet.sim.requests_for("b-n3")) == 100 - to_primary


async def test_tpm_is_settled_with_real_usage_and_failures_give_the_reservation_back(
        fleet: Fleet, make_gateway: MakeGateway) -> None:
    ok, failing = model_entry("p-n5"), model_entry("f-503-n5")
    ok["deployments"][0]["limits"] = {"tpm": 100000}
    failing["deployments"][0]["limits"] = {"tpm": 100000}
    gw = await make_gateway({"ok": ok, "failing": failing, "backup": model_entry("b-n5")},
                            {"chains": {"main": ["ok"], "bad": ["failing", "backup"]}, "default": "main"})
    async with aiohttp.ClientSession() as s:
        status, _, body = await plain_chat(s, gw.base, "main", max_tokens=3000)
        assert status == 200
        status, _, _ = await plain_chat(s, gw.base, "bad", max_tokens=3000)
        assert status == 200
    buckets = gw.gateway.state.buckets                 # type: ignore[attr-defined]
    spent = 100000 - buckets["deployment:ok/sim-openai/0:tpm"].level
    assert 0 <= spent <= body["usage"]["total_tokens"]         # not the 3,000 reserved (the bucket refills)
    assert 100000 - buckets["deployment:failing/sim-openai/0:tpm"].level < 1
