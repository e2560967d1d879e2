"""The operations page's aggregates and feed, exactly: decisions observed at chosen times
give the figures this test computes by hand; the feed builds once per interval for every
page and holds no more pages than its cap."""

from __future__ import annotations

import asyncio
import math
import random

from proxy.decisions import AttemptRecord, Decision
from proxy.ops.feed import Feed
from proxy.ops.live import MINUTE_S, RECENT, WINDOW_S, Histogram, LiveStats

T0 = 1_800_000_000.0


def _decision(rid: str, *, model: str | None = "m1", failures: tuple[str, ...] = (), outcome: str = "ok",
              tier: str = "standard", key: str | None = "app", cost: float = 0.0, wasted: float = 0.0,
              overhead: float | None = 0.5, provider: str = "p1") -> Decision:
    d = Decision(rid, 0.0, time=T0)
    d.tier, d.key, d.rule, d.served_model, d.outcome = tier, key, "short", model, outcome
    for failure in failures:
        d.attempts.append(AttemptRecord("m0", "m0/p0/0", "p0", 0.0, failure=failure))
    if model is not None:
        d.attempts.append(AttemptRecord(model, f"{model}/{provider}/0", provider, 0.0))
    d.cost_usd, d.wasted_cost_usd, d.overhead_ms = cost, wasted, overhead
    return d


def _live() -> LiveStats:
    live = LiveStats()
    live.configure(frozenset({"free", "standard", "premium"}))
    return live


def test_the_last_minute_adds_up_exactly() -> None:
    live = _live()
    live.observe(_decision("a", cost=0.01), T0 + 0.2)
    live.observe(_decision("b", failures=("server_error",), cost=0.03, wasted=0.01), T0 + 5.5)
    live.observe(_decision("c", model=None, failures=("timeout",), outcome="upstream_failed"), T0 + 30)
    live.observe(_decision("d", model=None, outcome="bad_request", tier="gold", key=None, overhead=None), T0 + 59)
    live.observe(_decision("old", cost=5.0), T0 - 61)           # outside the minute
    m = live.minute(T0 + 59.5)
    assert m["requests"] == 4
    assert (m["failed"], m["refused"]) == (1, 1)
    assert m["error_rate"] == 0.25
    assert m["fallback_rate"] == 1 / 3                           # of the three that reached an upstream
    assert m["by_model"] == {"none": 2, "m1": 2}
    assert m["by_provider"] == {"p0": {"attempts": 2, "failed": 2, "failure_rate": 1.0},
                                "p1": {"attempts": 2, "failed": 0, "failure_rate": 0.0}}
    assert math.isclose(m["cost_usd"], 0.04) and math.isclose(m["wasted_cost_usd"], 0.01)
    assert math.isclose(m["cost_per_request_usd"], 0.01)
    assert m["by_tier"]["other"] == {"requests": 1, "cost_usd": 0.0, "cost_per_request_usd": 0.0}  # "gold": unknown
    assert m["by_key"]["app"]["requests"] == 3 and m["by_key"]["none"]["requests"] == 1
    assert m["overhead_ms"]["p50"] is not None and abs(m["overhead_ms"]["p50"] - 0.5) <= 0.5 * 0.05
    assert live.totals["requests"] == 5 and math.isclose(live.totals["cost_usd"], 5.04)


def test_series_has_a_point_per_second_and_forgets_what_is_older_than_the_window() -> None:
    live = _live()
    live.observe(_decision("gone"), T0 - WINDOW_S - 5)
    live.observe(_decision("x"), T0 - 10.5)
    live.observe(_decision("y"), T0 - 10.1)
    s = live.series(T0 + 0.5)
    assert len(s["t"]) == WINDOW_S and s["t"][-1] == int(T0) - 1     # the current second is not over yet
    assert sum(s["requests"]) == 2
    assert s["requests"][s["t"].index(int(T0) - 11)] == 2
    assert live.minute(T0 + MINUTE_S)["requests"] == 0                # both are more than a minute old


def test_histogram_quantiles_are_within_a_few_percent_of_the_exact_ones() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0, 1.5) for _ in range(5000)]
    h = Histogram()
    for v in values:
        h.add(v)
    ordered = sorted(values)
    for p in (50, 90, 99):
        exact = ordered[math.ceil(p / 100 * len(ordered)) - 1]
        got = h.quantile(p)
        assert got is not None and exact <= got <= exact * 1.05, (p, exact, got)


def test_recent_decisions_are_bounded_and_found_by_id() -> None:
    live = _live()
    for i in range(RECENT + 10):
        live.observe(_decision(f"r{i}"), T0)
    assert len(live.recent) == RECENT
    assert live.find("r5") is None
    found = live.find(f"r{RECENT + 9}")
    assert found is not None and found.request_id == f"r{RECENT + 9}"
    assert [d.request_id for d in live.latest(2)] == [f"r{RECENT + 9}", f"r{RECENT + 8}"]


def test_quality_is_a_mean_per_tier_and_model() -> None:
    live = _live()
    live.observe_feedback("premium", "m1", 1.0)
    live.observe_feedback("premium", "m2", 0.5)
    live.observe_feedback("x-unknown", "m1", 0.0)
    q = live.quality_view()
    assert q["tier"] == {"other": {"mean": 0.0, "count": 1}, "premium": {"mean": 0.75, "count": 2}}
    assert q["model"]["m1"] == {"mean": 0.5, "count": 2}


async def test_the_feed_builds_once_per_interval_for_every_page_and_caps_the_pages() -> None:
    built = 0

    async def build() -> bytes:
        nonlocal built
        built += 1
        return f"frame {built}".encode()

    feed = Feed(build, interval_s=0.1, max_listeners=2)
    assert feed.join() and feed.join()
    assert not feed.join()                          # a third page is refused

    async def read(n: int) -> list[bytes]:
        frames = []
        async for frame in feed.frames():
            frames.append(frame)
            if len(frames) == n:
                break
        return frames

    first, second = await asyncio.wait_for(asyncio.gather(read(4), read(4)), 5)
    assert first == second                          # both pages got the same frames
    assert built <= 5                               # one build per interval, not one per page
    feed.leave()
    feed.leave()
    await asyncio.sleep(0.25)
    idle = built
    await asyncio.sleep(0.3)
    assert built == idle                            # nobody listens: nothing is built
    assert feed.join()
    await feed.close()
    assert await asyncio.wait_for(read(10), 1) == []       # frames() ends once closed
    assert not feed.join()
