"""Exactly one decision record per chat request, whatever happens, consistent with the answer.

Real sockets: the simulator, a real gateway, an aiohttp client (and a raw socket for a
client that leaves halfway through its body).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.balancer import Balancer
from proxy.config import Price
from proxy.decisions import AttemptRecord, Decision, DecisionLog
from proxy.simulator import canonical_text

from .conftest import ROOT, model_entry
from .decision_log_support import decisions_in, read_lines, settled_records

GATEWAY_KEY = "gw-test-key-7f3a9c"
LIMITED_KEY = "gw-limited-key-21b0"
MESSAGES = [{"role": "user", "content": "Say something about foxes and dogs."}]


def _models() -> dict[str, Any]:
    return {
        "plain": model_entry("plain-n5"),
        "broken": model_entry("broken-500"),
        "slow": model_entry("slow-n40-gap50"),
        "cut": model_entry("cut-cut3"),
        "dead": model_entry("dead-503"),
        "pricey": model_entry("pricey", price={"input": 1000.0, "output": 1000.0}),
    }


def _routes(log: Path) -> dict[str, Any]:
    return {
        "chains": {"main": ["plain"], "rescue": ["broken", "plain"]},
        "default": "main",
        "keys": [
            {"name": "tester", "key_env": "TEST_GATEWAY_KEY", "tier": "standard", "trust_tier_header": True},
            {"name": "limited", "key_env": "TEST_LIMITED_KEY", "tier": "free", "allow": ["plain"]},
        ],
        "server": {"decision_log": str(log), "max_body_bytes": 2048},
    }


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GATEWAY_KEY", GATEWAY_KEY)
    monkeypatch.setenv("TEST_LIMITED_KEY", LIMITED_KEY)


class Seen:
    """What the client observed for one request, to compare with its record."""

    def __init__(self, rid: str, status: int, headers: Mapping[str, str], outcome: str) -> None:
        self.rid, self.status, self.headers, self.outcome = rid, status, headers, outcome


async def _send(session: aiohttp.ClientSession, url: str, rid: str, outcome: str, *, body: Any = None,
                raw: bytes | None = None, key: str | None = GATEWAY_KEY, headers: dict[str, str] | None = None,
                disconnect_after_first_chunk: bool = False) -> Seen:
    h = {"X-Request-Id": rid, **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"data": raw, "headers": {**h, "Content-Type": "application/json"}} \
        if raw is not None else {"json": body, "headers": h}
    async with session.post(url + "/v1/chat/completions", **kwargs) as response:
        seen = Seen(rid, response.status, response.headers.copy(), outcome)
        if disconnect_after_first_chunk:
            await response.content.readline()
            response.close()
        else:
            await response.read()
    return seen


async def _leave_during_body(url: str, rid: str) -> None:
    """Headers and half the promised body, then the connection closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {GATEWAY_KEY}\r\nX-Request-Id: {rid}\r\nContent-Length: 900\r\n\r\n"
                 '{"model": "plain", "messages": ['.encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await writer.wait_closed()


async def test_every_request_leaves_exactly_one_consistent_record(make_gateway, tmp_path: Path, keys: None) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway(_models(), _routes(log))
    plain = {"model": "plain", "messages": MESSAGES}
    stream = {**plain, "stream": True}
    async with aiohttp.ClientSession() as s:
        sent = [
            await _send(s, gw.url, "r-plain", "ok", body=plain),
            await _send(s, gw.url, "r-stream", "ok", body=stream),
            await _send(s, gw.url, "r-fallback", "ok", body={"model": "rescue", "messages": MESSAGES}),
            await _send(s, gw.url, "r-fallback-stream", "ok", body={"model": "rescue", "messages": MESSAGES,
                                                                    "stream": True}),
            await _send(s, gw.url, "r-midstream", "stream_error", body={**stream, "model": "cut"}),
            await _send(s, gw.url, "r-gone", "client_disconnected", body={**stream, "model": "slow"},
                        disconnect_after_first_chunk=True),
            await _send(s, gw.url, "r-badjson", "bad_request", raw=b'{"model": "plain", "messages": ['),
            await _send(s, gw.url, "r-nomessages", "bad_request", body={"model": "plain"}),
            await _send(s, gw.url, "r-toolarge", "bad_request",
                        body={"model": "plain", "messages": [{"role": "user", "content": "x" * 4000}]}),
            await _send(s, gw.url, "r-nocandidate", "no_candidate", body={"model": "pricey", "messages": MESSAGES},
                        headers={"X-Max-Cost-USD": "0.000001"}),
            await _send(s, gw.url, "r-unknown", "not_found", body={"model": "nope", "messages": MESSAGES}),
            await _send(s, gw.url, "r-nokey", "unauthorized", body=plain, key=None),
            await _send(s, gw.url, "r-wrongkey", "unauthorized", body=plain, key="not-a-key"),
            await _send(s, gw.url, "r-forbidden", "forbidden", body={"model": "cut", "messages": MESSAGES},
                        key=LIMITED_KEY),
            await _send(s, gw.url, "r-dead", "upstream_failed", body={"model": "dead", "messages": MESSAGES}),
        ]
        generated = await _send(s, gw.url, "", "ok", body=plain)     # no id given: the gateway makes one
        await _leave_during_body(gw.url, "r-left-in-body")

    expected = len(sent) + 2
    records = await settled_records(gw.gateway, log, expected)
    assert len(records) == expected, [r["request_id"] for r in records]
    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == expected

    generated_id = generated.headers["X-Request-Id"]
    assert generated_id.startswith("req_") and by_id[generated_id]["outcome"] == "ok"
    left = by_id["r-left-in-body"]
    assert (left["outcome"], left["status"], left["attempts"]) == ("client_disconnected", 499, [])

    for seen in sent:
        record = by_id[seen.rid]
        assert seen.headers["X-Request-Id"] == seen.rid
        assert record["outcome"] == seen.outcome, (seen.rid, record)
        assert record["status"] == seen.status, seen.rid
        assert len(record["attempts"]) == int(seen.headers["X-Route-Attempts"]), seen.rid
        attempted = record["served_model"] or (record["attempts"][-1]["model"] if record["attempts"] else "none")
        assert seen.headers["X-Route-Model"] == attempted, seen.rid
        assert seen.headers["X-Route-Rule"] == (record["rule"] or "none"), seen.rid
        assert record["type"] == "decision" and record["time"].endswith("Z")

    fallback = by_id["r-fallback"]
    assert [a["model"] for a in fallback["attempts"]][-1] == "plain" and fallback["attempts"][0]["failure"]
    assert by_id["r-toolarge"]["status"] == 413
    assert "pricey" in str(by_id["r-nocandidate"]["skipped"])
    assert by_id["r-nokey"]["key"] is None and by_id["r-plain"]["key"] == "tester"
    assert by_id["r-forbidden"]["key"] == "limited" and by_id["r-forbidden"]["tier"] == "free"
    gone = by_id["r-gone"]
    assert gone["served_model"] == "slow" and gone["attempts"][0]["failure"] == "client_disconnected"
    assert gone["cost_usd"] > 0 and gone["cost_estimated"] and gone["wasted_cost_usd"] == 0
    assert by_id["r-midstream"]["served_model"] == "cut"


async def test_cost_is_real_when_usage_came_back_and_estimated_only_when_it_did_not(
        make_gateway, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    models = {"plain": model_entry("plain-n5"), "mute": model_entry("mute-n8-nousage"),
              "cut": model_entry("cut-cut3"), "broken": model_entry("broken-500")}
    gw = await make_gateway(models, {"chains": {"main": ["plain"]}, "default": "main",
                                     "server": {"decision_log": str(log)}})
    async with aiohttp.ClientSession() as s:
        for rid, model, stream in (("real", "plain", False), ("mute", "mute", False), ("mute-s", "mute", True),
                                   ("cut", "cut", True), ("broken", "broken", False)):
            await _send(s, gw.url, rid, "", body={"model": model, "messages": MESSAGES, "stream": stream}, key=None)
    by_id = {r["request_id"]: r for r in await settled_records(gw.gateway, log, 5)}
    price_in, price_out = 1.0, 2.0      # model_entry's price, USD per million tokens

    real = by_id["real"]
    assert not real["cost_estimated"] and real["output_tokens"] == 5
    assert real["cost_usd"] == pytest.approx((real["input_tokens"] * price_in + 5 * price_out) / 1e6)

    # No usage: the router's input estimate and a token per 4 characters of the answer.
    text_chars = len("".join(canonical_text(8)))         # what the simulator answers with n8
    for rid in ("mute", "mute-s"):
        mute = by_id[rid]
        input_estimate = mute["signals"]["input_tokens"]
        assert mute["cost_estimated"] and mute["output_tokens"] == (text_chars + 3) // 4
        assert mute["cost_usd"] == pytest.approx((input_estimate * price_in + (text_chars + 3) // 4 * price_out) / 1e6)

    cut = by_id["cut"]          # broke after 3 words: billed, abandoned, so all of it is wasted
    assert cut["outcome"] == "stream_error" and cut["cost_estimated"]
    assert cut["attempts"][0]["wasted"] and cut["wasted_cost_usd"] == cut["cost_usd"] > 0
    assert cut["attempts"][0]["output_tokens"] == (len("".join(canonical_text(3))) + 3) // 4

    broken = by_id["broken"]    # failed before any content: not billed
    assert broken["outcome"] == "upstream_failed"
    assert broken["cost_usd"] == 0 and broken["wasted_cost_usd"] == 0 and not broken["cost_estimated"]
    assert all(a["cost_usd"] == 0 and not a["wasted"] for a in broken["attempts"])


async def test_a_continued_stream_bills_the_broken_attempt_as_waste(make_gateway, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    models = {"cut": model_entry("cut-cut3"), "plain": model_entry("plain-n12",
                                                                    capabilities=["prefill"])}
    gw = await make_gateway(models, {"chains": {"main": {"models": ["cut", "plain"], "on_stream_failure": "continue"}},
                                     "default": "main", "server": {"decision_log": str(log)}})
    async with aiohttp.ClientSession() as s:
        seen = await _send(s, gw.url, "cont", "ok", body={"model": "auto", "messages": MESSAGES, "stream": True},
                           key=None)
    [record] = await settled_records(gw.gateway, log, 1)
    assert seen.status == 200 and record["outcome"] == "ok" and record["served_model"] == "plain"
    first, second = record["attempts"]
    assert first["wasted"] and first["cost_usd"] > 0 and not second["wasted"]
    assert record["wasted_cost_usd"] == pytest.approx(first["cost_usd"])
    assert record["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])


async def test_a_model_name_of_a_megabyte_is_kept_short_in_the_record_and_on_the_page(
        make_gateway, tmp_path: Path) -> None:
    """The record, the page's ring of the last 1,000 and its frames must not hold what a
    client sends at the size it sends it: a model name (and the error and reason quoting it)."""
    log = tmp_path / "decisions.jsonl"
    routes = {"chains": {"main": ["fast"]}, "default": "main", "aliases": {"fast-*": "fast"},
              "server": {"decision_log": str(log)}}
    gw = await make_gateway({"fast": model_entry("fast-n2")}, routes)
    long_name = "m" * 1_000_000
    async with aiohttp.ClientSession() as session:
        for model, status in ((long_name, 404), ("fast-" + long_name, 200)):   # unknown; an alias's pattern
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(gw.base + "/chat/completions", json=body) as resp:
                assert resp.status == status
                await resp.read()
        async with session.get(gw.url + "/dashboard/state") as resp:
            page = await resp.read()
    records = await settled_records(gw.gateway, log, 2)
    assert [r["status"] for r in records] == [404, 200]
    for record in records:
        assert len(record["requested_model"]) <= 256
        assert len(orjson.dumps(record)) < 16_000, {k: len(str(v)) for k, v in record.items()}
    assert len(page) < 200_000


async def test_rename_then_reopen_rotates_without_losing_a_record(make_gateway, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway({"plain": model_entry("plain-n3-gap5")},
                            {"chains": {"main": ["plain"]}, "default": "main", "server": {"decision_log": str(log)}})
    rotated = tmp_path / "decisions.jsonl.1"
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            await _send(s, gw.url, f"rot-{i}", "ok", body={"model": "plain", "messages": MESSAGES,
                                                           "stream": i % 2 == 0}, key=None)
        first = [asyncio.create_task(one(i)) for i in range(20)]
        await asyncio.sleep(0.02)
        os.rename(log, rotated)                 # what logrotate does, then SIGHUP -> reload -> reopen
        assert gw.gateway.reload()
        second = [asyncio.create_task(one(i)) for i in range(20, 30)]
        await asyncio.gather(*first, *second)
    await gw.gateway.decisions.flush()
    old, new = decisions_in(rotated), decisions_in(log)
    ids = sorted(r["request_id"] for r in old + new)
    assert ids == sorted(f"rot-{i}" for i in range(30))
    assert new, "records after the reopen go to the fresh file"
    assert {r["request_id"] for r in new} >= {f"rot-{i}" for i in range(20, 30)}


async def test_shutdown_writes_every_queued_record(fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import config as config_module

    from .conftest import serve, write_config

    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim")
    log = tmp_path / "decisions.jsonl"
    p, r = write_config(tmp_path, fleet, {"plain": model_entry("plain-n2")},
                        {"chains": {"main": ["plain"]}, "default": "main", "server": {"decision_log": str(log)}})
    running, runner = await serve(config_module.load(p, r))
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(_send(s, running.url, f"s-{i}", "ok", body={"model": "plain", "messages": MESSAGES},
                                     key=None) for i in range(25)))
    await runner.cleanup()          # no flush first: closing must drain the queue
    assert sorted(r["request_id"] for r in read_lines(log)) == sorted(f"s-{i}" for i in range(25))


async def test_a_gateway_bug_still_answers_in_openai_shape_and_leaves_one_record(
        make_gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_choice(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug inside the attempt loop")

    monkeypatch.setattr(Balancer, "choose", broken_choice)
    log = tmp_path / "decisions.jsonl"
    gw = await make_gateway({"plain": model_entry("plain")}, {"chains": {"main": ["plain"]}, "default": "main",
                                                             "server": {"decision_log": str(log)}})
    async with aiohttp.ClientSession() as s:
        for rid, stream in (("bug", False), ("bug-s", True)):
            async with s.post(gw.base + "/chat/completions", headers={"X-Request-Id": rid},
                              json={"model": "plain", "messages": MESSAGES, "stream": stream}) as r:
                assert r.status == 500 and r.headers["X-Request-Id"] == rid
                assert (await r.json())["error"]["code"] == "internal_error"
    records = await settled_records(gw.gateway, log, 2)
    assert sorted((x["request_id"], x["outcome"], x["status"]) for x in records) == [
        ("bug", "internal_error", 500), ("bug-s", "internal_error", 500)]


def test_report_reads_a_log_written_by_the_gateway(tmp_path: Path) -> None:
    """The report and the log agree on the schema: feed it records written by DecisionLog."""
    log = tmp_path / "decisions.jsonl"

    async def write() -> None:
        writer = DecisionLog(str(log))
        writer.start()
        for i in range(4):
            d = Decision(f"w{i}", 0.0)
            d.tier, d.rule, d.signals, d.served_model, d.duration_ms = "free", "short", {"input_tokens": 400}, "m", 5.0
            attempt = AttemptRecord("m", "m/p/0", "p", 0.0, Price(**model_entry("x")["price"]))
            attempt.content_seen, attempt.output_chars = True, 400
            d.attempts.append(attempt)
            d.settle()
            writer.record(d)
        writer.record({"type": "feedback", "request_id": "w0", "score": 0.5, "tier": "free", "model": "m",
                       "rule": "short"})
        await writer.close()

    asyncio.run(write())
    done = subprocess.run([sys.executable, "-m", "proxy", "report", "--json", str(log)], cwd=ROOT,
                          capture_output=True, timeout=30, check=True)
    [week] = orjson.loads(done.stdout)["weeks"]
    assert week["all"]["requests"] == 4 and week["tier"]["free"]["quality"] == 0.5
    # 400 input tokens at $1/M and 100 estimated output tokens at $2/M, per request
    assert week["model"]["m"]["avg_cost_usd"] == pytest.approx((400 * 1.0 + 100 * 2.0) / 1e6)


async def test_close_drains_a_full_queue_and_a_late_record_is_still_written(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    writer = DecisionLog(str(log))
    writer.start()
    for i in range(500):                    # queued with no await in between: the writer has written nothing
        writer.record(Decision(f"q{i}", 0.0))
    assert writer.written == 0
    await writer.close()
    writer.record(Decision("late", 0.0))    # a request that outlived the drain
    assert [r["request_id"] for r in decisions_in(log)] == [f"q{i}" for i in range(500)] + ["late"]
