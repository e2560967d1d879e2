"""`/v1/responses`: OpenAI's Responses API, served by any upstream protocol.

`POST /v1/responses` goes through the shared lifecycle (`inbound.lifecycle`): the request
becomes a canonical chat body (`responses_input`), is routed and failed over exactly like
chat, and the answer is encoded as a response object or the Responses event stream
(`responses_output`). Errors are OpenAI's shape, as for chat.

State. The gateway issues its own response ids. Unless the request says `store: false`,
what a follow-up needs is kept in the state store's memos (scope "responses", shared by
every instance with Redis) for `server.responses_ttl_s`: the response object (for `GET`) and the conversation as chat
messages, the earlier history included, without the instructions (which, as in OpenAI's
API, a follow-up does not inherit). Entries are scoped to the gateway key that created
them: another key, like an unknown, expired, deleted or unstored id, gets 404
`previous_response_not_found` on a follow-up and 404 `response_not_found` on `GET` and
`DELETE /v1/responses/{id}`. Each output item is kept too, for an `item_reference` in a
later input (404 `item_not_found` when it is gone). Only answered responses are stored
(completed or incomplete), never a failed one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any, cast

import orjson
from aiohttp import web

from ..config import GatewayKey
from ..errors import GatewayError, bad_request
from ..gateway import Gateway
from ..server.edge import GATEWAY, error_response, json_response, request_id
from ..state import Memos
from .lifecycle import Call, handler
from .responses_input import item_references, parse_request
from .responses_output import ResponsesEncoder, ResponseShape

SCOPE = "responses"
ISSUED = re.compile(r"[A-Za-z0-9_-]{1,200}")     # what the ids this gateway issues are made of
log = logging.getLogger("proxy.inbound.responses")


class Stored:
    """Stored responses of one gateway key, in the memos: a response under its id (the
    object and its conversation), each of its output items under `items/<id>` (what an
    `item_reference` names). Keyed by the key's name, so another key cannot reach them.
    An id this gateway cannot have issued (`ISSUED`) is never looked up: `items/msg_...`
    sent as a response id must not read an item as if it were a response."""

    __slots__ = ("memos", "prefix")

    def __init__(self, memos: Memos, key: GatewayKey | None) -> None:
        self.memos = memos
        # The name's length first: key names may hold "/", and "a" with "items/x" must never
        # meet "a/items" with "x".
        name = key.name if key is not None else ""
        self.prefix = f"{len(name)}:{name}/"

    async def response(self, response_id: str) -> dict[str, Any] | None:
        """`{"response": <object>, "history": <chat messages>}`, or None."""
        if not ISSUED.fullmatch(response_id):
            return None
        stored = await self.memos.recall(SCOPE, self.prefix + response_id)
        return None if stored is None else cast(dict[str, Any], orjson.loads(stored))

    async def items(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        unique = [i for i in dict.fromkeys(ids) if ISSUED.fullmatch(i)]
        found = await asyncio.gather(*(self.memos.recall(SCOPE, f"{self.prefix}items/{i}") for i in unique))
        return {i: orjson.loads(item) for i, item in zip(unique, found) if item is not None}

    async def keep(self, response: dict[str, Any], history: list[dict[str, Any]], ttl_s: float) -> bool:
        writes = [self.memos.remember(SCOPE, self.prefix + response["id"],
                                      orjson.dumps({"response": response, "history": history}), ttl_s)]
        writes += [self.memos.remember(SCOPE, f"{self.prefix}items/{item['id']}", orjson.dumps(item), ttl_s)
                   for item in response["output"]]
        return all(await asyncio.gather(*writes))

    async def forget(self, response_id: str) -> bool:
        stored = await self.response(response_id)
        if stored is None:
            return False
        await asyncio.gather(self.memos.forget(SCOPE, self.prefix + response_id),
                             *(self.memos.forget(SCOPE, f"{self.prefix}items/{item['id']}")
                               for item in stored["response"]["output"]))
        return True


class Responses:
    name = "responses"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("Authorization")

    def error_body(self, err: GatewayError) -> bytes:
        return err.body()

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call:
        stored = Stored(gateway.state, key)
        references = item_references(body)
        limit = gateway.snapshot.config.server.max_messages
        if len(references) > limit:     # each is a state read: bounded before any is made
            raise bad_request(f"'input' holds {len(references)} item_reference items; at most {limit} "
                              "(server.max_messages)", "input")
        request = parse_request(body, await stored.items(references) if references else None)
        history: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            previous = await stored.response(request.previous_response_id)
            if previous is None:
                raise GatewayError(
                    404, f"previous response '{request.previous_response_id}' not found: it was never stored "
                    "(store: false), has expired or was deleted, or belongs to another key; send the whole "
                    "conversation as input instead", "invalid_request_error", "previous_response_not_found",
                    "previous_response_id", outcome="not_found")
            history = previous["history"]
        shape = ResponseShape(request.model, request.store, request.echo)
        if not request.store:
            return Call(request.chat_body(history), ResponsesEncoder(shape, None))
        ttl_s = gateway.snapshot.config.server.responses_ttl_s

        async def remember(response: dict[str, Any], answer: dict[str, Any]) -> None:
            # The answer goes out whatever happens here: a store that fails costs the follow-up, not this.
            try:
                if not await stored.keep(response, [*history, *request.messages, answer], ttl_s):
                    log.warning("a response was not stored", extra={"response_id": shape.id})
            except Exception:
                log.exception("could not store a response", extra={"response_id": shape.id})

        return Call(request.chat_body(history), ResponsesEncoder(shape, remember))


create = handler(Responses())


def _stored(request: web.Request) -> Stored | web.Response:
    """This request's key's stored responses, or the error answer (401)."""
    gateway = request.app[GATEWAY]
    try:
        key = gateway.snapshot.authenticate(request.headers.get("Authorization"))
    except GatewayError as err:
        return error_response(err, {"X-Request-Id": request_id(request)})
    return Stored(gateway.state, key)


def _not_found(request: web.Request) -> web.Response:
    err = GatewayError(404, f"no stored response with id '{request.match_info['id']}'", "invalid_request_error",
                       "response_not_found", "response_id", outcome="not_found")
    return error_response(err, {"X-Request-Id": request_id(request)})


async def retrieve(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}`: a stored response object. `?stream=true` (the SDKs'
    `retrieve(id, stream=True)`, which replays a `background` response) is a 400: there is
    no background response to replay, and a JSON answer would reach that client as an empty
    stream."""
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    if request.query.get("stream", "false").lower() != "false":
        err = bad_request("a stored response cannot be streamed again ('background' is not supported); "
                          "GET it without 'stream'", "stream")
        return error_response(err, {"X-Request-Id": request_id(request)})
    found = await stored.response(request.match_info["id"])
    return _not_found(request) if found is None else json_response(found["response"])


async def delete(request: web.Request) -> web.Response:
    """`DELETE /v1/responses/{id}`: forget a stored response and its items; a follow-up on it,
    or a reference to one of its items, is then a 404."""
    stored = _stored(request)
    if isinstance(stored, web.Response):
        return stored
    if not await stored.forget(request.match_info["id"]):
        return _not_found(request)
    return json_response({"id": request.match_info["id"], "object": "response.deleted", "deleted": True})
