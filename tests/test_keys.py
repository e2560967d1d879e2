"""Gateway keys: every way a key can be refused gets its own status, and no key is ever echoed."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from .conftest import MakeGateway, RunningGateway, model_entry

WEB_KEY = "gw-web-0123456789abcdef"
BATCH_KEY = "gw-batch-fedcba9876543210"
HASHED_KEY = "gw-hashed-aaaabbbbccccdddd"
ADMIN_KEY = "gw-admin-5555666677778888"
BODY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


def _routes(rpm: int = 3) -> dict:
    return {
        "chains": {"main": ["fast"], "spare": ["other"]},
        "default": "main",
        "keys": [
            {"name": "web-app", "key_env": "WEB_APP_KEY", "tier": "standard", "trust_tier_header": True},
            {"name": "batch", "key_env": "BATCH_KEY", "tier": "free", "allow": ["auto", "main"], "rpm": rpm},
            {"name": "hashed", "key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest(), "tier": "premium"},
            {"name": "ops", "key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(), "tier": "free",
             "allow": [], "admin": True},
        ],
        "server": {"decision_log": "DECISIONS"},
    }


@pytest.fixture
async def keyed(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunningGateway:
    monkeypatch.setenv("WEB_APP_KEY", WEB_KEY)
    monkeypatch.setenv("BATCH_KEY", BATCH_KEY)
    routes = _routes()
    routes["server"]["decision_log"] = str(tmp_path / "decisions.jsonl")
    return await make_gateway({"fast": model_entry("fast-n3"), "other": model_entry("other-n3")}, routes)


async def _post(gw: RunningGateway, path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session, \
            session.post(gw.base + path, json=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_missing_and_unknown_keys_get_401(keyed: RunningGateway) -> None:
    status, _, body = await _post(keyed, "/chat/completions", BODY, {})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, body = await _post(keyed, "/chat/completions", BODY, _bearer("gw-not-a-key"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "gw-not-a-key" not in orjson.dumps(body).decode()
    status, _, _ = await _post(keyed, "/chat/completions", BODY, {"Authorization": f"Basic {WEB_KEY}"})
    assert status == 401


async def test_metrics_answer_only_an_admin_key(keyed: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        for headers, status, code in (({}, 401, "invalid_api_key"), (_bearer("gw-not-a-key"), 401, "invalid_api_key"),
                                      (_bearer(WEB_KEY), 403, "admin_required")):
            async with session.get(keyed.url + "/metrics", headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]["code"]) == (status, code), body
                assert "llm_proxy" not in orjson.dumps(body).decode()
        async with session.get(keyed.url + "/metrics", headers=_bearer(ADMIN_KEY)) as resp:
            assert resp.status == 200 and "llm_proxy_requests_total" in await resp.text()
    status, _, body = await _post(keyed, "/chat/completions", BODY, _bearer(ADMIN_KEY))
    assert status == 403, "an admin key with allow: [] reads metrics and spends no model traffic"


async def test_env_and_sha256_keys_are_accepted(keyed: RunningGateway) -> None:
    for key in (WEB_KEY, HASHED_KEY):
        status, headers, body = await _post(keyed, "/chat/completions", BODY, _bearer(key))
        assert status == 200, body
        assert headers["X-Route-Model"] == "fast"


async def test_key_not_allowed_this_model_gets_403(keyed: RunningGateway) -> None:
    status, _, body = await _post(keyed, "/chat/completions", {**BODY, "model": "other"}, _bearer(BATCH_KEY))
    assert status == 403
    assert body["error"]["code"] == "model_not_allowed" and "batch" in body["error"]["message"]
    status, _, _ = await _post(keyed, "/chat/completions", {**BODY, "model": "main"}, _bearer(BATCH_KEY))
    assert status == 200


async def test_tier_header_counts_only_for_trusted_keys(keyed: RunningGateway) -> None:
    premium = {"X-User-Tier": "premium"}
    _, _, trusted = await _post(keyed, "/route", BODY, {**_bearer(WEB_KEY), **premium})
    assert trusted["tier"] == "premium" and trusted["key"] == "web-app"
    status, _, untrusted = await _post(keyed, "/route", BODY, {**_bearer(BATCH_KEY), **premium})
    assert status == 200 and untrusted["tier"] == "free"      # the key's own tier stands


async def test_per_key_rpm_answers_429_with_retry_after(keyed: RunningGateway) -> None:
    for _ in range(3):
        status, _, _ = await _post(keyed, "/chat/completions", BODY, _bearer(BATCH_KEY))
        assert status == 200
    status, headers, body = await _post(keyed, "/chat/completions", BODY, _bearer(BATCH_KEY))
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "key_rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 20          # one request per 20 s at rpm 3
    status, _, _ = await _post(keyed, "/chat/completions", BODY, _bearer(WEB_KEY))
    assert status == 200                                    # other keys have their own bucket


async def test_key_limit_and_breakers_survive_a_reload(keyed: RunningGateway, tmp_path: Path) -> None:
    gateway = keyed.gateway
    for _ in range(3):
        assert (await _post(keyed, "/chat/completions", BODY, _bearer(BATCH_KEY)))[0] == 200
    breaker = gateway.state.breaker("fast/sim-openai/0")
    before = gateway.snapshot
    assert gateway.reload() is True
    assert gateway.snapshot is not before
    assert gateway.state.breaker("fast/sim-openai/0") is breaker
    status, _, _ = await _post(keyed, "/chat/completions", BODY, _bearer(BATCH_KEY))
    assert status == 429                                    # the bucket carried over the reload


async def test_keys_never_reach_the_decision_log(keyed: RunningGateway, tmp_path: Path) -> None:
    for key in (WEB_KEY, BATCH_KEY, "gw-not-a-key"):
        await _post(keyed, "/chat/completions", BODY, _bearer(key))
    await keyed.gateway.decisions.close()
    text = (tmp_path / "decisions.jsonl").read_text()
    assert text.count("\n") == 3
    assert '"key":"web-app"' in text and '"key":"batch"' in text
    for secret in (WEB_KEY, BATCH_KEY, "gw-not-a-key"):
        assert secret not in text


async def test_a_reload_cannot_drop_the_keys_of_a_public_gateway(keyed: RunningGateway) -> None:
    gateway = keyed.gateway
    gateway.keys_required = True            # what `serve` sets when bound beyond loopback with keys
    routes = Path(gateway.snapshot.config.routes_path)
    data = yaml.safe_load(routes.read_text())
    del data["keys"]
    routes.write_text(yaml.safe_dump(data))
    assert gateway.reload() is False
    status, _, _ = await _post(keyed, "/chat/completions", BODY, {})
    assert status == 401                    # still authenticating
    gateway.keys_required = False           # on loopback the same reload is fine
    assert gateway.reload() is True
    status, _, _ = await _post(keyed, "/chat/completions", BODY, {})
    assert status == 200


async def test_models_list_needs_a_key_and_shows_what_it_may_use(keyed: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(keyed.base + "/models") as resp:
            assert resp.status == 401
        async with session.get(keyed.base + "/models", headers=_bearer(BATCH_KEY)) as resp:
            batch = {m["id"] for m in (await resp.json())["data"]}
        async with session.get(keyed.base + "/models", headers=_bearer(WEB_KEY)) as resp:
            web = {m["id"] for m in (await resp.json())["data"]}
    assert batch == {"auto", "main"}
    assert web == {"auto", "main", "spare", "fast", "other"}


async def test_route_answer_carries_the_route_headers(keyed: RunningGateway) -> None:
    status, headers, body = await _post(keyed, "/route", BODY, _bearer(WEB_KEY))
    assert status == 200
    assert (headers["X-Route-Rule"], headers["X-Route-Model"], headers["X-Route-Attempts"]) == ("default", "fast", "0")
    assert headers["X-Route-Provider"] == "sim-openai" and body["candidates"][0]["model"] == "fast"


async def test_an_oversized_announced_body_is_checked_after_the_key_and_recorded(keyed: RunningGateway,
                                                                                tmp_path: Path) -> None:
    port = int(keyed.url.rsplit(":", 1)[1])

    async def status_of(headers: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 999999999\r\nX-Request-Id: big-1\r\n"
                     + headers + b"\r\n")
        await writer.drain()
        line = await reader.readline()
        writer.close()
        return line

    assert (await status_of(b"")).startswith(b"HTTP/1.1 401")
    assert (await status_of(b"Authorization: Bearer " + WEB_KEY.encode() + b"\r\n")).startswith(b"HTTP/1.1 413")
    await keyed.gateway.decisions.flush()
    records = [orjson.loads(line) for line in (tmp_path / "decisions.jsonl").read_bytes().splitlines()]
    assert [(r["request_id"], r["status"]) for r in records if r.get("request_id") == "big-1"] == \
        [("big-1", 401), ("big-1", 413)]


async def test_a_model_is_retrieved_by_any_name_a_request_may_send(keyed: RunningGateway) -> None:
    """`models.retrieve` (openai SDK), with and without /v1: 401 without a key, 404 for a name
    the key may not use, as for one that does not exist."""
    from anthropic import AsyncAnthropic, AuthenticationError
    from anthropic import NotFoundError as AnthropicNotFound
    from openai import AsyncOpenAI, NotFoundError

    for base in (keyed.base, keyed.url):
        web = AsyncOpenAI(base_url=base, api_key=WEB_KEY, max_retries=0)
        fast = await web.models.retrieve("fast")
        assert (fast.id, fast.object, fast.owned_by) == ("fast", "model", "sim-openai")
        assert (await web.models.retrieve("main")).owned_by == "llm-proxy:chain"
        assert (await web.models.retrieve("fast-n3")).owned_by == "sim-openai"     # a deployment's upstream id
        with pytest.raises(NotFoundError):
            await web.models.retrieve("nope")
        assert {m.id async for m in web.models.list()} == {"auto", "main", "spare", "fast", "other"}
        batch = AsyncOpenAI(base_url=base, api_key=BATCH_KEY, max_retries=0)
        assert (await batch.models.retrieve("main")).id == "main"
        with pytest.raises(NotFoundError):
            await batch.models.retrieve("spare")            # exists, but this key may not use it
        await web.close()
        await batch.close()
    async with aiohttp.ClientSession() as session:
        for headers in ({}, _bearer("gw-not-a-key"), {"x-api-key": "gw-not-a-key"}):
            async with session.get(keyed.url + "/models/fast", headers=headers) as resp:
                error = (await resp.json())["error"]
                assert (resp.status, error["type"], error["code"]) == (401, "authentication_error",
                                                                       "invalid_api_key")
        async with session.get(keyed.base + "/models/spare", headers=_bearer(BATCH_KEY)) as resp:
            error = (await resp.json())["error"]
            assert (resp.status, error["code"], error["param"]) == (404, "model_not_found", "model")
    # The Anthropic SDK's `models.retrieve`, with the key as x-api-key (Claude Code's header).
    claude = AsyncAnthropic(base_url=keyed.url, api_key=None, default_headers={"x-api-key": WEB_KEY}, max_retries=0)
    info = await claude.models.retrieve("fast")
    assert (info.id, info.type, info.display_name) == ("fast", "model", "fast")
    await claude.close()
    # Its refusals come in Anthropic's shape, which its SDK turns into its own exceptions.
    stranger = AsyncAnthropic(base_url=keyed.url, api_key=None, default_headers={"x-api-key": "gw-not-a-key"},
                              max_retries=0)
    with pytest.raises(AuthenticationError) as refused:
        await stranger.models.retrieve("fast")
    assert refused.value.body["error"]["type"] == "authentication_error"   # type: ignore[index]
    await stranger.close()
    claude = AsyncAnthropic(base_url=keyed.url, api_key=None, default_headers={"x-api-key": BATCH_KEY}, max_retries=0)
    with pytest.raises(AnthropicNotFound) as missing:
        await claude.models.retrieve("spare")
    assert missing.value.body["type"] == "error"   # type: ignore[index]
    listed = await claude.models.list()             # Anthropic's paging fields, only what the key may name
    assert ([m.id for m in listed.data], listed.has_more, listed.last_id) == (["auto", "main"], False, "main")
    await claude.close()
