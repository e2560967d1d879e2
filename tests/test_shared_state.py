"""Several gateways on one redis-server: what they share, on real sockets.

In-process gateways (each its own Gateway, state store and Redis connections) in front of
the simulator; the multi-process runs are in test_shared_limits.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import config as config_module
from proxy.config import ConfigError

from .conftest import Fleet, MakeGateway, RunningGateway, model_entry, write_config
from .redis_support import RedisServer
from .test_metrics_feedback import scrape, value

MESSAGES = [{"role": "user", "content": "hello there"}]


def shared_routes(redis: RedisServer, prefix: str, models: list[str], **server: Any) -> dict[str, Any]:
    return {"chains": {"main": models}, "default": "main",
            "server": {"state": {"url": redis.url, "prefix": prefix, "instances": 2}, **server}}


async def two_gateways(make_gateway: MakeGateway, redis: RedisServer, models: dict[str, Any],
                       **routes: Any) -> tuple[RunningGateway, RunningGateway]:
    prefix = f"t{os.urandom(6).hex()}"
    out = []
    for _ in range(2):
        r = shared_routes(redis, prefix, list(models))
        r.update(routes)
        out.append(await make_gateway(models, r))
    return out[0], out[1]


def test_state_settings_are_read_and_a_password_never_sits_in_the_file(tmp_path: Path, fleet: Fleet) -> None:
    models = {"m": model_entry("m-n2")}
    routes: dict[str, Any] = {"chains": {"main": ["m"]}, "default": "main", "server": {"state": {
        "url": "redis://cache.internal:6379/2", "password_env": "GW_REDIS_PASSWORD", "instances": 3,
        "timeout_ms": 20}}}
    p, r = write_config(tmp_path, fleet, models, routes)
    state = config_module.load(p, r, {"GW_REDIS_PASSWORD": "s3cret-redis"}).server.state
    assert (state.url, state.instances, state.timeout_ms, state.password) == (
        "redis://cache.internal:6379/2", 3, 20.0, "s3cret-redis")
    assert "s3cret" not in repr(state)
    assert config_module.load(p, r, {}).server.state.password is None
    for bad, message in (("redis://:s3cret@cache:6379/0", "password_env"),
                         ("unix:///run/redis.sock?password=s3cret", "password_env"),
                         ("http://cache:6379", "redis://")):
        routes["server"]["state"] = {"url": bad}
        p, r = write_config(tmp_path, fleet, models, routes)
        with pytest.raises(ConfigError, match=rf"server\.state\.url: .*{message}") as caught:
            config_module.load(p, r, {})
        assert "s3cret" not in str(caught.value)


async def test_feedback_reaches_any_instance(make_gateway: MakeGateway, redis_server: RedisServer) -> None:
    """Done-when 5: a request served by one instance is scored through another."""
    one, two = await two_gateways(make_gateway, redis_server, {"good": model_entry("good-n2")})
    async with aiohttp.ClientSession() as s:
        async with s.post(one.base + "/chat/completions", json={"model": "good", "messages": MESSAGES},
                          headers={"X-Request-Id": "served-by-one"}) as r:
            assert r.status == 200
        await one.gateway.state.remember("sync", "barrier", b"", 5)     # the background write has gone out
        async with s.post(two.base + "/feedback", json={"request_id": "served-by-one", "score": 0.5}) as r:
            assert r.status == 200, await r.text()
        async with s.post(two.base + "/feedback", json={"request_id": "never-served", "score": 0.5}) as r:
            assert r.status == 404
        samples = await scrape(s, two.url)
    assert value(samples, "llm_proxy_quality_score_count", tier="standard", model="good", rule="model") == 1


async def test_a_key_rpm_and_deployment_limits_hold_across_instances(
        make_gateway: MakeGateway, redis_server: RedisServer, fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_KEY", "gw-batch-key-0001")
    monkeypatch.setenv("WEB_KEY", "gw-web-key-0001")
    limited = model_entry("lim-n2", deployments=[{"provider": "sim-openai", "model": "lim-n2", "limits": {"rpm": 6}}])
    keys = [{"name": "batch", "key_env": "BATCH_KEY", "tier": "standard", "rpm": 4},
            {"name": "web", "key_env": "WEB_KEY", "tier": "standard", "admin": True}]
    one, two = await two_gateways(make_gateway, redis_server, {"lim": limited, "free": model_entry("free-n2")},
                                  keys=keys, chains={"main": ["lim"], "open": ["free"]})
    auth = {"Authorization": "Bearer gw-batch-key-0001"}
    statuses = []
    async with aiohttp.ClientSession() as s:
        for i in range(6):                       # the key allows 4 in total, whichever instance serves
            gw = (one, two)[i % 2]
            async with s.post(gw.base + "/chat/completions", json={"model": "free", "messages": MESSAGES},
                              headers=auth) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert (await r.json())["error"]["code"] == "key_rate_limited"
                    assert 1 <= int(r.headers["Retry-After"]) <= 15
        assert statuses == [200, 200, 200, 200, 429, 429]
        served = []
        for i in range(8):                       # the deployment allows 6 in total
            gw = (one, two)[i % 2]
            async with s.post(gw.base + "/chat/completions", json={"model": "lim", "messages": MESSAGES},
                              headers={"Authorization": "Bearer gw-web-key-0001"}) as r:
                served.append(r.status)
        assert served.count(200) == 6 and served.count(429) == 2
        assert len(fleet.sim.requests_for("lim-n2")) == 6
        samples = await scrape(s, one.url, {"Authorization": "Bearer gw-web-key-0001"})
        async with s.get(two.url + "/readyz") as r:
            ready = await r.json()
    assert ready["state"]["backend"] == "redis" and ready["state"]["mode"] == "shared"
    # The view is cluster-wide: the first instance sees what both spent.
    assert value(samples, "llm_proxy_bucket_level", scope="key", id="batch", kind="rpm") < 0.5
    assert value(samples, "llm_proxy_bucket_level", scope="deployment", id="lim/sim-openai/0", kind="rpm") < 0.5
    assert value(samples, "llm_proxy_state_degraded", backend="redis") == 0
    assert value(samples, "llm_proxy_state_round_trip_ms_count") > 0



async def test_redis_down_or_hanging_degrades_to_local_shares_and_comes_back(
        make_gateway: MakeGateway, own_redis: RedisServer, fleet: Fleet) -> None:
    limited = model_entry("deg-n2", deployments=[{"provider": "sim-openai", "model": "deg-n2",
                                                   "limits": {"rpm": 40}}])
    routes = shared_routes(own_redis, "deg", ["lim"])
    routes["server"]["state"]["instances"] = 4                # local share: 40 / 4 = 10 a minute
    gw = await make_gateway({"lim": limited}, routes)
    health = gw.gateway.state.health

    async def chat(s: aiohttp.ClientSession) -> tuple[int, float]:
        started = time.monotonic()
        async with s.post(gw.base + "/chat/completions", json={"model": "lim", "messages": MESSAGES}) as r:
            await r.read()
            return r.status, time.monotonic() - started

    async with aiohttp.ClientSession() as s:
        assert [(await chat(s))[0] for _ in range(4)] == [200] * 4
        assert health.mode == "shared"
        own_redis.pause()                                     # Redis hangs: every call would wait
        before = 0                  # served locally, each after one bound, until the timeouts have
        while health.mode == "shared" and before < 5:       # gone on for a whole bound: degraded
            status, took = await chat(s)
            before += 1
            assert status == 200 and took < 0.1 + 0.05        # one bound (50 ms), no more
        assert health.mode == "degraded" and "timed out" in (health.reason or "") and before == 2
        own_redis.resume()
        own_redis.stop()                                      # ... and then it is gone
        results = [await chat(s) for _ in range(14)]
        assert all(took < 0.1 for _, took in results)
        # The local share is 10 a minute, whatever the shared bucket had left.
        assert [status for status, _ in results].count(200) == 10 - before      # the rest went before the switch
        async with s.get(gw.url + "/readyz") as r:
            ready = await r.json()
            assert r.status == 200 and ready["state"]["mode"] == "degraded"
        own_redis.start()                                     # back, empty
        async with asyncio.timeout(5):
            while health.mode != "shared":
                await asyncio.sleep(0.05)
        samples = await scrape(s, gw.url)
    assert value(samples, "llm_proxy_state_switches_total", mode="degraded") == 1
    assert value(samples, "llm_proxy_state_switches_total", mode="shared") == 1
    assert value(samples, "llm_proxy_state_degraded", backend="redis") == 0
    # What the local share spent was handed back: the shared bucket is not full after the return.
    assert value(samples, "llm_proxy_bucket_level", scope="deployment", id="lim/sim-openai/0", kind="rpm") < 31
