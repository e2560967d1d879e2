"""Limits a public gateway needs: header size, a body that trickles in, a client that reads slowly."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import config as config_module
from proxy.server.app import MAX_FIELD_SIZE, create_app, listen, make_runner
from proxy.server.edge import GATEWAY

from .conftest import Fleet, MakeGateway, model_entry, write_config


async def test_header_size_limit(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"fast": model_entry("fast-n2")})
    async with aiohttp.ClientSession() as session:
        # Above aiohttp's default of 8190 bytes, within ours: a long cookie or token still works.
        async with session.get(gw.url + "/healthz", headers={"X-Big": "a" * 12_000}) as resp:
            assert resp.status == 200
        async with session.get(gw.url + "/healthz", headers={"X-Big": "a" * (MAX_FIELD_SIZE + 1024)}) as resp:
            assert resp.status in (400, 431)
        async with session.get(gw.url + "/healthz") as resp:          # the gateway is fine afterwards
            assert resp.status == 200


async def test_a_body_that_trickles_in_gets_408(make_gateway: MakeGateway) -> None:
    routes = {"chains": {"main": ["fast"]}, "default": "main", "server": {"body_timeout_s": 0.5}}
    gw = await make_gateway({"fast": model_entry("fast-n2")}, routes)
    port = int(gw.url.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
            head = await reader.readuntil(b"\r\n\r\n")
        assert b" 408 " in status_line, status_line
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        error = orjson.loads(await reader.readexactly(length))
        assert error["error"]["code"] == "request_timeout"
    finally:
        writer.close()


async def test_a_slow_reader_holds_back_the_stream_instead_of_buffering_it(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """response.write must await the socket's drain: a client that stops reading stalls the
    relay (and, through TCP, the upstream) rather than growing the gateway's write buffer."""
    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim")
    p, r = write_config(tmp_path, fleet, {"big": model_entry("big-n20000")},
                        timeouts={"connect_s": 1, "first_token_s": 5, "idle_s": 20, "total_s": 60})
    app = create_app(config_module.load(p, r))
    client_transports: list[asyncio.BaseTransport] = []

    async def capture(request: web.Request, response: web.StreamResponse) -> None:
        if request.transport is not None:
            client_transports.append(request.transport)

    app.on_response_prepare.append(capture)
    runner = make_runner(app)
    await runner.setup()
    port = (await listen(runner, app[GATEWAY], "127.0.0.1", 0)).port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    writer = None
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        body = orjson.dumps({"model": "big", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        async with asyncio.timeout(5):
            assert b" 200 " in await reader.readline()
        await asyncio.sleep(1.5)                    # the client reads nothing for a while
        assert client_transports
        buffered = max(t.get_write_buffer_size() for t in client_transports)  # type: ignore[attr-defined]
        assert buffered < 512 * 1024, f"{buffered} bytes buffered for a client that is not reading"
        received = 0
        async with asyncio.timeout(30):             # now it reads: the whole answer arrives
            while chunk := await reader.read(65536):
                received += len(chunk)
                if b"data: [DONE]" in chunk:
                    break
        assert received > 1024 * 1024
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()
        await runner.cleanup()
