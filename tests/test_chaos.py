"""`llm-proxy chaos` against an OpenAI-only config and against the shipped files.

Chaos starts its own simulator and gateways on 127.0.0.1, so these tests only write
config files; the base URLs in them are replaced by the simulator's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
CAPS = ["code", "json", "tools", "vision"]


def openai_only(tmp_path: Path, chains: dict[str, Any], server: dict[str, Any] | None = None,
                prefill: tuple[str, ...] = ()) -> list[str]:
    models = {
        name: {"tier": 2, "context_window": 128000, "price": {"input": 1.0, "output": 2.0},
               "capabilities": CAPS + (["prefill"] if name in prefill else []),
               "deployments": [{"provider": "oa", "model": f"{name}-up"}]}
        for name in ("alpha", "beta", "gamma")
    }
    providers = {"oa": {"api": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "UNSET_KEY"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"providers": providers, "models": models}))
    routes: dict[str, Any] = {"chains": chains, "default": next(iter(chains))}
    if server:
        routes["server"] = server
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(routes))
    return ["--providers", str(tmp_path / "p.yaml"), "--routes", str(tmp_path / "r.yaml")]


def test_every_step_of_an_openai_chain_triggers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chaos", *openai_only(tmp_path, {"main": ["alpha", "beta", "gamma"]})])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok   alpha fail (503): expected complete stream from beta" in out
    assert "ok   alpha, beta fail (429-ra0.2): expected complete stream from gamma" in out
    assert "ok   every model fails (503): expected a clean error status; client saw HTTP 502" in out
    assert "ok   alpha cut mid-stream: expected an error event and no [DONE]" in out
    assert "4/4 steps passed" in out


def test_a_step_that_cannot_trigger_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One attempt per request: the fallback can never happen, and chaos must say so.
    code = main(["chaos", *openai_only(tmp_path, {"main": ["alpha", "beta"]}, server={"max_attempts": 1})])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL alpha fail (503): expected complete stream from beta; client saw HTTP 502" in out


@pytest.mark.parametrize("prefill", [("beta",), ()])      # continued from a prefill, or restarted and verified
def test_continuation_chain_is_proved_with_the_whole_text(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          prefill: tuple[str, ...]) -> None:
    chains = {"main": {"models": ["alpha", "beta", "gamma"], "on_stream_failure": "continue"}}
    code = main(["chaos", "--json", *openai_only(tmp_path, chains, prefill=prefill)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '"name": "alpha cut mid-stream"' in out and '"expect": "the whole text, continued"' in out


def test_unknown_chain_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--chain", "nope", *openai_only(tmp_path, {"main": ["alpha", "beta"]})]) == 2
    assert "unknown chain nope" in capsys.readouterr().err


def test_shipped_standard_chain_passes_across_protocols(capsys: pytest.CaptureFixture[str]) -> None:
    # `standard` spans anthropic, openai and gemini; the other chains run in `llm-proxy chaos` itself.
    code = main(["chaos", "--chain", "standard", "--providers", str(ROOT / "providers.yaml"),
                 "--routes", str(ROOT / "routes.yaml")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "chain standard" in out and "FAIL" not in out
    assert "fail (503): expected complete stream from gpt-4.1" in out


def test_plan_covers_fallbacks_entries_and_rotates_through_every_fault() -> None:
    from proxy import config as config_module
    from proxy.commands.chaos import STEP_FAULTS, paths, plan_steps
    from proxy.providers import registry

    from .conftest import ROOT

    config = config_module.load(ROOT / "providers.yaml", ROOT / "routes.yaml", env={})
    found = paths(config, None)
    labels = [label for label, _, _ in found]
    assert set(config.chains) <= set(labels)
    assert {f"fallbacks.{m}" for m in config.fallbacks} <= set(labels)
    rotation, used = 0, set()
    for _, requested, chain in found:
        assert requested == chain.models[0] or requested in config.chains
        for name, _, _, _ in plan_steps(chain, config, set(registry()), rotation):
            if " fail (" in name:
                used.add(name.rsplit("(", 1)[1].rstrip(")"))
        rotation += len(chain.models) - 1
    assert used == set(STEP_FAULTS)
