"""How an answer goes on the client's wire: the `Encoder` contract every client surface fills.

Inside the gateway an answer has one canonical form, OpenAI's chat completion: adapters
turn every upstream protocol into `chat.completion` bodies and `chat.completion.chunk`
payloads (JSON bytes, unframed). A client surface (`proxy/inbound/`: chat completions,
responses, messages) creates one `Encoder` per request; dispatch and streaming hand it
what the upstream sent and write what it returns. The encoder owns everything about the
client's wire format: the framing, the stream's lifecycle events, the end marker, the
error event after the commit and the plain answer's body. Dispatch owns the commit point:
no encoder method is called before the first content, so nothing an encoder writes can
reveal a failover.

The calls, in order, for one streamed request:
  chunk(payload)        per canonical payload, after the commit, on the hot path: return
                        the bytes to write (b"" to write nothing). Chat frames it and does
                        nothing else; other surfaces decode it and emit their own events.
  end(payloads, native) once, when the upstream finished: `payloads` are the translator's
                        last ones (a usage chunk) still to encode; return the tail (chat:
                        those frames and `data: [DONE]`). Async, so that a surface can store
                        what a follow-up needs before the client can see the end and ask.
  error(message, type, code)
                        at most once, instead of `end`, when the stream broke after the
                        commit (or the gateway failed, or is shutting down): the surface's
                        own error event, never a silent close.
Before any of them, once routing has read the request: `expect_input_tokens(tokens)`, the
gateway's estimate of the request's input tokens, for a surface whose wire format needs a
usage figure before (or without) the upstream's own count.
A plain request gets one call, `answer(body, native)`: the upstream's answer as a
`chat.completion` body -> the surface's body (async for the same reason as `end`).

Native passthrough. A surface may name one upstream protocol as `native` (the Anthropic
Messages surface names `anthropic`). When the deployment serving an attempt speaks it and
the adapter can build a native request (`NativeAdapter.build_native`), dispatch sends the
client's own body with only `model` replaced (and the client's protocol headers the surface
picks, `Call.native_headers`), and the answer passes through untouched:
for a stream, each upstream event is written as it arrived (`event:`/`data:` framing, the
encoder's `chunk` is not called), while the adapter's translator still reads every event
so the commit point, the finish, usage and cost work exactly as for a translated stream;
`end((), native=True)` normally returns b"" (the upstream's own end went through) and
`answer(body, native=True)` receives the upstream's own body, normally to return it. A
stream committed natively is never continued on another model (`on_stream_failure:
continue`): it ends with `error`.

Imports only errors and sse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .errors import error_body
from .sse import DONE_FRAME, frame


class Encoder(Protocol):
    """One request's client-side encoding; see the module docstring for the order of calls."""

    native: str | None          # the upstream protocol whose own answers this client takes as they are

    def expect_input_tokens(self, tokens: int) -> None: ...

    def chunk(self, payload: bytes) -> bytes: ...

    async def end(self, payloads: Sequence[bytes], native: bool) -> bytes: ...

    def error(self, message: str, type_: str, code: str | None) -> bytes: ...

    async def answer(self, body: bytes, native: bool) -> bytes: ...


class ChatEncoder:
    """Chat completions: the canonical form is the client's own, so a chunk is only framed
    (`sse.frame`, the same call and cost as before encoders existed) and a plain answer is
    passed as it is. Stateless: one instance serves every request."""

    __slots__ = ()
    native: str | None = None
    chunk = staticmethod(frame)

    def expect_input_tokens(self, tokens: int) -> None:
        """Chat passes usage on as the upstream reports it."""

    async def end(self, payloads: Sequence[bytes], native: bool) -> bytes:
        if not payloads:
            return DONE_FRAME
        return b"".join(frame(p) for p in payloads) + DONE_FRAME

    def error(self, message: str, type_: str, code: str | None) -> bytes:
        return frame(error_body(message, type_, code))

    async def answer(self, body: bytes, native: bool) -> bytes:
        return body


CHAT = ChatEncoder()
