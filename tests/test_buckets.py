"""Token buckets and the balancer: exact with an injected clock, then an rpm burst on real sockets."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.balancer import Balancer, Load, Refused, Reservation, bucket_specs, reservation_tokens
from proxy.breaker import BreakerPolicy
from proxy.config import Deployment, Limits, Price, Provider, Timeouts
from proxy.state import Admission, BucketSpec, Grant, MemoryState, Option, Outcome, TokenBucket

from .conftest import Fleet, MakeGateway, model_entry
from .decision_log_support import settled_records
from .streams import plain_chat


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def provider(name: str = "acct", limits: Limits = Limits()) -> Provider:
    return Provider(name, "openai", "http://127.0.0.1:9/v1", None, None, limits, Timeouts(), {}, {}, None)


def deployment(name: str, weight: float = 1.0, limits: Limits = Limits(), price: float = 1.0,
               account: Provider | None = None) -> Deployment:
    return Deployment(f"m/{name}/0", account or provider(), name, weight, limits, Price(price, price))


def setup(policy: BreakerPolicy | None = None, seed: int | None = None
          ) -> tuple[MemoryState, Balancer, Clock]:
    clock = Clock()
    state = MemoryState(policy, clock=clock)
    return state, Balancer(state, Load(), random.Random(seed)), clock


def test_bucket_refills_at_its_rate_and_never_above_capacity() -> None:
    b = TokenBucket(60, now=0.0)
    for _ in range(60):
        assert b.available(1, 0.0)
        b.take(1, 0.0)
    assert not b.available(1, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(1.0)
    assert b.available(1, 1.0) and not b.available(2, 1.0)
    assert b.wait_s(1, 1000.0) == 0.0 and b.level == 60.0


async def test_a_reservation_beyond_the_bucket_waits_for_a_full_one_and_is_settled_with_real_usage() -> None:
    state, balancer, clock = setup()
    d = deployment("a", limits=Limits(tpm=1000))
    tokens = reservation_tokens(100, 400)
    assert tokens == 500
    r = await balancer.choose([d], "weighted", tokens, set())
    assert isinstance(r, Reservation)
    bucket = state.buckets["deployment:m/a/0:tpm"]
    assert bucket.level == 500
    balancer.settle(r, Outcome(120))                 # spent 120 of 500: 380 come back
    assert bucket.level == pytest.approx(880)
    assert isinstance(await balancer.choose([d], "weighted", 5000, set()), Refused)   # needs a full bucket
    clock.now = 60.0
    big = await balancer.choose([d], "weighted", 5000, set())     # full again: admitted, and owes the rest
    assert isinstance(big, Reservation) and bucket.level == pytest.approx(-4000)
    balancer.settle(big, Outcome(1500))              # spent 1,500: what it did not spend comes back
    assert bucket.level == pytest.approx(-500)
    refused = await balancer.choose([d], "weighted", 10, set())
    assert isinstance(refused, Refused) and refused.refusal.reason == "rate_limited"
    assert refused.refusal.retry_after == pytest.approx((500 + 10) / (1000 / 60))


async def test_unknown_usage_keeps_the_reservation() -> None:
    state, balancer, _ = setup()
    d = deployment("a", limits=Limits(tpm=1000))
    r = await balancer.choose([d], "weighted", 300, set())
    assert isinstance(r, Reservation)
    balancer.settle(r, Outcome(None))
    assert state.buckets["deployment:m/a/0:tpm"].level == 700


async def test_provider_account_bucket_is_shared_by_its_deployments() -> None:
    _, balancer, _ = setup()
    account = provider(limits=Limits(rpm=2))
    a, b = deployment("a", account=account), deployment("b", account=account)
    for _ in range(2):
        assert isinstance(await balancer.choose([a, b], "weighted", 1, set()), Reservation)
    refused = await balancer.choose([a, b], "weighted", 1, set())
    assert isinstance(refused, Refused) and refused.refusal.reason == "rate_limited"
    assert refused.refusal.retry_after == pytest.approx(30.0)


async def test_a_share_scales_every_limit() -> None:
    """`--workers 2` without Redis: each worker enforces half of each limit."""
    clock = Clock()
    state = MemoryState(clock=clock, share=0.5)
    balancer = Balancer(state, Load())
    d = deployment("a", limits=Limits(rpm=60, tpm=10_000))
    admitted = 0
    while isinstance(await balancer.choose([d], "weighted", 100, set()), Reservation):
        admitted += 1
    assert admitted == 30
    refused = await balancer.choose([d], "weighted", 100, set())
    assert isinstance(refused, Refused) and refused.refusal.retry_after == pytest.approx(2.0)   # 0.5 a second


async def test_shares_smaller_than_one_request_still_hold_the_total() -> None:
    """rpm 2 over 4 processes (2 instances x 2 workers while Redis is away): each process's
    share is half a request a minute. Each process admits whenever its share lets it for 10
    minutes: together they stay within the limit's burst plus its refill (2 + 10 x 2)."""
    clock = Clock()
    processes = [MemoryState(clock=clock, share=0.25) for _ in range(4)]
    d = deployment("a", limits=Limits(rpm=2))
    key = BucketSpec("key:batch", 2, 1)
    admitted = keyed = 0
    for second in range(600):
        clock.now = float(second)
        for state in processes:
            if isinstance(state.admit_now(Admission((Option(d.id, bucket_specs(d, 1)),))), Grant):
                admitted += 1
            if isinstance(state.admit_now(Admission((), key)), Grant):
                keyed += 1
    assert admitted <= 22 and keyed <= 22
    assert admitted >= 18 and keyed >= 18       # and the shares together still reach the limit


async def test_weighted_choice_follows_weights() -> None:
    _, balancer, _ = setup(seed=7)
    heavy, light = deployment("heavy", weight=3), deployment("light", weight=1)
    picks = []
    for _ in range(2000):
        r = await balancer.choose([heavy, light], "weighted", 1, set())
        assert isinstance(r, Reservation)
        picks.append(r.deployment.upstream_model)
        balancer.settle(r, Outcome(1))
    assert 0.70 < picks.count("heavy") / len(picks) < 0.80


async def test_weighted_choice_among_the_admissible_follows_their_weights() -> None:
    """The first admissible deployment of a weighted order is a weighted choice among the admissible."""
    state, balancer, _ = setup(BreakerPolicy(consecutive=1, open_s=60), seed=3)
    a, b, c = deployment("a", weight=1), deployment("b", weight=2), deployment("c", weight=6)
    state.breaker(c.id).record_failure(0.0)         # c is open: a and b share 1:2
    picks = []
    for _ in range(3000):
        r = await balancer.choose([a, b, c], "weighted", 1, set())
        assert isinstance(r, Reservation)
        picks.append(r.deployment.upstream_model)
        balancer.settle(r, Outcome(1))
    assert "c" not in picks
    assert 0.62 < picks.count("b") / len(picks) < 0.71


async def test_weighted_choice_prefers_the_less_loaded() -> None:
    _, balancer, _ = setup(seed=1)
    a, b = deployment("a"), deployment("b")
    balancer.load.stats(a.id).in_flight = 9          # weight share 1/10 against 1/1
    to_a = 0
    for _ in range(300):
        r = await balancer.choose([a, b], "weighted", 1, set())
        assert isinstance(r, Reservation)
        to_a += r.deployment is a
        balancer.settle(r, Outcome(1))
    assert to_a < 60                                  # about 1 in 11


async def test_least_loaded_cheapest_and_lowest_latency() -> None:
    _, balancer, _ = setup()
    stats = balancer.load.stats
    a, b = deployment("a", price=5.0), deployment("b", price=1.0)
    stats(b.id).in_flight = 2
    pick = await balancer.choose([a, b], "least_loaded", 1, set())
    assert isinstance(pick, Reservation) and pick.deployment is a
    balancer.settle(pick, Outcome(1))
    pick = await balancer.choose([a, b], "cheapest", 1, set())
    assert isinstance(pick, Reservation) and pick.deployment is b
    balancer.settle(pick, Outcome(1))
    for seconds in (0.9, 0.8):
        stats(a.id).observe_ttft(seconds)
    for seconds in (0.1, 2.0):                        # EWMA 0.48: still faster than a's 0.88
        stats(b.id).observe_ttft(seconds)
    pick = await balancer.choose([a, b], "lowest_latency", 1, set())
    assert isinstance(pick, Reservation) and pick.deployment is b


async def test_open_breakers_are_skipped_and_the_oldest_is_named() -> None:
    state, balancer, clock = setup(BreakerPolicy(consecutive=1, open_s=10.0))
    a, b, c = deployment("a"), deployment("b"), deployment("c")
    state.breaker(b.id).record_failure(1.0)
    state.breaker(a.id).record_failure(2.0)
    clock.now = 3.0
    pick = await balancer.choose([a, b, c], "weighted", 1, set())
    assert isinstance(pick, Reservation) and pick.deployment is c
    refused = await balancer.choose([a, b, c], "weighted", 1, {c.id})
    assert isinstance(refused, Refused) and refused.refusal.reason == "breaker_open" and refused.longest_open is b
    assert refused.refusal.open_for == pytest.approx(2.0) and refused.refusal.open_wait == pytest.approx(8.0)


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


async def test_a_candidate_passed_over_says_why_in_the_record(fleet: Fleet, make_gateway: MakeGateway,
                                                             tmp_path: Path) -> None:
    """An empty bucket or an open breaker leaves no attempt: the record's `skipped` says which."""
    log = tmp_path / "decisions.jsonl"
    primary = model_entry("p-n2")
    primary["deployments"][0]["limits"] = {"rpm": 1}
    gw = await make_gateway(
        {"primary": primary, "broken": model_entry("x-503"), "backup": model_entry("b-n2")},
        {"chains": {"main": ["primary", "backup"], "down": ["broken", "backup"]}, "default": "main",
         "server": {"decision_log": str(log), "breaker": {"consecutive": 1, "open_s": 30, "max_backoff_s": 60}}})
    served = []
    async with aiohttp.ClientSession() as s:
        for chain in ("main", "main", "down", "down"):      # the bucket empties, the breaker opens
            status, headers, _ = await plain_chat(s, gw.base, chain)
            named = {name.lower(): value for name, value in headers.items()}
            served.append((status, named["x-route-model"], named["x-request-id"]))
    assert [(status, model) for status, model, _ in served] == [(200, "primary")] + [(200, "backup")] * 3
    records = {r["request_id"]: r for r in await settled_records(gw.gateway, log, 4)}
    skipped = [records[request_id]["skipped"] for _, _, request_id in served]
    assert skipped[0] == [] and skipped[2] == []          # served; failed (its attempt says why)
    assert [s["model"] for s in skipped[1]] == ["primary"] and skipped[1][0]["reason"].startswith("rate limited:")
    assert [s["model"] for s in skipped[3]] == ["broken"] and skipped[3][0]["reason"].startswith("breaker open:")
    assert [a["model"] for a in records[served[3][2]]["attempts"]] == ["backup"]
