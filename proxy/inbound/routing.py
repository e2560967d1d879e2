"""Routing a client request, shared by every inbound API, `/v1/route` and `llm-proxy explain`:
authenticate, read the body once, extract the signals, plan, and note it all in the
request's decision record. (A key's own `rpm` is reserved later, with the first deployment
the attempt loop admits: one state call, and a refused request costs the key nothing.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..config import GatewayKey
from ..decisions import Decision
from ..errors import GatewayError
from ..gateway import Snapshot
from ..router import Plan
from ..server.cors import keyless_refusal
from ..server.edge import decode_json, read_body
from ..signals import Signals, extract


def decide(snapshot: Snapshot, key: GatewayKey | None, headers: Mapping[str, str], body: Any,
           decision: Decision) -> tuple[Signals, Plan]:
    """Read the signals, check the key may use the model, and route: for chat, /v1/route, `explain`."""
    config = snapshot.config
    decision.key = key.name if key is not None else None
    signals = extract(body, headers, key, config.server.default_tier, config.server.max_messages)
    decision.tier = signals.tier
    decision.stream = signals.stream
    decision.requested_model = body["model"]
    snapshot.authorize(key, body["model"])
    started = time.perf_counter()
    try:
        plan = snapshot.router.plan(signals, body["model"])
    except GatewayError as err:
        if isinstance(err.detail, Plan):        # no_candidate: the record says why each was skipped
            _note_plan(decision, err.detail)
        raise
    finally:
        decision.routing_us = round((time.perf_counter() - started) * 1e6, 2)
        decision.signals = {
            "input_tokens": signals.input_tokens, "max_tokens": signals.max_tokens,
            "task_type": signals.task_type, "latency": signals.latency, "output_format": signals.output_format,
            "tools": signals.tools, "images": signals.images, "region": signals.region,
            "max_cost_usd": signals.max_cost_usd,
        }
    _note_plan(decision, plan)
    return signals, plan


def _note_plan(decision: Decision, plan: Plan) -> None:
    decision.rule, decision.reason, decision.chain = plan.rule, plan.reason, plan.chain
    decision.candidates = [c.model.name for c in plan.candidates]
    decision.skipped = [{"model": s.model, "reason": s.reason} for s in plan.skipped]


def route_view(plan: Plan, decision: Decision) -> dict[str, Any]:
    """The body of /v1/route and the output of `llm-proxy explain`."""
    return {**plan.to_json(), "tier": decision.tier, "key": decision.key, "signals": decision.signals}


async def read_and_decide(request: web.Request, snapshot: Snapshot, decision: Decision
                          ) -> tuple[dict[str, Any], Signals, Plan]:
    """A chat body's whole way to a plan (/v1/route, `explain`)."""
    key, raw = await authenticate_and_read(request, snapshot, decision, request.headers.get("Authorization"))
    body = decode_json(raw)
    signals, plan = decide(snapshot, key, request.headers, body, decision)
    return body, signals, plan


async def authenticate_and_read(request: web.Request, snapshot: Snapshot, decision: Decision,
                                authorization: str | None) -> tuple[GatewayKey | None, bytes]:
    """The key (401 before any body is read; without keys, the 403 of a cross-site page or a
    rebinding domain, `server.cors`), then the body's bytes (413, 408)."""
    refusal = keyless_refusal(request)
    if refusal is not None:
        raise refusal
    key = snapshot.authenticate(authorization)
    decision.key = key.name if key is not None else None                # known even if the body is bad
    server = snapshot.config.server
    return key, await read_body(request, server.max_body_bytes, server.body_timeout_s)


def answer_headers(decision: Decision) -> dict[str, str]:
    """The X-Route-* headers every answer carries; `none` where the request never got that far
    (a 401 has no rule, a no_candidate no model), the last attempt's model when none served."""
    last = decision.attempts[-1] if decision.attempts else None
    return {
        "X-Request-Id": decision.request_id,
        "X-Route-Rule": decision.rule or "none",
        "X-Route-Model": decision.served_model or (last.model if last else "none"),
        "X-Route-Provider": decision.served_provider or (last.provider if last else "none"),
        "X-Route-Attempts": str(len(decision.attempts)),
    }
