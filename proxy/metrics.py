"""Prometheus metrics, derived from the decision record once per request.

Every counter and histogram moves in `observe`, called once when a request ends, so the
streaming hot path never touches metrics. Breaker states and bucket levels are read at
scrape time by a collector. Each Gateway owns its own registry: no process globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .breaker import STATE_VALUE

if TYPE_CHECKING:
    from .decisions import Decision
    from .gateway import Gateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_US_BUCKETS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)


class _StateCollector(Collector):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        breakers = GaugeMetricFamily("llm_proxy_breaker_state",
                                     "Circuit breaker state per deployment (0 closed, 1 half-open, 2 open)",
                                     labels=["deployment"])
        for deployment_id, breaker in sorted(self.gateway.state.all_breakers().items()):
            breakers.add_metric([deployment_id], STATE_VALUE[breaker.state])
        yield breakers
        levels = GaugeMetricFamily("llm_proxy_bucket_level", "Token bucket level (requests or tokens left)",
                                   labels=["bucket"])
        now = self.gateway.clock()
        buckets = getattr(self.gateway.state, "buckets", {})
        for name, bucket in sorted(buckets.items()):
            bucket._refill(now)
            levels.add_metric([name], bucket.level)
        yield levels


class Metrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llm_proxy_requests", "Requests by served model, rule, tier and outcome",
                                ["model", "rule", "tier", "outcome"], registry=r)
        self.attempts = Counter("llm_proxy_attempts", "Upstream attempts by model, provider and result",
                                ["model", "provider", "result"], registry=r)
        self.fallbacks = Counter("llm_proxy_fallbacks", "Requests served after more than one attempt",
                                 ["rule", "tier"], registry=r)
        self.tokens = Counter("llm_proxy_tokens", "Tokens by model, tier and kind", ["model", "tier", "kind"],
                              registry=r)
        self.cost = Counter("llm_proxy_cost_usd", "Cost in USD by model and tier", ["model", "tier"], registry=r)
        self.overhead = Histogram("llm_proxy_overhead_ms", "Gateway time before the upstream request left (ms)",
                                  buckets=_MS_BUCKETS, registry=r)
        self.ttft = Histogram("llm_proxy_ttft_ms", "Time to first token seen by the client (ms)",
                              buckets=_MS_BUCKETS, registry=r)
        self.routing = Histogram("llm_proxy_routing_us", "Routing decision time (microseconds)",
                                 buckets=_US_BUCKETS, registry=r)
        r.register(_StateCollector(gateway))

    def observe(self, d: Decision) -> None:
        tier = d.tier or "none"
        rule = d.rule or "none"
        model = d.served_model or "none"
        self.requests.labels(model, rule, tier, d.outcome).inc()
        for a in d.attempts:
            self.attempts.labels(a.model, a.provider, a.failure or "ok").inc()
        if d.served_model and len(d.attempts) > 1:
            self.fallbacks.labels(rule, tier).inc()
        if d.usage is not None:
            self.tokens.labels(model, tier, "input").inc(d.usage.prompt_tokens)
            self.tokens.labels(model, tier, "output").inc(d.usage.output_tokens)
        if d.cost_usd:
            self.cost.labels(model, tier).inc(d.cost_usd)
        if d.overhead_ms is not None:
            self.overhead.observe(d.overhead_ms)
        if d.ttft_ms is not None:
            self.ttft.observe(d.ttft_ms)
        if d.routing_us is not None:
            self.routing.observe(d.routing_us)

    def render(self) -> bytes:
        return generate_latest(self.registry)
