"""A bare aiohttp pass-through proxy: the floor any aiohttp + uvloop gateway stands on.

    python -m bench.bareproxy --upstream URL [--port 0]

Reads the body, POSTs it to one upstream URL over a pooled keep-alive session, returns
the answer: no routing, no records, no metrics, no timeouts. `bench.overhead` runs it on
the gateway's core and reports its throughput and CPU per request next to the gateway's,
so the table says how much of the gateway's cost is the framework and how much is its
own work. Loopback only; prints `ready <port>`; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .loadgen import is_loopback_url
from .simserver import serve_ready

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.Response:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=body, headers={"Content-Type": "application/json"}) as up:
        answer = await up.read()
        return web.Response(body=answer, status=up.status, content_type="application/json")


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    app.router.add_post("/v1/chat/completions", relay)
    app.cleanup_ctx.append(_session)
    return app


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         cookie_jar=aiohttp.DummyCookieJar())
    gc.freeze()                 # as the gateway does
    yield
    await app[SESSION].close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bareproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="the chat completions URL to relay to")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if not is_loopback_url(args.upstream):
        print("error: the bare proxy relays to loopback only", file=sys.stderr)
        return 2
    import uvloop

    uvloop.run(serve_ready(build_app(args.upstream), "127.0.0.1", args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
