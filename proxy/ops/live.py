"""Rolling aggregates and rings for the operations page, fed once per finished request.

`LiveStats.observe` runs in `Gateway.finish`, after the answer has left, with the decision
record that is built there anyway: a few counter increments into the current one-second
slot and one append to a ring of recent decisions. Nothing here runs per chunk, and
nothing is computed until a page asks (`minute`, `series`), at most once per second per
gateway however many pages are open (see `feed`).

Everything is bounded: `WINDOW_S` one-second slots (older slots are replaced), latency
kept as logarithmic histograms (a few hundred buckets at most, whatever the rate),
`RECENT` decisions, and label values that come from the config (a tier the config does
not name counts as `other`, as in the metrics).

Time is a parameter (`now`, epoch seconds), so tests are exact. Imports only the
decision record; the tiers the config names are handed in (`configure`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..decisions import CLIENT_DISCONNECTED, Decision

WINDOW_S = 300          # seconds of one-second history the charts show
MINUTE_S = 60           # the rolling window of the headline figures
RECENT = 1000           # decisions kept for the list and for lookup by request id
_PER_DOUBLING = 16      # latency histogram buckets per doubling
_SMALLEST = 0.001       # ms: smaller latencies share the lowest bucket
FAILED_OUTCOMES = frozenset(("upstream_failed", "timeout", "stream_error", "internal_error", "shutdown", "error"))


class Histogram:
    """Latency counts in logarithmic buckets, 16 per doubling (a quantile is read to within
    about 2%): constant work per sample, no sorting, and merging a minute of seconds is a
    sum of small dicts. Prometheus reads latency the same way."""

    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, value: float) -> None:
        index = math.ceil(math.log2(value if value > _SMALLEST else _SMALLEST) * _PER_DOUBLING)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.n += 1

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.n += other.n

    def quantile(self, p: float) -> float | None:
        """The upper bound of the bucket holding the nearest-rank p-th percentile."""
        if not self.n:
            return None
        rank = max(1, math.ceil(p / 100 * self.n))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return round(2 ** (index / _PER_DOUBLING), 3)
        raise AssertionError("unreachable: the counts add up to n")


def _bump(counts: dict[str, float], name: str, amount: float = 1) -> None:
    counts[name] = counts.get(name, 0) + amount


@dataclass(slots=True)
class Second:
    """What finished during one wall-clock second."""

    at: int = -1
    requests: int = 0
    failed: int = 0                 # the gateway could not answer (5xx, a broken stream)
    refused: int = 0                # the caller's fault (4xx)
    routed: int = 0                 # reached at least one upstream
    fallbacks: int = 0
    cost: float = 0.0
    wasted: float = 0.0
    models: dict[str, float] = field(default_factory=dict)          # requests by served model
    rules: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, float] = field(default_factory=dict)        # upstream attempts by provider
    attempt_failures: dict[str, float] = field(default_factory=dict)
    tier_cost: dict[str, float] = field(default_factory=dict)
    tier_requests: dict[str, float] = field(default_factory=dict)
    key_cost: dict[str, float] = field(default_factory=dict)
    key_requests: dict[str, float] = field(default_factory=dict)
    overhead: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    latency: tuple[float | None, float | None, float | None] | None = None   # once the second is over

    def percentiles(self) -> tuple[float | None, float | None, float | None]:
        """(overhead p50, overhead p99, ttft p50); remembered, since a past second never changes."""
        if self.latency is None:
            self.latency = (self.overhead.quantile(50), self.overhead.quantile(99), self.ttft.quantile(50))
        return self.latency


@dataclass(slots=True)
class Score:
    total: float = 0.0
    count: int = 0


class LiveStats:
    def __init__(self) -> None:
        self._slots = [Second() for _ in range(WINDOW_S)]
        self.recent: deque[Decision] = deque(maxlen=RECENT)
        self.quality: dict[str, dict[str, Score]] = {"tier": {}, "model": {}}
        self.tiers: frozenset[str] = frozenset()
        self.totals = {"requests": 0, "cost_usd": 0.0, "wasted_cost_usd": 0.0}

    def configure(self, tiers: frozenset[str]) -> None:
        """The tiers the config names (at start and on reload); others count as `other`."""
        self.tiers = tiers

    def tier(self, tier: str | None) -> str:
        if tier is None:
            return "none"
        return tier if tier in self.tiers else "other"

    def _slot(self, now: float) -> Second:
        second = int(now)
        slot = self._slots[second % WINDOW_S]
        if slot.at != second:
            slot = self._slots[second % WINDOW_S] = Second(second)
        return slot

    def observe(self, d: Decision, now: float) -> None:
        """Once per request, from `Gateway.finish`: count it into the current second, keep it."""
        slot = self._slot(now)
        slot.requests += 1
        if d.outcome in FAILED_OUTCOMES:
            slot.failed += 1
        elif d.outcome != "ok" and d.outcome != CLIENT_DISCONNECTED:
            slot.refused += 1
        if d.attempts:
            slot.routed += 1
            if len(d.attempts) > 1:
                slot.fallbacks += 1
        _bump(slot.models, d.served_model or "none")
        _bump(slot.rules, d.rule or "none")
        for attempt in d.attempts:
            _bump(slot.attempts, attempt.provider)
            if attempt.failure is not None and attempt.failure != CLIENT_DISCONNECTED:
                _bump(slot.attempt_failures, attempt.provider)
        tier, key = self.tier(d.tier), d.key or "none"
        _bump(slot.tier_requests, tier)
        _bump(slot.key_requests, key)
        if d.cost_usd:
            slot.cost += d.cost_usd
            slot.wasted += d.wasted_cost_usd
            _bump(slot.tier_cost, tier, d.cost_usd)
            _bump(slot.key_cost, key, d.cost_usd)
        if d.overhead_ms is not None:
            slot.overhead.add(d.overhead_ms)
        if d.ttft_ms is not None:
            slot.ttft.add(d.ttft_ms)
        totals = self.totals
        totals["requests"] += 1
        totals["cost_usd"] += d.cost_usd
        totals["wasted_cost_usd"] += d.wasted_cost_usd
        self.recent.append(d)

    def observe_feedback(self, tier: str | None, model: str | None, score: float) -> None:
        for dimension, name in (("tier", self.tier(tier)), ("model", model or "none")):
            s = self.quality[dimension].setdefault(name, Score())
            s.total += score
            s.count += 1

    def find(self, request_id: str) -> Decision | None:
        """The most recent request with this id among the last `RECENT`."""
        for d in reversed(self.recent):
            if d.request_id == request_id:
                return d
        return None

    def latest(self, count: int) -> list[Decision]:
        """The last `count` decisions, newest first."""
        return list(itertools.islice(reversed(self.recent), count))

    def _window(self, now: float, seconds: int) -> Iterator[Second]:
        """The slots of the last `seconds` whole seconds, the current one included."""
        last = int(now)
        for slot in self._slots:
            if last - seconds < slot.at <= last:
                yield slot

    def minute(self, now: float) -> dict[str, Any]:
        """The headline figures over the last `MINUTE_S` seconds."""
        slots = list(self._window(now, MINUTE_S))
        requests = sum(s.requests for s in slots)
        cost = math.fsum(s.cost for s in slots)
        routed = sum(s.routed for s in slots)
        overhead, ttft = Histogram(), Histogram()
        for s in slots:
            overhead.merge(s.overhead)
            ttft.merge(s.ttft)
        tier_cost, tier_requests = _merged(s.tier_cost for s in slots), _merged(s.tier_requests for s in slots)
        key_cost, key_requests = _merged(s.key_cost for s in slots), _merged(s.key_requests for s in slots)
        attempts, attempt_failures = _merged(s.attempts for s in slots), _merged(s.attempt_failures for s in slots)
        return {
            "window_s": MINUTE_S,
            "requests": requests,
            "rps": round(requests / MINUTE_S, 3),
            "failed": sum(s.failed for s in slots),
            "refused": sum(s.refused for s in slots),
            "error_rate": _rate(sum(s.failed for s in slots), requests),
            "fallback_rate": _rate(sum(s.fallbacks for s in slots), routed),
            "by_model": _sorted(_merged(s.models for s in slots)),
            "by_rule": _sorted(_merged(s.rules for s in slots)),
            "by_provider": {name: {"attempts": int(n), "failed": int(attempt_failures.get(name, 0)),
                                   "failure_rate": _rate(attempt_failures.get(name, 0), n)}
                            for name, n in _sorted(attempts).items()},
            "overhead_ms": {"p50": overhead.quantile(50), "p99": overhead.quantile(99)},
            "ttft_ms": {"p50": ttft.quantile(50), "p99": ttft.quantile(99)},
            "cost_usd": cost,
            "wasted_cost_usd": math.fsum(s.wasted for s in slots),
            "cost_per_request_usd": cost / requests if requests else None,
            "by_tier": {name: {"requests": int(n), "cost_usd": tier_cost.get(name, 0.0),
                               "cost_per_request_usd": tier_cost.get(name, 0.0) / n}
                        for name, n in _sorted(tier_requests).items()},
            "by_key": {name: {"requests": int(n), "cost_usd": key_cost.get(name, 0.0),
                              "cost_per_request_usd": key_cost.get(name, 0.0) / n}
                       for name, n in _sorted(key_requests).items()},
        }

    def series(self, now: float) -> dict[str, list[Any]]:
        """One point per second over the last `WINDOW_S` seconds (the current, partial one
        left out), oldest first: the charts' data."""
        last = int(now) - 1
        by_second = {s.at: s for s in self._slots if last - WINDOW_S < s.at <= last}
        empty = Second(latency=(None, None, None))
        out: dict[str, list[Any]] = {k: [] for k in ("t", "requests", "failed", "fallbacks", "cost_usd",
                                                     "overhead_p50_ms", "overhead_p99_ms", "ttft_p50_ms")}
        for second in range(last - WINDOW_S + 1, last + 1):
            s = by_second.get(second, empty)
            out["t"].append(second)
            out["requests"].append(s.requests)
            out["failed"].append(s.failed)
            out["fallbacks"].append(s.fallbacks)
            out["cost_usd"].append(round(s.cost, 9))
            overhead_p50, overhead_p99, ttft_p50 = s.percentiles()
            out["overhead_p50_ms"].append(overhead_p50)
            out["overhead_p99_ms"].append(overhead_p99)
            out["ttft_p50_ms"].append(ttft_p50)
        return out

    def quality_view(self) -> dict[str, dict[str, dict[str, float]]]:
        return {dimension: {name: {"mean": s.total / s.count, "count": s.count}
                            for name, s in sorted(scores.items())}
                for dimension, scores in self.quality.items()}


def _merged(counts: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in counts:
        for name, n in c.items():
            out[name] = out.get(name, 0) + n
    return out


def _sorted(counts: dict[str, float]) -> dict[str, float]:
    """Largest first, then by name: the order tables show."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole else None
