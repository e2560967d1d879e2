"""The shared surface machinery (`inbound.lifecycle`, `encoding`) with a surface defined here.

The surface takes Anthropic Messages bodies and names `anthropic` as its native protocol,
so an Anthropic deployment gets the client's own body (only `model` replaced) and the
client gets the upstream's own bytes, while an OpenAI deployment gets the canonical chat
body and its answer goes through the encoder. Both paths share one decision record, the
commit point and failover.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import config as config_module
from proxy.config import GatewayKey
from proxy.errors import GatewayError
from proxy.gateway import Gateway
from proxy.inbound.lifecycle import Call, handler
from proxy.server.app import create_app, make_runner
from proxy.server.edge import GATEWAY
from proxy.simulator import canonical_text
from proxy.sse import SSEParser

from .conftest import Fleet, MakeGateway, model_entry, write_config
from .decision_log_support import settled_records


class MessagesLike:
    """Anthropic in; translated answers are reduced to a marker the test can recognise."""

    name = "messages-test"

    def authorization(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("Authorization")

    async def decode(self, body: Any, raw: bytes, key: GatewayKey | None, gateway: Gateway) -> Call:
        chat = {"model": body["model"], "stream": bool(body.get("stream")),
                "messages": [{"role": "user", "content": "hello"}], "max_tokens": body["max_tokens"]}
        return Call(chat, Encoder(), raw)

    def error_body(self, err: GatewayError) -> bytes:
        return orjson.dumps({"type": "error", "error": {"type": err.type, "message": err.message}})


class Encoder:
    native = "anthropic"

    def expect_input_tokens(self, tokens: int) -> None:
        pass

    def chunk(self, payload: bytes) -> bytes:
        return b"event: translated\ndata: " + payload + b"\n\n"

    async def end(self, payloads: Sequence[bytes], native: bool) -> bytes:
        return b"" if native else b"event: translated_end\ndata: {}\n\n"

    def error(self, message: str, type_: str, code: str | None) -> bytes:
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {"type": type_,
                                                                                   "message": message}}) + b"\n\n"

    async def answer(self, body: bytes, native: bool) -> bytes:
        return body if native else b'{"translated": ' + body + b"}"


@pytest.fixture
async def surface_gateway(tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
                          ) -> AsyncIterator[tuple[str, Gateway]]:
    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim-provider-secret-0001")
    models = {
        "cut": model_entry("native-n8-cut3", "sim-anthropic"),
        "flaky": model_entry("native-500", "sim-anthropic"),
        "claude": model_entry("native-n5", "sim-anthropic"),
        "gpt": model_entry("plain-n5", "sim-openai"),
    }
    routes = {"chains": {"failover": ["flaky", "claude"], "to-openai": ["flaky", "gpt"]}, "default": "failover",
              "server": {"decision_log": str(tmp_path / "decisions.jsonl")}}
    app = create_app(config_module.load(*write_config(tmp_path, fleet, models, routes)))
    app.router.add_post("/test/messages", handler(MessagesLike()))
    gateway = app[GATEWAY]
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/test/messages", gateway
    await runner.cleanup()


def messages_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "stream": stream, "metadata": {"user_id": "u-1"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello",
                                                       "cache_control": {"type": "ephemeral"}}]}]}


async def test_native_stream_passes_the_upstream_events_through(surface_gateway: tuple[str, Gateway],
                                                                fleet: Fleet) -> None:
    url, gateway = surface_gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=messages_body("failover", True)) as response:
            assert response.status == 200 and response.headers["X-Route-Model"] == "claude"
            assert response.headers["X-Route-Attempts"] == "3"      # 500, its retry, then the other model
            raw = await response.read()
    events = SSEParser().feed(raw)
    names = [e.name for e in events]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "translated" not in names
    assert raw == b"".join(b"event: " + (e.name or "").encode() + b"\ndata: " + e.data + b"\n\n" for e in events)
    text = "".join(orjson.loads(e.data)["delta"].get("text", "") for e in events if e.name == "content_block_delta")
    assert text == "".join(canonical_text(5))
    sent = fleet.sim.requests_for("native-n5")[-1].body
    assert sent == {**messages_body("failover", True), "model": "native-n5"}    # the client's own body
    [record] = await settled_records(gateway, Path(gateway.decisions.destination), 1)
    assert (record["api"], record["outcome"], record["served_model"]) == ("messages-test", "ok", "claude")
    assert record["attempts"][-1]["output_tokens"] == 5         # usage read beside the bytes, for the bill


async def test_native_plain_answer_is_the_upstream_body(surface_gateway: tuple[str, Gateway]) -> None:
    url, _ = surface_gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=messages_body("claude", False)) as response:
            body = orjson.loads(await response.read())
    assert body["type"] == "message" and body["content"][0]["text"] == "".join(canonical_text(5))


async def test_another_protocol_goes_through_the_encoder(surface_gateway: tuple[str, Gateway]) -> None:
    url, _ = surface_gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=messages_body("to-openai", True)) as response:
            events = SSEParser().feed(await response.read())
        async with session.post(url, json=messages_body("gpt", False)) as response:
            plain = orjson.loads(await response.read())
    assert {e.name for e in events[:-1]} == {"translated"} and events[-1].name == "translated_end"
    assert plain["translated"]["object"] == "chat.completion"


async def test_native_cut_ends_with_the_surface_error_event(surface_gateway: tuple[str, Gateway]) -> None:
    url, _ = surface_gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=messages_body("cut", True)) as response:
            events = SSEParser().feed(await response.read())
    assert events[0].name == "message_start" and events[-1].name == "error"
    assert "message_stop" not in [e.name for e in events]
    assert orjson.loads(events[-1].data)["error"]["type"] == "upstream_error"


async def test_chat_streams_are_the_upstreams_own_frames(make_gateway: MakeGateway, fleet: Fleet) -> None:
    """The chat encoder frames each payload and adds `[DONE]`, nothing else: an OpenAI
    upstream's stream reaches the client byte for byte (ids and timestamps drawn per stream
    aside), the role, content, finish and usage chunks alike."""
    gw = await make_gateway({"m": model_entry("frames-n4")})
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base + "/chat/completions", json={**body, "model": "m"}) as response:
            through = await response.read()
        direct_url = fleet.url("openai") + "/chat/completions"
        async with session.post(direct_url, json={**body, "model": "frames-n4"}) as response:
            direct = await response.read()

    def drawn(raw: bytes) -> bytes:
        return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb"chatcmpl-[0-9a-f]+", b"chatcmpl-x", raw))

    assert through.endswith(b"\n\ndata: [DONE]\n\n") and drawn(through) == drawn(direct)
