"""Operator mistakes on the command line end in one clear line, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import ROOT


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
