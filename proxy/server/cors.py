"""CORS for browser chat UIs: preflights answered, allowed origins marked on every answer.

Origins come from `server.cors_origins` of the config snapshot current when the request
arrives, so a reload changes them. An origin not in the list gets no CORS header at all
(the browser then refuses the answer); `"*"` in the list admits any origin. Headers are
added in `on_response_prepare`, which also runs for streamed answers, before their first
byte. Imports only the app key from the edge.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import error_body
from ..ops.pages import PREFIX as OPS_PREFIX
from .edge import GATEWAY

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"      # DELETE: /v1/responses/{id}
# What the OpenAI SDKs and the router's own headers need; a preflight's own list is added to it.
ALLOW_HEADERS = ("Authorization", "Content-Type", "X-Task-Type", "X-User-Tier", "X-Max-Cost-USD",
                 "X-Latency-Class", "X-Region", "X-Request-Id")
EXPOSE_HEADERS = "X-Request-Id, X-Route-Rule, X-Route-Model, X-Route-Provider, X-Route-Attempts, Retry-After"
MAX_AGE_S = "600"


def allowed_origin(request: web.Request) -> str | None:
    """The request's Origin when the config allows it, else None."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    origins = request.app[GATEWAY].snapshot.config.server.cors_origins
    return origin if origin in origins or "*" in origins else None


async def preflight(request: web.Request) -> web.StreamResponse:
    """`OPTIONS` on any path: answered here with no key, no body and no routing. A route, not a
    middleware, so that no other request pays for it."""
    if "Access-Control-Request-Method" not in request.headers:
        return web.Response(status=204, headers={"Allow": ALLOW_METHODS})
    origin = allowed_origin(request)
    if origin is None:
        return web.Response(status=403, body=error_body("origin not allowed", "invalid_request_error",
                                                        "cors_origin_not_allowed"), content_type="application/json")
    asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
    known = {h.lower() for h in ALLOW_HEADERS}
    headers = ", ".join((*ALLOW_HEADERS, *(h for h in asked if h.lower() not in known)))
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": headers,
        "Access-Control-Max-Age": MAX_AGE_S,
    })


async def mark_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer to an allowed origin, preflight and stream included."""
    if "Origin" not in request.headers or request.path.startswith(OPS_PREFIX):
        return                  # the operations page is never for another origin
    origin = allowed_origin(request)
    response.headers.add("Vary", "Origin")
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


def install(app: web.Application) -> None:
    app.router.add_route("OPTIONS", "/{path:.*}", preflight)
    app.on_response_prepare.append(mark_response)
