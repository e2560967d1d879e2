"""Prometheus metrics, derived from the decision record once per request.

Every counter and histogram moves in `observe`, called once when a request ends, so the
streaming hot path never touches metrics. Breaker states and bucket levels are read at
scrape time by a collector. Each Gateway owns its own registry: no process globals.

Label values stay bounded: models, rules and outcomes come from the config and the code;
a tier the config does not know (an arbitrary `X-User-Tier` on an open gateway) is
counted as `other`, so a caller cannot grow the series without limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .breaker import STATE_VALUE

if TYPE_CHECKING:
    from collections.abc import Callable

    from .balancer import StateStore
    from .config import Config
    from .decisions import Decision, DecisionLog, Served

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
    def __init__(self, state: StateStore, clock: Callable[[], float], decisions: DecisionLog) -> None:
        self.state = state
        self.clock = clock
        self.decisions = decisions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.state
        breakers = GaugeMetricFamily("llm_proxy_breaker_state",
                                     "Circuit breaker state per deployment (0 closed, 1 half-open, 2 open)",
                                     labels=["deployment"])
        for deployment_id, breaker in sorted(state.all_breakers().items()):
            breakers.add_metric([deployment_id], STATE_VALUE[breaker.state])
        yield breakers
        levels = GaugeMetricFamily("llm_proxy_bucket_level",
                                   "Token bucket level: requests (rpm) or tokens (tpm) left now, by scope "
                                   "(deployment, provider, key)",
                                   labels=["scope", "id", "kind"])
        now = self.clock()
        for bucket_name, bucket in sorted(state.all_buckets().items()):
            # "deployment:<id>:rpm", "provider:<name>:tpm", "key:<name>" (a key's own rpm)
            scope, _, rest = bucket_name.partition(":")
            owner, sep, kind = rest.rpartition(":")
            if not sep or kind not in ("rpm", "tpm"):
                owner, kind = rest, "rpm"
            level = min(bucket.capacity, bucket.level + max(0.0, now - bucket.updated) * bucket.rate)
            levels.add_metric([scope, owner, kind], level)
        yield levels
        dropped = GaugeMetricFamily("llm_proxy_decision_log_dropped",
                                    "Decision records that could not be written", value=self.decisions.dropped)
        yield dropped


class Metrics:
    """The gateway's metrics; handed the state store, the clock and the decision log it reads
    at scrape time, never the gateway itself."""

    def __init__(self, state: StateStore, clock: Callable[[], float], decisions: DecisionLog) -> None:
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
        r.register(_StateCollector(state, clock, decisions))

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
