"""`/v1/responses`: OpenAI's Responses API, served by any upstream protocol.

`POST /v1/responses` goes through the shared lifecycle (`inbound.lifecycle`): the request
becomes a canonical chat body (`responses_input`), is routed and failed over exactly like
chat, and the answer is encoded as a response object or the Responses event stream
(`responses_output`). Errors are OpenAI's shape, as for chat.

State. The gateway issues its own response ids. Unless the request says `store: false`,
what a follow-up needs is kept in the gateway's memos (scope "responses") for
`server.responses_ttl_s`: the response object (for `GET`) and the conversation as chat
messages, the earlier history included, without the instructions (which, as in OpenAI's
API, a follow-up does not inherit). Entries are scoped to the gateway key that created
them: another key, like an unknown, expired, deleted or unstored id, gets 404
`previous_response_not_found` on a follow-up and 404 `response_not_found` on `GET` and
`DELETE /v1/responses/{id}`. Only answered responses are stored (completed or
incomplete), never a failed one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ..config import GatewayKey
from ..errors import GatewayError
from ..gateway import Gateway
from ..server.edge import GATEWAY, error_response, json_response, request_id
from .lifecycle import Call, handler
from .responses_input import parse_request
from .responses_output import ResponsesEncoder, ResponseShape

SCOPE = "responses"
log = logging.getLogger("proxy.inbound.responses")


def memo_key(key: GatewayKey | None, response_id: str) -> str:
    """Where a response is kept: under the key's name, so another key cannot reach it."""
    return f"{key.name if key is not None else ''}/{response_id}"


class Responses:
    name = "responses"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("Authorization")

    def error_body(self, err: GatewayError) -> bytes:
        return err.body()

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call:
        request = parse_request(body)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            stored = await gateway.memos.recall(SCOPE, memo_key(key, request.previous_response_id))
            if stored is None:
                raise GatewayError(
                    404, f"previous response '{request.previous_response_id}' not found: it was never stored "
                    "(store: false), has expired or was deleted, or belongs to another key; send the whole "
                    "conversation as input instead", "invalid_request_error", "previous_response_not_found",
                    "previous_response_id", outcome="not_found")
            history = orjson.loads(stored)["history"]
        shape = ResponseShape(request.model, request.store, request.echo)
        if not request.store:
            return Call(request.chat_body(history), ResponsesEncoder(shape, None))
        ttl_s = gateway.snapshot.config.server.responses_ttl_s
        where = memo_key(key, shape.id)

        async def remember(response: dict[str, Any], answer: dict[str, Any]) -> None:
            # The answer goes out whatever happens here: a store that fails costs the follow-up, not this.
            value = orjson.dumps({"response": response, "history": [*history, *request.messages, answer]})
            try:
                stored = await gateway.memos.remember(SCOPE, where, value, ttl_s)
            except Exception:
                log.exception("could not store a response", extra={"response_id": shape.id})
                return
            if not stored:
                log.warning("a response was not stored", extra={"response_id": shape.id})

        return Call(request.chat_body(history), ResponsesEncoder(shape, remember))


create = handler(Responses())


async def _stored(request: web.Request) -> tuple[Gateway, str, web.Response | None]:
    """The memo key of `{id}` for this request's gateway key, or the error answer (401)."""
    gateway = request.app[GATEWAY]
    try:
        key = gateway.snapshot.authenticate(request.headers.get("Authorization"))
    except GatewayError as err:
        return gateway, "", error_response(err, {"X-Request-Id": request_id(request)})
    return gateway, memo_key(key, request.match_info["id"]), None


def _not_found(request: web.Request) -> web.Response:
    err = GatewayError(404, f"no stored response with id '{request.match_info['id']}'", "invalid_request_error",
                       "response_not_found", "response_id", outcome="not_found")
    return error_response(err, {"X-Request-Id": request_id(request)})


async def retrieve(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}`: a stored response object."""
    gateway, where, refused = await _stored(request)
    if refused is not None:
        return refused
    stored = await gateway.memos.recall(SCOPE, where)
    if stored is None:
        return _not_found(request)
    return json_response(orjson.loads(stored)["response"])


async def delete(request: web.Request) -> web.Response:
    """`DELETE /v1/responses/{id}`: forget a stored response; a follow-up on it is then a 404."""
    gateway, where, refused = await _stored(request)
    if refused is not None:
        return refused
    if not await gateway.memos.forget(SCOPE, where):
        return _not_found(request)
    return json_response({"id": request.match_info["id"], "object": "response.deleted", "deleted": True})
