"""CORS for browser chat UIs: preflights answered, allowed origins marked on every answer.

Origins come from `server.cors_origins` of the config snapshot current when the request
arrives, so a reload changes them. An origin not in the list gets no CORS header at all
(the browser then refuses the answer); `"*"` in the list admits any origin. Headers are
added in `on_response_prepare`, which also runs for streamed answers, before their first
byte.

A gateway without keys serves loopback only, and its only guard against a web page in the
user's own browser is the browser itself. `keyless_guard` closes the two holes that
remain: a cross-site page may still *send* a simple POST (`Content-Type: text/plain`, no
preflight) that the gateway would serve and bill although the page cannot read the answer,
and a page on a rebinding domain (evil.example resolving to 127.0.0.1) is same-origin with
the gateway in the browser's eyes. So, without keys, a request whose `Origin` is neither the
gateway's own nor in `cors_origins` gets 403, and, when the gateway listens on loopback, a
request whose `Host` is not a loopback name or address gets 403. Clients that are not
browsers (SDKs, curl) send no `Origin` and a loopback `Host`, and are unaffected; neither are
/healthz and /readyz, whose probes may name a service in `Host`. With keys
the key is the guard and nothing is checked here. The client APIs (and /v1/route) apply
`keyless_refusal` themselves, where they check the key (`inbound.routing`), so that a
refused request leaves its decision record and gets its API's error shape; the middleware
guards every other path. Imports only the app key from the edge.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web

from ..errors import GatewayError, error_body
from ..ops.pages import PREFIX as OPS_PREFIX
from .edge import GATEWAY

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"      # DELETE: /v1/responses/{id}
# What the OpenAI SDKs and the router's own headers need; a preflight's own list is added to it.
ALLOW_HEADERS = ("Authorization", "Content-Type", "X-Task-Type", "X-User-Tier", "X-Max-Cost-USD",
                 "X-Latency-Class", "X-Region", "X-Request-Id")
EXPOSE_HEADERS = "X-Request-Id, X-Route-Rule, X-Route-Model, X-Route-Provider, X-Route-Attempts, Retry-After"
MAX_AGE_S = "600"
HEALTH_PATHS = frozenset(("/healthz", "/readyz"))   # probes may name the service in Host; nothing to steal


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


def _loopback_host(host: str) -> bool:
    """`Host` names a loopback address: localhost (RFC 6761), 127.0.0.0/8 or [::1], any port."""
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# The handlers that call `keyless_refusal` themselves (the app's wiring lists them).
SELF_GUARDED = web.AppKey("keyless_self_guarded", frozenset)


def keyless_refusal(request: web.Request) -> GatewayError | None:
    """Why a gateway without keys refuses this request (module docstring), or None."""
    gateway = request.app[GATEWAY]
    if gateway.snapshot.config.auth_required or request.path in HEALTH_PATHS:
        return None
    host = request.headers.get("Host", "")         # a browser always sends one; a bare HTTP/1.0 client may not
    if host and gateway.loopback_only and not _loopback_host(host):
        return _refusal("this gateway has no keys and serves loopback clients only; the Host header must name "
                        "localhost or a loopback address", "host_not_allowed")
    origin = request.headers.get("Origin")
    if origin is not None and request.method != "OPTIONS" and origin != f"{request.scheme}://{host}" \
            and allowed_origin(request) is None:
        return _refusal(f"origin {origin[:100]!r} is not in server.cors_origins", "cors_origin_not_allowed")
    return None


def _refusal(message: str, code: str) -> GatewayError:
    return GatewayError(403, message, "invalid_request_error", code, outcome="forbidden")


@web.middleware
async def keyless_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Without keys: no cross-site browser request and no rebinding domain (module docstring)."""
    if request.match_info.handler in request.app.get(SELF_GUARDED, ()):
        return await handler(request)
    refusal = keyless_refusal(request)
    if refusal is None:
        return await handler(request)
    return web.Response(status=refusal.status, body=refusal.body(), content_type="application/json")


def install(app: web.Application) -> None:
    app.router.add_route("OPTIONS", "/{path:.*}", preflight)
    app.on_response_prepare.append(mark_response)
