"""The request lifecycle every client API shares: key, body, decode, route, dispatch, encode.

A surface (chat completions, responses, messages) supplies only what differs, as a
`Surface`:

  name                      the API, for the decision record's `api`
  authorization(headers)    the gateway key as `Authorization` would carry it
                            (`Bearer KEY`; Messages also accepts `x-api-key`)
  decode(body, raw, key, gateway)
                            the client's request -> a `Call`: the canonical chat body that
                            routing and the adapters read, the request's `Encoder` (the
                            client's wire format, `proxy.encoding`) and, for a surface with
                            a native protocol, the client's own bytes. A request the surface
                            cannot take is a GatewayError naming the surface's own field.
  error_body(err)           the surface's error shape, for every status this path answers

Everything else happens here, once, the same for every API: one decision record per
request whatever happens (answered, refused, failed upstream, abandoned, cut off by the
drain), the key's limits (its rpm reserved by the dispatcher with the first deployment), the
same rules, chains, buckets and breakers (`routing.decide`, the dispatcher), the commit
point (dispatch: nothing reaches the client before the first content, so a failover before
it is invisible), and an honest end after the commit: the surface's error event, never a
clean close that looks complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from ..config import GatewayKey
from ..decisions import CLIENT_DISCONNECTED, Decision
from ..dispatch import Exchange
from ..encoding import Encoder
from ..errors import GatewayError
from ..gateway import Gateway, Snapshot
from ..server.edge import CLIENT_CLOSED, GATEWAY, SSEWriter, decode_json, error_response, request_id, send_now
from ..streaming import ClientGone
from .routing import answer_headers, authenticate_and_read, decide

log = logging.getLogger("proxy.inbound")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Call:
    """A client request, decoded by its surface into what the gateway's core reads."""

    body: dict[str, Any]                # an OpenAI chat body: signals, routing and the adapters read it
    encoder: Encoder                    # how the answer goes on this client's wire
    native_body: bytes | None = None    # the client's own bytes, for an upstream that speaks its protocol
    native_headers: Mapping[str, str] = field(default_factory=dict)    # what a native request forwards
    dropped: tuple[str, ...] = ()       # what `body` leaves out of the client's request (for the record)
    untranslatable: str | None = None   # why only an upstream of the native protocol can serve it


class Surface(Protocol):
    name: str

    def authorization(self, headers: Mapping[str, str]) -> str | None: ...

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call: ...

    def error_body(self, err: GatewayError) -> bytes: ...


def handler(surface: Surface) -> Handler:
    """The aiohttp handler serving `surface` through the shared lifecycle."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve(request, surface)
    handle.__name__ = handle.__qualname__ = f"{surface.name}_handler"
    return handle


async def serve(request: web.Request, surface: Surface) -> web.StreamResponse:
    """Serve one request of `surface`; every request leaves through `Gateway.finish` exactly once."""
    gateway = request.app[GATEWAY]
    snapshot = gateway.snapshot                 # pinned: a reload does not change this request
    decision = Decision(request_id(request), gateway.clock(), api=surface.name)
    writer: SSEWriter | None = None
    encoder: Encoder | None = None
    plain: web.Response | None = None           # a whole answer, once it is being written
    task = asyncio.current_task()
    assert task is not None
    gateway.in_flight.add(task)                 # the drain waits for this set to empty
    try:
        key, raw = await authenticate_and_read(request, snapshot, decision, surface.authorization(request.headers))
        call = await surface.decode(decode_json(raw), raw, key, gateway)
        encoder = call.encoder
        signals, plan = decide(snapshot, key, request.headers, call.body, decision)
        encoder.expect_input_tokens(signals.input_tokens)
        deadline = decision.started + snapshot.config.server.request_timeout_s
        exchange = Exchange(decision.request_id, call.body, signals, plan, decision, deadline, encoder,
                            call.native_body, call.native_headers, call.dropped, call.untranslatable)
        if signals.stream:
            writer = SSEWriter(request)
            await snapshot.dispatcher.run(exchange, writer)
            assert writer.response is not None
            return writer.response
        payload = await snapshot.dispatcher.run(exchange, None)
        assert payload is not None
        plain = web.Response(body=payload, headers=answer_headers(decision), content_type="application/json")
        return await send_now(request, plain, _write_bound(snapshot, decision, deadline - gateway.clock()))
    except GatewayError as err:
        decision.outcome, decision.status, decision.error = err.outcome, err.status, err.message
        response = error_response(err, answer_headers(decision), surface.error_body(err))
        with contextlib.suppress(ClientGone):       # nobody left to tell: the record says so
            await send_now(request, response)
        return response
    except ClientGone:
        _client_left(decision, writer)
        if plain is not None:                   # never a second answer after the first began
            return plain
        if writer is not None and writer.committed and request.transport is not None:
            # A stream we gave up on (the client stopped reading): break the connection, so that
            # aiohttp cannot end the chunked body cleanly, which a client would take as complete.
            request.transport.abort()
        return writer.response if writer is not None and writer.response is not None else web.Response()
    except asyncio.CancelledError:
        if not gateway.cut_off:
            _client_left(decision, writer)
            raise
        task.uncancel()                         # our own drain deadline, not the client: answer it
        if plain is not None and plain.prepared:    # the status line is out: never a second answer
            decision.outcome, decision.error = "shutdown", "drain deadline passed while writing the answer"
            if request.transport is not None:
                request.transport.abort()
            return plain
        return await _cut_off(surface, writer, encoder, decision)
    except Exception:
        if writer is not None and writer.response is not None and encoder is not None:
            # The status line is gone already: never a clean close that looks complete.
            log.exception("unhandled error in a committed stream", extra={"request_id": decision.request_id})
            decision.outcome, decision.error = "internal_error", "internal gateway error"
            with contextlib.suppress(ClientGone):
                await writer.write(encoder.error("internal gateway error", "server_error", "internal_error"))
                await writer.finish()
            return writer.response
        log.exception("unhandled error", extra={"request_id": decision.request_id})
        internal = internal_error()
        decision.outcome, decision.status, decision.error = internal.outcome, internal.status, internal.message
        return error_response(internal, answer_headers(decision), surface.error_body(internal))
    finally:
        gateway.in_flight.discard(task)
        if decision.outcome == "ok" and decision.served_model is None:
            decision.outcome = "error"
        gateway.finish(decision)


def _write_bound(snapshot: Snapshot, decision: Decision, remaining_s: float) -> float:
    """How long a whole answer may take to leave: the serving provider's idle_s, as for a
    stream (a client that takes nothing for that long has stopped reading and must not pin
    the handler), and never past the request's deadline."""
    provider = snapshot.config.providers.get(decision.served_provider or "")
    return remaining_s if provider is None else min(remaining_s, provider.timeouts.idle_s)


async def _cut_off(surface: Surface, writer: SSEWriter | None, encoder: Encoder | None, decision: Decision
                   ) -> web.StreamResponse:
    """The drain deadline passed with this request still running: end it honestly, a stream
    with the surface's error event (never a silent close), anything else with a 503."""
    err = shutting_down()
    decision.error = err.message
    if writer is None or writer.response is None or not writer.response.prepared or encoder is None:
        decision.outcome, decision.status = err.outcome, err.status
        return error_response(err, answer_headers(decision), surface.error_body(err))
    decision.outcome = "stream_error"
    try:
        await writer.write(encoder.error(err.message, err.type, err.code))
        await writer.finish()
    except ClientGone:
        decision.outcome = "client_disconnected"
    return writer.response


def internal_error() -> GatewayError:
    """A failure of the gateway's own code: a 500 that says nothing of it (the log has it)."""
    return GatewayError(500, "internal gateway error", "server_error", "internal_error", outcome="internal_error")


def shutting_down() -> GatewayError:
    """The answer to a request the drain deadline cut off before it began answering."""
    return GatewayError(503, "the gateway is shutting down and its drain deadline passed; retry the request",
                        "server_error", "shutting_down", headers={"Retry-After": "1", "Connection": "close"},
                        outcome="shutdown")


def _client_left(decision: Decision, writer: SSEWriter | None) -> None:
    decision.outcome = CLIENT_DISCONNECTED
    if writer is None or not writer.committed:
        decision.status = CLIENT_CLOSED
