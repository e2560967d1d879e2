"""The simulated provider fleet: OpenAI, Anthropic and Gemini wire formats on 127.0.0.1.

Behaviour is chosen by the model name asked for, so one fleet serves the tests, bench/
and the demo without any setup. A name is split on '-' and each part that means
something here is applied; other parts are ignored, so `gpt-5-mini` is a healthy model:

  timing     ttft<ms>  first token delay     gap<ms>  delay between tokens   n<count>  tokens
  failures   429 429once 500 500once 503 529 401   (HTTP status before any byte; `once`
             fails only the first request for that model name), ra<seconds> Retry-After
             reset resetonce (connection closed before headers), hang (never answers)
  in stream  odd<k> (valid JSON of the wrong shape before token k),
             inband (an error event after a harmless first frame), garbage (a malformed
             event mid-stream), nodone (no terminal event), cut<k> (socket closed after k
             tokens), stall<k> (silence after k tokens)
  caller     ctx (400 context_length_exceeded), policy (400 content policy)
  text       differ<k> (the text differs from the canonical one from token k on: a model
             that does not give the same answer twice)
  tools      toolloop (a tool call on every turn, even right after a tool result)
  usage      cache<k> (k prompt tokens reported as cached), nousage (the OpenAI wire reports no usage,
             like OpenAI-compatible vendors that ignore stream_options)

Tools: a request that offers tools gets a call of the first one, unless `tool_choice` says
none; right after a tool result it gets text, as a real model answers with what the tool
returned. A forced choice (OpenAI `required` or a named function, Anthropic `any` or `tool`,
Gemini mode `ANY`) or the `toolloop` part calls the tool even then.

A 401 echoes the credential it was sent in its message, as some providers do, so tests
can prove the gateway never passes a provider key on.

Counting: Anthropic's `/v1/messages/count_tokens` and Gemini's `:countTokens` answer the
prompt tokens the model's usage would report for the same request, after its `ttft` delay.

A fault can also be set at run time with POST /_sim/faults {"model": m, "fault": f}
(`"fault": null` clears it), which the breaker sequence test and `llm-proxy chaos` use.
Every request and every connection the client dropped is recorded for tests to read.

Each protocol module turns a neutral `Reply` into its own frames and error bodies; the
timing and fault injection here are shared, so all three fail in the same ways.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

WORDS = ("The quick brown fox jumps over the lazy dog while the gateway streams every token "
         "exactly as it arrives from the simulated provider fleet").split()
_STATUS_FAULTS = {"429": 429, "500": 500, "503": 503, "529": 529, "401": 401}


@dataclass(frozen=True, slots=True)
class Behaviour:
    ttft_s: float = 0.0
    gap_s: float = 0.0
    tokens: int = 12
    status: int | None = None           # fail with this HTTP status before any byte
    once: bool = False                  # ...only the first time this model name is asked
    retry_after: float | None = None
    reset: bool = False
    hang: bool = False
    inband: bool = False
    garbage: bool = False
    odd_at: int | None = None
    nodone: bool = False
    cut_after: int | None = None
    stall_after: int | None = None
    caller: str | None = None           # "ctx" | "policy"
    cached: int = 0
    usage: bool = True                  # report usage (`nousage` turns it off)
    differ_at: int | None = None        # tokens from this one on differ from the canonical text
    tool_loop: bool = False             # call a tool even right after a tool result


def parse_behaviour(model: str, default: Behaviour) -> Behaviour:
    values: dict[str, Any] = {}
    for part in model.split("-"):
        p = part.lower()
        try:
            if p.startswith("ttft") and p[4:].isdigit():
                values["ttft_s"] = int(p[4:]) / 1000
            elif p.startswith("gap") and p[3:].isdigit():
                values["gap_s"] = int(p[3:]) / 1000
            elif p.startswith("n") and p[1:].isdigit():
                values["tokens"] = int(p[1:])
            elif p.startswith("ra") and p[2:]:
                values["retry_after"] = float(p[2:])
            elif p.startswith("odd") and p[3:].isdigit():
                values["odd_at"] = int(p[3:])
            elif p.startswith("differ") and p[6:].isdigit():
                values["differ_at"] = int(p[6:])
            elif p.startswith("cut") and p[3:].isdigit():
                values["cut_after"] = int(p[3:])
            elif p.startswith("stall") and p[5:].isdigit():
                values["stall_after"] = int(p[5:])
            elif p.startswith("cache") and p[5:].isdigit():
                values["cached"] = int(p[5:])
            elif p.endswith("once") and p[:-4] in _STATUS_FAULTS:
                values["status"], values["once"] = _STATUS_FAULTS[p[:-4]], True
            elif p in _STATUS_FAULTS:
                values["status"] = _STATUS_FAULTS[p]
            elif p == "resetonce":
                values["reset"], values["once"] = True, True
            elif p in ("reset", "hang", "inband", "garbage", "nodone"):
                values[p] = True
            elif p == "nousage":
                values["usage"] = False
            elif p == "toolloop":
                values["tool_loop"] = True
            elif p in ("ctx", "policy"):
                values["caller"] = p
        except ValueError:
            continue
    return dataclasses.replace(default, **values) if values else default


@dataclass(slots=True)
class Ask:
    """A request, read out of any protocol into the few things the simulator reacts to."""

    model: str
    stream: bool
    prompt_text: str
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)      # function names offered
    tool_choice_none: bool = False
    tool_forced: bool = False                           # the request requires a tool call
    after_tool_result: bool = False                     # the last turn carries a tool's result
    json_output: bool = False
    prefill: str | None = None                          # a trailing assistant message
    include_usage: bool = True


@dataclass(slots=True)
class Reply:
    pieces: list[str]                   # content tokens (a tool call's argument pieces when tool_name)
    finish: str                         # stop | length | tool_calls
    prompt_tokens: int
    cached_tokens: int
    tool_name: str | None = None
    stop_sequence: str | None = None    # the stop sequence that ended the text, if one did
    usage: bool = True                  # whether the wire reports usage

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def canonical_text(tokens: int) -> list[str]:
    return [WORDS[i % len(WORDS)] + " " for i in range(tokens)]


def make_reply(ask: Ask, behaviour: Behaviour) -> Reply:
    prompt_tokens = max(1, len(ask.prompt_text) // 4) + behaviour.cached
    if ask.tools and not ask.tool_choice_none and (ask.tool_forced or behaviour.tool_loop
                                                   or not ask.after_tool_result):
        args = ['{"location"', ': "Paris', '", "unit": "c"}']
        return Reply(args, "tool_calls", prompt_tokens, behaviour.cached, ask.tools[0], usage=behaviour.usage)
    pieces = canonical_text(behaviour.tokens)
    if behaviour.differ_at is not None:
        pieces = pieces[:behaviour.differ_at] + [piece.upper() for piece in pieces[behaviour.differ_at:]]
    if ask.json_output:
        words = "".join(pieces).strip().replace('"', "")
        pieces = ['{"answer": "', *[w + " " for w in words.split()][:-1], words.split()[-1] if words else "",
                  '"}']
    finish = "stop"
    if ask.prefill:
        done = "".join(pieces)
        if done.startswith(ask.prefill):
            rest, consumed = [], 0
            for piece in pieces:
                if consumed >= len(ask.prefill):
                    rest.append(piece)
                elif consumed + len(piece) > len(ask.prefill):
                    rest.append(piece[len(ask.prefill) - consumed:])
                consumed += len(piece)
            pieces = rest
    stopped_by = None
    if ask.stop:
        text, out = "", []
        for piece in pieces:
            cut = [(i, s) for s in ask.stop if (i := (text + piece).find(s)) >= 0]
            if cut:
                at, stopped_by = min(cut)
                keep = (text + piece)[:at][len(text):]
                if keep:
                    out.append(keep)
                break
            out.append(piece)
            text += piece
        pieces = out
    if ask.max_tokens is not None and len(pieces) > ask.max_tokens:
        pieces, finish = pieces[:ask.max_tokens], "length"
    return Reply(pieces, finish, prompt_tokens, behaviour.cached, stop_sequence=stopped_by, usage=behaviour.usage)


@dataclass(slots=True)
class Frames:
    head: list[bytes]           # lifecycle frames before content
    body: list[bytes]           # one frame per content token
    tail: list[bytes]           # finish and usage frames
    done: list[bytes]           # the protocol's terminal frame(s), left out by `nodone`


class Wire(Protocol):
    """One protocol's rendering of a Reply."""

    def read(self, request: web.Request, payload: dict[str, Any]) -> Ask: ...
    def complete(self, ask: Ask, reply: Reply) -> dict[str, Any]: ...
    def frames(self, ask: Ask, reply: Reply) -> Frames: ...
    def error_body(self, status: int, kind: str, message: str) -> dict[str, Any]: ...
    def error_frame(self, kind: str, message: str) -> bytes: ...


@dataclass(slots=True)
class Seen:
    """A request as the simulator received it."""

    protocol: str
    model: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    stream: bool
    disconnected_at: float | None = None
    completed: bool = False
    raw: bytes = b""                    # the request body's bytes as they arrived
    answer: bytearray = field(default_factory=bytearray)   # every byte of a 200 answer, as written
    query: str = ""                     # the URL's query string


class Simulator:
    def __init__(self, default: Behaviour | None = None) -> None:
        from .anthropic import AnthropicWire
        from .gemini import GeminiWire
        from .openai import OpenAIWire

        self.default = default or Behaviour()
        self.wires: dict[str, Wire] = {"openai": OpenAIWire(), "anthropic": AnthropicWire(), "gemini": GeminiWire()}
        self.seen: list[Seen] = []
        self.faults: dict[str, str] = {}
        self.record = True
        self._asked: dict[str, int] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/openai/v1/chat/completions", self._openai)
        app.router.add_post("/anthropic/v1/messages", self._anthropic)
        app.router.add_post("/anthropic/v1/messages/count_tokens", self._anthropic_count)
        app.router.add_post(r"/gemini/v1beta/models/{target:[^/]+}", self._gemini)
        app.router.add_post("/_sim/faults", self._set_fault)
        app.router.add_get("/_sim/seen", self._seen)
        return app

    # ---------------------------------------------------------------- protocol entry points

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("openai", request)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("anthropic", request)

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["target"].endswith(":countTokens"):
            payload = orjson.loads(await request.read())
            inner = payload.get("generateContentRequest") or payload
            return await self._count("gemini", request, payload, inner, "totalTokens")
        return await self._serve("gemini", request)

    async def _anthropic_count(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        return await self._count("anthropic", request, payload, {**payload, "max_tokens": 1}, "input_tokens")

    async def _count(self, protocol: str, request: web.Request, payload: dict[str, Any], readable: dict[str, Any],
               field_name: str) -> web.Response:
        """A provider's token count: the prompt tokens its answer's usage would report, after
        the model's first-token delay."""
        ask = self.wires[protocol].read(request, readable)
        if self.record:
            self.seen.append(Seen(protocol, ask.model, request.path, payload, dict(request.headers.items()),
                                  time.monotonic(), False, completed=True, query=request.query_string))
        await asyncio.sleep(parse_behaviour(ask.model, self.default).ttft_s)
        return web.json_response({field_name: max(1, len(ask.prompt_text) // 4)})

    async def _set_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("fault"):
            self.faults[body["model"]] = body["fault"]
        else:
            self.faults.pop(body["model"], None)
        return web.json_response({"faults": self.faults})

    async def _seen(self, request: web.Request) -> web.Response:
        return web.json_response([{"protocol": s.protocol, "model": s.model, "stream": s.stream,
                                   "disconnected": s.disconnected_at is not None} for s in self.seen])

    def requests_for(self, model: str) -> list[Seen]:
        return [s for s in self.seen if s.model == model]

    # ---------------------------------------------------------------- shared driver

    async def _serve(self, protocol: str, request: web.Request) -> web.StreamResponse:
        wire = self.wires[protocol]
        raw = await request.read()
        payload = orjson.loads(raw)
        ask = wire.read(request, payload)
        seen = Seen(protocol, ask.model, request.path, payload,
                    {k: v for k, v in request.headers.items()}, time.monotonic(), ask.stream, raw=raw,
                    query=request.query_string)
        if self.record:
            self.seen.append(seen)
        name = ask.model + ("-" + self.faults[ask.model] if ask.model in self.faults else "")
        behaviour = parse_behaviour(name, self.default)
        count = self._asked[ask.model] = self._asked.get(ask.model, 0) + 1
        failing = not behaviour.once or count == 1
        try:
            if behaviour.hang:
                await asyncio.sleep(3600)
            if behaviour.reset and failing:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            if behaviour.status is not None and failing:
                return self._error(wire, behaviour, request)
            if behaviour.caller is not None:
                kind = "context_length_exceeded" if behaviour.caller == "ctx" else "content_policy"
                message = ("This model's maximum context length is 1000 tokens" if kind == "context_length_exceeded"
                           else "The request was rejected by the content policy")
                return web.json_response(wire.error_body(400, kind, message), status=400)
            reply = make_reply(ask, behaviour)
            if not ask.stream:
                if behaviour.ttft_s:
                    await asyncio.sleep(behaviour.ttft_s + behaviour.gap_s * len(reply.pieces))
                seen.completed = True
                answer = orjson.dumps(wire.complete(ask, reply))
                if self.record:
                    seen.answer += answer
                return web.Response(body=answer, content_type="application/json")
            return await self._stream(request, wire, ask, reply, behaviour, seen)
        except (asyncio.CancelledError, ConnectionError):
            seen.disconnected_at = time.monotonic()
            raise

    def _error(self, wire: Wire, behaviour: Behaviour, request: web.Request) -> web.Response:
        status = behaviour.status or 500
        kind = {429: "rate_limit", 401: "auth", 503: "overloaded", 529: "overloaded"}.get(status, "server")
        headers = {}
        if status == 429 or behaviour.retry_after is not None:
            headers["Retry-After"] = f"{behaviour.retry_after if behaviour.retry_after is not None else 1:g}"
        message = f"simulated {status}"
        if status == 401:       # like providers that quote the key they were sent
            sent = [v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key",
                                                                           "x-goog-api-key", "api-key")]
            message = f"Incorrect API key provided: {' '.join(sent) or request.query.get('key', '')}"
        return web.json_response(wire.error_body(status, kind, message), status=status, headers=headers)

    async def _stream(self, request: web.Request, wire: Wire, ask: Ask, reply: Reply, behaviour: Behaviour,
                      seen: Seen) -> web.StreamResponse:
        frames = wire.frames(ask, reply)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        record = self.record

        async def write(data: bytes) -> None:
            if record:
                seen.answer += data
            await response.write(data)

        try:
            if frames.head:
                await write(frames.head[0])
            if behaviour.inband:
                await asyncio.sleep(behaviour.ttft_s)
                await write(wire.error_frame("overloaded", "simulated in-band error"))
                await response.write_eof()
                return response
            if len(frames.head) > 1:
                await write(b"".join(frames.head[1:]))
            for i, piece in enumerate(frames.body):
                if i == behaviour.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if i == behaviour.stall_after:
                    await asyncio.sleep(3600)
                delay = behaviour.ttft_s if i == 0 else behaviour.gap_s
                if delay:
                    await asyncio.sleep(delay)
                if i == behaviour.odd_at:
                    await write(b'data: {"choices": [1], "delta": 7}\n\n')
                if behaviour.garbage and i == 1:
                    await write(b"data: {this is not json\n\n")
                await write(piece)
            if not frames.body and behaviour.ttft_s:
                await asyncio.sleep(behaviour.ttft_s)
            await write(b"".join(frames.tail + ([] if behaviour.nodone else frames.done)))
            await response.write_eof()
            seen.completed = True
        except (ConnectionError, asyncio.CancelledError):
            seen.disconnected_at = time.monotonic()
            raise
        return response


async def start(host: str = "127.0.0.1", port: int = 0, default: Behaviour | None = None
                ) -> tuple[Simulator, web.AppRunner, int]:
    """Run a simulator in this event loop; returns it, its runner and the bound port."""
    simulator = Simulator(default)
    runner = web.AppRunner(simulator.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    return simulator, runner, bound

