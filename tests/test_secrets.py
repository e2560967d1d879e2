"""Secrets never leave: a real `python -m proxy serve` process, its whole output captured.

The provider key, the gateway key and an admin key are planted in the environment; the
simulator's 401 quotes the key it was sent, as real providers do, and a hostile upstream
(tests/hostile.py) quotes it late in a long message, where a cut before redaction would
split it, redirects to another host (which must receive nothing), sends a 50 MB line and
spreads its events over several data: lines. A request whose Authorization line the HTTP
parser rejects carries the gateway key, and so does a head that never ends. No key may appear in the decision log, the
process's stdout or stderr, /metrics, or any response body or header. The same process
proves SIGHUP log rotation and the drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .conftest import ROOT, Fleet, model_entry, write_config
from .decision_log_support import decisions_in
from .hostile import Upstreams, serving

# No credential shape (an Azure-style key): only the exact match can catch it, also where a
# message quoting it is cut.
PROVIDER_SECRET = "9a8b7c6d5e4fPROVIDERsecret0011"
GATEWAY_SECRET = "gwk-GATEWAYsecret-1122334455"
ADMIN_SECRET = "gwk-ADMINsecret-6677889900"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def served(providers: Path, routes: Path, env: dict[str, str]) -> AsyncIterator[tuple[str, subprocess.Popen]]:
    """`python -m proxy serve` on a free port; SIGTERM on exit (the caller reads the output)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--providers", str(providers), "--routes", str(routes),
         "--port", str(port)],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as s:
            while True:
                assert process.poll() is None, process.communicate()
                try:
                    async with s.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not become ready"
                await asyncio.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


async def _stop(process: subprocess.Popen) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(process.communicate, timeout=20)
    assert process.returncode == 0, err
    return out.decode(), err.decode()


def _config(tmp_path: Path, fleet: Fleet, decision_log: str, hostile: Upstreams | None = None
            ) -> tuple[Path, Path]:
    models = {"good": model_entry("good-n6"), "authfail": model_entry("authfail-401"),
              "authfail-a": model_entry("authfail-401", provider="sim-anthropic"),
              "authfail-g": model_entry("authfail-401", provider="sim-gemini"),
              "cut": model_entry("cut-cut2"), "down": model_entry("down-500")}
    chains = {"main": ["good"], "bad-auth": ["authfail", "authfail-a", "authfail-g"]}
    if hostile is not None:     # upstreams that quote the key late in a long message, redirect, or flood
        for api, redirect in (("openai", 302), ("anthropic", 307), ("gemini", 307)):
            models[f"echo-{api}"] = model_entry("m-echolong", f"hostile-{api}")
            models[f"redirect-{api}"] = model_entry(f"m-redirect{redirect}", f"hostile-{api}")
        models["huge"] = model_entry("m-hugeafter", "hostile-anthropic")
        models["multiline"] = model_entry("m-multiline", "hostile-gemini")
        chains["echo"] = ["echo-openai", "echo-anthropic", "echo-gemini"]
        chains["redirects"] = ["redirect-openai", "redirect-anthropic", "redirect-gemini"]
    routes = {"chains": chains, "default": "main",
              "keys": [{"name": "app", "key_env": "TEST_GATEWAY_SECRET", "tier": "standard"},
                       {"name": "ops", "key_env": "TEST_ADMIN_SECRET", "tier": "free", "allow": [], "admin": True}],
              "server": {"decision_log": decision_log, "header_timeout_s": 1}}
    providers = hostile.providers({"connect_s": 2, "first_token_s": 10, "idle_s": 5, "total_s": 30}) \
        if hostile is not None else None
    return write_config(tmp_path, fleet, models, routes, providers=providers)


async def test_neither_key_appears_in_log_output_metrics_or_answers(fleet: Fleet, tmp_path: Path) -> None:
    async with serving() as hostile:
        await _no_key_leaks(fleet, tmp_path, hostile)


async def _no_key_leaks(fleet: Fleet, tmp_path: Path, hostile: Upstreams) -> None:
    providers, routes = _config(tmp_path, fleet, "stdout", hostile)
    env = {"SIM_PROVIDER_KEY": PROVIDER_SECRET, "TEST_GATEWAY_SECRET": GATEWAY_SECRET,
           "TEST_ADMIN_SECRET": ADMIN_SECRET}
    seen: list[bytes] = []          # every response body and header block the clients got
    auth = {"Authorization": f"Bearer {GATEWAY_SECRET}"}
    chat = [
        ({"model": "good", "messages": [{"role": "user", "content": "hi"}]}, auth, 200),
        ({"model": "good", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 200),
        ({"model": "authfail", "messages": [{"role": "user", "content": "hi"}]}, auth, 502),
        ({"model": "bad-auth", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 502),
        ({"model": "cut", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 200),
        ({"model": "down", "messages": [{"role": "user", "content": "hi"}]}, auth, 502),
        ({"model": "good", "messages": [{"role": "user", "content": "hi"}]}, {}, 401),
        ({"model": "good", "messages": [{"role": "user", "content": "hi"}]},
         {"Authorization": f"Bearer {PROVIDER_SECRET}"}, 401),        # a client sending the provider key
        ({"model": "good", "messages": [{"role": "user", "content": "hi"}]},
         {"Authorization": f"Basic {GATEWAY_SECRET}"}, 401),
        ({"model": "good", "messages": "not a list"}, auth, 400),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}, auth, 502),   # the key quoted late
        ({"model": "redirects", "messages": [{"role": "user", "content": "hi"}]}, auth, 502),
        ({"model": "redirects", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 502),
        ({"model": "huge", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 200),
        ({"model": "multiline", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, auth, 200),
    ]

    async def keep(response: aiohttp.ClientResponse) -> bytes:
        body = await response.read()
        seen.append(body)
        seen.append("\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode())
        return body

    async with served(providers, routes, env) as (url, process):
        # A head that never ends, the key in it: closed at the head bound (1 s), meanwhile.
        half_reader, half_writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        half_writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + GATEWAY_SECRET.encode() + b"\r\nContent-Le")
        async with aiohttp.ClientSession() as s:
            ids = []
            for body, headers, status in chat:
                async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
                    await keep(r)
                    assert r.status == status, (body, await r.text())
                    ids.append(r.headers["X-Request-Id"])
            async with s.post(url + "/v1/feedback", json={"request_id": ids[0], "score": 1}, headers=auth) as r:
                await keep(r)
                assert r.status == 200
            async with s.post(url + "/v1/feedback", data=b"{", headers=auth) as r:
                await keep(r)
                assert r.status == 400
            async with s.post(url + "/v1/route", json=chat[0][0], headers=auth) as r:
                await keep(r)
            async with s.get(url + "/metrics", headers=auth) as r:       # not an admin key
                await keep(r)
                assert r.status == 403
            async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}) as r:
                metrics = await keep(r)
                assert b"llm_proxy_requests_total" in metrics
        # A header line the HTTP parser rejects (a trailing control byte) with the key in it.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + GATEWAY_SECRET.encode() + b"\x01\r\nContent-Length: 2\r\n\r\n{}")
        async with asyncio.timeout(10):
            seen.append(await reader.read())
        writer.close()
        assert seen[-1].startswith(b"HTTP/1.0 400") and b'"code":"malformed_request"' in seen[-1], seen[-1]
        async with asyncio.timeout(10):
            seen.append(await half_reader.read())
        half_writer.close()
        assert seen[-1] == b"", "the half-sent head was closed without an answer"
        out, err = await _stop(process)

    # The keys were really in play: the provider key reached the simulator (all three protocols),
    # whose 401 quoted it.
    sent = {(x.protocol, v) for x in fleet.sim.seen for v in x.headers.values()}
    assert {("openai", f"Bearer {PROVIDER_SECRET}"), ("anthropic", PROVIDER_SECRET),
            ("gemini", PROVIDER_SECRET)} <= sent
    records = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    decisions = [r for r in records if r.get("type") == "decision"]
    assert len(decisions) == len(chat), "every request left a record on stdout"
    assert any("[redacted]" in (a["message"] or "") for d in decisions for a in d["attempts"])
    for provider in ("sim-openai", "sim-anthropic", "sim-gemini"):    # each 502 lists its attempts, scrubbed
        quoted = f"via {provider}: auth 401 (Incorrect API key provided: [redacted])".encode()
        assert any(quoted in body for body in seen), provider
    assert hostile.bystander.received == [], "no redirect was followed"
    late = [a["message"] for d in decisions if d["requested_model"] == "echo" for a in d["attempts"]]
    assert len(late) == 3 and all(m.index("[redacted]") > 400 for m in late), late
    assert any("malformed HTTP request" in line for line in err.splitlines()), "the malformed request was logged"

    for secret in (PROVIDER_SECRET, GATEWAY_SECRET, ADMIN_SECRET):
        assert secret not in out, f"{secret} on stdout"
        assert secret not in err, f"{secret} on stderr"
        for blob in seen:
            assert secret.encode() not in blob, f"{secret} in an answer: {blob[:300]!r}"


async def test_sighup_reopens_the_log_and_sigterm_loses_nothing(fleet: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    providers, routes = _config(tmp_path, fleet, str(log))
    env = {"SIM_PROVIDER_KEY": PROVIDER_SECRET, "TEST_GATEWAY_SECRET": GATEWAY_SECRET}
    auth = {"Authorization": f"Bearer {GATEWAY_SECRET}"}
    body: dict[str, Any] = {"model": "good", "messages": [{"role": "user", "content": "hi"}]}
    rotated = tmp_path / "decisions.jsonl.1"
    async with served(providers, routes, env) as (url, process):
        async with aiohttp.ClientSession() as s:
            async def send(rid: str) -> None:
                async with s.post(url + "/v1/chat/completions", json=body, headers={**auth, "X-Request-Id": rid}) as r:
                    assert r.status == 200
            for i in range(3):
                await send(f"before-{i}")
            deadline = time.monotonic() + 5
            while len(decisions_in(log)) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            os.rename(log, rotated)
            process.send_signal(signal.SIGHUP)
            while not log.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.gather(*(send(f"after-{i}") for i in range(12)))
        await _stop(process)            # SIGTERM right away: the queue must drain before exit
    assert sorted(r["request_id"] for r in decisions_in(rotated)) == [f"before-{i}" for i in range(3)]
    assert sorted(r["request_id"] for r in decisions_in(log)) == sorted(f"after-{i}" for i in range(12))


def test_serve_refuses_a_decision_log_it_cannot_open(fleet: Fleet, tmp_path: Path) -> None:
    providers, routes = _config(tmp_path, fleet, str(tmp_path / "missing-dir" / "decisions.jsonl"))
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--providers", str(providers), "--routes",
                           str(routes), "--port", str(_free_port())], cwd=ROOT, capture_output=True, timeout=30,
                          env={**os.environ, "SIM_PROVIDER_KEY": PROVIDER_SECRET})
    assert done.returncode == 2
    assert b"server.decision_log: cannot open" in done.stderr and b"Traceback" not in done.stderr
