"""Client connections on real sockets: the head timeout, keep-alive idleness, the connection
limit and its overflow, malformed HTTP, and what every answer carries.

The in-process gateways use short bounds (`server:` settings); the flood runs against a real
`python -m proxy serve` whose open-file limit is lowered in the child, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import resource
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy import config as config_module
from proxy.server import connections
from proxy.server.app import create_app, listen, make_runner
from proxy.server.edge import GATEWAY

from .conftest import Fleet, MakeGateway, RunningGateway, SpawnGateway, model_entry, write_config

USER = {"role": "user", "content": "hello"}
SECRET = "gwk-LEAKcheck-0123456789"


def port_of(gw: RunningGateway) -> int:
    return int(gw.url.rsplit(":", 1)[1])


async def gateway_with(make_gateway: MakeGateway, **server: Any) -> RunningGateway:
    models = {"fast": model_entry("fast-n3"), "slow": model_entry("slow-ttft1500-n3"),
              "long": model_entry("long-gap200-n15")}
    return await make_gateway(models, {"chains": {"main": ["fast"]}, "default": "main", "server": server},
                              timeouts={"connect_s": 1, "first_token_s": 10, "idle_s": 10, "total_s": 30})


async def closed_within(reader: asyncio.StreamReader, limit_s: float) -> float | None:
    """Seconds until the gateway closed the connection (EOF or reset); None if still open."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return loop.time() - started


async def trickle(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)
    except (ConnectionError, OSError):
        pass


HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9\r\n\r\n")


@pytest.mark.parametrize("kind", ("silent", "half-sent", "trickling", "trickling after a request"))
async def test_a_connection_without_a_whole_head_is_closed_at_header_timeout(make_gateway: MakeGateway,
                                                                             kind: str) -> None:
    gw = await gateway_with(make_gateway, header_timeout_s=0.5, keepalive_timeout_s=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
    feeding = None
    if kind == "half-sent":
        writer.write(HEAD[:20])
    elif kind == "trickling":               # a byte every 0.1 s: bytes arriving do not extend the bound
        feeding = asyncio.create_task(trickle(writer, HEAD, 0.1))
    elif kind == "trickling after a request":   # kept alive past the bound, then the next head trickles
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.7)
        feeding = asyncio.create_task(trickle(writer, HEAD, 0.1))
    held = await closed_within(reader, 5)
    if feeding is not None:
        feeding.cancel()
    writer.close()
    assert held is not None and 0.4 <= held < 0.5 + 1.0, f"{kind}: closed after {held}"


async def test_keep_alive_idleness_has_its_own_bound_and_a_busy_request_is_never_cut(
        make_gateway: MakeGateway) -> None:
    gw = await gateway_with(make_gateway, header_timeout_s=0.5, keepalive_timeout_s=1.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
    body = orjson.dumps({"model": "slow", "messages": [USER]})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    async with asyncio.timeout(10):         # 1.5 s to the first token: three header timeouts, never cut
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(1.0)                # idle between requests: past the head bound, within keep-alive
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readuntil(b'{"status":"ok"}')
    held = await closed_within(reader, 5)
    writer.close()
    assert held is not None and 1.3 <= held < 1.5 + 1.0, f"idle connection closed after {held}"


async def test_beyond_the_limit_the_longest_idle_connection_makes_room(make_gateway: MakeGateway) -> None:
    gw = await gateway_with(make_gateway, header_timeout_s=30, max_connections=4)
    silent = []
    for _ in range(4):
        silent.append(await asyncio.open_connection("127.0.0.1", port_of(gw)))
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as session:      # a real client: a fifth connection
        async with session.post(gw.base + "/chat/completions", json={"model": "fast", "messages": [USER]}) as r:
            assert r.status == 200
    assert await closed_within(silent[0][0], 1) is not None, "the connection idle longest was closed"
    for reader, _ in silent[1:]:
        assert await closed_within(reader, 0.2) is None, "newer idle connections stay"
    for _, writer in silent:
        writer.close()


async def test_beyond_the_limit_with_every_connection_busy_a_newcomer_gets_503(make_gateway: MakeGateway) -> None:
    gw = await gateway_with(make_gateway, max_connections=2)

    async def stream() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base + "/chat/completions",
                                    json={"model": "long", "stream": True, "messages": [USER]}) as r:
                return await r.text()

    busy = [asyncio.create_task(stream()) for _ in range(2)]
    for _ in range(100):
        if len(gw.gateway.in_flight) == 2:
            break
        await asyncio.sleep(0.02)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"\r\nRetry-After: 1\r\n" in head, head
    assert b"\r\nConnection: close\r\n" in head and b"\r\nX-Request-Id: req_" in head
    assert orjson.loads(body)["error"]["code"] == "too_many_connections"
    for text in await asyncio.gather(*busy):
        assert text.endswith("data: [DONE]\n\n"), "the requests in flight were not disturbed"


async def test_malformed_http_gets_json_and_one_safe_log_line(make_gateway: MakeGateway,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    gw = await gateway_with(make_gateway)
    bad = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + SECRET.encode() + b"\x01\r\n\r\n")

    async def send(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))
        writer.write(raw)
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        return answer

    with caplog.at_level(logging.DEBUG):
        answer = await send(bad)
        for _ in range(3):                  # within the same second: counted, not logged
            await send(bad)
        await asyncio.sleep(1.1)
        await send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0] and b"Content-Type: application/json" in head
    assert b"X-Request-Id: req_" in head and b"Server: llm-proxy\r\n" in head and b"aiohttp" not in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "malformed_request" and error["type"] == "invalid_request_error"
    assert SECRET.encode() not in answer
    lines = [r for r in caplog.records if r.getMessage() == "malformed HTTP request"]
    assert [(r.levelno, r.__dict__["error"], r.__dict__["left_out"]) for r in lines] == [
        (logging.INFO, "BadHttpMessage", 0), (logging.INFO, "LineTooLong", 3)]
    for record in caplog.records:
        assert record.levelno < logging.ERROR, record.getMessage()
        text = str(record.__dict__) + (record.exc_text or "")
        assert SECRET not in text and SECRET[:12] not in text


async def test_every_answer_has_a_request_id_and_no_server_version(make_gateway: MakeGateway) -> None:
    gw = await gateway_with(make_gateway)
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/nowhere", json={}) as r:
            body = await r.json()
            assert r.status == 404 and body["error"]["message"] == "Not Found: POST /v1/nowhere"
            assert r.headers["X-Request-Id"].startswith("req_") and r.headers["Server"] == "llm-proxy"
        async with session.put(gw.base + "/models") as r:
            assert r.status == 405 and (await r.json())["error"]["message"].startswith(
                "Method Not Allowed: PUT /v1/models")
            assert r.headers["X-Request-Id"].startswith("req_")
        async with session.get(gw.url + "/healthz", headers={"X-Request-Id": "mine-1"}) as r:
            assert r.headers["X-Request-Id"] == "mine-1" and r.headers["Server"] == "llm-proxy"
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "fast", "stream": True, "messages": [USER]}) as r:
            await r.read()
            assert r.headers["Server"] == "llm-proxy" and r.headers["X-Request-Id"].startswith("req_")


def test_the_aiohttp_internals_this_module_uses() -> None:
    """proxy/server/connections.py builds aiohttp's per-connection RequestHandler itself and
    overrides some of its methods. If this fails, aiohttp changed them: read its web_protocol.py
    and web_runner.py again before adjusting connections.py."""
    params = inspect.signature(RequestHandler.__init__).parameters
    for name in ("manager", "loop", "keepalive_timeout", "access_log", "max_line_size", "max_field_size"):
        assert name in params, f"RequestHandler no longer takes {name!r}"
    for method in ("connection_made", "data_received", "connection_lost", "force_close"):
        assert callable(getattr(RequestHandler, method, None)), f"RequestHandler.{method} is gone"
    assert list(inspect.signature(RequestHandler.handle_error).parameters) == [
        "self", "request", "status", "exc", "message"], "RequestHandler.handle_error changed its signature"
    assert inspect.iscoroutinefunction(web.BaseSite.start) and inspect.iscoroutinefunction(web.BaseSite.stop)
    overridden = {"connection_made", "data_received", "connection_lost", "handle_error"}
    ours = {name for name in vars(connections.ClientConnection) if not name.startswith("__")} - overridden
    assert not ours & set(dir(RequestHandler)), f"aiohttp now has names of ours: {ours & set(dir(RequestHandler))}"


# --------------------------------------------------------------------------- a flood, a real process


async def test_a_flood_of_idle_sockets_with_few_descriptors_still_lets_a_real_request_through(
        fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway) -> None:
    """The gateway starts with RLIMIT_NOFILE (200, 256): it raises the soft limit to 256 and
    takes (256 - 64) / 2 = 96 connections. 300 silent, half-sent and trickling sockets (more
    descriptors than it has) arrive; a real request still gets its answer, and every flood
    socket is closed within the head bound."""
    p, r = write_config(tmp_path, fleet, {"fast": model_entry("fast-n3")},
                        {"chains": {"main": ["fast"]}, "default": "main",
                         "server": {"header_timeout_s": 2, "keepalive_timeout_s": 30}})
    gw = await spawn_gateway(p, r, open_files=(200, 256))
    listening = next(line for line in gw.logs() if line["msg"] == "listening")
    assert (listening["open_files"], listening["max_connections"]) == (256, 96)
    port = int(gw.url.rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    feeding = []
    for i in range(300):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        flood.append((reader, writer, loop.time()))
        if i % 3 == 1:
            writer.write(HEAD[:20])
        elif i % 3 == 2:
            feeding.append(asyncio.create_task(trickle(writer, HEAD, 0.25)))
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/chat/completions", json={"model": "fast", "messages": [USER]}) as r:
            assert r.status == 200, await r.text()
    answered_s = time.monotonic() - started

    async def closed_at(reader: asyncio.StreamReader) -> float | None:
        held = await closed_within(reader, 6)
        return None if held is None else loop.time()

    ends = await asyncio.gather(*(closed_at(reader) for reader, _, _ in flood))
    for task in feeding:
        task.cancel()
    for _, writer, _ in flood:
        writer.close()
    held = [end - opened for end, (_, _, opened) in zip(ends, flood) if end is not None]
    assert len(held) == 300, f"{300 - len(held)} flood sockets still open"
    assert max(held) < 2 + 1.5, f"a flood socket was held {max(held):.1f}s with header_timeout_s 2"
    assert answered_s < 2, f"the real request took {answered_s:.1f}s"
    errors = [line for line in gw.logs() if line["level"] in ("error", "critical")]
    assert not errors, errors[:3]
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 300     # the test itself had room


async def test_a_whole_answer_to_a_reader_that_stops_keeps_it_busy_then_cuts_it(
        fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer a handler returns (the catalogue, /metrics, the page's JSON) is written while
    its connection still counts as busy, and no longer than the send bound: a client that
    stops reading cannot hold the connection and the answer's bytes for ever."""
    monkeypatch.setattr(connections, "SEND_TIMEOUT_S", 0.5)
    config = config_module.load(*write_config(tmp_path, fleet, {"fast": model_entry("fast-n3")}))
    app = create_app(config)

    async def large(request: web.Request) -> web.Response:     # more than every buffer on the way holds
        return web.Response(body=b"x" * (32 << 20), content_type="application/octet-stream")

    app.router.add_get("/large", large)
    runner = make_runner(app)
    await runner.setup()
    site = await listen(runner, app[GATEWAY], "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", site.port))
            await loop.sock_sendall(client, b"GET /large HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await asyncio.sleep(0.3)                        # the answer is being written, and stalls
            assert site.connections.open == 1 and not site.connections.idle, "counted idle while writing"
            deadline = loop.time() + 5
            while site.connections.open and loop.time() < deadline:
                await asyncio.sleep(0.05)                   # the client reads nothing all along
            assert site.connections.open == 0, "a stalled answer held its connection past the bound"
    finally:
        await runner.cleanup()
