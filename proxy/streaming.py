"""One streamed attempt, from the upstream's first byte to the client's last.

Phase 1 holds every frame until the upstream has sent its first content-bearing event
(text, tool call or finish), bounded by `first_token_s`: any failure until then is unseen
by the client. Then the client's response is committed and the held frames written.
Phase 2 moves bytes as they arrive: per chunk only the SSE split, the translator's one
decode, the client surface's `Encoder.chunk` (for chat completions `sse.frame`, nothing
more) and the write; the idle timer restarts on every read. A stall, a cut, an
unreadable event or one over the size cap after the commit is a `StreamBroken`, which
dispatch ends with the surface's error event (or continues on another model); never a clean close that looks
complete. The end of a complete stream is the encoder's `end` (chat: `data: [DONE]`).
A write the client does not take within `idle_s` (it stopped reading) is `ClientGone`:
the idle bound holds on both sides of the relay.

A native attempt (see `proxy.encoding`) writes each upstream event as it arrived instead
of encoding the translator's payloads; the translator still reads every event.

The attempt loop and its policy stay in `dispatch`; this module owns no state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import aiohttp
import orjson

from .config import Timeouts
from .decisions import AttemptRecord
from .encoding import Encoder
from .errors import FailureClass, UpstreamFailure
from .providers import Adapter, StreamTranslator
from .sse import MAX_EVENT_BYTES, SSEParser, frame, named_frame
from .transport import classify, failure_from_exception, read_error_body, unreadable
from .usage import Usage
from .verify import Verifier


class ClientStream(Protocol):
    """Where a streamed answer goes; `commit` sends the status line and headers."""

    committed: bool

    async def commit(self, headers: Mapping[str, str]) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> None: ...


class StreamBroken(Exception):
    """A committed stream failed; the client already has part of the answer (`text`)."""

    def __init__(self, failure: UpstreamFailure, text: list[str] | None = None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.text = text or []


class ClientGone(Exception):
    """The client closed its connection; raised by `ClientStream` writes."""


async def stream_attempt(send: Callable[[], Awaitable[aiohttp.ClientResponse]], adapter: Adapter,
                         translator: StreamTranslator, timeouts: Timeouts, end_total: float, record: AttemptRecord,
                         client: ClientStream, commit: Callable[[], Awaitable[None]], prefill: str | None,
                         clock: Callable[[], float], encoder: Encoder, native: bool = False,
                         max_event_bytes: int = MAX_EVENT_BYTES, verify: Verifier | None = None, *,
                         max_held_bytes: int) -> Usage | None:
    """One streamed attempt: `send` it, hold frames until the first content, `commit` the
    client's response (once per request: a continuation writes on into it), then move
    bytes as they arrive, each payload through `encoder.chunk` (or, `native`, each
    upstream event as it came), until the upstream's end. Returns the upstream's usage.
    A restarted answer (`verify`) is held back until it has reproduced the text the client
    already has (see `proxy.verify`).

    Before the commit a failure raises UpstreamFailure (dispatch tries the next attempt
    unseen), also when the upstream sends more than `max_held_bytes` before its first
    content (all of it is held until then); after it, StreamBroken; a client that left or
    stopped reading, ClientGone.
    """
    parser = SSEParser(max_event_bytes)
    feed = passthrough(translator) if native else translator.feed
    if verify is not None:
        feed = verify.wrap(feed)
    encode = _as_is if native else encoder.chunk
    loop = asyncio.get_running_loop()
    headers_received = False
    response: aiohttp.ClientResponse | None = None
    try:
        # Phase 1: until the first content, everything is held back and any failure is unseen.
        pending: list[bytes] = []
        held = 0
        async with asyncio.timeout(max(0.001, min(timeouts.first_token_s, end_total - clock()))):
            response = await send()
            headers_received = True
            if response.status != 200:
                raise classify(adapter, response.status, response.headers, await read_error_body(response))
            content = response.content
            while not translator.content_seen and not translator.finished:
                chunk = await content.readany()
                if not chunk:
                    break
                held += len(chunk)
                if held > max_held_bytes:
                    raise UpstreamFailure(FailureClass.PROTOCOL,
                                          f"the upstream sent more than {max_held_bytes} bytes before any content")
                try:
                    for event in parser.feed(chunk):
                        pending.extend(feed(event.name, event.data))
                except UpstreamFailure:
                    raise
                except Exception as exc:
                    raise unreadable(exc) from None
            if not translator.content_seen:
                raise UpstreamFailure(FailureClass.PROTOCOL, "stream ended before any content")
        record.ttfb_s = clock() - record.started
        if prefill and prefill[-1].isspace():
            pending = trim_seam(pending, translator.text)
        async with _writing(timeouts.idle_s):
            if not client.committed:
                await commit()
            if pending:
                await client.write(b"".join(map(encode, pending)))

        # Phase 2: bytes flow as they arrive; the idle timer restarts on every read.
        writing = False
        try:
            async with asyncio.timeout(timeouts.idle_s) as idle:
                while not translator.finished:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    out = [encode(p) for ev in parser.feed(chunk) for p in feed(ev.name, ev.data)]
                    if out:
                        # The same bound for the write: a client that takes nothing for idle_s
                        # has stopped reading, and must not hold the upstream any longer.
                        writing = True
                        idle.reschedule(loop.time() + min(timeouts.idle_s, end_total - clock()))
                        await client.write(out[0] if len(out) == 1 else b"".join(out))
                        writing = False
                    idle.reschedule(loop.time() + min(timeouts.idle_s, end_total - clock()))
        except TimeoutError:
            if writing:
                raise ClientGone() from None        # it stopped reading: nothing more can reach it
            raise StreamBroken(UpstreamFailure(
                FailureClass.TIMEOUT, f"upstream stalled for {timeouts.idle_s:g}s after content"),
                translator.text) from None
        except UpstreamFailure as failure:
            raise StreamBroken(failure, translator.text) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise StreamBroken(failure_from_exception(exc, True), translator.text) from None
        except ClientGone:
            raise
        except Exception as exc:                # an adapter choking on an event it cannot read
            raise StreamBroken(unreadable(exc), translator.text) from None
        if not translator.finished and translator.finish_reason is None:
            raise StreamBroken(UpstreamFailure(FailureClass.PROTOCOL, "upstream stream was cut before its end"),
                               translator.text)
        if verify is not None and not verify.verified:      # it ended before reproducing the text sent
            raise StreamBroken(verify.shortfall(), translator.text)
        try:
            tail = () if native else translator.close()
        except Exception as exc:
            raise StreamBroken(unreadable(exc), translator.text) from None
        end = await encoder.end(tail, native)
        async with _writing(timeouts.idle_s):
            await client.write(end)
            await client.finish()
        return translator.usage
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise failure_from_exception(exc, headers_received) from None
    finally:
        record.content_seen = translator.content_seen
        record.usage = translator.usage
        record.output_chars = sum(map(len, translator.text))
        if response is not None:
            if translator.finished:
                response.release()      # complete: the connection goes back to the pool
            else:
                response.close()        # abandoned: never reuse a half-read connection


@asynccontextmanager
async def _writing(idle_s: float) -> AsyncIterator[None]:
    """Writes to the client outside the relay loop: bounded by `idle_s` like those inside it."""
    try:
        async with asyncio.timeout(idle_s):
            yield
    except TimeoutError:
        raise ClientGone() from None


def passthrough(translator: StreamTranslator) -> Callable[[str | None, bytes], Sequence[bytes]]:
    """A native attempt's feed: the translator reads each event (commit point, finish,
    usage, errors) and the event itself is what goes on, framed as it arrived."""
    def feed(name: str | None, data: bytes) -> Sequence[bytes]:
        translator.feed(name, data)
        return (frame(data) if name is None else named_frame(name, data),)
    return feed


def _as_is(payload: bytes) -> bytes:
    return payload


def trim_seam(payloads: list[bytes], text: list[str]) -> list[bytes]:
    """Strip leading whitespace from a continuation's first content, once.

    Some protocols cannot take a prefill ending in whitespace (Anthropic rejects it, so its
    adapter trims it) and the model then starts with that whitespace again: the client,
    who already has it, would see it twice at the seam. Runs once per continuation.
    """
    out: list[bytes] = []
    for i, payload in enumerate(payloads):
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            out.append(payload)
            continue
        for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                delta["content"] = content.lstrip()
                if text:
                    text[0] = text[0].lstrip()
                return [*out, orjson.dumps(chunk), *payloads[i + 1:]]
        out.append(payload)
    return out
