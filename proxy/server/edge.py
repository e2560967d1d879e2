"""The HTTP edge every surface shares: the app key, body decoding, request ids, JSON and SSE
answers, `Expect: 100-continue`, the middleware that keeps stray errors in OpenAI's shape
(a 404 or 405 names the method and path), and `stamp`, which gives every answer a request
id and a Server header without a version.

Imports the gateway type only for the app key; never an inbound API module.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..errors import GatewayError, bad_request, error_body
from ..gateway import Gateway
from ..streaming import ClientGone
from .connections import SEND_TIMEOUT_S, SERVER, new_request_id, send_within

GATEWAY = web.AppKey("gateway", Gateway)
ErrorShape = Callable[[int, str], bytes]      # (status, message) -> an API's error body
# Path prefixes whose unknown routes, wrong methods and stray errors answer in their API's shape.
ERROR_SHAPES = web.AppKey("error_shapes", tuple)
CLIENT_CLOSED = 499             # the status recorded when the client left before any answer
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_PATH_SHOWN = 200            # of a path named in a 404 or 405
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
    off (the connection aborted) rather than allowed to pin the handler: ClientGone."""
    if not await send_within(request, response, within_s):
        raise ClientGone()
    return response


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def error_response(err: GatewayError, headers: Mapping[str, str], body: bytes | None = None) -> web.Response:
    """`err` with its status and headers; the body in OpenAI's shape unless a surface gives its own."""
    return web.Response(body=err.body() if body is None else body, status=err.status,
                        headers={**headers, **err.headers}, content_type="application/json")


async def read_json(request: web.Request, max_bytes: int, timeout_s: float = 30.0) -> Any:
    """The body, decoded once (see `read_body`); 400 when it is not JSON."""
    return decode_json(await read_body(request, max_bytes, timeout_s))


async def read_body(request: web.Request, max_bytes: int, timeout_s: float = 30.0) -> bytes:
    """The body's bytes; 413 over the limit, 408 when it trickles in slower than `timeout_s`
    (a slow client must not pin a handler)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise GatewayError(413, f"request body exceeds {max_bytes} bytes", "invalid_request_error",
                           "request_too_large", outcome="bad_request")
    content = request.content
    if content.is_eof():                        # the whole body came with the headers: no wait, no timer
        raw = content.read_nowait(-1)
        if len(raw) > max_bytes:
            raise GatewayError(413, f"request body exceeds {max_bytes} bytes", "invalid_request_error",
                               "request_too_large", outcome="bad_request")
        return raw
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
    return b"".join(chunks)


def decode_json(raw: bytes) -> Any:
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
    return new_request_id()


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer carries a request id (the client's, if well-formed)
    and a Server header that names no version."""
    response.headers["Server"] = SERVER
    if "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = request_id(request)


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
        if status in (404, 405):
            path = request.path if len(request.path) <= MAX_PATH_SHOWN else request.path[:MAX_PATH_SHOWN] + "..."
            reason = f"{reason}: {request.method} {path}"
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        headers = {"Allow": exc.headers["Allow"]} if status == 405 and "Allow" in exc.headers else None
        shape = _shape(request)
        body = error_body(reason, "invalid_request_error", code) if shape is None else shape(status, reason)
        return web.Response(body=body, status=status, headers=headers, content_type="application/json")
    except (asyncio.CancelledError, ClientGone):
        raise
    except Exception:
        request.app.logger.exception("unhandled error", extra={"path": request.path})
        shape = _shape(request)
        body = error_body("internal gateway error", "server_error", "internal_error") if shape is None \
            else shape(500, "internal gateway error")
        return web.Response(body=body, status=500, content_type="application/json")


def _shape(request: web.Request) -> ErrorShape | None:
    """The error shape of the API whose path this is, or None for OpenAI's."""
    for prefix, shape in request.app.get(ERROR_SHAPES, ()):
        if request.path == prefix or request.path.startswith(prefix + "/"):
            return shape
    return None
