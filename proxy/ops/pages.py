"""The operations page's HTTP endpoints, all under /dashboard, all read-only:

  GET /dashboard                      the page: HTML with the current state in it
  GET /dashboard/assets/{name}        its script, style sheet and the vendored chart library
  GET /dashboard/state                the state as JSON (what every SSE frame holds)
  GET /dashboard/events               SSE: a `state` event per second while the page is open
  GET /dashboard/requests/{id}        one recent request's full decision record

Every endpoint needs an admin key when routes.yaml has keys (the config's own admin
check, handed in as `OpsSource.authorize`, the one /metrics uses); without keys the
gateway serves loopback only, and so does the page.
The key may come as `Authorization: Bearer KEY` (curl, scripts) or as HTTP Basic with the
key as the password, which is what a browser sends after its own login prompt, also on
the page's script, style and event-stream requests; so a 401 here carries
`WWW-Authenticate: Basic`. Answers are never cached, never framed, and the page's
Content-Security-Policy lets it load and connect to this gateway only.

Imports the page's own modules and the error shape; never the Gateway or the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html

import orjson
from aiohttp import web

from ..errors import GatewayError, error_body
from .assets import asset
from .feed import Feed
from .view import OpsSource, page_state

PREFIX = "/dashboard"
SOURCE = web.AppKey("ops_source", OpsSource)
FEED = web.AppKey("ops_feed", Feed)
WRITE_TIMEOUT_S = 10.0          # a page that takes no frame for this long is dropped
REALM = 'Basic realm="llm-proxy operations", charset="UTF-8"'
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COMMON = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
          "Referrer-Policy": "no-referrer"}
ASSETS = {       # name -> content type; nothing else under assets/ is served
    "dashboard.js": "text/javascript", "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css", "uPlot.LICENSE": "text/plain",
}


def bearer(authorization: str | None) -> str | None:
    """`Basic base64(user:KEY)` -> `Bearer KEY` (the user name is ignored); anything else as is."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return authorization
    try:
        _, _, secret = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "Basic"                      # malformed: the admin check refuses it with its own 401
    return f"Bearer {secret}"


def _refusal(err: GatewayError) -> web.Response:
    headers = {**COMMON, **err.headers}
    if err.status == 401:
        headers["WWW-Authenticate"] = REALM
    return web.Response(body=err.body(), status=err.status, headers=headers, content_type="application/json")


def _admitted(request: web.Request) -> web.Response | None:
    """None when the caller may see the page, else the 401/403 answer."""
    try:
        request.app[SOURCE].authorize(bearer(request.headers.get("Authorization")))
    except GatewayError as err:
        return _refusal(err)
    return None


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=COMMON, content_type="application/json")


async def _state_json(source: OpsSource) -> bytes:
    return orjson.dumps(await page_state(source))


async def page(request: web.Request) -> web.Response:
    if (refused := _admitted(request)) is not None:
        return refused
    source = request.app[SOURCE]
    # The state goes in as JSON in a non-executable script element; "<" is escaped so that no
    # value (a model name a caller sent, say) can close the element.
    state = (await _state_json(source)).replace(b"<", b"\\u003c").decode()
    body = (asset("dashboard.html").decode()
            .replace("{{instance}}", html.escape(source.instance))
            .replace("{{state}}", state))
    return web.Response(text=body, content_type="text/html", headers={**COMMON, "Content-Security-Policy": CSP})


async def assets(request: web.Request) -> web.Response:
    if (refused := _admitted(request)) is not None:
        return refused
    name = request.match_info["name"]
    if name not in ASSETS:
        return web.Response(body=error_body(f"no asset '{name}'", "invalid_request_error", "not_found"),
                            status=404, headers=COMMON, content_type="application/json")
    return web.Response(body=asset(name), headers={**COMMON, "Content-Type": f"{ASSETS[name]}; charset=utf-8"})


async def state(request: web.Request) -> web.Response:
    if (refused := _admitted(request)) is not None:
        return refused
    return web.Response(body=await _state_json(request.app[SOURCE]), headers=COMMON, content_type="application/json")


async def record(request: web.Request) -> web.Response:
    if (refused := _admitted(request)) is not None:
        return refused
    request_id = request.match_info["request_id"]
    found = request.app[SOURCE].live.find(request_id)
    if found is None:
        return web.Response(body=error_body(f"no recent request with id '{request_id}' on this instance",
                                            "invalid_request_error", "request_not_found", "request_id"),
                            status=404, headers=COMMON, content_type="application/json")
    return _json(found.to_json())


async def events(request: web.Request) -> web.StreamResponse:
    if (refused := _admitted(request)) is not None:
        return refused
    feed = request.app[FEED]
    if not feed.join():
        body = error_body("the gateway is shutting down", "server_error", "shutting_down") if feed.closed else \
            error_body(f"the operations page is open {feed.max_listeners} times already; close one",
                       "server_error", "too_many_pages")
        return web.Response(body=body, status=503, headers={**COMMON, "Retry-After": "10"},
                            content_type="application/json")
    response = web.StreamResponse(headers={**COMMON, "Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        async for frame in feed.frames():
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write(frame)
    except ConnectionError:
        pass                                # the page went away
    except TimeoutError:
        # It stopped reading: break the connection, or its socket and the frames buffered for
        # it would stay until it reads them, however long that takes.
        if request.transport is not None:
            request.transport.abort()
    finally:
        feed.leave()
    return response


async def _frame(source: OpsSource) -> bytes:
    return b"event: state\ndata: " + await _state_json(source) + b"\n\n"


async def _close_feed(app: web.Application) -> None:
    await app[FEED].close()


def install(app: web.Application, source: OpsSource) -> None:
    app[SOURCE] = source
    app[FEED] = Feed(lambda: _frame(source))
    app.on_shutdown.append(_close_feed)
    app.router.add_get(PREFIX, page)
    app.router.add_get(PREFIX + "/", page)
    app.router.add_get(PREFIX + "/assets/{name}", assets)
    app.router.add_get(PREFIX + "/state", state)
    app.router.add_get(PREFIX + "/events", events)
    app.router.add_get(PREFIX + "/requests/{request_id}", record)
