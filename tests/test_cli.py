"""Operator mistakes on the command line end in one clear line, never a traceback."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from .conftest import ROOT, free_port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (("serve", "--port", "99999"), "99999 is not a port number"),
    (("serve", "--workers", "0"), "must be a whole number of at least 1"),
    (("serve", "--log-level", "loud"), "invalid choice: 'loud'"),
    (("demo", "--port", "-5"), "is not a port number"),
    (("serve", "--host", "999.1.1.1", "--allow-unauthenticated"), "error: cannot listen on 999.1.1.1:8080"),
    (("chaos", "--time-limit", "-1"), "must be a positive number of seconds"),
    (("explain", "/nonexistent/body.json"), "error: cannot read /nonexistent/body.json"),
])
def test_bad_arguments_are_one_clear_line(args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_reported_before_serving() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port))
    assert result.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_host_means_every_interface() -> None:
    from proxy.server.app import listen_problem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert listen_problem("", free) is None


def test_the_demo_serves_what_it_prints() -> None:
    """The quick start: the demo's banner names the gateway and its operations page, and both
    answer the moment it is printed (it comes once the port listens); Ctrl-C stops it cleanly."""
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert demo.stderr is not None
        banner = ""
        while "Ctrl-C stops." not in banner:            # the listener's log line, then the banner
            line = demo.stderr.readline()
            assert line, f"the demo ended early: {banner}"
            banner += line
        assert banner.index('"msg":"listening"') < banner.index("llm-proxy demo:")
        url = f"http://127.0.0.1:{port}"
        assert f"{url}/dashboard" in banner
        body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Hello!"}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", data=body), timeout=10) as r:
            assert json.load(r)["choices"][0]["message"]["content"]
        with urllib.request.urlopen(f"{url}/dashboard", timeout=10) as r:
            assert r.status == 200 and b"llm-proxy" in r.read()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=15) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
