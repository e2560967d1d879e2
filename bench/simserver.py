"""The simulated fleet as its own process, for `bench.overhead` and `bench.load`.

    python -m bench.simserver [--host 127.0.0.1] [--port 0]

Serves the product simulator (`proxy.simulator`: behaviour by model name, so
`bench-instant` answers at once and `bench-ttft50-gap500-n8` streams slowly) with request
recording off, so that a long bench does not grow its memory, plus one bench-only route:

  POST /stamped/v1/chat/completions   an OpenAI stream paced by the model name's ttft/gap/n
                                      whose every chunk carries the monotonic time it was
                                      written (`system_fingerprint: "t<ns>"`)

CLOCK_MONOTONIC is shared by every process on the machine, so a client reading a chunk
knows exactly how long that chunk spent between the upstream's write and its own read;
comparing that transit direct and through the gateway gives the per-chunk delay the
gateway adds, free of the upstream's own timer drift. Prints `ready <port>` when
listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import orjson
from aiohttp import web

from proxy.simulator import Behaviour, Simulator, canonical_text, parse_behaviour


def stamped_chunk(model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
            "system_fingerprint": f"t{time.perf_counter_ns()}",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def stamped_stream(request: web.Request) -> web.StreamResponse:
    payload = orjson.loads(await request.read())
    model = str(payload.get("model", "bench"))
    behaviour = parse_behaviour(model, Behaviour())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i, piece in enumerate(canonical_text(behaviour.tokens)):
        delay = behaviour.ttft_s if i == 0 else behaviour.gap_s
        if delay:
            await asyncio.sleep(delay)
        await response.write(stamped_chunk(model, {"content": piece}))
    usage = {"prompt_tokens": 10, "completion_tokens": behaviour.tokens, "total_tokens": 10 + behaviour.tokens}
    tail = stamped_chunk(model, {}, "stop")
    tail += b"data: " + orjson.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                                      "model": model, "choices": [], "usage": usage}) + b"\n\n"
    await response.write(tail + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def build_app() -> web.Application:
    simulator = Simulator()
    simulator.record = False
    app = simulator.app()
    app.router.add_post("/stamped/v1/chat/completions", stamped_stream)
    return app


async def serve_ready(app: web.Application, host: str, port: int) -> None:
    """Serve `app`, print `ready <port>` for the parent, and stop on SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"ready {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("error: the bench simulator serves on loopback only", file=sys.stderr)
        return 2
    import uvloop

    uvloop.run(serve_ready(build_app(), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
