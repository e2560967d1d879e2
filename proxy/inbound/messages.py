"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API, for
the anthropic SDKs and Claude Code (`ANTHROPIC_BASE_URL` pointed at the gateway).

Messages requests go through the shared lifecycle (`inbound.lifecycle`): same keys, rules,
chains, limits, breakers, commit point and decision record as chat. The gateway key may come
as `x-api-key` (what the SDK sends) or `Authorization: Bearer`. Errors on this surface are
in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`.

An Anthropic deployment gets the client's own bytes with only `model` replaced, and the
client's `anthropic-version` and `anthropic-beta` headers; its answer comes back untouched
(`encoding`'s native passthrough). Any other deployment gets the translated chat body
(`messages_request`) and its answer is re-encoded (`messages_answer`); what that body
leaves out is named in the attempt's `dropped` in the decision record, and a request it
cannot carry at all is served only by Anthropic deployments (the others are skipped with the
reason). Query strings (Claude Code's `?beta=true`) are accepted and not forwarded: beta
features are switched on by the `anthropic-beta` header, which is.

count_tokens is routed like a message (so `auto`, chains and aliases name the same model)
and answered by the first candidate's first deployment when its protocol can count (its
adapter's `build_count`: Anthropic's `/v1/messages/count_tokens`, Gemini's `:countTokens`).
Otherwise, or when that call fails, the gateway's own estimate (system prompt, messages and
tools, at the router's 4 characters a token) answers, and `X-Token-Count-Source: estimate`
says so (`provider` when the provider counted). No tokens are billed for counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any, cast

import aiohttp
from aiohttp import web

from ..config import Deployment, GatewayKey
from ..decisions import CLIENT_DISCONNECTED, AttemptRecord, Decision
from ..errors import GatewayError, UpstreamFailure, redact
from ..gateway import Gateway
from ..providers import CountingAdapter, UpstreamRequest, json_event
from ..server.edge import CLIENT_CLOSED, GATEWAY, decode_json, error_response, json_response, request_id, send_now
from ..streaming import ClientGone
from ..transport import classify, failure_from_exception, read_error_body
from .lifecycle import Call, internal_error, serve, shutting_down
from .messages_answer import MessagesEncoder, error_body
from .messages_request import check, to_chat
from .routing import answer_headers, authenticate_and_read, decide

__all__ = ["count_tokens", "error_body", "messages"]

log = logging.getLogger("proxy.inbound.messages")
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
COUNT_SOURCE = "X-Token-Count-Source"


def authorization(headers: Mapping[str, str]) -> str | None:
    """The gateway key as `Authorization` carries it: the SDK sends `x-api-key`, Claude Code
    with `ANTHROPIC_AUTH_TOKEN` a Bearer token."""
    given = headers.get("Authorization")
    if given:
        return given
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else None


class Messages:
    """The surface, one per request: it carries the client's headers a native request forwards."""

    name = "messages"

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.forward = {name: headers[name] for name in FORWARDED_HEADERS if headers.get(name)}

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return authorization(headers)

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call:
        translated = to_chat(check(body))
        return Call(translated.body, MessagesEncoder(), raw, self.forward, tuple(translated.dropped),
                    translated.unsendable)

    def error_body(self, err: GatewayError) -> bytes:
        return error_body(err.status, err.message)


async def messages(request: web.Request) -> web.StreamResponse:
    return await serve(request, Messages(request.headers))


# ---------------------------------------------------------------------------- count_tokens


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """Routed like a message, counted by the provider where it can, estimated otherwise;
    one decision record, like every request."""
    gateway = request.app[GATEWAY]
    snapshot = gateway.snapshot
    decision = Decision(request_id(request), gateway.clock(), api="messages.count_tokens")
    task = asyncio.current_task()
    assert task is not None
    gateway.in_flight.add(task)             # the drain waits for it (and cuts it off) like any request
    try:
        key, raw = await authenticate_and_read(request, snapshot, decision, authorization(request.headers))
        translated = to_chat(check(decode_json(raw), count_only=True))
        signals, plan = decide(snapshot, key, request.headers, translated.body, decision)
        # No deployment is admitted for a count: the key's rpm alone, and only for a request it may
        # make (a refused one costs the key nothing, as on every other path).
        await gateway.admit_key(key)
        estimate = signals.input_tokens + translated.extra_tokens
        candidate = plan.candidates[0]
        deployment = candidate.deployments[0]
        decision.served_model, decision.served_provider = candidate.model.name, deployment.provider.name
        counted = await _provider_count(gateway, deployment, raw, translated.body, request.headers, decision)
        headers = {**answer_headers(decision), COUNT_SOURCE: "estimate" if counted is None else "provider"}
        answer = json_response({"input_tokens": estimate if counted is None else counted}, headers=headers)
        return await send_now(request, answer)
    except GatewayError as err:
        return await _refuse(request, decision, err)
    except ClientGone:
        decision.outcome, decision.status = CLIENT_DISCONNECTED, CLIENT_CLOSED
        return web.Response(status=CLIENT_CLOSED)
    except asyncio.CancelledError:
        if not gateway.cut_off:             # the client left
            decision.outcome, decision.status = CLIENT_DISCONNECTED, CLIENT_CLOSED
            raise
        task.uncancel()                     # our own drain deadline, not the client: answer it
        return await _refuse(request, decision, shutting_down())
    except Exception:
        log.exception("unhandled error", extra={"request_id": decision.request_id})
        return await _refuse(request, decision, internal_error())
    finally:
        gateway.in_flight.discard(task)
        gateway.finish(decision)


async def _refuse(request: web.Request, decision: Decision, err: GatewayError) -> web.Response:
    decision.outcome, decision.status, decision.error = err.outcome, err.status, err.message
    response = error_response(err, answer_headers(decision), error_body(err.status, err.message))
    with contextlib.suppress(ClientGone):
        await send_now(request, response)
    return response


def _count_request(adapter: Any, deployment: Deployment, raw: bytes, chat: dict[str, Any],
                   headers: Mapping[str, str]) -> UpstreamRequest | None:
    """The provider's own counting request, or None where its protocol has none (OpenAI chat)."""
    if not hasattr(adapter, "build_count"):
        return None
    forward = {name: headers[name] for name in FORWARDED_HEADERS if headers.get(name)}
    return cast(CountingAdapter, adapter).build_count(deployment, raw, chat, forward)


async def _provider_count(gateway: Gateway, deployment: Deployment, raw: bytes, chat: dict[str, Any],
                          headers: Mapping[str, str], decision: Decision) -> int | None:
    """The provider's count, or None (no counting endpoint, or the call failed: the record says why)."""
    adapter = gateway.adapters[deployment.provider.api]
    try:
        request = _count_request(adapter, deployment, raw, chat, headers)
    except Exception:           # a body the provider's request cannot be built from: estimate
        return None
    if request is None:
        return None
    record = AttemptRecord(decision.served_model or "", deployment.id, deployment.provider.name, gateway.clock())
    decision.attempts.append(record)
    headers_received = False
    try:
        async with asyncio.timeout(deployment.provider.timeouts.first_token_s):
            async with await gateway.transport.send(deployment.provider, request) as response:
                headers_received = True
                if response.status != 200:
                    raise classify(adapter, response.status, response.headers, await read_error_body(response))
                answer = json_event(await response.read()) or {}
    except (TimeoutError, aiohttp.ClientError, ConnectionError, UpstreamFailure) as exc:
        failure = exc if isinstance(exc, UpstreamFailure) else failure_from_exception(exc, headers_received)
        record.failure, record.status = failure.kind.value, failure.status
        record.message = redact(failure.message, deployment.provider.api_key)
        return None
    finally:
        record.duration_s = gateway.clock() - record.started
    count = answer.get("input_tokens", answer.get("totalTokens"))
    if type(count) is not int:
        record.failure, record.message = "protocol", "the count answer has no token count"
        return None
    record.served = True
    return count
