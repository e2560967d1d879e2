"""Limits and breakers across processes and instances, on real sockets against real servers.

- `--workers 2` without Redis: each worker enforces half of every limit.
- 2 gateway instances x 2 workers on one redis-server, driven above an rpm, a tpm and a
  key's rpm for 20 s: the upstream gets what the buckets allow, within 1 %.
- 3 instances and a failing provider: the breaker opens for all, half-open lets exactly
  `probes` probes through across all of them, and all serve from it after it recovers.
- Redis stopped in the middle of a load run, then started again.

The 20 s run is the expensive one (about 25 s with the processes' start); the others take
a few seconds each.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import config as config_module

from .conftest import Fleet, GatewayProcess, RunningGateway, SpawnGateway, child_pids, model_entry, serve, write_config
from .redis_support import RedisServer

MESSAGES = [{"role": "user", "content": "hello there"}]



@dataclass
class Result:
    status: int
    latency_s: float
    sent: float = 0.0           # monotonic
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""


async def chat(session: aiohttp.ClientSession, url: str, model: str, headers: dict[str, str] | None = None,
               **extra: Any) -> Result:
    started = time.monotonic()
    async with session.post(url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **extra},
                            headers=headers or {}) as r:
        body = await r.json(content_type=None)
        return Result(r.status, time.monotonic() - started, started, body, r.headers.get("X-Route-Model", ""))


async def all_listening(gw: GatewayProcess, workers: int = 2) -> None:
    """`spawn_gateway` waits for one worker to answer; a test of shares needs every worker up."""
    async with asyncio.timeout(15):
        while sum(line["msg"] == "listening" for line in gw.logs()) < workers:
            await asyncio.sleep(0.05)


async def drive(rate: float, duration_s: float, send: Any) -> list[Result]:
    """An open loop: `send(i)` at `rate` a second for `duration_s`, whatever the answers take."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        tasks.append(asyncio.create_task(send(i)))
    return list(await asyncio.gather(*tasks))


async def test_workers_without_redis_each_enforce_their_share(fleet: Fleet, tmp_path: Path,
                                                              spawn_gateway: SpawnGateway) -> None:
    """Done-when 2: --workers 2 and rpm 60, 200 requests in a second: at most 60 reach the upstream."""
    limited = model_entry("share-n2", deployments=[{"provider": "sim-openai", "model": "share-n2",
                                                     "limits": {"rpm": 60}}])
    p, r = write_config(tmp_path, fleet, {"lim": limited})
    gw = await spawn_gateway(p, r, "--workers", "2")
    await all_listening(gw)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
        results = await asyncio.gather(*(chat(s, gw.url, "lim") for _ in range(200)))
    elapsed = time.monotonic() - started
    served = len(fleet.sim.requests_for("share-n2"))
    print(f"workers=2 rpm=60: {served} of 200 reached the upstream in {elapsed:.2f} s")
    assert {res.status for res in results} <= {200, 429}
    assert sum(res.status == 200 for res in results) == served
    assert served <= 60 + int(elapsed)          # the limit refills 1 a second while the burst lasts
    assert served >= 50                          # both workers used their half


async def test_two_instances_of_two_workers_share_exact_limits(
        fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway, own_redis: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Done-when 1: 2 instances x 2 workers, 20 s above an rpm of 600, a tpm, and a key's rpm."""
    duration = 20.0
    models = {
        "rpm": model_entry("rpm-n2", deployments=[{"provider": "sim-openai", "model": "rpm-n2",
                                                   "limits": {"rpm": 600}}]),
        "tpm": model_entry("tpm-n10", deployments=[{"provider": "sim-openai", "model": "tpm-n10",
                                                   "limits": {"tpm": 3000}}]),
        "open": model_entry("open-n2"),
    }
    env = {"METERED_KEY": "gw-metered-0001", "PLAIN_KEY": "gw-plain-0001"}
    routes = {"chains": {"main": ["open"]}, "default": "main",
              "keys": [{"name": "metered", "key_env": "METERED_KEY", "tier": "standard", "rpm": 600},
                       {"name": "plain", "key_env": "PLAIN_KEY", "tier": "standard"}],
              # A generous bound: this run is about exact limits while Redis answers, on a machine
              # that the 4 workers, the load and the simulator keep busy (outages: the last test).
              "server": {"state": {"url": own_redis.url, "instances": 2, "timeout_ms": 250}}}
    p, r = write_config(tmp_path, fleet, models, routes)
    instances = [await spawn_gateway(p, r, "--workers", "2", env=env) for _ in range(2)]
    for gw in instances:
        await all_listening(gw)
    plain = {"Authorization": "Bearer gw-plain-0001"}
    metered = {"Authorization": "Bearer gw-metered-0001"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        def to(i: int) -> str:
            return instances[i % 2].url

        started = time.monotonic()
        rpm, tpm, key = await asyncio.gather(
            drive(50, duration, lambda i: chat(s, to(i), "rpm", plain)),
            drive(25, duration, lambda i: chat(s, to(i), "tpm", plain, max_tokens=10)),
            drive(50, duration, lambda i: chat(s, to(i), "open", metered)))
        elapsed = time.monotonic() - started
    for results in (rpm, tpm, key):
        assert {res.status for res in results} <= {200, 429}, {res.status for res in results}
    assert all(res.body["error"]["code"] == "key_rate_limited" for res in key if res.status == 429)

    allowed_rpm = 600 + 600 / 60 * elapsed
    served_rpm = len(fleet.sim.requests_for("rpm-n2"))
    allowed_tokens = 3000 + 3000 / 60 * elapsed
    spent_tokens = sum(res.body["usage"]["total_tokens"] for res in tpm if res.status == 200)
    served_key = sum(res.status == 200 for res in key)
    print(f"{elapsed:.1f} s: rpm {served_rpm} of {allowed_rpm:.0f} allowed ({len(rpm)} sent); "
          f"tpm {spent_tokens} of {allowed_tokens:.0f} tokens ({len(tpm)} sent); "
          f"key rpm {served_key} of {allowed_rpm:.0f} ({len(key)} sent)")
    switches = [(line["msg"], line.get("reason")) for gw in instances for line in gw.logs()
                if "shared state" in line["msg"]]
    assert not switches, switches
    assert len(rpm) > allowed_rpm and len(key) > allowed_rpm      # the load was above every limit
    assert len(tpm) * 12 > allowed_tokens
    assert served_rpm == sum(res.status == 200 for res in rpm)
    assert 0.95 * allowed_rpm <= served_rpm <= 1.01 * allowed_rpm
    assert 0.95 * allowed_tokens <= spent_tokens <= 1.01 * allowed_tokens
    assert 0.95 * allowed_rpm <= served_key <= 1.01 * allowed_rpm


async def test_a_failing_provider_behind_three_instances(fleet: Fleet, tmp_path: Path,
                                                         redis_server: RedisServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Done-when 3: one breaker for all: at most one more request per instance once it is open,
    exactly `probes` probes across all in half-open, and every instance back on it after."""
    monkeypatch.setenv("SIM_PROVIDER_KEY", "sk-sim-provider-secret-0001")
    models = {"flaky": model_entry("flaky3-n2"), "backup": model_entry("backup3-n2")}
    prefix = f"t{os.urandom(6).hex()}"
    gateways: list[RunningGateway] = []
    runners = []
    for i in range(3):                           # each instance marks its upstream requests
        directory = tmp_path / f"gw{i}"
        directory.mkdir()
        providers = {"sim-openai": {"api": "openai", "base_url": fleet.url("openai"),
                                    "api_key_env": "SIM_PROVIDER_KEY", "headers": {"X-Instance": str(i)},
                                    "timeouts": {"connect_s": 1, "first_token_s": 0.8, "idle_s": 1, "total_s": 0.8}}}
        routes = {"chains": {"main": ["flaky", "backup"]}, "default": "main", "server": {
            "state": {"url": redis_server.url, "prefix": prefix, "instances": 3},
            "breaker": {"consecutive": 3, "open_s": 1.0, "max_backoff_s": 1.0, "cost_factor": 0, "probes": 2}}}
        p, r = write_config(directory, fleet, models, routes, providers=providers)
        running, runner = await serve(config_module.load(p, r))
        gateways.append(running)
        runners.append(runner)
    state = gateways[0].gateway.state
    flaky = "flaky/sim-openai/0"

    def upstream(after: float = 0.0) -> list[str]:
        """The instance behind each request to the failing model that arrived after `after` (unix)."""
        offset = time.time() - time.monotonic()
        return [seen.headers["X-Instance"] for seen in fleet.sim.requests_for("flaky3-n2")
                if seen.at + offset > after]

    try:
        async with aiohttp.ClientSession() as s:
            async def keep_sending(gw: RunningGateway, until: float) -> list[Result]:
                out = []
                while time.monotonic() < until:
                    out.append(await chat(s, gw.url, "main"))
                return out

            # 1. It fails: each instance sends one request at a time until well after the breaker opened.
            async with s.post(f"http://127.0.0.1:{fleet.port}/_sim/faults",
                              json={"model": "flaky3-n2", "fault": "503"}) as resp:
                assert resp.status == 200
            results = await asyncio.gather(*(keep_sending(gw, time.monotonic() + 0.6) for gw in gateways))
            view = (await state.view([flaky], {})).breakers[flaky]
            assert view.state == "open" and view.opened_at is not None
            assert all(res.status == 200 and res.model == "backup" for batch in results for res in batch)
            late = upstream(after=view.opened_at)
            print(f"opened after {len(upstream()) - len(late)} failures; later: {late}")
            assert all(late.count(str(i)) <= 1 for i in range(3)), late

            # 2. Half-open: it hangs now, so probes hold their slots; all three instances send at once.
            async with s.post(f"http://127.0.0.1:{fleet.port}/_sim/faults",
                              json={"model": "flaky3-n2", "fault": "hang"}) as resp:
                assert resp.status == 200
            await asyncio.sleep(max(0.0, view.open_until - time.time()) + 0.05)
            before = len(upstream())
            burst = await asyncio.gather(*(chat(s, gw.url, "main") for gw in gateways for _ in range(4)))
            assert all(res.status == 200 and res.model == "backup" for res in burst)
            probes = upstream()[before:]
            print(f"half-open: {len(probes)} probes from instances {probes}")
            assert len(probes) == 2

            # 3. It recovers: once the interval ends, the first request probes and closes it for all.
            async with s.post(f"http://127.0.0.1:{fleet.port}/_sim/faults",
                              json={"model": "flaky3-n2", "fault": None}) as resp:
                assert resp.status == 200
            view = (await state.view([flaky], {})).breakers[flaky]
            await asyncio.sleep(max(0.0, (view.open_until or 0) - time.time()) + 0.05)
            first = await chat(s, gateways[2].url, "main")
            assert first.status == 200 and first.model == "flaky"
            # Its settle closes the breaker in the background (never on the client's bytes): a
            # request in the milliseconds before it lands still sees the probes out.
            async with asyncio.timeout(1):
                while (await state.view([flaky], {})).breakers[flaky].state != "closed":
                    await asyncio.sleep(0.005)
            after = [await chat(s, gw.url, "main") for gw in gateways]
            assert [res.model for res in after] == ["flaky"] * 3
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_redis_stopped_mid_load_then_back(fleet: Fleet, tmp_path: Path, spawn_gateway: SpawnGateway,
                                                own_redis: RedisServer) -> None:
    """Done-when 4: no request fails or waits for Redis; local shares while it is away; shared
    again within 5 s of its return; the log and the metrics show both switches."""
    models = {"m": model_entry("outage-n2", deployments=[{"provider": "sim-openai", "model": "outage-n2",
                                                          "limits": {"rpm": 6000}}])}
    routes = {"chains": {"main": ["m"]}, "default": "main",
              "server": {"state": {"url": own_redis.url, "instances": 2}}}
    p, r = write_config(tmp_path, fleet, models, routes)
    gw = await spawn_gateway(p, r, "--workers", "2")
    await all_listening(gw)
    workers = set(child_pids(gw.proc.pid))
    assert len(workers) == 2
    marks: dict[str, float] = {}
    levels: list[float] = []

    async def outage() -> None:
        await asyncio.sleep(3)
        marks["stopped"] = time.monotonic()
        own_redis.stop()
        await asyncio.sleep(1.5)
        levels.append(await bucket_level(gw))           # a worker's local share, not the shared bucket
        await asyncio.sleep(1.5)
        own_redis.start()
        marks["started"] = time.monotonic()

    # A connection per request, so that the kernel spreads them over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        results, _ = await asyncio.gather(drive(40, 10, lambda i: chat(s, gw.url, "main")), outage())
        ready = [await (await s.get(gw.url + "/readyz")).json() for _ in range(4)]
    baseline = sorted(res.latency_s for res in results[:100])
    slowest = max(res.latency_s for res in results)
    slow = [(round(res.sent - marks["stopped"], 2), round(res.latency_s * 1000)) for res in results
            if res.latency_s > baseline[50] + 0.03]
    print(f"{len(results)} requests; baseline p50 {baseline[50] * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms; "
          f"slow (s after the stop, ms): {slow}; started again {marks['started'] - marks['stopped']:.2f} s after")
    assert all(res.status == 200 for res in results)
    # From the stop, through the outage, to 2 s after the start (the return lands about 1 s
    # after it): no request waits 100 ms more than usual.
    switching = [res for res in results if -0.05 < res.sent - marks["stopped"]
                 and res.sent - marks["started"] < 2.0]
    assert len(switching) > 180 and max(res.latency_s for res in switching) < baseline[50] + 0.1
    assert levels and levels[0] <= 6000 / 4                 # 1 / (2 instances x 2 workers)
    assert all(entry["state"]["mode"] == "shared" for entry in ready)
    logs = gw.logs()
    down = {line["pid"]: line["ts"] for line in logs if line["msg"].startswith("shared state unreachable")}
    back = {line["pid"]: line["ts"] for line in logs if line["msg"] == "shared state reachable again"}
    assert set(down) == set(back) == workers
    started_unix = marks["started"] + time.time() - time.monotonic()
    assert all(ts - started_unix < 5.0 for ts in back.values()), (back, started_unix)
    text = await metrics_text(gw)
    switches = [line for line in text.splitlines() if line.startswith("llm_proxy_state_switches_total")]
    assert 'llm_proxy_state_switches_total{mode="degraded"} 1.0' in text, (switches, logs)
    assert 'llm_proxy_state_switches_total{mode="shared"} 1.0' in text
    assert 'llm_proxy_state_degraded{backend="redis"} 0.0' in text


async def bucket_level(gw: GatewayProcess) -> float:
    text = await metrics_text(gw)
    line = next(line for line in text.splitlines()
                if line.startswith("llm_proxy_bucket_level{") and 'scope="deployment"' in line)
    return float(line.rsplit(" ", 1)[1])


async def metrics_text(gw: GatewayProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        return await r.text()
