"""Wiring only: the aiohttp application, its routes, and the serving loop with signals.

The one `Gateway` object lives under `edge.GATEWAY`. `serve` runs one process (or
N with SO_REUSEPORT, see proxy.server.workers) on uvloop; SIGHUP reloads the config, SIGTERM and SIGINT drain:
/readyz turns 503, the listener closes, requests in flight finish up to the drain
deadline, the decision log is flushed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .. import config as config_module
from ..config import Config
from ..gateway import Gateway
from ..inbound import chat, messages, responses
from ..ops import pages as ops_pages
from ..ops.deployments import read_deployments
from ..ops.view import OpsSource
from . import admin, connections, cors, edge
from .edge import GATEWAY
from .workers import FORWARDED, supervise

log = logging.getLogger("proxy.app")


def create_app(config: Config, gateway: Gateway | None = None) -> web.Application:
    app = web.Application(middlewares=[connections.track_requests, edge.openai_errors, cors.keyless_guard],
                          client_max_size=1 << 40)
    app[GATEWAY] = gateway or Gateway(config)
    # Paths whose unknown routes and wrong methods answer in another API's error shape.
    app[edge.ERROR_SHAPES] = (("/v1/messages", messages.error_body), ("/messages", messages.error_body))
    app.on_response_prepare.append(edge.stamp)
    cors.install(app)
    app.router.add_post("/v1/chat/completions", chat.chat_completions, expect_handler=edge.expect_continue)
    app.router.add_post("/chat/completions", chat.chat_completions, expect_handler=edge.expect_continue)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/messages", messages.messages, expect_handler=edge.expect_continue)
        app.router.add_post(f"{prefix}/messages/count_tokens", messages.count_tokens,
                            expect_handler=edge.expect_continue)
        app.router.add_post(f"{prefix}/responses", responses.create, expect_handler=edge.expect_continue)
        app.router.add_get(prefix + "/responses/{id}", responses.retrieve)
        app.router.add_delete(prefix + "/responses/{id}", responses.delete)
    app.router.add_post("/v1/route", admin.route)
    app.router.add_post("/v1/feedback", admin.feedback)
    for prefix in ("/v1", ""):                  # the SDKs' base URL may or may not end in /v1
        app.router.add_get(f"{prefix}/models", admin.models)
        app.router.add_get(prefix + "/models/{model_id:.+}", admin.model)
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    # These check the keyless guard with the key (inbound.routing): a refusal has its decision record.
    app[cors.SELF_GUARDED] = frozenset((chat.chat_completions, messages.messages, messages.count_tokens,
                                        responses.create, admin.route))
    ops_pages.install(app, ops_source(app[GATEWAY]))
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


def ops_source(gateway: Gateway) -> OpsSource:
    """What the operations page reads: handed over piece by piece, never the Gateway itself."""

    async def deployments() -> dict[str, Any]:
        view = await gateway.state_view()       # the same read-only view /metrics renders
        return read_deployments(view, gateway.load, gateway.snapshot.config, time.time())

    return OpsSource(
        live=gateway.live,
        deployments=deployments,
        authorize=lambda authorization: gateway.snapshot.authenticate_admin(authorization),   # as /metrics
        in_flight=lambda: len(gateway.in_flight),
        instance=gateway.instance,
    )


async def _start(app: web.Application) -> None:
    await app[GATEWAY].start()


async def _stop(app: web.Application) -> None:
    await app[GATEWAY].stop()


def listen_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (a bad address, the port taken), checked before
    any worker starts, or None. Binding without SO_REUSEPORT also catches a second gateway
    that would otherwise share the port with one already running."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:       # as the server itself binds: IPv6 only
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Header limits for the HTTP parser: an Authorization header plus the X-* routing headers fit
# many times over; a longer request line (8 KiB) or header line (16 KiB) gets a 400 before any handler runs.
MAX_LINE_SIZE = 8 * 1024
MAX_FIELD_SIZE = 16 * 1024
# After the drain deadline, the streams still running get this long to write their error event.
CUT_OFF_GRACE_S = 3.0
# What aiohttp's own shutdown then allows the remaining (non-chat) handlers.
SHUTDOWN_TIMEOUT_S = 1.0


# What every connection's aiohttp request handler is built with (see connections.Listener).
HANDLER_ARGS: dict[str, Any] = {"access_log": None, "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE}


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner with the production request-handler settings (tests use the same)."""
    return web.AppRunner(app, handle_signals=False, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                         **HANDLER_ARGS)


async def listen(runner: web.AppRunner, gateway: Gateway, host: str | None = None, port: int = 0,
                 sock: socket.socket | None = None, reuse_port: bool = False) -> connections.Listener:
    """Start listening with the connection bounds of `server:` in routes.yaml, read from the
    current config at each accept (a reload applies to new connections)."""
    auto = connections.default_max_connections()

    def limits() -> connections.ConnectionLimits:
        server = gateway.snapshot.config.server
        return connections.ConnectionLimits(server.header_timeout_s, server.keepalive_timeout_s,
                                            server.max_connections or auto)

    site = connections.Listener(runner, limits, HANDLER_ARGS, host, port, sock, reuse_port)
    await site.start()
    return site


async def drain(gateway: Gateway, runner: web.AppRunner, deadline_s: float) -> None:
    """Stop taking work and let the requests in flight finish, up to `deadline_s`.

    aiohttp's own `runner.cleanup()` is not enough for streams: its shutdown waits
    `shutdown_timeout` for a handler, then *again* up to `shutdown_timeout` after
    cancelling the request, and then cancels the handler task, which closes a stream
    silently in the middle of an answer. So the drain happens here first: close the
    listener, ask every keep-alive connection to close after its current answer, wait
    for the chat requests in flight; at the deadline cancel those still running, and
    `inbound.chat.chat_completions` ends each with an error event (or a 503) because
    `gateway.cut_off` says the cancel is ours. Only then does `cleanup()` run, with
    nothing left to cut, and flush the decision log through the app's on_cleanup.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    gateway.draining = True
    for site in list(runner.sites):
        await site.stop()                   # the listener closes: no new connections
    await asyncio.sleep(0)                  # requests already accepted get to start
    if runner.server is not None:
        runner.server.pre_shutdown()        # idle keep-alive connections close, busy ones after this answer
    pending: set[asyncio.Task[object]] = set()
    while True:                             # until every request seen has sent its last byte
        pending = {task for task in pending | gateway.in_flight if not task.done()}
        if not pending or (remaining := end - loop.time()) <= 0:
            break
        await asyncio.wait(pending, timeout=remaining)
    if gateway.in_flight:
        log.warning("drain deadline passed, ending requests still running",
                    extra={"requests": len(gateway.in_flight), "deadline_s": deadline_s})
        gateway.cut_off = True
        for task in gateway.in_flight:
            task.cancel()
        await asyncio.wait(set(gateway.in_flight), timeout=CUT_OFF_GRACE_S)


async def run_server(config: Config, host: str, port: int, reuse_port: bool = False,
                     sock: socket.socket | None = None, workers: int = 1,
                     listening: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Returns the exit code. `workers` is how many
    processes share the port: without Redis each enforces 1/workers of every limit.
    `listening` is called once the port accepts connections (the demo prints its banner then)."""
    gateway = Gateway(config, workers=workers)
    gateway.keys_required = config.auth_required and not is_loopback(host)
    gateway.loopback_only = is_loopback(host)
    app = create_app(config, gateway)
    runner = make_runner(app)
    await runner.setup()
    site = await listen(runner, gateway, host, port, sock, reuse_port)
    # Everything alive now (modules, config, app) lives as long as the process; frozen, it
    # is skipped by every later collection, so a full collection stops costing ~5 ms (the
    # p99 of a request that happens to trigger one) and forked workers share these pages.
    gc.freeze()
    # Nearly everything a request allocates is freed by reference counting; collecting the
    # young generation every 700 allocations (several times per request) buys nothing.
    gc.set_threshold(20_000, 20, 20)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, gateway.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)       # blocked around a worker's fork
    log.info("listening", extra={"address": site.name, "pid": os.getpid(),
                                 "auth": "keys" if config.auth_required else "off",
                                 "state": gateway.state.health.mode,
                                 "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                                 "max_connections": site.connections.limits().max_connections})
    if listening is not None:
        listening()
    await stop.wait()
    deadline = gateway.snapshot.config.server.drain_timeout_s    # the current config's, after reloads
    log.info("draining", extra={"deadline_s": deadline, "in_flight": len(gateway.in_flight), "pid": os.getpid()})
    await drain(gateway, runner, deadline)
    await runner.cleanup()          # nothing left in flight; on_cleanup flushes the decision log
    log.info("stopped", extra={"pid": os.getpid()})
    return 0


def serve(config: Config, host: str, port: int, workers: int = 1) -> int:
    """Run one process, or `workers` processes sharing the port (see proxy.server.workers)."""
    import uvloop

    connections.raise_open_file_limit()         # before the workers fork: they inherit it
    if workers <= 1:
        return uvloop.run(run_server(config, host, port))

    def run_worker(respawned: bool) -> int:
        current = config
        if respawned:               # the files may have been reloaded since the parent read them
            try:
                current = config_module.load(config.providers_path, config.routes_path)
            except config_module.ConfigError as exc:
                log.error("config invalid, the new worker uses the one read at start", extra={"reason": str(exc)})
        return uvloop.run(run_server(current, host, port, reuse_port=True, workers=workers))

    return supervise(workers, run_worker)
