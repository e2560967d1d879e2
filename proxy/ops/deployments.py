"""What the page shows of the deployments' state: breakers, 429 holds, bucket levels, load.

`read_deployments` is the one place the operations page reads the state store (async:
a shared store answers over the network). It walks
the config (so a healthy deployment no request has touched yet is listed too) and looks
each breaker and bucket up without creating it. Times come back relative to `now`
(seconds until the next probe, seconds a hold has left), in the store's own clock.

Key buckets are listed by the key's name; nothing here can hold a secret.
Imports config, breaker and balancer only.
"""

from __future__ import annotations

from typing import Any

from ..balancer import StateStore, TokenBucket
from ..breaker import OPEN
from ..config import Config, Limits


def _bucket(buckets: dict[str, TokenBucket], name: str, kind: str, limit: int | None, now: float
            ) -> dict[str, Any] | None:
    """A bucket's level, or full when no request has used it yet; None when there is no limit."""
    if not limit:
        return None
    bucket = buckets.get(name)
    if bucket is None or bucket.capacity != limit:
        return {"kind": kind, "level": float(limit), "capacity": float(limit)}
    return {"kind": kind, "level": round(bucket.level_at(now), 1), "capacity": bucket.capacity}


def _limits(buckets: dict[str, TokenBucket], prefix: str, limits: Limits, now: float) -> list[dict[str, Any]]:
    found = (_bucket(buckets, f"{prefix}:rpm", "requests", limits.rpm, now),
             _bucket(buckets, f"{prefix}:tpm", "tokens", limits.tpm, now))
    return [b for b in found if b is not None]


async def read_deployments(state: StateStore, config: Config, now: float) -> dict[str, list[dict[str, Any]]]:
    """Every configured deployment with its breaker, hold, buckets and requests in flight;
    every provider account and gateway key with a limit, with its buckets."""
    breakers, buckets = state.all_breakers(), state.all_buckets()
    deployments = []
    for model in config.models.values():
        for d in model.deployments:
            breaker = breakers.get(d.id)
            status = breaker.state if breaker is not None else "closed"
            probe_in = max(0.0, breaker.open_until - now) if breaker is not None and status == OPEN else None
            held_for = breaker.held_until - now if breaker is not None else 0.0
            deployments.append({
                "id": d.id, "model": model.name, "provider": d.provider.name, "upstream_model": d.upstream_model,
                "breaker": status, "probe_in_s": None if probe_in is None else round(probe_in, 2),
                "held_for_s": round(held_for, 2) if held_for > 0 else None,
                "in_flight": state.stats(d.id).in_flight,
                "buckets": _limits(buckets, f"deployment:{d.id}", d.limits, now),
            })
    providers = [{"name": p.name, "buckets": _limits(buckets, f"provider:{p.name}", p.limits, now)}
                 for p in config.providers.values() if p.limits.rpm or p.limits.tpm]
    keys = [{"name": k.name, "buckets": [b for b in [_bucket(buckets, f"key:{k.name}", "requests", k.rpm, now)]
                                         if b is not None]}
            for k in config.keys if k.rpm]
    return {"deployments": deployments, "providers": providers, "keys": keys}
