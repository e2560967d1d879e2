"""`POST /v1/chat/completions`: OpenAI Chat Completions, streamed or not.

Every request leaves through `Gateway.finish` exactly once, whatever happens: answered,
refused, failed upstream or abandoned by the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from ..decisions import CLIENT_DISCONNECTED, Decision
from ..dispatch import Exchange
from ..errors import GatewayError, error_body
from ..server.edge import CLIENT_CLOSED, GATEWAY, SSEWriter, error_response, request_id, send_now
from ..sse import frame
from ..streaming import ClientGone
from .routing import answer_headers, read_and_decide

log = logging.getLogger("proxy.inbound.chat")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    snapshot = gateway.snapshot                 # pinned: a reload does not change this request
    decision = Decision(request_id(request), gateway.clock())
    writer: SSEWriter | None = None
    plain: web.Response | None = None           # a whole answer, once it is being written
    task = asyncio.current_task()
    assert task is not None
    gateway.in_flight.add(task)                 # the drain waits for this set to empty
    try:
        body, signals, plan = await read_and_decide(request, snapshot, decision, gateway.admit)
        deadline = decision.started + snapshot.config.server.request_timeout_s
        exchange = Exchange(decision.request_id, body, signals, plan, decision, deadline)
        if signals.stream:
            writer = SSEWriter(request)
            await snapshot.dispatcher.run(exchange, writer)
            assert writer.response is not None
            return writer.response
        payload = await snapshot.dispatcher.run(exchange, None)
        assert payload is not None
        plain = web.Response(body=payload, headers=answer_headers(decision), content_type="application/json")
        return await send_now(request, plain, deadline - gateway.clock())
    except GatewayError as err:
        decision.outcome, decision.status, decision.error = err.outcome, err.status, err.message
        response = error_response(err, answer_headers(decision))
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
        return await _cut_off(writer, decision)
    except Exception:
        if writer is not None and writer.response is not None:     # the status line is gone already
            log.exception("unhandled error in a committed stream", extra={"request_id": decision.request_id})
            decision.outcome, decision.error = "internal_error", "internal gateway error"
            try:                                # never a clean close that looks complete
                await writer.write(frame(error_body("internal gateway error", "server_error", "internal_error")))
                await writer.finish()
            except ClientGone:
                pass
            return writer.response
        log.exception("unhandled error", extra={"request_id": decision.request_id})
        internal = GatewayError(500, "internal gateway error", "server_error", "internal_error",
                                outcome="internal_error")
        decision.outcome, decision.status, decision.error = internal.outcome, internal.status, internal.message
        return error_response(internal, answer_headers(decision))
    finally:
        gateway.in_flight.discard(task)
        if decision.outcome == "ok" and decision.served_model is None:
            decision.outcome = "error"
        gateway.finish(decision)


async def _cut_off(writer: SSEWriter | None, decision: Decision) -> web.StreamResponse:
    """The drain deadline passed with this request still running: end it honestly, a stream
    with an error event (never a silent close), anything else with a 503."""
    err = GatewayError(503, "the gateway is shutting down and its drain deadline passed; retry the request",
                       "server_error", "shutting_down", outcome="shutdown")
    decision.error = err.message
    if writer is None or writer.response is None or not writer.response.prepared:
        decision.outcome, decision.status = err.outcome, err.status
        return error_response(err, {**answer_headers(decision), "Retry-After": "1", "Connection": "close"})
    decision.outcome = "stream_error"
    try:
        await writer.write(frame(err.body()))
        await writer.finish()
    except ClientGone:
        decision.outcome = "client_disconnected"
    return writer.response


def _client_left(decision: Decision, writer: SSEWriter | None) -> None:
    decision.outcome = CLIENT_DISCONNECTED
    if writer is None or not writer.committed:
        decision.status = CLIENT_CLOSED
