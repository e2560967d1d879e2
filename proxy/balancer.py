"""The choice of a deployment: order the candidates' deployments, then one admission.

The balancer orders a model's deployments by its `strategy` (with this process's load
statistics) and hands the order to the state store, which admits the first one whose
breaker admits it and whose buckets have room, all in one call (one round trip to
Redis). Picking the first admissible deployment of a weighted random order is the same
as a weighted choice among the admissible ones: the order is an exponential race
(each deployment draws Exp(weight), the smallest goes first), and the first of any
subset in such a race is drawn in proportion to the weights within that subset.

Buckets: requests per minute and tokens per minute, per deployment and per provider
account, named here (`deployment:<id>:rpm`, `provider:<name>:tpm`, `key:<name>`). A
request reserves 1 request and its input tokens + max_tokens (1,024 when it sets none;
one larger than the bucket waits for a full bucket and leaves it in debt); `settle`
refunds what the real usage did not spend, or takes what it spent beyond the reservation.
Load statistics (in flight, time to first token) stay per process: they steer this
instance's choices only.

Imports config and state only.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import Config, Deployment, GatewayKey
from .state import Admission, BucketSpec, Grant, Option, Outcome, Refusal, StateStore

DEFAULT_OUTPUT_RESERVATION = 1024


@dataclass(slots=True)
class DeploymentStats:
    in_flight: int = 0
    ttft_ewma: float | None = None          # seconds, for the lowest-latency strategy

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_ewma = seconds if self.ttft_ewma is None else 0.8 * self.ttft_ewma + 0.2 * seconds


@dataclass
class Load:
    """This process's load per deployment; survives reloads (keyed by stable ids)."""

    statistics: dict[str, DeploymentStats] = field(default_factory=dict)

    def stats(self, deployment_id: str) -> DeploymentStats:
        stats = self.statistics.get(deployment_id)
        if stats is None:
            stats = self.statistics[deployment_id] = DeploymentStats()
        return stats


@dataclass(slots=True)
class Reservation:
    """A chosen deployment and what the state store reserved for it; settle it exactly once."""

    deployment: Deployment
    tokens: int
    grant: Grant
    settled: asyncio.Future[str] | None = None      # the breaker's state after the settle

    @property
    def probe(self) -> bool:
        return self.grant.probe


@dataclass(frozen=True, slots=True)
class Refused:
    """The state store's refusal, with the deployment it names (the one open longest)."""

    refusal: Refusal
    longest_open: Deployment | None = None


def bucket_specs(deployment: Deployment, tokens: int) -> tuple[BucketSpec, ...]:
    """Every bucket a request to `deployment` reserves from: its own and its provider account's."""
    specs = []
    for scope, limits in ((f"deployment:{deployment.id}", deployment.limits),
                          (f"provider:{deployment.provider.name}", deployment.provider.limits)):
        if limits.rpm:
            specs.append(BucketSpec(scope + ":rpm", limits.rpm, 1))
        if limits.tpm:
            specs.append(BucketSpec(scope + ":tpm", limits.tpm, tokens, tokens=True))
    return tuple(specs)


def key_spec(key: GatewayKey | None) -> BucketSpec | None:
    """The key's own requests-per-minute bucket, or None when the key sets no `rpm`."""
    if key is None or key.rpm is None:
        return None
    return BucketSpec(f"key:{key.name}", key.rpm, 1)


def watched(config: Config) -> tuple[list[str], dict[str, int]]:
    """Every deployment id and every bucket (name -> limit) the config defines: what a view reads."""
    deployments: list[str] = []
    buckets: dict[str, int] = {}
    for model in config.models.values():
        for d in model.deployments:
            deployments.append(d.id)
            for spec in bucket_specs(d, 0):
                buckets[spec.name] = spec.per_minute
    for key in config.keys:
        if (limit := key_spec(key)) is not None:
            buckets[limit.name] = limit.per_minute
    return deployments, buckets


class Balancer:
    def __init__(self, state: StateStore, load: Load, rng: random.Random | None = None) -> None:
        self.state = state
        self.load = load
        self.rng = rng or random.Random()

    async def choose(self, deployments: Sequence[Deployment], strategy: str, tokens: int,
                     excluded: frozenset[str] | set[str], key: BucketSpec | None = None,
                     probe_lease_s: float = 60.0) -> Reservation | Refused:
        """Admit one deployment (and the key's bucket, when given) in one state call, and reserve."""
        ready = [d for d in deployments if d.id not in excluded]
        if not ready:
            return Refused(Refusal("excluded"))
        ordered = self.order(ready, strategy)
        admission = Admission(tuple(Option(d.id, bucket_specs(d, tokens)) for d in ordered), key,
                              probe_lease_s=probe_lease_s)
        return self._reserved(ordered, tokens, await self.state.admit(admission))

    async def force(self, deployment: Deployment, tokens: int, key: BucketSpec | None = None,
                    probe_lease_s: float = 60.0) -> Reservation | Refused:
        """Probe a deployment whose breaker is open: every candidate is open, so try the oldest.
        Refused while its probe slots are taken (the probe is bounded even then) or a 429 holds it."""
        admission = Admission((Option(deployment.id, bucket_specs(deployment, tokens)),), key, force=True,
                              probe_lease_s=probe_lease_s)
        return self._reserved([deployment], tokens, await self.state.admit(admission))

    def _reserved(self, ordered: Sequence[Deployment], tokens: int, answer: Grant | Refusal
                  ) -> Reservation | Refused:
        if isinstance(answer, Refusal):
            longest = None if answer.longest_open is None else ordered[answer.longest_open]
            return Refused(answer, longest)
        deployment = ordered[answer.index]
        self.load.stats(deployment.id).in_flight += 1
        return Reservation(deployment, tokens, answer)

    def settle(self, reservation: Reservation, outcome: Outcome) -> asyncio.Future[str]:
        """Hand the reservation back with how the attempt went; never waits (off the byte path).
        The future says the breaker's state once the settle has landed."""
        self.load.stats(reservation.deployment.id).in_flight -= 1
        return self.state.settle(reservation.grant, outcome)

    def order(self, ready: list[Deployment], strategy: str) -> list[Deployment]:
        if len(ready) == 1:
            return ready
        stats = self.load.stats
        if strategy == "least_loaded":
            return sorted(ready, key=lambda d: (stats(d.id).in_flight, -d.weight))
        if strategy == "lowest_latency":
            return sorted(ready, key=lambda d: (stats(d.id).ttft_ewma or 0.0, stats(d.id).in_flight))
        if strategy == "cheapest":
            return sorted(ready, key=lambda d: (d.price.input + d.price.output, stats(d.id).in_flight))
        # weighted: weight shared by current load, so a busy deployment gets less
        draw = self.rng.expovariate
        return sorted(ready, key=lambda d: draw(d.weight / (1 + stats(d.id).in_flight)))


def reservation_tokens(input_tokens: int, max_tokens: int | None) -> int:
    return input_tokens + (max_tokens if max_tokens is not None else DEFAULT_OUTPUT_RESERVATION)


__all__ = ["Balancer", "Load", "Refused", "Reservation", "bucket_specs", "key_spec", "reservation_tokens", "watched"]
