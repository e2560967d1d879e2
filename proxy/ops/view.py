"""The page's data: one JSON document, the same for `/dashboard/state` and each SSE frame.

`OpsSource` is what the server's wiring hands the page: the rolling aggregates, a
function that reads the deployments' state, the admin check, the count of requests in
flight and this instance's id. The page never sees the Gateway object itself.

A decision in the list is a summary (rule, chain, what served, what was skipped or failed
and why); the full record is the decision log's own JSON (`Decision.to_json`), which by
construction holds key names, never keys.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..decisions import Decision
from .live import LiveStats

LATEST = 50             # decisions in the page's list


@dataclass(frozen=True)
class OpsSource:
    live: LiveStats
    deployments: Callable[[], Awaitable[dict[str, Any]]]    # read_deployments over the current state and config
    authorize: Callable[[str | None], object]      # the admin check on `Authorization`; raises 401/403
    in_flight: Callable[[], int]
    instance: str
    clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)


def summary(d: Decision) -> dict[str, Any]:
    return {
        "request_id": d.request_id, "time": round(d.time, 3), "api": d.api, "instance": d.instance, "key": d.key,
        "tier": d.tier,
        "requested_model": d.requested_model, "stream": d.stream, "rule": d.rule, "chain": d.chain,
        "served_model": d.served_model, "served_provider": d.served_provider, "outcome": d.outcome,
        "status": d.status, "attempts": [{"model": a.model, "provider": a.provider, "failure": a.failure}
                                         for a in d.attempts],
        "skipped": d.skipped, "cost_usd": round(d.cost_usd, 9), "duration_ms": d.duration_ms,
    }


async def page_state(source: OpsSource) -> dict[str, Any]:
    deployments = await source.deployments()        # first: a shared store answers over the network
    now = source.clock()
    live = source.live
    return {
        "time": now,
        "instance": source.instance,
        "uptime_s": round(now - source.started, 1),
        "in_flight": source.in_flight(),
        "minute": live.minute(now),
        "series": live.series(now),
        "state": deployments,
        "decisions": [summary(d) for d in live.latest(LATEST)],
        "quality": live.quality_view(),
        "totals": live.totals,
    }
