"""The spine: the OpenAI SDK and an EventSource through the gateway to the simulator."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from aiohttp_sse_client.client import EventSource

from proxy.simulator import canonical_text

from .conftest import MakeGateway, model_entry

HELLO = [{"role": "user", "content": "Say hello"}]


def expected_text(tokens: int) -> str:
    return "".join(canonical_text(tokens))


async def test_async_sdk_plain_and_streamed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n7")})
    client = openai.AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0)
    plain = await client.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    completion = plain.parse()
    assert completion.choices[0].message.content == expected_text(7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert plain.headers["X-Route-Model"] == "chat"
    assert plain.headers["X-Route-Attempts"] == "1"

    stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
    pieces, finish, usage_chunks = [], None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage_chunks += 1
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected_text(7)
    assert finish == "stop"
    assert usage_chunks == 0, "the client did not ask for usage, so the gateway drops the usage chunk"
    await client.close()


async def test_streamed_usage_when_asked(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n4")})
    client = openai.AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    await client.close()


async def test_sync_sdk_in_a_thread(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n5")})

    def call() -> tuple[str, str]:
        with openai.OpenAI(base_url=gw.base, api_key="unused", max_retries=0) as client:
            plain = client.chat.completions.create(model="chat", messages=HELLO)
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(model="chat", messages=HELLO, stream=True)
                               if c.choices)
            return plain.choices[0].message.content or "", streamed

    plain, streamed = await asyncio.to_thread(call)
    assert plain == streamed == expected_text(5)


async def test_event_source_receives_chunks_as_they_arrive(make_gateway: MakeGateway) -> None:
    """200 ms between tokens upstream: the client sees them about 200 ms apart, not batched."""
    gw = await make_gateway({"slow": model_entry("ok-n5-gap200")}, timeouts={"first_token_s": 2, "idle_s": 2})
    arrivals, texts = [], []
    body = {"model": "slow", "stream": True, "messages": HELLO}
    async with EventSource(gw.base + "/chat/completions", option={"method": "POST"}, json=body,
                           max_connect_retry=0, timeout=aiohttp.ClientTimeout(total=10)) as source:
        async for event in source:
            if event.data == "[DONE]":
                break
            import orjson
            chunk = orjson.loads(event.data)
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                arrivals.append(time.monotonic())
                texts.append(content)
    assert "".join(texts) == expected_text(5)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(gaps) == 4
    assert all(0.12 < g < 0.40 for g in gaps), f"chunks were batched or delayed: {gaps}"


async def test_response_headers_for_sse(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n2")})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", headers={"X-Request-Id": "my-req-1"},
                                json={"model": "chat", "stream": True, "messages": HELLO}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            assert r.headers["X-Request-Id"] == "my-req-1"
            text = await r.text()
    assert text.endswith("data: [DONE]\n\n")


async def test_gateway_always_asks_upstream_for_usage(make_gateway: MakeGateway, fleet) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n2-usagecheck")})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "chat", "stream": True, "messages": HELLO}) as r:
            await r.read()
    sent = fleet.sim.requests_for("ok-n2-usagecheck")[0].body
    assert sent["stream_options"] == {"include_usage": True}


async def test_client_disconnect_releases_upstream_within_a_second(make_gateway: MakeGateway, fleet) -> None:
    gw = await make_gateway({"long": model_entry("ok-n200-gap50-disc")}, timeouts={"idle_s": 5})
    async with aiohttp.ClientSession() as session:
        response = await session.post(gw.base + "/chat/completions",
                                      json={"model": "long", "stream": True, "messages": HELLO})
        assert response.status == 200
        await response.content.readline()
        response.close()                        # the client goes away mid-stream
        closed_at = time.monotonic()
    seen = fleet.sim.requests_for("ok-n200-gap50-disc")[0]
    deadline = closed_at + 1.0
    while seen.disconnected_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert seen.disconnected_at is not None, "the upstream connection was not released"
    assert seen.disconnected_at - closed_at < 1.0
    assert not seen.completed
    await asyncio.sleep(0.05)
    assert all(s.in_flight == 0 for s in gw.gateway.load.statistics.values())  # type: ignore[attr-defined]


async def test_models_health_ready(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"a": model_entry("ok"), "b": model_entry("ok")},
                            routes={"chains": {"main": ["a", "b"]}, "default": "main"})
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base + "/models") as r:
            listing = await r.json()
        async with session.get(gw.url + "/healthz") as r:
            assert r.status == 200
        async with session.get(gw.url + "/readyz") as r:
            assert r.status == 200
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {"auto", "main", "a", "b"}


BAD_INPUTS = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    (b'"just a string"', 400, "invalid_request"),
    (b'{"model": "chat"}', 400, "invalid_request"),
    (b'{"model": "chat", "messages": []}', 400, "invalid_request"),
    (b'{"model": "chat", "messages": "hello"}', 400, "invalid_request"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": 5}]}', 400, "invalid_request"),
    (b'{"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_request"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request"),
    (b'{"model": "chat", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request"),
    (b'{"model": "chat", "max_tokens": -3, "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request"),
    (b'{"model": "chat", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}', 400,
     "invalid_request"),
    (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}', 413,
     "request_too_large"),
]


@pytest.mark.parametrize("raw,status,code", BAD_INPUTS, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_INPUTS)])
async def test_bad_input_gets_openai_error_and_server_keeps_serving(make_gateway: MakeGateway, raw: bytes,
                                                                    status: int, code: str) -> None:
    gw = await make_gateway({"chat": model_entry("ok-n1")},
                            routes={"chains": {"main": ["chat"]}, "default": "main",
                                    "server": {"max_body_bytes": 65536}})
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", data=raw,
                                headers={"Content-Type": "application/json"}) as r:
            assert r.status == status
            error = (await r.json())["error"]
        assert error["code"] == code
        assert error["type"] == "invalid_request_error"
        assert error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        async with session.post(gw.base + "/chat/completions",
                                json={"model": "chat", "messages": HELLO}) as r:
            assert r.status == 200, "the gateway must keep serving after bad input"


async def test_unknown_path_and_method_are_openai_shaped(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"chat": model_entry("ok")})
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.base + "/nothing-here") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
        async with session.get(gw.base + "/chat/completions") as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"
