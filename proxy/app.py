"""Wiring only: the aiohttp application, its routes, and the serving loop with signals.

The one `Gateway` object lives under `handlers.GATEWAY`. `serve` runs one process (or
N with SO_REUSEPORT) on uvloop; SIGHUP reloads the config, SIGTERM and SIGINT drain:
/readyz turns 503, the listener closes, requests in flight finish up to the drain
deadline, the decision log is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys

from aiohttp import web

from . import handlers
from .config import Config
from .gateway import Gateway
from .handlers import GATEWAY

log = logging.getLogger("proxy.app")


def create_app(config: Config, gateway: Gateway | None = None) -> web.Application:
    app = web.Application(middlewares=[handlers.openai_errors], client_max_size=1 << 40)
    app[GATEWAY] = gateway or Gateway(config)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/route", handlers.route)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    await app[GATEWAY].start()


async def _stop(app: web.Application) -> None:
    await app[GATEWAY].stop()


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_server(config: Config, host: str, port: int, reuse_port: bool = False,
                     sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Returns the exit code."""
    gateway = Gateway(config)
    app = create_app(config, gateway)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                           shutdown_timeout=config.server.drain_timeout_s)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=2048)
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    log.info("listening", extra={"host": host, "port": port, "pid": os.getpid()})
    await stop.wait()
    log.info("draining", extra={"deadline_s": config.server.drain_timeout_s})
    gateway.draining = True
    await runner.cleanup()          # closes the listener, waits for requests in flight, then on_cleanup
    log.info("stopped")
    return 0


def serve(config: Config, host: str, port: int, workers: int = 1) -> int:
    """Run `workers` processes sharing the port (SO_REUSEPORT); the parent supervises."""
    import uvloop

    if workers <= 1:
        return uvloop.run(run_server(config, host, port))
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = uvloop.run(run_server(config, host, port, reuse_port=True))
            os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    code = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        code = code or (os.waitstatus_to_exitcode(status) if status else 0)
    sys.stdout.flush()
    return code
