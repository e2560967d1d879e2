"""A hostile upstream on 127.0.0.1 for all three wire protocols, and a bystander that records
every request it receives. Behaviour is chosen by the model name, as in the simulator:

  redirect302, redirect307   answer with that status and a Location on the bystander
  multiline                  a valid stream whose every JSON `data:` spans several lines (legal SSE)
  hugefirst                  an unterminated 50 MB line before any event
  emptyfirst                 50 MB of small valid events before any content (empty deltas)
  hugeafter                  a few good tokens, then an unterminated 50 MB line
  bigbody                    a non-streamed 200 whose JSON body never ends (50 MB, chunked)
  echolong                   a 401 whose long message quotes the key it was sent, late

Valid frames come from the simulator's own wires, so only the hostile part is new here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from proxy.simulator import Behaviour, Simulator, make_reply

PREFIX = {"openai": "/openai/v1", "anthropic": "/anthropic/v1", "gemini": "/gemini/v1beta"}
HUGE_BYTES = 50 * 1024 * 1024
PIECE = b"x" * 65536
EMPTY_EVENTS = b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{}}]}\n\n' * 700
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


@dataclass
class Bystander:
    """Another host: anything it receives is a request the gateway should never have sent."""

    received: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.Response:
        self.received.append({"path": request.path, "headers": dict(request.headers), "body": await request.read()})
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "gotcha"},
                                               "finish_reason": "stop"}]})


class Hostile:
    def __init__(self, bystander_url: str) -> None:
        self.bystander_url = bystander_url
        self.sim = Simulator()
        self.sent_bytes: dict[str, int] = {}        # model -> bytes of the hostile part written

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/openai/v1/chat/completions", self._serve)
        app.router.add_post("/anthropic/v1/messages", self._serve)
        app.router.add_post(r"/gemini/v1beta/models/{target:[^/]+}", self._serve)
        return app

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        protocol = request.path.split("/")[1]
        wire = self.sim.wires[protocol]
        ask = wire.read(request, orjson.loads(await request.read()))
        mode = next((p for p in ask.model.split("-") if p in MODES), "")
        if mode.startswith("redirect"):
            location = self.bystander_url + request.path_qs
            return web.Response(status=int(mode[-3:]), headers={"Location": location})
        if mode == "echolong":
            sent = " ".join(v for k, v in request.headers.items() if k.lower() in KEY_HEADERS)
            message = "The request could not be authenticated. " + "Details follow. " * 27 + f"Key sent: {sent}."
            message += " Please check your account settings and try again later." * 3
            return web.json_response(wire.error_body(401, "auth", message), status=401)
        if mode == "bigbody":
            start = b'{"choices": [{"message": {"content": "'
            return await self._endless(request, ask.model, start, "application/json")
        reply = make_reply(ask, Behaviour(tokens=6))
        frames = wire.frames(ask, reply)
        if mode == "hugefirst":
            return await self._endless(request, ask.model, b"data: ", "text/event-stream")
        if mode == "emptyfirst":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            return await self._flood(response, ask.model, b"", EMPTY_EVENTS)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if mode == "hugeafter":
            await response.write(b"".join(frames.head + frames.body[:3]))
            return await self._flood(response, ask.model, b"data: ")
        for frame in [*frames.head, *frames.body, *frames.tail, *frames.done]:
            await response.write(multiline(frame) if mode == "multiline" else frame)
        await response.write_eof()
        return response

    async def _endless(self, request: web.Request, model: str, start: bytes, content_type: str
                       ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        return await self._flood(response, model, start)

    async def _flood(self, response: web.StreamResponse, model: str, start: bytes, piece: bytes = PIECE
                     ) -> web.StreamResponse:
        """HUGE_BYTES of `piece` (no line end), as fast as the gateway takes them; it is expected to hang up."""
        self.sent_bytes[model] = 0
        try:
            await response.write(start)
            while self.sent_bytes[model] < HUGE_BYTES:
                await response.write(piece)
                self.sent_bytes[model] += len(piece)
            await response.write_eof()
        except (ConnectionError, OSError):
            pass
        return response


MODES = ("redirect302", "redirect307", "multiline", "hugefirst", "emptyfirst", "hugeafter", "bigbody", "echolong")


def multiline(frame: bytes) -> bytes:
    """The same events with each JSON document spread over several `data:` lines; the SSE spec
    joins them again with LF, which in JSON is whitespace."""
    out = []
    for line in frame.split(b"\n"):
        if line.startswith(b"data: {"):
            pretty = json.dumps(orjson.loads(line[6:]), indent=1).encode()
            out.extend(b"data: " + part for part in pretty.split(b"\n"))
        else:
            out.append(line)
    return b"\n".join(out)


@dataclass
class Upstreams:
    hostile: Hostile
    bystander: Bystander
    port: int

    def providers(self, timeouts: dict[str, float]) -> dict[str, Any]:
        """providers.yaml entries `hostile-<api>` for the three protocols, keyed by SIM_PROVIDER_KEY."""
        return {f"hostile-{api}": {"api": api, "base_url": f"http://127.0.0.1:{self.port}{PREFIX[api]}",
                                   "api_key_env": "SIM_PROVIDER_KEY", "timeouts": timeouts} for api in PREFIX}


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


@asynccontextmanager
async def serving() -> AsyncIterator[Upstreams]:
    """The hostile upstream and its bystander on 127.0.0.1, in this event loop."""
    bystander = Bystander()
    b_runner, b_port = await _start(bystander.app())
    hostile = Hostile(f"http://127.0.0.1:{b_port}")
    h_runner, h_port = await _start(hostile.app())
    try:
        yield Upstreams(hostile, bystander, h_port)
    finally:
        await h_runner.cleanup()
        await b_runner.cleanup()
