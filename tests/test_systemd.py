"""`llm-proxy systemd-unit` prints a unit that systemd accepts and that fits this install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

PROVIDERS = ROOT / "providers.yaml"
ROUTES = ROOT / "routes.yaml"


def _run(tmp_path: Path, routes: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """From another directory, so that relative paths would show."""
    return subprocess.run([sys.executable, "-m", "proxy", "systemd-unit", "--providers", str(PROVIDERS),
                           "--routes", str(routes), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _unit(tmp_path: Path, *args: str) -> str:
    done = _run(tmp_path, ROUTES, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            out.setdefault(name, []).append(value)
    return out


def test_unit_fits_this_install(tmp_path: Path) -> None:
    unit = _settings(_unit(tmp_path, "--port", "8080", "--workers", "2"))
    exec_start = unit["ExecStart"][0].split()
    assert exec_start[0] == sys.executable and Path(exec_start[0]).is_absolute()
    assert exec_start[1:4] == ["-m", "proxy", "serve"]
    assert exec_start[exec_start.index("--providers") + 1] == str(PROVIDERS.resolve())
    assert exec_start[exec_start.index("--routes") + 1] == str(ROUTES.resolve())
    assert exec_start[exec_start.index("--workers") + 1] == "2"
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"] and unit["Restart"] == ["on-failure"]
    assert unit["EnvironmentFile"][0].startswith("/")
    assert int(unit["LimitNOFILE"][0]) >= 65536
    assert int(unit["TimeoutStopSec"][0]) > 30            # longer than the default drain deadline of 30 s
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert unit[hardening] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["ProtectHome"][0] in ("yes", "read-only")
    assert unit["CapabilityBoundingSet"] == [""]             # a high port needs no capability


def test_the_units_python_path_finds_this_checkout(tmp_path: Path) -> None:
    """A checkout run without installing it: the unit's PYTHONPATH alone (no site-packages,
    another working directory) must let its interpreter import this very package."""
    unit = _settings(_unit(tmp_path))
    environment = dict(value.split("=", 1) for value in unit["Environment"])
    python = unit["ExecStart"][0].split()[0]
    done = subprocess.run([python, "-S", "-c", "import proxy; print(proxy.__file__)"], cwd=tmp_path,
                          env={"PYTHONPATH": environment["PYTHONPATH"]}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == ROOT / "proxy" / "__init__.py"


def test_decision_log_directory_stays_writable(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir()
    routes = tmp_path / "routes.yaml"
    data = yaml.safe_load(ROUTES.read_text())
    data.setdefault("server", {}).update({"decision_log": str(logs / "decisions.jsonl"), "drain_timeout_s": 90})
    routes.write_text(yaml.safe_dump(data))
    done = _run(tmp_path, routes, "--port", "443")
    assert done.returncode == 0, done.stderr
    unit = _settings(done.stdout)
    assert str(logs.resolve()) in unit["ReadWritePaths"][0].split()
    assert int(unit["TimeoutStopSec"][0]) > 90
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]   # port 443


def test_a_local_redis_comes_first_and_its_password_goes_to_the_env_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    data = yaml.safe_load(ROUTES.read_text())
    data.setdefault("server", {})["state"] = {"url": "unix:///run/redis/redis-server.sock",
                                              "password_env": "LLM_PROXY_REDIS_PASSWORD", "instances": 2}
    routes.write_text(yaml.safe_dump(data))
    done = _run(tmp_path, routes)
    assert done.returncode == 0, done.stderr
    assert _settings(done.stdout)["After"] == ["network-online.target redis-server.service"]
    assert "LLM_PROXY_REDIS_PASSWORD=" in done.stderr and "/etc/llm-proxy/llm-proxy.env" in done.stderr
    assert "usermod -aG redis llm-proxy" in done.stderr        # the socket is the redis group's
    data["server"]["state"] = {"url": "redis://10.0.0.7:6379/0"}      # another host: no ordering to add
    routes.write_text(yaml.safe_dump(data))
    assert _settings(_run(tmp_path, routes).stdout)["After"] == ["network-online.target"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("LLM_PROXY_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is missing although .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed here (.ci/run installs the systemd package)")
    path = tmp_path / "llm-proxy.service"
    path.write_text(_unit(tmp_path))
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    problems = [line for line in done.stderr.splitlines() if "llm-proxy.service" in line]
    assert not problems, problems


def test_host_follows_whether_the_config_has_keys(tmp_path: Path) -> None:
    def host(done: subprocess.CompletedProcess[str]) -> str:
        exec_start = _settings(done.stdout)["ExecStart"][0].split()
        return exec_start[exec_start.index("--host") + 1]

    open_routes = _run(tmp_path, ROUTES)                # the shipped routes have no keys
    assert open_routes.returncode == 0
    assert host(open_routes) == "127.0.0.1" and "no keys" in open_routes.stderr
    keyed = yaml.safe_load(ROUTES.read_text())
    keyed["keys"] = [{"name": "web", "key_env": "WEB_KEY", "tier": "standard"}]
    keyed_path = tmp_path / "routes.yaml"
    keyed_path.write_text(yaml.safe_dump(keyed))
    assert host(_run(tmp_path, keyed_path)) == "0.0.0.0"
    refused = _run(tmp_path, ROUTES, "--host", "0.0.0.0")
    assert host(refused) == "0.0.0.0" and "will not start" in refused.stderr
