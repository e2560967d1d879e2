"""Token buckets, the per-deployment state store, and the choice of a deployment.

`StateStore` is the small interface behind which buckets, breakers and load statistics
live. `MemoryState` keeps them in this process; a shared store (Redis) can implement
the same five methods when several gateway instances run side by side.

Buckets: requests per minute and tokens per minute, per deployment and per provider
account. A request reserves 1 request and its input tokens + max_tokens (1,024 when it
sets none, capped at the bucket's size) at admission; `settle` refunds what the real
usage did not spend, or takes what it spent beyond the reservation.

Time is a parameter everywhere. Imports config and breaker only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .breaker import BreakerPolicy, CircuitBreaker
from .config import Deployment, Limits

DEFAULT_OUTPUT_RESERVATION = 1024


class TokenBucket:
    __slots__ = ("capacity", "rate", "level", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def available(self, amount: float, now: float) -> bool:
        self._refill(now)
        return self.level >= min(amount, self.capacity)

    def take(self, amount: float, now: float) -> None:
        """May go below zero (a settle of real usage): the debt delays the next admission."""
        self._refill(now)
        self.level -= min(amount, self.capacity)

    def refund(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def wait_s(self, amount: float, now: float) -> float:
        self._refill(now)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.rate


@dataclass(slots=True)
class DeploymentStats:
    in_flight: int = 0
    ttft_ewma: float | None = None          # seconds, for the lowest-latency strategy

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_ewma = seconds if self.ttft_ewma is None else 0.8 * self.ttft_ewma + 0.2 * seconds


class StateStore(Protocol):
    def breaker(self, deployment_id: str) -> CircuitBreaker: ...
    def bucket(self, name: str, per_minute: int, now: float) -> TokenBucket: ...
    def stats(self, deployment_id: str) -> DeploymentStats: ...
    def all_breakers(self) -> dict[str, CircuitBreaker]: ...
    def all_buckets(self) -> dict[str, TokenBucket]: ...
    def set_breaker_policy(self, policy: BreakerPolicy) -> None: ...


@dataclass
class MemoryState:
    """All per-deployment state of one process. Survives config reloads: keys are stable ids."""

    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    statistics: dict[str, DeploymentStats] = field(default_factory=dict)

    def breaker(self, deployment_id: str) -> CircuitBreaker:
        breaker = self.breakers.get(deployment_id)
        if breaker is None:
            breaker = self.breakers[deployment_id] = CircuitBreaker(self.policy)
        return breaker

    def bucket(self, name: str, per_minute: int, now: float) -> TokenBucket:
        bucket = self.buckets.get(name)
        if bucket is None or bucket.capacity != per_minute:
            bucket = self.buckets[name] = TokenBucket(per_minute, now)
        return bucket

    def stats(self, deployment_id: str) -> DeploymentStats:
        stats = self.statistics.get(deployment_id)
        if stats is None:
            stats = self.statistics[deployment_id] = DeploymentStats()
        return stats

    def all_breakers(self) -> dict[str, CircuitBreaker]:
        return self.breakers

    def all_buckets(self) -> dict[str, TokenBucket]:
        return self.buckets

    def set_breaker_policy(self, policy: BreakerPolicy) -> None:
        """From `server.breaker` at start and on reload; breakers keep their state."""
        self.policy = policy
        for breaker in self.breakers.values():
            breaker.policy = policy


@dataclass(slots=True)
class Reservation:
    """What a chosen deployment took from its buckets; `settle` gives back the unused part."""

    deployment: Deployment
    tokens: int
    buckets: list[TokenBucket]      # token buckets only; a spent request is never refunded
    probe: bool = False


@dataclass(slots=True)
class Refusal:
    """Why no deployment of a candidate could be used right now."""

    reason: str                 # "breaker_open" | "rate_limited" | "excluded"
    retry_after: float = 0.0
    longest_open: Deployment | None = None


def _buckets_for(state: StateStore, deployment: Deployment, now: float) -> tuple[list[TokenBucket], list[TokenBucket]]:
    """(request buckets, token buckets) of a deployment and its provider account."""
    requests, tokens = [], []
    for name, limits in ((f"deployment:{deployment.id}", deployment.limits),
                         (f"provider:{deployment.provider.name}", deployment.provider.limits)):
        if limits.rpm:
            requests.append(state.bucket(name + ":rpm", limits.rpm, now))
        if limits.tpm:
            tokens.append(state.bucket(name + ":tpm", limits.tpm, now))
    return requests, tokens


def _has_limits(deployment: Deployment) -> bool:
    d, p = deployment.limits, deployment.provider.limits
    return bool(d.rpm or d.tpm or p.rpm or p.tpm)


class Balancer:
    def __init__(self, state: StateStore, rng: random.Random | None = None) -> None:
        self.state = state
        self.rng = rng or random.Random()

    def choose(self, deployments: Sequence[Deployment], strategy: str, tokens: int, now: float,
               excluded: frozenset[str] | set[str]) -> Reservation | Refusal:
        """Pick one deployment whose breaker admits and whose buckets have room, and reserve."""
        state = self.state
        open_, limited, ready = [], [], []
        wait = float("inf")
        for d in deployments:
            if d.id in excluded:
                continue
            breaker = state.breaker(d.id)
            if breaker.state != "closed" and now < breaker.open_until:
                open_.append(d)
                continue
            if now < breaker.held_until:            # the provider's own Retry-After
                limited.append(d)
                wait = min(wait, breaker.held_until - now)
                continue
            if _has_limits(d):
                requests, token_buckets = _buckets_for(state, d, now)
                short = [b.wait_s(1, now) for b in requests] + [b.wait_s(tokens, now) for b in token_buckets]
                worst = max(short, default=0.0)
                if worst > 0:
                    limited.append(d)
                    wait = min(wait, worst)
                    continue
            ready.append(d)
        while ready:
            chosen = self._pick(ready, strategy)
            breaker = state.breaker(chosen.id)
            if breaker.allows(now):
                reservation = self._reserve(chosen, tokens, now)
                reservation.probe = breaker.state != "closed"   # it holds a half-open probe slot
                return reservation
            ready.remove(chosen)            # half-open with its probe slots taken
            open_.append(chosen)
        if limited:
            return Refusal("rate_limited", retry_after=wait)
        if open_:
            longest = min(open_, key=lambda d: state.breaker(d.id).opened_at)
            return Refusal("breaker_open", longest_open=longest)
        return Refusal("excluded")

    def force(self, deployment: Deployment, tokens: int, now: float) -> Reservation | None:
        """Probe a deployment whose breaker is open: every candidate is open, so try the oldest.
        None while its probe slots are taken (the probe is bounded even then) or a 429 holds it."""
        breaker = self.state.breaker(deployment.id)
        if now < breaker.held_until or not breaker.force_probe(now):   # never probe into a 429 hold
            return None
        reservation = self._reserve(deployment, tokens, now)
        reservation.probe = True
        return reservation

    def _reserve(self, deployment: Deployment, tokens: int, now: float) -> Reservation:
        token_buckets: list[TokenBucket] = []
        if _has_limits(deployment):
            requests, token_buckets = _buckets_for(self.state, deployment, now)
            for b in requests:
                b.take(1, now)
            for b in token_buckets:
                b.take(tokens, now)
        self.state.stats(deployment.id).in_flight += 1
        return Reservation(deployment, tokens, token_buckets)

    def settle(self, reservation: Reservation, used_tokens: int | None, now: float) -> None:
        """Return unused reserved tokens; called exactly once per reservation."""
        self.state.stats(reservation.deployment.id).in_flight -= 1
        if used_tokens is None:
            return                              # usage unknown: the reservation stands
        for b in reservation.buckets:
            taken = min(reservation.tokens, b.capacity)
            if used_tokens < taken:
                b.refund(taken - used_tokens, now)
            elif used_tokens > taken:
                b.take(used_tokens - taken, now)    # spent more than reserved: the bucket owes it

    def _pick(self, ready: list[Deployment], strategy: str) -> Deployment:
        if len(ready) == 1:
            return ready[0]
        stats = self.state.stats
        if strategy == "least_loaded":
            return min(ready, key=lambda d: (stats(d.id).in_flight, -d.weight))
        if strategy == "lowest_latency":
            return min(ready, key=lambda d: (stats(d.id).ttft_ewma or 0.0, stats(d.id).in_flight))
        if strategy == "cheapest":
            return min(ready, key=lambda d: (d.price.input + d.price.output, stats(d.id).in_flight))
        # weighted: weight shared by current load, so a busy deployment gets less
        weights = [d.weight / (1 + stats(d.id).in_flight) for d in ready]
        return self.rng.choices(ready, weights)[0]


def reservation_tokens(input_tokens: int, max_tokens: int | None) -> int:
    return input_tokens + (max_tokens if max_tokens is not None else DEFAULT_OUTPUT_RESERVATION)


__all__ = ["Balancer", "MemoryState", "Reservation", "Refusal", "StateStore", "TokenBucket", "Limits",
           "reservation_tokens"]
