"""Prometheus metrics, derived from the decision record once per request.

Every counter and histogram moves in `observe`, called once when a request ends, so the
streaming hot path never touches metrics. Breaker states, bucket levels and the state
backend's health are handed to `render` at scrape time (a `StateView`, cluster-wide with
Redis) and read by a collector. Each Gateway owns its own registry: no process globals.

Label values stay bounded: models, rules and outcomes come from the config and the code;
a tier the config does not know (an arbitrary `X-User-Tier` on an open gateway) is
counted as `other`, so a caller cannot grow the series without limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .breaker import STATE_VALUE
from .state.store import ROUND_TRIP_BUCKETS_MS

if TYPE_CHECKING:
    from .config import Config
    from .decisions import Decision, DecisionLog, Served
    from .state import StateHealth, StateView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_US_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
_COMMON_TIERS = frozenset(("free", "standard", "premium"))


def known_tiers(config: Config) -> frozenset[str]:
    """Tiers the config names: the default, the keys' tiers, and the values rules test."""
    tiers = set(_COMMON_TIERS) | {config.server.default_tier} | {k.tier for k in config.keys}
    for rule in config.rules:
        for condition in rule.when:
            if condition.signal == "tier":
                values = condition.value if isinstance(condition.value, (list, tuple, frozenset, set)) \
                    else [condition.value]
                tiers.update(str(v) for v in values)
    return frozenset(tiers)


class _StateCollector(Collector):
    """Reads what `Metrics.render` was handed: the state view and the backend's health."""

    def __init__(self, decisions: DecisionLog) -> None:
        self.decisions = decisions
        self.view: StateView | None = None
        self.health: StateHealth | None = None

    def collect(self) -> Iterator[Metric]:
        breakers = GaugeMetricFamily("llm_proxy_breaker_state",
                                     "Circuit breaker state per deployment (0 closed, 1 half-open, 2 open)",
                                     labels=["deployment"])
        levels = GaugeMetricFamily("llm_proxy_bucket_level",
                                   "Token bucket level: requests (rpm) or tokens (tpm) left now, by scope "
                                   "(deployment, provider, key)",
                                   labels=["scope", "id", "kind"])
        if self.view is not None:
            for deployment_id, breaker in sorted(self.view.breakers.items()):
                breakers.add_metric([deployment_id], STATE_VALUE[breaker.state])
            for bucket_name, bucket in sorted(self.view.buckets.items()):
                # "deployment:<id>:rpm", "provider:<name>:tpm", "key:<name>" (a key's own rpm)
                scope, _, rest = bucket_name.partition(":")
                owner, sep, kind = rest.rpartition(":")
                if not sep or kind not in ("rpm", "tpm"):
                    owner, kind = rest, "rpm"
                levels.add_metric([scope, owner, kind], bucket.level)
        yield breakers
        yield levels
        yield GaugeMetricFamily("llm_proxy_decision_log_dropped", "Decision records that could not be written",
                                value=self.decisions.dropped)
        if self.health is not None:
            yield from _health_metrics(self.health)


def _health_metrics(health: StateHealth) -> Iterator[Metric]:
    degraded = GaugeMetricFamily("llm_proxy_state_degraded", "1 while the shared state (Redis) is unreachable "
                                 "and this process enforces its local share of every limit", labels=["backend"])
    degraded.add_metric([health.backend], 1 if health.mode == "degraded" else 0)
    yield degraded
    switches = CounterMetricFamily("llm_proxy_state_switches", "Switches between shared and degraded mode, "
                                   "by the mode switched to", labels=["mode"])
    for mode in ("degraded", "shared"):
        switches.add_metric([mode], health.switches.get(mode, 0))
    yield switches
    errors = CounterMetricFamily("llm_proxy_state_errors", "State backend calls that failed or timed out, "
                                 "by operation", labels=["operation"])
    for operation, count in sorted(health.errors.items()):
        errors.add_metric([operation], count)
    yield errors
    cumulative, running = [], 0
    for bound, count in zip((*ROUND_TRIP_BUCKETS_MS, float("inf")), health.round_trip_counts):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
    yield HistogramMetricFamily("llm_proxy_state_round_trip_ms", "Round trip of state backend calls (ms)",
                                buckets=cumulative, sum_value=health.round_trip_sum_ms)


class Metrics:
    """The gateway's metrics; handed the decision log, and at each scrape the state view and
    health it reads, never the gateway itself."""

    def __init__(self, decisions: DecisionLog) -> None:
        self.tiers: frozenset[str] = _COMMON_TIERS
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        self.requests = Counter("llm_proxy_requests", "Requests by served model, rule, tier and outcome",
                                ["model", "rule", "tier", "outcome"], registry=r)
        self.attempts = Counter("llm_proxy_attempts", "Upstream attempts by model, provider and result",
                                ["model", "provider", "result"], registry=r)
        self.fallbacks = Counter("llm_proxy_fallbacks", "Requests that needed more than one attempt",
                                 ["rule", "tier"], registry=r)
        self.tokens = Counter("llm_proxy_tokens", "Tokens by model, tier and kind (input, cached_input, output)",
                              ["model", "tier", "kind"], registry=r)
        self.cost = Counter("llm_proxy_cost_usd", "Cost in USD by model and tier, wasted attempts included",
                            ["model", "tier"], registry=r)
        self.wasted = Counter("llm_proxy_wasted_cost_usd", "Cost in USD of billed attempts the gateway abandoned",
                              ["model", "tier"], registry=r)
        self.overhead = Histogram("llm_proxy_overhead_ms", "Gateway time before the upstream request left (ms)",
                                  buckets=_MS_BUCKETS, registry=r)
        self.ttft = Histogram("llm_proxy_ttft_ms", "Time to first token seen by the client (ms)",
                              buckets=_MS_BUCKETS, registry=r)
        self.duration = Histogram("llm_proxy_request_duration_ms", "Whole request duration (ms)",
                                  buckets=_MS_BUCKETS, registry=r)
        self.routing = Histogram("llm_proxy_routing_us", "Routing decision time (microseconds)",
                                 buckets=_US_BUCKETS, registry=r)
        self.quality = Summary("llm_proxy_quality_score", "Feedback scores (0-1) by tier, model and rule",
                               ["tier", "model", "rule"], registry=r)
        self._state = _StateCollector(decisions)
        r.register(self._state)

    def configure(self, config: Config) -> None:
        self.tiers = known_tiers(config)

    def tier(self, tier: str | None) -> str:
        if tier is None:
            return "none"
        return tier if tier in self.tiers else "other"

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """`metric.labels(*labels)`, remembered: labels() validates and locks on every call, and
        this runs several times per request. Bounded: every label value comes from the config
        or a fixed set (unknown tiers are already folded into `other`)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, d: Decision) -> None:
        tier = self.tier(d.tier)
        rule = d.rule or "none"
        model = d.served_model or "none"
        child = self._child
        child(self.requests, model, rule, tier, d.outcome).inc()
        for a in d.attempts:
            child(self.attempts, a.model, a.provider, a.failure or "ok").inc()
        if d.fell_back:
            child(self.fallbacks, rule, tier).inc()
        if d.usage is not None:
            child(self.tokens, model, tier, "input").inc(d.usage.input_tokens)
            child(self.tokens, model, tier, "cached_input").inc(d.usage.cached_input_tokens)
            child(self.tokens, model, tier, "output").inc(d.usage.output_tokens)
        for a in d.attempts:
            if a.cost_usd:
                child(self.cost, a.model, tier).inc(a.cost_usd)
                if a.wasted:
                    child(self.wasted, a.model, tier).inc(a.cost_usd)
        if d.overhead_ms is not None:
            self.overhead.observe(d.overhead_ms)
        if d.ttft_ms is not None:
            self.ttft.observe(d.ttft_ms)
        if d.duration_ms is not None:
            self.duration.observe(d.duration_ms)
        if d.routing_us is not None:
            self.routing.observe(d.routing_us)

    def observe_feedback(self, served: Served, score: float) -> None:
        self.quality.labels(self.tier(served.tier), served.model or "none", served.rule or "none").observe(score)

    def render(self, view: StateView | None = None, health: StateHealth | None = None) -> bytes:
        self._state.view, self._state.health = view, health
        return generate_latest(self.registry)
