"""The one attempt loop: breaker, bucket, adapter, commit at first content, failover.

For each candidate of the plan, in order, the balancer picks a deployment that its
breaker admits and whose buckets have room; the attempt's failure is classified once and
`errors.POLICY` says whether to retry the same deployment (once, after Retry-After or a
short jittered backoff), try another deployment or candidate, or give the caller the
provider's reason. Attempts per request are bounded by `server.max_attempts`; a retry is
only taken while the budget still leaves one attempt for every later candidate.

Streaming commit point: nothing reaches the client until the upstream has sent its first
content-bearing event; until then any failure moves to the next attempt unseen. After it,
bytes flow as they arrive (`streaming.stream_attempt` moves them); a stall or a cut ends
the client's stream here with the client surface's error event (`Encoder.error`: for chat
an OpenAI-style error event and no `[DONE]`), unless the chain opted into continuation:
then the next candidate continues the text already sent (a prefill), or, when it cannot
take a prefill, restarts the answer, held back until it has reproduced that text
(`proxy.verify`).

What reaches the client is the request's `Encoder` (`proxy.encoding`): the plain answer
goes through `Encoder.answer`, a stream's payloads through `Encoder.chunk`. When the
surface names the serving deployment's protocol as `native` and its adapter can build
a native request, the client's own body goes up (only `model` replaced) and the answer
comes back untouched.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import orjson

from .balancer import Balancer, Load, Refused, Reservation, reservation_tokens
from .breaker import OPEN
from .config import Chain, Deployment
from .decisions import CLIENT_DISCONNECTED, AttemptRecord, Decision
from .encoding import CHAT, Encoder
from .errors import POLICY, FailureClass, UpstreamFailure, final_error, key_limited, redact
from .providers import Adapter, NativeAdapter, UpstreamRequest
from .router import Candidate, Plan
from .settings import ServerSettings
from .signals import Signals
from .state import BucketSpec, Outcome, StateStore
from .streaming import ClientGone, ClientStream, StreamBroken, stream_attempt
from .transport import Transport, classify, failure_from_exception, read_answer, read_error_body, unreadable
from .usage import Usage
from .verify import MAX_CHARS, Verifier

AUTH_OPEN_S = 300.0
BACKOFF_S = (0.05, 0.25)        # jittered wait before the one retry of a 5xx or reset
RATE_LIMIT_BACKOFF_S = (0.2, 0.6)   # the hold after a 429 that gave no Retry-After
RETRY_MARGIN_S = 0.01


@dataclass(slots=True)
class Exchange:
    """One client request in flight: what dispatch needs to know about it."""

    request_id: str
    body: dict[str, Any]
    signals: Signals
    plan: Plan
    decision: Decision
    deadline: float             # monotonic
    encoder: Encoder = CHAT     # the client surface's encoding of this answer
    native_body: bytes | None = None    # the client's own body, for a native attempt (see proxy.encoding)
    native_headers: Mapping[str, str] = field(default_factory=dict)     # the client's headers it forwards
    dropped: tuple[str, ...] = ()       # what `body` leaves out of the client's request: a translated
    untranslatable: str | None = None   # attempt's record names it; why only a native attempt can serve


@dataclass(slots=True)
class OpenBreaker:
    """The candidate deployment whose breaker has been open longest, as a refusal reported it."""

    deployment: Deployment
    opened_at: float            # on the dispatcher's clock
    probe_at: float             # when it may be probed (open interval or 429 hold), same clock


class Dispatcher:
    def __init__(self, adapters: Mapping[str, Adapter], transport: Transport, state: StateStore,
                 settings: ServerSettings, load: Load | None = None,
                 key_limits: Mapping[str, BucketSpec] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.adapters = adapters
        self.transport = transport
        self.state = state
        self.load = load or Load()
        self.balancer = Balancer(state, self.load)
        self.key_limits = key_limits or {}      # a key's own rpm, by the key's name
        self.settings = settings
        self.clock = clock
        self.sleep = sleep

    # ------------------------------------------------------------------ the loop

    async def run(self, ex: Exchange, client: ClientStream | None) -> bytes | None:
        """Serve `ex`: returns the JSON body for a plain request, or None once streamed.

        Raises GatewayError when no attempt could serve and nothing was committed.
        """
        chain: Chain | None = ex.plan.chain_config
        tokens = reservation_tokens(ex.signals.input_tokens, ex.signals.max_tokens)
        budget = self.settings.max_attempts
        rate_limited_wait: float | None = None      # the shortest wait any limit asked for
        open_longest: OpenBreaker | None = None     # every breaker open: the one to probe
        min_context = 0                             # after context_length_exceeded: a larger window
        prefill: str | None = None                  # text streamed so far, once continuing
        last_caller: UpstreamFailure | None = None
        unsendable: UpstreamFailure | None = None   # a protocol could not express the request
        # The key's rpm is reserved in the same call as the first deployment admitted, then paid.
        key = self.key_limits.get(ex.signals.key) if ex.signals.key is not None else None

        candidates = ex.plan.candidates
        for position, candidate in enumerate(candidates):
            model = candidate.model
            later = len(candidates) - position - 1      # a retry never costs these their attempt
            deployments, skip = self._usable(candidate, min_context, prefill)
            if skip is not None:
                ex.decision.skipped.append({"model": model.name, "reason": skip})
                continue
            # Continuing a broken stream on a model that cannot take a prefill: restart, and verify.
            restart = prefill is not None and "prefill" not in model.capabilities
            excluded: set[str] = set()
            retried: set[str] = set()
            pinned: Deployment | None = None        # the retry goes to the deployment that failed
            tried = False
            while budget > 0:
                pool = (pinned,) if pinned is not None else deployments
                choice = await self.balancer.choose(pool, model.strategy, tokens, excluded, key, self._lease(ex))
                if isinstance(choice, Refused):
                    refusal = choice.refusal
                    if refusal.reason == "key_limited":
                        raise key_limited(key, refusal.retry_after)
                    if pinned is not None:          # no longer admitted (limit, breaker): try the others
                        excluded.add(pinned.id)
                        pinned = None
                        continue
                    if refusal.reason == "rate_limited":
                        rate_limited_wait = min(rate_limited_wait or math.inf, refusal.retry_after)
                    elif refusal.reason == "breaker_open" and choice.longest_open is not None:
                        open_longest = self._older(open_longest, choice)
                    if not tried and (why := passed_over(choice)) is not None:     # the record says why
                        ex.decision.skipped.append({"model": model.name, "reason": why})
                    break
                key = None                          # the key pays once per request
                pinned = None
                request = self._build(ex, choice, None if restart else prefill, continuing=prefill is not None)
                if isinstance(request, UpstreamFailure):    # this protocol cannot express the request
                    ex.decision.skipped.append({"model": model.name, "reason": request.message})
                    unsendable = unsendable or request
                    excluded.add(choice.deployment.id)
                    continue
                budget -= 1
                tried = True
                verifier = Verifier(prefill, self.clock() + verify_s(choice.deployment), self.clock) \
                    if restart and prefill is not None else None
                outcome = await self._attempt(ex, candidate, choice, request, client,
                                              None if restart else prefill, verifier)
                if outcome is None:
                    return None
                if isinstance(outcome, bytes):
                    return await ex.encoder.answer(outcome, request.native)
                if isinstance(outcome, StreamBroken):
                    # Only text can be continued, and never after a native commit (the client
                    # already has the upstream's own events): a broken tool call or an empty
                    # answer ends here.
                    added = added_text(outcome, verifier)
                    if chain is None or chain.on_stream_failure != "continue" or client is None \
                            or added is None or request.native:
                        await self._end_with_error(ex, client, outcome.failure)
                        return None
                    prefill = (prefill or "") + added
                    break                                       # continue on the next candidate
                failure = outcome
                if failure.kind is FailureClass.RATE_LIMITED and failure.retry_after is not None:
                    rate_limited_wait = min(rate_limited_wait or math.inf, failure.retry_after)
                if failure.kind is FailureClass.CONTENT_POLICY and chain is not None \
                        and chain.fallback_on_content_policy:
                    last_caller = failure
                    break
                policy = POLICY[failure.kind]
                if not policy.fallback:
                    last_caller = failure
                    budget = 0
                    break
                if failure.kind is FailureClass.CONTEXT_LENGTH:
                    min_context = max(min_context, model.context_window)
                    last_caller = failure
                    break
                wait = self._retry_wait(failure, ex.deadline)
                # A failure that opened the breaker (a failed probe, say) is not retried: the
                # breaker would refuse the retry after its wait, so fall over at once.
                if policy.retry_same and choice.deployment.id not in retried and wait is not None \
                        and budget > later and await self._breaker_state(choice) != OPEN:
                    retried.add(choice.deployment.id)
                    pinned = choice.deployment
                    await self.sleep(wait)
                    continue
                excluded.add(choice.deployment.id)
            if budget <= 0:
                break

        if not ex.decision.attempts and open_longest is not None and rate_limited_wait is None and budget > 0:
            outcome = await self._probe_oldest(ex, open_longest.deployment, tokens, key, client)
            if outcome is None or isinstance(outcome, bytes):
                return outcome
        if client is not None and client.committed:
            await self._end_with_error(ex, client, UpstreamFailure(
                FailureClass.PROTOCOL, "no candidate could continue the interrupted answer"))
            return None
        if last_caller is None and not ex.decision.attempts:
            last_caller = unsendable
        open_wait = None if open_longest is None else max(0.0, open_longest.probe_at - self.clock())
        raise final_error(ex.decision.attempts, last_caller, rate_limited_wait, open_wait)

    async def _probe_oldest(self, ex: Exchange, oldest: Deployment, tokens: int, key: BucketSpec | None,
                            client: ClientStream | None) -> bytes | None | UpstreamFailure:
        """Every candidate's breaker is open: probe the one open longest rather than fail untried.
        Returns what `run` returns when it answered (or ended the stream), else the failure."""
        candidate = next(c for c in ex.plan.candidates if oldest in c.deployments)
        reservation = await self.balancer.force(oldest, tokens, key, self._lease(ex))
        if isinstance(reservation, Refused):        # its probe slots are taken, or it is rate-limited
            if reservation.refusal.reason == "key_limited":
                raise key_limited(key, reservation.refusal.retry_after)
            return UpstreamFailure(FailureClass.CONNECT, "breaker open")
        request = self._build(ex, reservation, None)
        if isinstance(request, UpstreamFailure):
            return request
        outcome = await self._attempt(ex, candidate, reservation, request, client, None)
        if isinstance(outcome, StreamBroken):
            await self._end_with_error(ex, client, outcome.failure)
            return None
        if isinstance(outcome, bytes):
            return await ex.encoder.answer(outcome, request.native)
        return outcome

    def _usable(self, candidate: Candidate, min_context: int, prefill: str | None
                ) -> tuple[tuple[Deployment, ...], str | None]:
        """The candidate's deployments this request may use, or why the candidate is skipped."""
        model = candidate.model
        if model.context_window <= min_context:
            return (), "context window not larger than a model that reported context_length_exceeded"
        if prefill is not None and "prefill" not in model.capabilities and len(prefill) > MAX_CHARS:
            return (), f"cannot take a prefill, and the answer so far is too long to regenerate and verify " \
                       f"({len(prefill)} > {MAX_CHARS} characters)"
        adapters = self.adapters
        deployments = candidate.deployments
        if any(d.provider.api not in adapters for d in deployments):
            deployments = tuple(d for d in deployments if d.provider.api in adapters)
            if not deployments:
                return (), "no adapter for its wire protocol"
        return deployments, None

    def _older(self, current: OpenBreaker | None, refused: Refused) -> OpenBreaker:
        """Of two deployments with open breakers, the one open longest."""
        assert refused.longest_open is not None
        now = self.clock()
        other = OpenBreaker(refused.longest_open, now - refused.refusal.open_for, now + refused.refusal.open_wait)
        return other if current is None or other.opened_at < current.opened_at else current

    @staticmethod
    async def _breaker_state(reservation: Reservation) -> str:
        """The deployment's breaker state once this attempt's settle has landed ("" if unknown):
        awaited only on the way to a retry, never on a client's bytes."""
        return await reservation.settled if reservation.settled is not None else ""

    def _lease(self, ex: Exchange) -> float:
        """How long a half-open probe slot stays taken if its settle never comes (the instance
        died mid-request): never longer than the request may run."""
        return max(1.0, ex.deadline - self.clock() + 1.0)

    def _retry_wait(self, failure: UpstreamFailure, deadline: float) -> float | None:
        """Seconds to wait before retrying the same deployment, or None when it does not fit.

        A 429's wait is its Retry-After (or the jittered hold `_attempt` chose), plus a hair
        so the retry never lands before the deployment's hold has ended.
        """
        if failure.kind is FailureClass.RATE_LIMITED:
            wait = (failure.retry_after or 0.0) + RETRY_MARGIN_S
            if wait > self.settings.max_retry_wait_s:
                return None
        else:
            wait = random.uniform(*BACKOFF_S)
        return wait if self.clock() + wait < deadline - 0.5 else None

    # ------------------------------------------------------------------ one attempt

    def _build(self, ex: Exchange, reservation: Reservation, prefill: str | None, continuing: bool = False
               ) -> UpstreamRequest | UpstreamFailure:
        """The upstream request, or why this protocol cannot express it (then the reservation
        is given back: nothing was sent, so it is not an attempt)."""
        deployment = reservation.deployment
        adapter = self.adapters[deployment.provider.api]
        try:
            if not continuing and ex.native_body is not None and ex.encoder.native == deployment.provider.api \
                    and hasattr(adapter, "build_native"):
                return cast(NativeAdapter, adapter).build_native(deployment, ex.native_body, ex.signals.stream,
                                                                 ex.native_headers)
            if ex.untranslatable is not None:
                raise UpstreamFailure(FailureClass.CALLER, ex.untranslatable, 400, "unsupported_parameter")
            return adapter.build(deployment, ex.body, ex.signals.stream, prefill)
        except Exception as exc:        # an adapter meeting a shape it cannot express: the request's fault
            self.balancer.settle(reservation, Outcome(0))       # no verdict: a probe slot is released
            if isinstance(exc, UpstreamFailure):
                return exc
            return UpstreamFailure(FailureClass.CALLER, f"the request cannot be sent to {deployment.provider.api} "
                                   f"({type(exc).__name__}: {exc})", 400, "invalid_request")

    async def _attempt(self, ex: Exchange, candidate: Candidate, reservation: Reservation,
                       request: UpstreamRequest, client: ClientStream | None, prefill: str | None,
                       verifier: Verifier | None = None) -> bytes | None | UpstreamFailure | StreamBroken:
        deployment = reservation.deployment
        adapter = self.adapters[deployment.provider.api]
        record = AttemptRecord(candidate.model.name, deployment.id, deployment.provider.name, self.clock(),
                               deployment.price, dropped=None if request.native else ex.dropped or None)
        ex.decision.attempts.append(record)
        used_tokens: int | None = None
        verdict: str | None = None          # "ok" | "fail" | None (no verdict: client left)
        failure_hold: float | None = None   # a Retry-After that came with a failure: the open interval
        failure_cost = 0.0                  # how long a failure before the commit kept the request waiting
        trip_for: float | None = None       # bad credentials: open whatever the counts
        hold_for: float | None = None       # a 429: a hold, not a failure
        try:
            if ex.decision.overhead_ms is None:
                ex.decision.overhead_ms = round((self.clock() - ex.decision.started) * 1000, 3)
            body: bytes | None = None
            raw: bytes | None = None        # the upstream's own answer, for a native request
            if client is None:
                body, usage, raw = await self._plain(adapter, deployment, request, record, ex.deadline)
            else:
                usage = await self._streamed(ex, adapter, candidate, deployment, request, record, client, prefill,
                                             verifier)
            verdict = "ok"
            used_tokens = usage.total_tokens if usage else None
            self._served(ex, candidate, deployment, record, usage, body)
            return raw if request.native else body
        except StreamBroken as broken:
            verdict = "fail" if POLICY[broken.failure.kind].breaker else "ok"
            self._failed(record, broken.failure, deployment)
            return broken
        except UpstreamFailure as failure:
            verdict = "fail" if POLICY[failure.kind].breaker else None
            failure_hold = failure.retry_after
            failure_cost = self.clock() - record.started
            # Failed before the commit: refused before any output spends nothing, but a restart
            # that diverged had generated text (the provider bills it): its reservation stands.
            used_tokens = (record.usage.total_tokens if record.usage else None) if record.content_seen else 0
            self._failed(record, failure, deployment)
            if failure.kind is FailureClass.AUTH:
                trip_for = AUTH_OPEN_S
            elif failure.kind is FailureClass.RATE_LIMITED:
                # No traffic until the limit lifts; without Retry-After, a short jittered hold
                # that the retry (if any) then waits out exactly.
                if failure.retry_after is None:
                    failure.retry_after = random.uniform(*RATE_LIMIT_BACKOFF_S)
                failure.retry_after = hold_for = min(failure.retry_after, self.settings.breaker.max_open_s)
            elif failure.kind in (FailureClass.CALLER, FailureClass.CONTENT_POLICY, FailureClass.CONTEXT_LENGTH):
                verdict = "ok"      # the deployment answered correctly; the request was wrong
            return failure
        finally:
            record.duration_s = self.clock() - record.started
            if verifier is not None:
                record.regenerated_chars = verifier.position     # billed again, and wasted
            # Off the byte path: the settle never waits (with Redis it is sent in the background).
            reservation.settled = self.balancer.settle(
                reservation, Outcome(used_tokens, verdict, failure_hold, trip_for, hold_for, failure_cost))

    def _failed(self, record: AttemptRecord, failure: UpstreamFailure, deployment: Deployment) -> None:
        # Upstream messages can echo what they were sent (a 401 quoting the key): scrub them
        # here, the one place every failure passes, before they reach a record or a client.
        failure.message = redact(failure.message, deployment.provider.api_key)
        record.failure = failure.kind.value
        record.status = failure.status
        record.message = failure.message

    def _served(self, ex: Exchange, candidate: Candidate, deployment: Deployment, record: AttemptRecord,
                usage: Usage | None, body: bytes | None) -> None:
        """Note who served; `Decision.settle` bills it at the end, estimating when usage is None."""
        record.served = record.content_seen = True
        record.usage = usage
        if usage is None and body is not None:
            record.output_chars = answer_chars(body)
        ex.decision.served_model = candidate.model.name
        ex.decision.served_provider = deployment.provider.name
        if record.ttfb_s is not None:
            self.load.stats(deployment.id).observe_ttft(record.ttfb_s)

    def route_headers(self, ex: Exchange, candidate: Candidate, deployment: Deployment) -> dict[str, str]:
        return {
            "X-Request-Id": ex.request_id,
            "X-Route-Rule": ex.plan.rule,
            "X-Route-Model": candidate.model.name,
            "X-Route-Provider": deployment.provider.name,
            "X-Route-Attempts": str(len(ex.decision.attempts)),
        }

    async def _plain(self, adapter: Adapter, deployment: Deployment, request: Any, record: AttemptRecord,
                     deadline: float) -> tuple[bytes, Usage | None, bytes]:
        """The answer as a `chat.completion` body, its usage, and the upstream's own bytes."""
        timeouts = deployment.provider.timeouts
        limit = max(0.001, min(timeouts.total_s, deadline - self.clock()))
        headers_received = False
        try:
            async with asyncio.timeout(limit):
                async with await self.transport.send(deployment.provider, request) as response:
                    headers_received = True
                    if response.status != 200:
                        raise classify(adapter, response.status, response.headers, await read_error_body(response))
                    payload = await read_answer(response, self.settings.max_upstream_body_bytes)
                    record.ttfb_s = self.clock() - record.started
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise failure_from_exception(exc, headers_received) from None
        try:
            body, usage = adapter.parse(payload, deployment)
            return body, usage, payload
        except UpstreamFailure:
            raise
        except Exception as exc:
            raise unreadable(exc) from None

    async def _streamed(self, ex: Exchange, adapter: Adapter, candidate: Candidate, deployment: Deployment,
                        request: UpstreamRequest, record: AttemptRecord, client: ClientStream,
                        prefill: str | None, verifier: Verifier | None) -> Usage | None:
        async def commit() -> None:
            ex.decision.served_model = candidate.model.name     # what X-Route-Model tells the client
            ex.decision.served_provider = deployment.provider.name
            await client.commit(self.route_headers(ex, candidate, deployment))
            ex.decision.ttft_ms = round((self.clock() - ex.decision.started) * 1000, 3)

        # The text is always collected (a list append per content event): it prices an attempt that
        # broke before its usage arrived, and it is the prefill when a chain continues a broken stream.
        translator = adapter.stream(deployment, ex.signals.include_usage, True)
        timeouts = deployment.provider.timeouts
        return await stream_attempt(
            lambda: self.transport.send(deployment.provider, request), adapter, translator, timeouts,
            min(self.clock() + timeouts.total_s, ex.deadline), record, client, commit, prefill, self.clock,
            ex.encoder, request.native, self.settings.max_upstream_event_bytes, verifier,
            max_held_bytes=self.settings.max_upstream_body_bytes)

    async def _end_with_error(self, ex: Exchange, client: ClientStream | None, failure: UpstreamFailure) -> None:
        """After the commit the only honest end is the surface's error event, never a clean close."""
        ex.decision.outcome = "stream_error"
        ex.decision.error = str(failure)
        if client is None:
            return
        try:
            await client.write(ex.encoder.error(f"upstream stream failed: {failure.message}", "upstream_error",
                                                f"stream_{failure.kind.value}"))
            await client.finish()
        except ClientGone:
            ex.decision.outcome = CLIENT_DISCONNECTED


def verify_s(deployment: Deployment) -> float:
    """How long a restart may take to reproduce the text already sent: as long as the gateway
    waits for any attempt's first token, plus one idle gap. The client sees nothing meanwhile."""
    timeouts = deployment.provider.timeouts
    return timeouts.first_token_s + timeouts.idle_s


def added_text(broken: StreamBroken, verifier: Verifier | None) -> str | None:
    """The text a broken attempt added to the client's answer; None when the answer cannot be
    continued from text (a broken tool call, an empty answer)."""
    if verifier is not None and not verifier.verified:
        return ""                   # a restart that had not caught up: nothing of it reached the client
    text = "".join(broken.text)
    if verifier is not None:
        text = text[len(verifier.sent):]
    return text or None


def answer_chars(body: bytes) -> int:
    """Characters of text in an OpenAI chat.completion body: prices an answer sent without usage."""
    try:
        choices = orjson.loads(body).get("choices") or []
        return sum(len(c["message"].get("content") or "") for c in choices if isinstance(c.get("message"), dict))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return 0


def passed_over(choice: Refused) -> str | None:
    """Why no deployment of a candidate was admitted, for the record's `skipped`."""
    refusal = choice.refusal
    if refusal.reason == "rate_limited":
        return f"rate limited: no deployment has room for {refusal.retry_after:.1f}s"
    if refusal.reason == "breaker_open":
        return f"breaker open: every deployment's breaker is open (probe in {refusal.open_wait:.1f}s)"
    return None                 # excluded: its deployments were tried already, or cannot take the request
