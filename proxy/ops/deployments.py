"""What the page shows of the deployments' state: breakers, 429 holds, bucket levels, load.

`read_deployments` is the one place the operations page turns the state store's read-only
view (`StateStore.view`, cluster-wide when Redis serves) into what it shows. It walks the
config, so a healthy deployment no request has touched yet is listed too. Times come back
relative to `now` (seconds until the next probe, seconds a 429 hold has left); the view's
times are unix times. Requests in flight are this process's (`Load`).

Key buckets are listed by the key's name; nothing here can hold a secret.
Imports config, balancer and the state's view types only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..balancer import Load
from ..config import Config, Limits
from ..state import BucketView, StateView


def _bucket(buckets: Mapping[str, BucketView], name: str, kind: str, limit: int | None) -> dict[str, Any] | None:
    """A bucket's level (full when the view does not hold it); None when there is no limit."""
    if not limit:
        return None
    bucket = buckets.get(name)
    if bucket is None:
        return {"kind": kind, "level": float(limit), "capacity": float(limit)}
    return {"kind": kind, "level": round(bucket.level, 1), "capacity": round(bucket.capacity, 1)}


def _limits(buckets: Mapping[str, BucketView], prefix: str, limits: Limits) -> list[dict[str, Any]]:
    found = (_bucket(buckets, f"{prefix}:rpm", "requests", limits.rpm),
             _bucket(buckets, f"{prefix}:tpm", "tokens", limits.tpm))
    return [b for b in found if b is not None]


def _until(when: float | None, now: float) -> float | None:
    return None if when is None else round(max(0.0, when - now), 2)


def read_deployments(view: StateView, load: Load, config: Config, now: float) -> dict[str, Any]:
    """Every configured deployment with its breaker, hold, buckets and requests in flight;
    every provider account and gateway key with a limit, with its buckets; and the state's
    mode (`local`, `shared` across instances, or `degraded` to this instance)."""
    deployments = []
    for model in config.models.values():
        for d in model.deployments:
            breaker = view.breakers.get(d.id)
            status = breaker.state if breaker is not None else "closed"
            held = _until(breaker.held_until, now) if breaker is not None else None
            stats = load.statistics.get(d.id)
            deployments.append({
                "id": d.id, "model": model.name, "provider": d.provider.name, "upstream_model": d.upstream_model,
                "breaker": status,
                "probe_in_s": _until(breaker.open_until, now) if breaker is not None and status == "open" else None,
                "held_for_s": held or None,
                "in_flight": stats.in_flight if stats is not None else 0,
                "buckets": _limits(view.buckets, f"deployment:{d.id}", d.limits),
            })
    providers = [{"name": p.name, "buckets": _limits(view.buckets, f"provider:{p.name}", p.limits)}
                 for p in config.providers.values() if p.limits.rpm or p.limits.tpm]
    keys = [{"name": k.name, "buckets": [b for b in [_bucket(view.buckets, f"key:{k.name}", "requests", k.rpm)]
                                         if b is not None]}
            for k in config.keys if k.rpm]
    return {"mode": view.mode, "deployments": deployments, "providers": providers, "keys": keys}
