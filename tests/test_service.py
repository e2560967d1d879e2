"""The gateway as a real process: reload under load, a broken reload, drain on SIGTERM, workers.

Each test runs the simulator in its own event loop and `python -m proxy serve` as a
subprocess on config files from `write_config`; everything is bounded in time and the
subprocess is always killed at the end (fixture `spawn_gateway`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from .conftest import Fleet, GatewayProcess, SpawnGateway, child_pids, model_entry, write_config

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "hello"}]
STREAM_TIMEOUTS = {"connect_s": 1, "first_token_s": 3, "idle_s": 5, "total_s": 60}


async def _chat(session: aiohttp.ClientSession, gw: GatewayProcess, model: str = "auto", stream: bool = False
                ) -> tuple[int, str, str]:
    """(status, X-Route-Model, body text)."""
    async with session.post(gw.url + "/v1/chat/completions",
                            json={"model": model, "stream": stream, "messages": MESSAGES}) as resp:
        return resp.status, resp.headers.get("X-Route-Model", ""), await resp.text()


async def _open_stream(session: aiohttp.ClientSession, gw: GatewayProcess, model: str
                       ) -> tuple[aiohttp.ClientResponse, bytes]:
    """A stream that has already delivered its first chunk, so it is surely in flight."""
    resp = await session.post(gw.url + "/v1/chat/completions",
                              json={"model": model, "stream": True, "messages": MESSAGES})
    assert resp.status == 200, await resp.text()
    first = await resp.content.readany()
    return resp, first


async def _rest(resp: aiohttp.ClientResponse, first: bytes) -> str:
    try:
        return (first + await resp.content.read()).decode()
    finally:
        resp.release()


def _content(text: str) -> str:
    """The streamed answer's text."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def _write_routes(path: Path, routes: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(routes, sort_keys=False))
    tmp.replace(path)                   # a reader never sees half a file


async def _wait_for_log(gw: GatewayProcess, message: str, since: int, timeout_s: float = 5.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            lines = [line for line in gw.logs()[since:] if line.get("msg") == message]
            if lines:
                return lines[0]
            await asyncio.sleep(0.05)


async def test_reload_under_load_loses_no_request(fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway) -> None:
    models = {"alpha": model_entry("alpha-n5-gap10"), "beta": model_entry("beta-n5-gap10"),
              "slow": model_entry("slow-n20-gap100")}
    routes: dict[str, Any] = {"chains": {"main": ["alpha"]}, "default": "main",
                              "server": {"decision_log": str(tmp_path / "decisions.jsonl")}}
    p, r = write_config(tmp_path, fleet, models, routes, timeouts=STREAM_TIMEOUTS)
    gw = await spawn_gateway(p, r)
    results: list[tuple[int, str, str]] = []
    stop_at = time.monotonic() + 8.0

    async def load(session: aiohttp.ClientSession, stream: bool) -> None:
        for _ in range(60):                         # bounded in count and in time
            if time.monotonic() > stop_at:
                return
            results.append(await _chat(session, gw, stream=stream))

    async with aiohttp.ClientSession() as session:
        long_stream = await _open_stream(session, gw, "slow")     # spans both reloads
        loaders = [asyncio.create_task(load(session, stream)) for stream in (True, False, True)]
        await asyncio.sleep(0.3)
        for version, chain in enumerate((["beta"], ["alpha"]), start=1):
            routes["chains"]["main"] = chain
            if version == 2:
                del models["slow"]                  # the in-flight stream's model disappears
                write_config(tmp_path, fleet, models, routes, timeouts=STREAM_TIMEOUTS)
            else:
                _write_routes(r, routes)
            mark = len(gw.logs())
            gw.proc.send_signal(signal.SIGHUP)
            await _wait_for_log(gw, "config reloaded", mark)
            await asyncio.sleep(0.4)
        await asyncio.gather(*loaders)
        slow_text = await _rest(*long_stream)
        after = await _chat(session, gw)

    assert len(results) >= 20
    failures = [res for res in results if res[0] != 200]
    assert not failures, failures[:3]
    for _, _, text in results:
        assert text.rstrip().endswith("data: [DONE]") or orjson.loads(text)["choices"][0]["message"]["content"]
    assert {model for _, model, _ in results} == {"alpha", "beta"}     # both configs really served
    assert slow_text.rstrip().endswith("data: [DONE]")                 # finished on the config it started with
    assert len(_content(slow_text).split()) == 20
    assert after[:2] == (200, "alpha")


async def test_a_broken_config_on_reload_keeps_the_old_one(fleet: Fleet, tmp_path: Path,
                                                           spawn_gateway: SpawnGateway) -> None:
    p, r = write_config(tmp_path, fleet, {"alpha": model_entry("alpha-n3")})
    gw = await spawn_gateway(p, r)
    async with aiohttp.ClientSession() as session:
        for broken in ("chains: {main: [alpha]}\ndefault: premum\n", "chains: [unclosed\n"):
            r.write_text(broken)
            mark = len(gw.logs())
            gw.proc.send_signal(signal.SIGHUP)
            line = await _wait_for_log(gw, "reload rejected, the old config keeps serving", mark)
            assert line["level"] == "error" and "routes.yaml" in line["reason"]
            status, model, _ = await _chat(session, gw)
            assert (status, model) == (200, "alpha")
        async with session.get(gw.url + "/readyz") as resp:
            assert resp.status == 200
    assert gw.proc.returncode is None


async def test_sigterm_lets_twenty_streams_finish_then_exits_0(fleet: Fleet, tmp_path: Path,
                                                                spawn_gateway: SpawnGateway) -> None:
    decisions = tmp_path / "decisions.jsonl"
    routes = {"chains": {"main": ["slow"]}, "default": "main",
              "server": {"decision_log": str(decisions), "drain_timeout_s": 15}}
    p, r = write_config(tmp_path, fleet, {"slow": model_entry("slow-n15-gap100")}, routes, timeouts=STREAM_TIMEOUTS)
    gw = await spawn_gateway(p, r)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        streams = await asyncio.gather(*(_open_stream(session, gw, "auto") for _ in range(20)))
        gw.proc.send_signal(signal.SIGTERM)
        await _wait_for_log(gw, "draining", 0)
        with pytest.raises(aiohttp.ClientConnectionError):     # the listener is closed
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/healthz"):
                pass
        texts = await asyncio.gather(*(_rest(resp, first) for resp, first in streams))
    for text in texts:
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        assert len(_content(text).split()) == 15
    assert await gw.exit_code(10) == 0
    records = [orjson.loads(line) for line in decisions.read_bytes().splitlines()]
    assert len(records) == 20 and {rec["outcome"] for rec in records} == {"ok"}
    assert any(line["msg"] == "stopped" for line in gw.logs())


async def test_a_stream_still_running_at_the_drain_deadline_ends_with_an_error_event(
        fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway) -> None:
    decisions = tmp_path / "decisions.jsonl"
    routes = {"chains": {"main": ["endless"]}, "default": "main",
              "server": {"decision_log": str(decisions), "drain_timeout_s": 1}}
    p, r = write_config(tmp_path, fleet, {"endless": model_entry("endless-n100-gap200")}, routes,
                        timeouts=STREAM_TIMEOUTS)
    gw = await spawn_gateway(p, r)
    async with aiohttp.ClientSession() as session:
        resp, first = await _open_stream(session, gw, "auto")
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            text = await _rest(resp, first)
    assert 0.8 < time.monotonic() - started < 6
    last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
    assert orjson.loads(last[6:])["error"]["code"] == "shutting_down"
    assert "[DONE]" not in text
    assert await gw.exit_code(10) == 0
    records = [orjson.loads(line) for line in decisions.read_bytes().splitlines()]
    assert [rec["outcome"] for rec in records] == ["stream_error"]


async def test_no_keys_means_loopback_only(fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway) -> None:
    p, r = write_config(tmp_path, fleet, {"alpha": model_entry("alpha-n2")})
    refused = await spawn_gateway(p, r, host="0.0.0.0", ready=False)
    assert await refused.exit_code(15) == 2
    assert "--allow-unauthenticated" in refused.log_path.read_text()
    allowed = await spawn_gateway(p, r, "--allow-unauthenticated", host="0.0.0.0")
    async with aiohttp.ClientSession() as session:
        assert (await _chat(session, allowed))[:2] == (200, "alpha")
    allowed.proc.send_signal(signal.SIGTERM)
    assert await allowed.exit_code(10) == 0


async def test_workers_share_the_port_and_drain_together(fleet: Fleet, tmp_path: Path,
                                                         spawn_gateway: SpawnGateway) -> None:
    p, r = write_config(tmp_path, fleet, {"alpha": model_entry("alpha-n3-gap100")}, timeouts=STREAM_TIMEOUTS)
    gw = await spawn_gateway(p, r, "--workers", "2")
    workers = child_pids(gw.proc.pid)
    assert len(workers) == 2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        streams = await asyncio.gather(*(_open_stream(session, gw, "auto") for _ in range(8)))
        gw.proc.send_signal(signal.SIGTERM)
        texts = await asyncio.gather(*(_rest(resp, first) for resp, first in streams))
    assert all(text.rstrip().endswith("data: [DONE]") for text in texts)
    assert await gw.exit_code(10) == 0
    listening = {line["pid"] for line in gw.logs() if line["msg"] == "listening"}
    stopped = {line["pid"] for line in gw.logs() if line["msg"] == "stopped"}
    assert listening == stopped == set(workers)


async def test_a_worker_that_dies_is_replaced(fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway) -> None:
    p, r = write_config(tmp_path, fleet, {"alpha": model_entry("alpha-n2")})
    gw = await spawn_gateway(p, r, "--workers", "2")
    first = child_pids(gw.proc.pid)
    assert len(first) == 2
    await asyncio.sleep(5.2)                                     # past the worker's minimum lifetime
    os.kill(first[0], signal.SIGKILL)
    async with asyncio.timeout(10):
        while len(now := child_pids(gw.proc.pid)) != 2 or first[0] in now:
            await asyncio.sleep(0.05)
    async with asyncio.timeout(10):                             # the new worker is up
        while sum(line["msg"] == "listening" for line in gw.logs()) < 3:
            await asyncio.sleep(0.05)
    assert any(line["msg"] == "worker died, starting another" for line in gw.logs())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(6):
            assert (await _chat(session, gw))[:2] == (200, "alpha")
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(10) == 0
