"""The gateway's own endpoints: the routing dry run, feedback, the model catalogue, health,
readiness and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..config import Config
from ..decisions import Decision
from ..errors import GatewayError, bad_request, not_found
from ..inbound.messages import authorization as either_key_header
from ..inbound.messages_answer import error_body as anthropic_error_body
from ..inbound.routing import answer_headers, read_and_decide, route_view
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..streaming import ClientGone
from .edge import CLIENT_CLOSED, GATEWAY, error_response, json_response, read_json, request_id

FEEDBACK_MAX_BYTES = 16 * 1024


async def route(request: web.Request) -> web.Response:
    """Dry run: the decision a chat request would get, calling no upstream."""
    gateway = request.app[GATEWAY]
    decision = Decision(request_id(request), gateway.clock())
    try:
        _, _, plan = await read_and_decide(request, gateway.snapshot, decision)
    except GatewayError as err:
        return error_response(err, answer_headers(decision))         # as the chat refusal would carry
    except ClientGone:
        return web.Response(status=CLIENT_CLOSED)
    first = plan.candidates[0]
    return json_response(route_view(plan, decision), headers={   # what the chat answer would carry
        "X-Request-Id": decision.request_id, "X-Route-Rule": plan.rule, "X-Route-Model": first.model.name,
        "X-Route-Provider": first.deployments[0].provider.name, "X-Route-Attempts": "0"})


def feedback_fields(body: Any) -> tuple[str, float]:
    """`{"request_id": str, "score": 0.0-1.0}` -> (request_id, score); 400 naming the bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise bad_request("'request_id' must be a non-empty string", "request_id")
    score = body.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score) \
            or not 0.0 <= score <= 1.0:
        raise bad_request("'score' must be a number from 0.0 to 1.0", "score")
    return rid, float(score)


async def feedback(request: web.Request) -> web.Response:
    """A quality score for a recent request, recorded against its tier, model and rule."""
    gateway = request.app[GATEWAY]
    snapshot = gateway.snapshot
    try:
        key = snapshot.authenticate(request.headers.get("Authorization"))
        rid, score = feedback_fields(await read_json(request, FEEDBACK_MAX_BYTES))
        await gateway.feedback(rid, score, key)
    except GatewayError as err:
        return error_response(err, {})
    except ClientGone:
        return web.Response(status=CLIENT_CLOSED)
    return json_response({"object": "feedback", "request_id": rid, "score": score})


def _catalogue(config: Config) -> dict[str, str]:
    """Every name a client may list, with its owner: `auto`, the chains, the models."""
    owners = {"auto": "llm-proxy"}
    owners.update((name, "llm-proxy:chain") for name in config.chains)
    owners.update((m.name, m.deployments[0].provider.name) for m in config.models.values())
    return owners


def _entry(name: str, owner: str) -> dict[str, Any]:
    """OpenAI's model object with Anthropic's fields beside it (`type`, `display_name`,
    `created_at`): both SDKs read the same entry, each ignoring the other's fields."""
    return {"id": name, "object": "model", "created": 0, "owned_by": owner,
            "type": "model", "display_name": name, "created_at": "1970-01-01T00:00:00Z"}


def _refused(err: GatewayError, headers: Mapping[str, str]) -> web.Response:
    """A refusal in the shape of the caller's SDK: Anthropic's when it sent `anthropic-version`
    (its SDK and Claude Code always do), OpenAI's otherwise."""
    if "anthropic-version" in headers:
        return error_response(err, {}, anthropic_error_body(err.status, err.message))
    return error_response(err, {})


async def models(request: web.Request) -> web.Response:
    """The catalogue, as OpenAI lists it, with Anthropic's paging fields beside it (one page:
    the catalogue is small). With keys configured, only for a key, and only what that key
    may name (`allow`). Both SDKs call this path, so the key may come as a Bearer token or,
    as the Anthropic SDK and Claude Code send it, as `x-api-key`."""
    snapshot = request.app[GATEWAY].snapshot
    try:
        key = snapshot.authenticate(either_key_header(request.headers))
    except GatewayError as err:
        return _refused(err, request.headers)
    allowed = key.allow if key is not None else None
    data = [_entry(name, owner) for name, owner in _catalogue(snapshot.config).items()
            if allowed is None or name in allowed]
    return json_response({"object": "list", "data": data, "has_more": False,       # Anthropic's paging fields
                          "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def model(request: web.Request) -> web.Response:
    """One model as OpenAI shows it (`models.retrieve`). Any name a request may send resolves:
    a catalogue model, a chain, `auto`, an alias or a deployment's upstream id; the entry keeps
    the asked id, as OpenAI does, and names the owner of what it resolves to. A name the key
    may not use is as unknown as one that does not exist (404): the list hides it too. The
    key as for the list."""
    snapshot = request.app[GATEWAY].snapshot
    asked = request.match_info["model_id"]
    try:
        key = snapshot.authenticate(either_key_header(request.headers))
        target = snapshot.router.resolve(asked)
        if target is None or not snapshot.may_use(key, asked):
            raise not_found(f"the model '{asked}' does not exist; GET /v1/models lists them")
    except GatewayError as err:
        return _refused(err, request.headers)
    return json_response(_entry(asked, _catalogue(snapshot.config)[target]))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    state = gateway.state.health.detail()       # Redis away: still ready, serving on local shares
    if gateway.ready and not gateway.draining:
        return json_response({"status": "ready", "state": state})
    return json_response({"status": "draining" if gateway.draining else "starting", "state": state}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; with keys configured only for an admin key (its labels name keys,
    models and rules)."""
    gateway = request.app[GATEWAY]
    try:
        gateway.snapshot.authenticate_admin(request.headers.get("Authorization"))
    except GatewayError as err:
        return error_response(err, {})
    body = gateway.metrics.render(await gateway.state_view(), gateway.state.health)
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
