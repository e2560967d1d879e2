"""Client connections: how long one may take to send a request head, how long it may idle,
how many may be open, and what a malformed request gets.

- Head: a connection must deliver a request's line and headers within `header_timeout_s`
  of connecting, and, between requests, of the first byte of the next one. Silence, a
  half-sent line and a head trickled a byte at a time all end there: the connection is
  closed without an answer (there is no request to answer). Bytes that arrive while a
  request is in progress do not start the bound: at the protocol level they cannot be told
  from that request's body without the parser's internals, so a head fragment pipelined
  behind a request and never finished is closed by the keep-alive bound (it is idle, so
  the connection limit can close it first).
- Idle: between requests a keep-alive connection may wait `keepalive_timeout_s` (aiohttp's
  own keep-alive timer, which also runs from the connect and is never extended by bytes).
  A connection is busy, not idle, until its answer has left; an answer a handler returns
  unsent must leave within SEND_TIMEOUT_S, or the connection is aborted (`send_within`).
- Count: at most `max_connections` open at once (default: half the open-file limit less
  64 for the gateway's own files; each client connection may hold an upstream socket too;
  `serve` raises the soft limit to the hard one at start). A connection beyond it closes
  the connection idle longest (waiting for a head, or between requests), so a flood of
  silent sockets cannot lock real clients out. When none is idle (every one is in a
  request), the newcomer is answered `503` with `Retry-After: 1` and `Connection: close`
  without its request being read, so it leaves no decision record. Either is logged as a
  WARNING, at most every 10 s, with the running counts.
- Malformed HTTP (a bad request line, a bad header, an oversized line, bad framing): a JSON
  400 in OpenAI's shape, and one log line at INFO: the error's kind and the peer, never
  the line itself (a header value can be a key), at most one a second with a count of
  those left out.

This is the one module that knows aiohttp's connection internals. It builds aiohttp's
`RequestHandler` (one per connection) itself, as a subclass that overrides only the
asyncio protocol methods and `handle_error`, and listens through its own `Listener` site.
tests/test_connections.py::test_the_aiohttp_internals_this_module_uses fails loudly when
aiohttp changes what it relies on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from ..errors import error_body

log = logging.getLogger("proxy.connections")

RESERVED_FILES = 64             # listener, log files, the event loop, pipes: not for clients
REFUSED_LINGER_S = 1.0          # a refused connection is read (and dropped) this long, so the 503 is not reset
SEND_TIMEOUT_S = 30.0           # for a whole answer to leave once it is ready, however slow the reader
MAX_LINGERING = 64              # refused connections lingering at once; beyond, they are closed at once
LOG_EVERY_S = 1.0               # at most one line a second about malformed requests
FULL_LOG_EVERY_S = 10.0         # and one each 10 s about the connection limit

SERVER = "llm-proxy"            # the Server header of every answer: no version to look up
MALFORMED = {                   # what a client is told: never its own bytes echoed back
    LineTooLong: "a request line or header line is too long",
    InvalidHeader: "a header is malformed",
    BadStatusLine: "the request line is malformed",
    BadHttpMethod: "the request method is malformed (TLS sent to a plain HTTP port?)",
    InvalidURLError: "the request target is malformed",
    PayloadEncodingError: "the request body's framing is malformed",
}


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int


def default_max_connections() -> int:
    """Half the open-file limit left after the gateway's own files: a client connection may
    hold an upstream connection too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - RESERVED_FILES) // 2)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the default soft 1024 would cap the
    gateway at a few hundred clients); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):       # a hard limit above the kernel's nr_open
            pass
    return soft


class Connections:
    """Every open client connection of one listener: the count, the idle ones in the order
    they became idle (the longest idle is closed first), and the log of what was closed."""

    def __init__(self, limits: Callable[[], ConnectionLimits]) -> None:
        self.limits = limits            # read at each accept, so a reload applies to new connections
        self.open = 0
        self.idle: dict[ClientConnection, None] = {}     # insertion order: idle since
        self.lingering = 0
        self.evicted = 0
        self.refused = 0
        self._malformed = _RateLimitedLog("malformed HTTP request", logging.INFO, LOG_EVERY_S)
        self._full = _RateLimitedLog("connection limit reached", logging.WARNING, FULL_LOG_EVERY_S)

    def admit(self, limits: ConnectionLimits) -> bool:
        """Room for one more: True, after closing the connection idle longest if need be;
        False when every open connection is in a request."""
        if self.open < limits.max_connections:
            return True
        if not self.idle:
            self.refused += 1
            self._full.emit(max_connections=limits.max_connections, action="refused", evicted=self.evicted,
                            refused=self.refused)
            return False
        oldest = next(iter(self.idle))
        self.forget(oldest)             # its slot is free now, though its socket may close next turn
        self.evicted += 1
        self._full.emit(max_connections=limits.max_connections, action="closed the longest idle",
                        evicted=self.evicted, refused=self.refused)
        oldest.force_close()
        return True

    def opened(self, connection: ClientConnection) -> None:
        self.open += 1
        self.idle[connection] = None

    def forget(self, connection: ClientConnection) -> None:
        if not connection.gw_counted:
            return
        connection.gw_counted = False
        self.open -= 1
        self.idle.pop(connection, None)

    def malformed(self, peer: str | None, exc: BaseException, status: int) -> None:
        self._malformed.emit(peer=peer, error=type(exc).__name__, status=status)


class _RateLimitedLog:
    """One line per `every_s` at most about one kind of event, counting those left out in
    between (a client can cause these at will: the log must not grow at its pace)."""

    __slots__ = ("message", "level", "every_s", "next_at", "left_out")

    def __init__(self, message: str, level: int, every_s: float) -> None:
        self.message, self.level, self.every_s = message, level, every_s
        self.next_at = 0.0
        self.left_out = 0

    def emit(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        self.next_at = now + self.every_s
        log.log(self.level, self.message, extra={**fields, "left_out": self.left_out})
        self.left_out = 0


class ClientConnection(RequestHandler):
    """aiohttp's handler for one connection, with the head timer and the busy/idle marks
    (`request_started` / `request_finished`, from the `track_requests` middleware)."""

    __slots__ = ("gw_registry", "gw_header_timeout_s", "gw_busy", "gw_head", "gw_counted")

    def __init__(self, manager: web.Server, registry: Connections, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), keepalive_timeout=limits.keepalive_timeout_s,
                         **kwargs)
        self.gw_registry = registry
        self.gw_header_timeout_s = limits.header_timeout_s
        self.gw_busy = False
        self.gw_head: asyncio.TimerHandle | None = None
        self.gw_counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.gw_counted = True
        self.gw_registry.opened(self)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if not self.gw_busy and self.gw_head is None:      # the first byte of a request head
            self._arm_head_timer()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.gw_head is not None:
            self.gw_head.cancel()
            self.gw_head = None
        self.gw_registry.forget(self)
        super().connection_lost(exc)

    def request_started(self) -> None:
        self.gw_busy = True
        if self.gw_head is not None:
            self.gw_head.cancel()
            self.gw_head = None
        self.gw_registry.idle.pop(self, None)

    def request_finished(self) -> None:
        self.gw_busy = False
        if self.gw_counted:
            self.gw_registry.idle[self] = None      # idle from now: the end of the order

    def _arm_head_timer(self) -> None:
        self.gw_head = asyncio.get_running_loop().call_later(self.gw_header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.gw_head = None
        if not self.gw_busy:
            self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or, never expected, an error no middleware
        caught): a JSON answer and a safe log line instead of aiohttp's text/plain answer,
        which echoed the offending line, and its ERROR log with the line in the traceback."""
        if request.writer.output_size > 0:     # part of an answer is out: no second one
            raise ConnectionError("an answer was already begun; cannot send another")
        if isinstance(exc, HttpProcessingError):
            status = exc.code if 400 <= exc.code < 500 else 400
            reason = next((text for kind, text in MALFORMED.items() if isinstance(exc, kind)),
                          "the request is not valid HTTP")
            self.gw_registry.malformed(request.remote, exc, status)
            body = error_body(f"malformed HTTP request: {reason}", "invalid_request_error", "malformed_request")
        else:
            log.error("unhandled error in the HTTP server", exc_info=exc)
            body = error_body("internal gateway error", "server_error", "internal_error")
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={"X-Request-Id": new_request_id(), "Server": SERVER})
        response.force_close()
        return response


class Refused(asyncio.Protocol):
    """A connection beyond `max_connections` while every open one is in a request: a 503
    before anything is read, then the write side closed. Whatever the client sent is read
    and dropped for a moment, so that closing does not reset the 503 away."""

    def __init__(self, registry: Connections) -> None:
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        body = error_body("the gateway is at its connection limit; retry shortly", "server_error",
                          "too_many_connections")
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nServer: " + SERVER.encode() +
                        b"\r\nX-Request-Id: " + new_request_id().encode() +
                        b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        if self.registry.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.registry.lingering += 1
        self.timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False                    # the peer is done too: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.registry.lingering -= 1


class Listener(web.BaseSite):
    """The gateway's listening socket: like aiohttp's TCPSite and SockSite, but every
    connection is a `ClientConnection` counted in `connections` (or `Refused`)."""

    __slots__ = ("runner", "connections", "handler_args", "host", "port", "sock", "reuse_port", "backlog",
                 "listener")

    def __init__(self, runner: web.BaseRunner, limits: Callable[[], ConnectionLimits], handler_args: dict[str, Any],
                 host: str | None = None, port: int = 0, sock: Any = None, reuse_port: bool = False,
                 backlog: int = 2048) -> None:
        super().__init__(runner, backlog=backlog)
        self.runner = runner
        self.connections = Connections(limits)
        self.handler_args = handler_args
        self.host, self.port, self.sock, self.reuse_port, self.backlog = host, port, sock, reuse_port, backlog
        self.listener: asyncio.AbstractServer | None = None

    @property
    def name(self) -> str:
        return f"http://{self.host or '0.0.0.0'}:{self.port}"

    def connection(self) -> asyncio.Protocol:
        """The protocol factory: a handler, after making room if the limit is reached."""
        limits = self.connections.limits()
        if not self.connections.admit(limits):
            return Refused(self.connections)
        server = self.runner.server
        assert server is not None
        return ClientConnection(server, self.connections, limits, **self.handler_args)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if self.sock is not None:
            self.listener = await loop.create_server(self.connection, sock=self.sock, backlog=self.backlog)
        else:
            self.listener = await loop.create_server(self.connection, self.host, self.port, backlog=self.backlog,
                                                     reuse_port=self.reuse_port or None)
        sockets = self.listener.sockets
        if sockets:
            self.host, self.port = sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        await super().stop()


async def send_within(request: web.BaseRequest, response: web.StreamResponse, within_s: float) -> bool:
    """Put a whole answer on the wire within `within_s`. False when the client is gone or took
    nothing for that long; its connection is then broken (aborted, not closed: a close would
    wait, holding the socket and the answer, for a reader that may never come back)."""
    try:
        async with asyncio.timeout(max(0.001, within_s)):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        return False
    except (ConnectionError, ClientError):
        return False
    return True


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Marks the connection busy for the request's life, the writing of its answer included: a
    busy connection is never closed for its head timer or to make room for a newcomer. An
    answer the handler returns unsent (the catalogue, /metrics, the page's JSON) is sent here,
    within SEND_TIMEOUT_S, rather than by aiohttp afterwards with no bound."""
    connection = request.protocol
    if not isinstance(connection, ClientConnection):     # served by another listener (tests)
        return await handler(request)
    connection.request_started()
    try:
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            await send_within(request, response, SEND_TIMEOUT_S)
        return response
    finally:
        connection.request_finished()
