"""Shapes and answers that once broke the gateway: each must end in a clear answer, with
every reservation and probe slot given back."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import Fleet, MakeGateway, model_entry

USER = {"role": "user", "content": "hello"}
PROTOCOLS = ("openai", "anthropic", "gemini")


def in_flight(gw: Any) -> int:
    return sum(s.in_flight for s in gw.gateway.load.statistics.values())


BAD_SHAPES: list[tuple[str, dict[str, Any]]] = [
    ("tool_calls-not-objects", {"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": [1]}, USER]}),
    ("tool-function-not-object", {"messages": [USER], "tools": [{"type": "function", "function": "f"}]}),
    ("json_schema-not-object", {"messages": [USER], "response_format": {"type": "json_schema", "json_schema": "x"}}),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name,body", BAD_SHAPES, ids=[b[0] for b in BAD_SHAPES])
async def test_bad_shapes_are_400_and_leak_nothing(make_gateway: MakeGateway, protocol: str, name: str,
                                                   body: dict[str, Any]) -> None:
    gw = await make_gateway({"m": model_entry("ok-n2", f"sim-{protocol}")})
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            async with session.post(gw.base + "/chat/completions",
                                    json={"model": "m", "stream": stream, **body}) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with session.post(gw.base + "/chat/completions", json={"model": "m", "messages": [USER]}) as r:
            assert r.status == 200
    assert in_flight(gw) == 0


@pytest.mark.parametrize("protocol", ("anthropic", "gemini"))
async def test_a_request_the_adapter_cannot_translate_is_400_not_500(make_gateway: MakeGateway, fleet: Fleet,
                                                                     protocol: str) -> None:
    """Arguments that are not a JSON string pass validation but cannot be translated."""
    gw = await make_gateway({"m": model_entry("ok-n2-untranslatable", f"sim-{protocol}")})
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"not": "a string"}}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={"model": "m", "messages": messages}) as r:
            text = await r.text()
    assert r.status in (200, 400), text         # either translated sensibly or refused clearly
    assert in_flight(gw) == 0
    breaker = gw.gateway.state.breaker(f"m/sim-{protocol}/0")
    assert breaker.state == "closed"


async def test_retry_after_is_honoured_for_requests_that_follow(make_gateway: MakeGateway, fleet: Fleet) -> None:
    """After a 429 with Retry-After: 30 the deployment gets no traffic, and every caller is told
    to come back in about 30 s, not 1 s, and never gets a 502."""
    gw = await make_gateway({"m": model_entry("limited-429-ra30")})
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(gw.base + "/chat/completions", json={"model": "m", "messages": [USER]}) as r:
                assert r.status == 429
                assert 28 <= int(r.headers["Retry-After"]) <= 30
                assert (await r.json())["error"]["code"] == "rate_limited"
    assert len(fleet.sim.requests_for("limited-429-ra30")) == 1


async def test_a_day_long_retry_after_is_capped(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"m": model_entry("limited-429-ra86400")},
                            {"chains": {"main": ["m"]}, "default": "main", "server": {"breaker": {"max_open_s": 60}}})
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(gw.base + "/chat/completions", json={"model": "m", "messages": [USER]}) as r:
                assert r.status == 429
                assert 50 <= int(r.headers["Retry-After"]) <= 60


async def test_wrongly_shaped_chunk_after_content_ends_with_an_error_event(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"m": model_entry("ok-n5-gap30-odd2")})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "m", "stream": True, "messages": [USER]}) as r:
            assert r.status == 200
            text = await r.text()
    assert '"content":"The "' in text
    assert '"error"' in text.splitlines()[-2] and "[DONE]" not in text
    assert in_flight(gw) == 0


async def test_wrongly_shaped_chunk_before_content_fails_over_unseen(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"odd": model_entry("ok-n3-odd0"), "backup": model_entry("ok-n3-backup")},
                            {"chains": {"main": ["odd", "backup"]}, "default": "main"})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "auto", "stream": True, "messages": [USER]}) as r:
            assert r.status == 200
            assert r.headers["X-Route-Model"] == "backup"
            assert r.headers["X-Route-Attempts"] == "2"
            text = await r.text()
    assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
    assert text.count('"role":"assistant"') == 1


async def test_a_reload_retires_sessions_no_provider_uses_any_more(make_gateway: MakeGateway) -> None:
    import asyncio
    import dataclasses

    gw = await make_gateway({"m": model_entry("ok-n2")})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={"model": "m", "messages": [USER]}) as r:
            assert r.status == 200
    transport = gw.gateway.transport
    provider = gw.gateway.snapshot.config.providers["sim-openai"]
    old = transport.session(provider)
    moved = dataclasses.replace(provider, base_url=provider.base_url + "/moved")
    transport.retire([moved, *[p for p in gw.gateway.snapshot.config.providers.values() if p is not provider]],
                     grace_s=0.05)
    assert not old.closed, "requests in flight keep their session through the grace period"
    assert transport.session(provider) is not old
    await asyncio.sleep(0.2)
    assert old.closed


async def _raw_post(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a tiny receive buffer, so that not reading fills the gateway's buffers fast."""
    import socket

    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=raw, limit=1 << 16)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    return reader, writer


async def _read_to_end(reader: asyncio.StreamReader, seconds: float) -> bytes:
    data = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(1 << 20):
            data += chunk
    return data


async def test_a_client_that_stops_reading_gets_a_broken_stream_not_a_clean_end(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"m": model_entry("ok-n20000")},
                            timeouts={"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 1.5})
    body = orjson.dumps({"model": "m", "stream": True, "messages": [USER]})
    reader, writer = await _raw_post(int(gw.url.rsplit(":", 1)[1]), body)
    first = await reader.read(2000)
    assert first.startswith(b"HTTP/1.1 200")
    writer.transport.pause_reading()                    # the client stops reading
    await asyncio.sleep(2.5)                            # past the attempt's total budget
    writer.transport.resume_reading()
    data = first + await _read_to_end(reader, 10)
    writer.close()
    assert b"[DONE]" not in data
    assert not data.endswith(b"0\r\n\r\n"), "the chunked body must not end cleanly"
    assert in_flight(gw) == 0


async def test_drain_deadline_while_writing_a_plain_answer_sends_no_second_answer(fleet: Fleet, tmp_path,
                                                                                 monkeypatch) -> None:
    from proxy import config as config_module
    from proxy.server.app import drain

    from .conftest import serve, write_config

    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim-provider-secret-0001")
    p, r = write_config(tmp_path, fleet, {"m": model_entry("ok-n600000")},
                        timeouts={"connect_s": 1, "first_token_s": 30, "idle_s": 30, "total_s": 60})
    gw, runner = await serve(config_module.load(p, r))
    try:
        reader, writer = await _raw_post(int(gw.url.rsplit(":", 1)[1]),
                                         orjson.dumps({"model": "m", "messages": [USER]}))
        writer.transport.pause_reading()
        for _ in range(100):                            # until the big answer is being written
            await asyncio.sleep(0.05)
            if not gw.gateway.in_flight:
                break
        await asyncio.sleep(0.5)
        await drain(gw.gateway, runner, 0.2)
        writer.transport.resume_reading()
        data = await _read_to_end(reader, 10)
        writer.close()
    finally:
        await runner.cleanup()
    assert data.count(b"HTTP/1.1 ") == 1, data[:200]


async def test_a_client_that_will_not_read_a_plain_answer_is_cut_off_at_the_deadline(
        make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"m": model_entry("ok-n600000")},
                            {"chains": {"main": ["m"]}, "default": "main", "server": {"request_timeout_s": 3}},
                            timeouts={"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 30})
    reader, writer = await _raw_post(int(gw.url.rsplit(":", 1)[1]), orjson.dumps({"model": "m", "messages": [USER]}))
    writer.transport.pause_reading()
    for _ in range(120):                                # the handler gives up by the request's deadline
        await asyncio.sleep(0.05)
        if not gw.gateway.in_flight and _ > 10:
            break
    assert not gw.gateway.in_flight, "a reader that never reads must not pin the handler"
    writer.transport.resume_reading()
    data = await _read_to_end(reader, 10)
    writer.close()
    assert data.count(b"HTTP/1.1 ") <= 1
    assert in_flight(gw) == 0


async def test_a_client_that_stops_reading_a_stream_is_cut_within_idle_s(make_gateway: MakeGateway,
                                                                        fleet: Fleet) -> None:
    """Not at total_s: a reader that takes nothing for idle_s is gone, and the upstream is let go."""
    gw = await make_gateway({"m": model_entry("ok-n200000")},
                            timeouts={"connect_s": 1, "first_token_s": 5, "idle_s": 1, "total_s": 60})
    records: list[Any] = []
    gw.gateway.decisions.record = records.append       # type: ignore[method-assign]
    reader, writer = await _raw_post(int(gw.url.rsplit(":", 1)[1]),
                                     orjson.dumps({"model": "m", "stream": True, "messages": [USER]}))
    assert (await reader.read(2000)).startswith(b"HTTP/1.1 200")
    writer.transport.pause_reading()                    # the client stops reading, and stays connected
    started = asyncio.get_running_loop().time()
    while gw.gateway.in_flight and asyncio.get_running_loop().time() - started < 20:
        await asyncio.sleep(0.05)
    held = asyncio.get_running_loop().time() - started
    writer.close()
    assert not gw.gateway.in_flight and held < 1 + 3, f"held for {held:.1f}s with idle_s 1"
    assert records[0].outcome == "client_disconnected"
    for _ in range(40):                                 # the upstream connection is let go too
        if fleet.sim.requests_for("ok-n200000")[0].disconnected_at is not None:
            break
        await asyncio.sleep(0.05)
    assert fleet.sim.requests_for("ok-n200000")[0].disconnected_at is not None


async def test_a_client_that_will_not_read_a_plain_answer_is_cut_within_idle_s(make_gateway: MakeGateway) -> None:
    """A whole answer's write is bounded like a stream's: by the serving provider's idle_s, not
    by the request's much longer deadline."""
    gw = await make_gateway({"m": model_entry("ok-n600000")},
                            {"chains": {"main": ["m"]}, "default": "main", "server": {"request_timeout_s": 60}},
                            timeouts={"connect_s": 1, "first_token_s": 20, "idle_s": 1, "total_s": 60})
    records: list[Any] = []
    gw.gateway.decisions.record = records.append       # type: ignore[method-assign]
    reader, writer = await _raw_post(int(gw.url.rsplit(":", 1)[1]), orjson.dumps({"model": "m", "messages": [USER]}))
    writer.transport.pause_reading()
    for _ in range(600):                                # until the request is over (30 s at most)
        if records:
            break
        await asyncio.sleep(0.05)
    duration_s = records[0].duration_ms / 1000
    upstream_s = records[0].attempts[0].duration_s
    writer.close()
    assert records[0].outcome == "client_disconnected"
    assert duration_s - upstream_s < 1 + 2, f"the write was held {duration_s - upstream_s:.1f}s with idle_s 1"
