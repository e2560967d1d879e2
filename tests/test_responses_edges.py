"""`/v1/responses` when things go wrong: failover before the commit, a cut after it, every
refusal in OpenAI's error shape, and the stored state (key scope, store: false, delete, TTL).
Each POST leaves one decision record naming the API."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from openai import APIError, AsyncOpenAI, BadRequestError

from proxy.simulator import canonical_text
from proxy.sse import SSEParser

from .conftest import MakeGateway, RunningGateway, model_entry
from .decision_log_support import settled_records
from .test_shared_state import two_gateways

WEB_KEY, BATCH_KEY = "gw-web-0123456789abcdef", "gw-batch-fedcba9876543210"
ASK = {"model": "main", "input": "hello"}


async def post(gw: RunningGateway, body: Any, key: str | None = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    async with aiohttp.ClientSession() as session, session.post(
            gw.base + "/responses", data=raw if raw is not None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **headers}) as response:
        return response.status, response.headers.copy(), await response.read()


async def call(gw: RunningGateway, method: str, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.request(method, gw.base + path, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


def events(raw: bytes) -> list[dict[str, Any]]:
    parsed = SSEParser().feed(raw)
    out = [orjson.loads(e.data) for e in parsed]
    assert [e.name for e in parsed] == [e["type"] for e in out]     # `event:` names the type
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def openai_error(body: bytes) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


@pytest.fixture(params=("openai", "anthropic", "gemini"))
async def logged(make_gateway: MakeGateway, tmp_path: Path, request: pytest.FixtureRequest
                 ) -> tuple[RunningGateway, Path]:
    """Each upstream protocol in turn: the failures are detected in its own stream format."""
    log = tmp_path / "decisions.jsonl"
    provider = f"sim-{request.param}"
    models = {"flaky": model_entry("r-500", provider), "inband": model_entry("r-inband", provider),
              "cut": model_entry("r-n8-cut3", provider), "ok": model_entry("r-n4", provider)}
    routes = {"chains": {"main": ["flaky", "inband", "ok"], "plain": ["flaky", "ok"], "cutting": ["cut"]},
              "default": "main", "server": {"decision_log": str(log)}}
    return await make_gateway(models, routes), log


async def test_failover_before_the_first_content_is_invisible(logged: tuple[RunningGateway, Path]) -> None:
    gw, log = logged
    status, headers, raw = await post(gw, {**ASK, "stream": True})
    # A 500, then an error inside a stream that had begun (each retried once): none is seen.
    assert status == 200 and headers["X-Route-Model"] == "ok" and headers["X-Route-Attempts"] == "5"
    stream = events(raw)
    assert stream[0]["type"] == "response.created" and stream[-1]["type"] == "response.completed"
    assert [e["type"] for e in stream].count("response.created") == 1
    text = "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta")
    assert text == "".join(canonical_text(4)) == stream[-1]["response"]["output"][0]["content"][0]["text"]
    assert not any("fail" in e["type"] or "error" in e["type"] for e in stream)
    status, headers, raw = await post(gw, {**ASK, "model": "plain"})       # an in-band error is a stream's
    assert status == 200 and orjson.loads(raw)["output"][0]["content"][0]["text"] == text
    records = await settled_records(gw.gateway, log, 2)
    assert [(r["api"], r["outcome"], len(r["attempts"])) for r in records] == [("responses", "ok", 5),
                                                                               ("responses", "ok", 3)]


async def test_a_cut_after_the_first_content_ends_with_response_failed(logged: tuple[RunningGateway, Path]) -> None:
    gw, log = logged
    status, headers, raw = await post(gw, {**ASK, "model": "cutting", "stream": True})
    assert status == 200
    stream = events(raw)
    kinds = [e["type"] for e in stream]
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
    assert kinds.count("response.output_text.delta") == 3
    assert stream[-2]["error"]["code"] == stream[-2]["code"] == "stream_protocol"
    failed = stream[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "upstream stream failed" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "".join(canonical_text(3))
    assert failed["output"][0]["status"] == "incomplete"
    [record] = await settled_records(gw.gateway, log, 1)
    assert record["api"] == "responses" and record["outcome"] == "stream_error"
    status, _ = await call(gw, "GET", f"/responses/{failed['id']}")
    assert status == 404                                    # a failed response is not kept
    client = AsyncOpenAI(base_url=gw.base, api_key="unused", max_retries=0)
    seen: list[str] = []
    with pytest.raises(APIError, match="upstream stream failed"):     # the SDK raises, never a quiet end
        async with client.responses.stream(model="cutting", input="hello") as sdk_stream:
            async for event in sdk_stream:
                seen.append(event.type)
    await client.close()
    assert seen.count("response.output_text.delta") == 3 and "response.completed" not in seen


async def test_a_chain_that_continues_finishes_the_same_response(make_gateway: MakeGateway) -> None:
    models = {"cut": model_entry("c-n8-cut3", capabilities=["prefill"]),
              "rest": model_entry("c-n8", capabilities=["prefill"])}
    gw = await make_gateway(models, {"chains": {"main": {"models": ["cut", "rest"], "on_stream_failure": "continue"}},
                                     "default": "main"})
    status, _, raw = await post(gw, {**ASK, "stream": True})
    stream = events(raw)
    assert stream[-1]["type"] == "response.completed"
    assert [e["type"] for e in stream].count("response.output_item.added") == 1
    assert stream[-1]["response"]["output"][0]["content"][0]["text"] == "".join(canonical_text(8))


async def test_every_status_of_the_chat_path_in_openai_shape(make_gateway: MakeGateway, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_APP_KEY", WEB_KEY)
    monkeypatch.setenv("BATCH_KEY", BATCH_KEY)
    log = tmp_path / "decisions.jsonl"
    models = {"ok": model_entry("e-n3"), "limited": model_entry("e-429-ra0"), "broken": model_entry("e-500"),
              "silent": model_entry("e-hang")}
    routes = {"chains": {"main": ["ok"], "limits": ["limited"], "down": ["broken"], "slow": ["silent"]},
              "default": "main",
              "keys": [{"name": "web", "key_env": "WEB_APP_KEY", "tier": "standard"},
                       {"name": "batch", "key_env": "BATCH_KEY", "tier": "free", "allow": ["main"], "rpm": 2}],
              "server": {"decision_log": str(log), "max_body_bytes": 2048}}
    gw = await make_gateway(models, routes, timeouts={"connect_s": 1, "first_token_s": 0.3, "idle_s": 1,
                                                     "total_s": 0.3})
    expected = [
        (await post(gw, ASK), 401, "invalid_api_key"),
        (await post(gw, ASK, "gw-unknown"), 401, "invalid_api_key"),
        (await post(gw, {**ASK, "model": "ok"}, BATCH_KEY), 403, "model_not_allowed"),
        (await post(gw, ASK, BATCH_KEY), 200, None),
        (await post(gw, ASK, BATCH_KEY), 200, None),       # the 403 cost the key nothing (rpm 2)
        (await post(gw, ASK, BATCH_KEY), 429, "key_rate_limited"),
        (await post(gw, {**ASK, "model": "nope"}, WEB_KEY), 404, "model_not_found"),
        (await post(gw, {**ASK, "input": "x" * 4096}, WEB_KEY), 413, "request_too_large"),
        (await post(gw, None, WEB_KEY, raw=b'{"model": "main", "input": '), 400, "invalid_json"),
        (await post(gw, {**ASK, "model": "limits"}, WEB_KEY), 429, "rate_limited"),
        (await post(gw, {**ASK, "model": "down", "stream": True}, WEB_KEY), 502, "upstream_failed"),
        (await post(gw, {**ASK, "model": "slow"}, WEB_KEY), 504, "upstream_timeout"),
        (await post(gw, ASK, WEB_KEY, headers={"X-Max-Cost-USD": "0.0000000001"}), 400, "no_candidate"),
        (await post(gw, {**ASK, "previous_response_id": "resp_nope"}, WEB_KEY), 404,
         "previous_response_not_found"),
    ]
    for (status, headers, body), want_status, want_code in expected:
        assert status == want_status, body
        assert "X-Request-Id" in headers
        if want_code is not None:
            assert openai_error(body)["code"] == want_code
            assert WEB_KEY not in body.decode() and "sk-sim" not in body.decode()
    assert expected[5][0][1]["Retry-After"]
    records = await settled_records(gw.gateway, log, len(expected))
    assert len(records) == len(expected) and {r["api"] for r in records} == {"responses"}
    assert [r["status"] for r in records] == [status for _, status, _ in expected]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "main"}, "input"),
    ({"input": "hi"}, "model"),
    ({**ASK, "stream": "yes"}, "stream"),
    ({**ASK, "input": 42}, "input"),
    ({**ASK, "input": [{"type": "message", "role": "robot", "content": "hi"}]}, "input[0].role"),
    ({**ASK, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type"),
    ({**ASK, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({**ASK, "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({**ASK, "tools": [{"type": "function"}]}, "tools[0].name"),
    ({**ASK, "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({**ASK, "max_output_tokens": 0}, "max_output_tokens"),
    ({**ASK, "background": True}, "background"),
    ([ASK], None),
])
async def test_bad_input_is_400_naming_the_field(make_gateway: MakeGateway, body: Any, param: str | None) -> None:
    gw = await make_gateway({"ok": model_entry("b-n3")}, {"chains": {"main": ["ok"]}, "default": "main"})
    status, _, raw = await post(gw, body)
    assert status == 400
    error = openai_error(raw)
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def two_keys(make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, upstream: str,
                   second: str) -> RunningGateway:
    """A gateway with key "web" (WEB_KEY) and a second key named `second` (BATCH_KEY)."""
    monkeypatch.setenv("WEB_APP_KEY", WEB_KEY)
    monkeypatch.setenv("BATCH_KEY", BATCH_KEY)
    return await make_gateway({"ok": model_entry(upstream)}, {
        "chains": {"main": ["ok"]}, "default": "main",
        "keys": [{"name": "web", "key_env": "WEB_APP_KEY", "tier": "standard"},
                 {"name": second, "key_env": "BATCH_KEY", "tier": "free"}]})


async def test_stored_responses_are_scoped_to_the_key(make_gateway: MakeGateway,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await two_keys(make_gateway, monkeypatch, "s-n3", "batch")
    _, _, raw = await post(gw, ASK, WEB_KEY)
    rid = orjson.loads(raw)["id"]
    assert (await call(gw, "GET", f"/responses/{rid}", WEB_KEY))[1]["id"] == rid
    for method in ("GET", "DELETE"):                        # the key first, in OpenAI's shape
        for key in (None, "gw-unknown"):
            status, body = await call(gw, method, f"/responses/{rid}", key)
            assert status == 401 and openai_error(orjson.dumps(body))["code"] == "invalid_api_key"
    client = AsyncOpenAI(base_url=gw.base, api_key=WEB_KEY, max_retries=0)
    with pytest.raises(BadRequestError) as refused:         # not a JSON body the SDK reads as an empty stream
        await client.responses.retrieve(rid, stream=True)
    await client.close()
    assert openai_error(refused.value.response.content)["param"] == "stream"
    status, body = await call(gw, "GET", f"/responses/{rid}", BATCH_KEY)
    assert status == 404 and openai_error(orjson.dumps(body))["code"] == "response_not_found"
    status, _, raw = await post(gw, {**ASK, "previous_response_id": rid}, BATCH_KEY)
    assert status == 404 and openai_error(raw)["param"] == "previous_response_id"
    status, body = await call(gw, "DELETE", f"/responses/{rid}", BATCH_KEY)
    assert status == 404 and openai_error(orjson.dumps(body))["code"] == "response_not_found"
    assert (await call(gw, "DELETE", f"/responses/{rid}", WEB_KEY))[1] == {
        "id": rid, "object": "response.deleted", "deleted": True}
    assert (await call(gw, "GET", f"/responses/{rid}", WEB_KEY))[0] == 404
    status, _, raw = await post(gw, {**ASK, "previous_response_id": rid}, WEB_KEY)
    assert status == 404 and openai_error(raw)["code"] == "previous_response_not_found"


async def test_key_names_holding_a_slash_keep_their_stores_apart(make_gateway: MakeGateway,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Key "web" keeps its output items under items/<id>; key "web/items" must not reach one by
    asking for a response of that id."""
    gw = await two_keys(make_gateway, monkeypatch, "slash-n3", "web/items")
    _, _, raw = await post(gw, ASK, WEB_KEY)
    item_id = orjson.loads(raw)["output"][0]["id"]
    status, body = await call(gw, "GET", f"/responses/{item_id}", BATCH_KEY)
    assert status == 404 and body["error"]["code"] == "response_not_found"
    status, _, raw = await post(gw, {**ASK, "previous_response_id": item_id}, BATCH_KEY)
    assert status == 404


async def test_store_false_keeps_nothing_and_entries_expire(make_gateway: MakeGateway) -> None:
    gw = await make_gateway({"ok": model_entry("t-n3")}, {"chains": {"main": ["ok"]}, "default": "main"})
    _, _, raw = await post(gw, {**ASK, "store": False, "stream": True})
    unstored = events(raw)[-1]["response"]
    assert unstored["store"] is False
    assert (await call(gw, "GET", f"/responses/{unstored['id']}"))[0] == 404
    assert (await post(gw, {**ASK, "previous_response_id": unstored["id"]}))[0] == 404
    _, _, raw = await post(gw, {**ASK, "stream": True})
    kept = events(raw)[-1]["response"]
    assert (await post(gw, {**ASK, "previous_response_id": kept["id"]}))[0] == 200
    memos = gw.gateway.state                # the memory backend: its clock decides expiry
    real_clock = memos.clock                # type: ignore[attr-defined]
    memos.clock = lambda: real_clock() + gw.gateway.snapshot.config.server.responses_ttl_s + 1
    status, _, raw = await post(gw, {**ASK, "previous_response_id": kept["id"]})
    assert status == 404 and "expired" in openai_error(raw)["message"]


async def test_item_references_replay_stored_output_items(make_gateway: MakeGateway, fleet: Any) -> None:
    """What the Vercel AI SDK sends by default for earlier assistant turns: references to the
    output items of stored responses, which the gateway replaces with the items themselves."""
    gw = await make_gateway({"ok": model_entry("i-n3"), "tools": model_entry("tools")},
                            {"chains": {"main": ["ok"]}, "default": "main"})
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    _, _, raw = await post(gw, {**ASK, "input": "Hi, I am Ada."})
    [message] = orjson.loads(raw)["output"]
    _, _, raw = await post(gw, {"model": "tools", "input": "Weather?", "tools": [tool], "stream": True})
    [fcall] = events(raw)[-1]["response"]["output"]
    status, _, raw = await post(gw, {**ASK, "tools": [tool], "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi, I am Ada."}]},
        {"type": "item_reference", "id": message["id"]},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "item_reference", "id": fcall["id"]},
        {"type": "function_call_output", "call_id": fcall["call_id"], "output": "18 C"}]})
    assert status == 200, raw
    sent = fleet.sim.requests_for("i-n3")[-1].body["messages"]
    assert sent[1] == {"role": "assistant", "content": message["content"][0]["text"]}
    assert sent[3]["tool_calls"][0]["id"] == fcall["call_id"] and sent[4]["content"] == "18 C"
    status, _, raw = await post(gw, {**ASK, "input": [{"type": "item_reference", "id": "msg_gone"}]})
    assert status == 404 and openai_error(raw)["code"] == "item_not_found"
    assert openai_error(raw)["param"] == "input[0].id"
    _, _, raw = await post(gw, {**ASK, "input": "again"})
    stored = orjson.loads(raw)
    assert (await call(gw, "DELETE", f"/responses/{stored['id']}"))[0] == 200
    status, _, raw = await post(gw, {**ASK, "input": [{"type": "item_reference", "id": stored["output"][0]["id"]}]})
    assert status == 404                                    # its items went with the response


async def test_item_references_are_bounded_before_any_is_looked_up(make_gateway: MakeGateway) -> None:
    """Every reference is a read of the state store (a Redis round trip when shared): one body of
    a few MB could name 100,000 of them. More than `max_messages` is a 400 before any read."""
    gw = await make_gateway({"ok": model_entry("j-n3")},
                            {"chains": {"main": ["ok"]}, "default": "main", "server": {"max_messages": 4}})
    reads: list[str] = []
    recall = gw.gateway.state.recall

    async def counted(scope: str, key: str) -> bytes | None:
        reads.append(key)
        return await recall(scope, key)

    gw.gateway.state.recall = counted       # type: ignore[method-assign]
    references = [{"type": "item_reference", "id": f"msg_{i}"} for i in range(5)]
    status, _, raw = await post(gw, {**ASK, "input": references})
    assert status == 400 and openai_error(raw)["param"] == "input" and reads == []
    status, _, raw = await post(gw, {**ASK, "input": references[:4]})
    assert status == 404 and openai_error(raw)["code"] == "item_not_found" and len(reads) == 4


async def test_an_id_the_gateway_never_issued_is_a_404_not_a_lookup(make_gateway: MakeGateway) -> None:
    """Items are stored beside responses (`items/<id>`): an id with a slash must not read an
    item as a response (that was a 500), on a follow-up, a read or a delete."""
    gw = await make_gateway({"ok": model_entry("k-n3")}, {"chains": {"main": ["ok"]}, "default": "main"})
    _, _, raw = await post(gw, ASK)
    item = "items/" + orjson.loads(raw)["output"][0]["id"]
    status, _, raw = await post(gw, {**ASK, "previous_response_id": item})
    assert status == 404 and openai_error(raw)["code"] == "previous_response_not_found"
    for method in ("GET", "DELETE"):
        status, body = await call(gw, method, "/responses/" + item.replace("/", "%2F"))
        assert status == 404 and body["error"]["code"] == "response_not_found"


async def test_stored_responses_are_shared_through_redis(make_gateway: MakeGateway, redis_server: Any) -> None:
    """Two instances on one Redis: a follow-up, a reference and a read may reach either, at once
    (the store is written before the client sees the end, so no wait is needed)."""
    one, two = await two_gateways(make_gateway, redis_server, {"ok": model_entry("r-n3")})
    _, _, raw = await post(one, {"model": "ok", "input": "Hi, I am Ada.", "stream": True})
    first = events(raw)[-1]["response"]
    status, _, raw = await post(two, {"model": "ok", "input": "Who am I?", "previous_response_id": first["id"]})
    assert status == 200, raw
    status, _, raw = await post(two, {"model": "ok", "input": [
        {"type": "item_reference", "id": first["output"][0]["id"]}, {"role": "user", "content": "And?"}]})
    assert status == 200, raw
    assert (await call(two, "GET", f"/responses/{first['id']}"))[1]["output"] == first["output"]
    assert (await call(two, "DELETE", f"/responses/{first['id']}"))[0] == 200
    assert (await call(one, "GET", f"/responses/{first['id']}"))[0] == 404
