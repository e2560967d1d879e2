"""The HTTP edge: decode the body once, call the gateway, write JSON or SSE, shape errors.

Every request to /v1/chat/completions leaves through `Gateway.finish` exactly once,
whatever happens: answered, refused, failed upstream or abandoned by the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .config import GatewayKey
from .decisions import CLIENT_DISCONNECTED, Decision
from .dispatch import Exchange
from .errors import GatewayError, bad_request, error_body
from .gateway import Gateway, Snapshot
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .router import Plan
from .signals import Signals, extract
from .sse import frame
from .streaming import ClientGone

log = logging.getLogger("proxy.handlers")
GATEWAY = web.AppKey("gateway", Gateway)
SEND_TIMEOUT_S = 30.0           # for a whole answer to leave once it is ready, however slow the reader
FEEDBACK_MAX_BYTES = 16 * 1024
CLIENT_CLOSED = 499             # the status recorded when the client left before any answer
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class SSEWriter:
    """The client side of a streamed answer; dispatch commits it at the first content."""

    __slots__ = ("request", "response", "committed")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.committed = False

    async def commit(self, headers: Mapping[str, str]) -> None:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        self.response = response
        self.committed = True
        try:
            await response.prepare(self.request)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ClientGone() from exc

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write(data)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ClientGone() from exc

    async def finish(self) -> None:
        assert self.response is not None
        try:
            await self.response.write_eof()
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ClientGone() from exc


async def send_now(request: web.Request, response: web.Response, within_s: float = SEND_TIMEOUT_S
                   ) -> web.Response:
    """Put a whole answer on the wire before returning it, so that the bookkeeping in the
    handler's `finally` (decision record, metrics) runs after the client has its bytes
    rather than in front of them. A client that will not read it within `within_s` is cut
    off (the connection aborted) rather than allowed to pin the handler."""
    try:
        async with asyncio.timeout(max(0.001, within_s)):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ClientGone() from None
    except (ConnectionError, aiohttp.ClientError) as exc:
        raise ClientGone() from exc
    return response


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: GatewayError, headers: Mapping[str, str]) -> web.Response:
    return web.Response(body=err.body(), status=err.status, headers={**headers, **err.headers},
                        content_type="application/json")


async def read_json(request: web.Request, max_bytes: int, timeout_s: float = 30.0) -> Any:
    """The body, decoded once; 413 over the limit, 408 when it trickles in slower than
    `timeout_s` (a slow client must not pin a handler), 400 when it is not JSON."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise GatewayError(413, f"request body exceeds {max_bytes} bytes", "invalid_request_error",
                           "request_too_large", outcome="bad_request")
    content = request.content
    if content.is_eof():                        # the whole body came with the headers: no wait, no timer
        raw = content.read_nowait(-1)
        if len(raw) > max_bytes:
            raise GatewayError(413, f"request body exceeds {max_bytes} bytes", "invalid_request_error",
                               "request_too_large", outcome="bad_request")
        return _decode(raw)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise GatewayError(413, f"request body exceeds {max_bytes} bytes", "invalid_request_error",
                                       "request_too_large", outcome="bad_request")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within {timeout_s:g}s", "invalid_request_error",
                           "request_timeout", outcome="bad_request") from None
    except (aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError, ConnectionError) as exc:
        if request.transport is None or request.transport.is_closing():
            raise ClientGone() from exc
        raise bad_request("the request body could not be read (malformed transfer encoding)",
                          code="invalid_body") from None
    return _decode(b"".join(chunks))


def _decode(raw: bytes) -> Any:
    if not raw:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc.msg}", code="invalid_json") from None


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID.match(given):
        return given
    return "req_" + os.urandom(16).hex()      # uuid4's randomness without building a UUID object


def decide(snapshot: Snapshot, key: GatewayKey | None, headers: Mapping[str, str], body: Any,
           decision: Decision) -> tuple[Signals, Plan]:
    """Read the signals, check the key may use the model, and route: for chat, /v1/route, `explain`."""
    config = snapshot.config
    decision.key = key.name if key is not None else None
    signals = extract(body, headers, key, config.server.default_tier, config.server.max_messages)
    decision.tier = signals.tier
    decision.stream = signals.stream
    decision.requested_model = body["model"]
    snapshot.authorize(key, body["model"])
    started = time.perf_counter()
    try:
        plan = snapshot.router.plan(signals, body["model"])
    except GatewayError as err:
        if isinstance(err.detail, Plan):        # no_candidate: the record says why each was skipped
            _note_plan(decision, err.detail)
        raise
    finally:
        decision.routing_us = round((time.perf_counter() - started) * 1e6, 2)
        decision.signals = {
            "input_tokens": signals.input_tokens, "max_tokens": signals.max_tokens,
            "task_type": signals.task_type, "latency": signals.latency, "output_format": signals.output_format,
            "tools": signals.tools, "images": signals.images, "region": signals.region,
            "max_cost_usd": signals.max_cost_usd,
        }
    _note_plan(decision, plan)
    return signals, plan


def _note_plan(decision: Decision, plan: Plan) -> None:
    decision.rule, decision.reason, decision.chain = plan.rule, plan.reason, plan.chain
    decision.candidates = [c.model.name for c in plan.candidates]
    decision.skipped = [{"model": s.model, "reason": s.reason} for s in plan.skipped]


def route_view(plan: Plan, decision: Decision) -> dict[str, Any]:
    """The body of /v1/route and the output of `llm-proxy explain`."""
    return {**plan.to_json(), "tier": decision.tier, "key": decision.key, "signals": decision.signals}


async def _read_and_decide(request: web.Request, snapshot: Snapshot, decision: Decision,
                           admit: Callable[[GatewayKey | None], None] | None = None
                           ) -> tuple[dict[str, Any], Signals, Plan]:
    key = snapshot.authenticate(request.headers.get("Authorization"))    # 401 before reading any body
    decision.key = key.name if key is not None else None                # known even if the body is bad
    if admit is not None:
        admit(key)                                                          # the key's own rpm: 429
    server = snapshot.config.server
    body = await read_json(request, server.max_body_bytes, server.body_timeout_s)
    signals, plan = decide(snapshot, key, request.headers, body, decision)
    return body, signals, plan


def _answer_headers(decision: Decision) -> dict[str, str]:
    """The X-Route-* headers every answer carries; `none` where the request never got that far
    (a 401 has no rule, a no_candidate no model), the last attempt's model when none served."""
    last = decision.attempts[-1] if decision.attempts else None
    return {
        "X-Request-Id": decision.request_id,
        "X-Route-Rule": decision.rule or "none",
        "X-Route-Model": decision.served_model or (last.model if last else "none"),
        "X-Route-Provider": decision.served_provider or (last.provider if last else "none"),
        "X-Route-Attempts": str(len(decision.attempts)),
    }


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
        body, signals, plan = await _read_and_decide(request, snapshot, decision, gateway.admit)
        deadline = decision.started + snapshot.config.server.request_timeout_s
        exchange = Exchange(decision.request_id, body, signals, plan, decision, deadline)
        if signals.stream:
            writer = SSEWriter(request)
            await snapshot.dispatcher.run(exchange, writer)
            assert writer.response is not None
            return writer.response
        payload = await snapshot.dispatcher.run(exchange, None)
        assert payload is not None
        plain = web.Response(body=payload, headers=_answer_headers(decision), content_type="application/json")
        return await send_now(request, plain, deadline - gateway.clock())
    except GatewayError as err:
        decision.outcome, decision.status, decision.error = err.outcome, err.status, err.message
        response = error_response(err, _answer_headers(decision))
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
        return error_response(internal, _answer_headers(decision))
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
        return error_response(err, {**_answer_headers(decision), "Retry-After": "1", "Connection": "close"})
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


async def route(request: web.Request) -> web.Response:
    """Dry run: the decision a chat request would get, calling no upstream."""
    gateway = request.app[GATEWAY]
    decision = Decision(request_id(request), gateway.clock())
    try:
        _, _, plan = await _read_and_decide(request, gateway.snapshot, decision)
    except GatewayError as err:
        return error_response(err, {"X-Request-Id": decision.request_id})
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
        gateway.feedback(rid, score, key)
    except GatewayError as err:
        return error_response(err, {})
    except ClientGone:
        return web.Response(status=CLIENT_CLOSED)
    return json_response({"object": "feedback", "request_id": rid, "score": score})


async def models(request: web.Request) -> web.Response:
    """The catalogue, as OpenAI lists it: with keys configured, only for a key, and only what
    that key may name (`allow`)."""
    snapshot = request.app[GATEWAY].snapshot
    config = snapshot.config
    try:
        key = snapshot.authenticate(request.headers.get("Authorization"))
    except GatewayError as err:
        return error_response(err, {})
    allowed = key.allow if key is not None else None
    data = [{"id": "auto", "object": "model", "created": 0, "owned_by": "llm-proxy"}]
    data += [{"id": name, "object": "model", "created": 0, "owned_by": "llm-proxy:chain"} for name in config.chains]
    data += [{"id": m.name, "object": "model", "created": 0, "owned_by": m.deployments[0].provider.name}
             for m in config.models.values()]
    if allowed is not None:
        data = [entry for entry in data if entry["id"] in allowed]
    return json_response({"object": "list", "data": data})


async def expect_continue(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue`: an announced body over the limit gets no 100 Continue; the
    handler then answers 413 from the Content-Length alone, through the usual path (the key
    checked first, one decision record, the X-Route-* headers), before reading any body."""
    limit = request.app[GATEWAY].snapshot.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return None
    expect = request.headers.get("Expect", "")
    if request.version >= (1, 1):
        if expect.lower() != "100-continue":
            return error_response(GatewayError(417, f"unknown Expect: {expect}", "invalid_request_error",
                                               "expectation_failed"), {})
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0      # the interim answer is not part of the response body
    return None


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    if gateway.ready and not gateway.draining:
        return json_response({"status": "ready"})
    return json_response({"status": "draining" if gateway.draining else "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown paths, wrong methods and stray exceptions still answer in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, reason = exc.status, exc.reason
        if isinstance(exc, web.HTTPMethodNotAllowed) and exc.allowed_methods <= {"OPTIONS"}:
            status, reason = 404, "Not Found"   # only the CORS preflight route matched the path
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        headers = {"Allow": exc.headers["Allow"]} if status == 405 and "Allow" in exc.headers else None
        return web.Response(body=error_body(reason, "invalid_request_error", code), status=status,
                            headers=headers, content_type="application/json")
    except (asyncio.CancelledError, ClientGone):
        raise
    except Exception:
        request.app.logger.exception("unhandled error", extra={"path": request.path})
        return web.Response(body=error_body("internal gateway error", "server_error", "internal_error"),
                            status=500, content_type="application/json")
