"""The router, table-driven: every operator on every signal, first match, default, skips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import config as config_module
from proxy.errors import GatewayError
from proxy.router import Router
from proxy.signals import Signals


def make_signals(**overrides: Any) -> Signals:
    values: dict[str, Any] = dict(input_tokens=500, max_tokens=None, task_type=None, tier="standard", latency=None,
                                  output_format="text", tools=False, images=False, region=None, key=None,
                                  max_cost_usd=None, stream=False, include_usage=False)
    values.update(overrides)
    return Signals(**values)


def model(tier: int = 2, window: int = 100_000, out: int = 4096, price: tuple[float, float] = (1.0, 2.0),
          caps: tuple[str, ...] = ("json", "tools", "vision"), providers: tuple[str, ...] = ("us",)) -> dict:
    return {"tier": tier, "context_window": window, "max_output_tokens": out,
            "price": {"input": price[0], "output": price[1]}, "capabilities": list(caps),
            "deployments": [{"provider": p} for p in providers]}


def router(tmp_path: Path, models: dict[str, Any], routes: dict[str, Any]) -> Router:
    providers = {
        "us": {"api": "openai", "base_url": "http://127.0.0.1:9/v1", "region": "us"},
        "eu": {"api": "openai", "base_url": "http://127.0.0.1:9/v1", "region": "eu"},
    }
    p, r = tmp_path / "p.yaml", tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"providers": providers, "models": models}))
    r.write_text(yaml.safe_dump(routes, sort_keys=False))      # aliases: file order matters
    return Router(config_module.load(p, r, env={}))


# (signal, condition, value that matches, value that does not)
CONDITIONS = [
    ("input_tokens", {"gt": 1000}, 1001, 1000),
    ("input_tokens", {"gte": 1000}, 1000, 999),
    ("input_tokens", {"lt": 1000}, 999, 1000),
    ("input_tokens", {"lte": 1000}, 1000, 1001),
    ("input_tokens", 42, 42, 43),
    ("max_tokens", {"gt": 100}, 101, None),
    ("max_tokens", {"exists": True}, 5, None),
    ("max_tokens", {"exists": False}, None, 5),
    ("task_type", "code", "code", "chat"),
    ("task_type", {"in": ["code", "reasoning"]}, "reasoning", "chat"),
    ("task_type", {"exists": True}, "chat", None),
    ("tier", "premium", "premium", "standard"),
    ("tier", {"in": ["free", "standard"]}, "free", "premium"),
    ("latency", "realtime", "realtime", "batch"),
    ("latency", {"exists": False}, None, "interactive"),
    ("output_format", "json_schema", "json_schema", "text"),
    ("output_format", {"in": ["json_object", "json_schema"]}, "json_object", "text"),
    ("tools", True, True, False),
    ("tools", {"exists": True}, True, False),
    ("images", True, True, False),
    ("region", "eu", "eu", "us"),
    ("region", {"exists": True}, "us", None),
    ("key", "batch-jobs", "batch-jobs", "web-app"),
    ("key", {"in": ["a", "b"]}, "b", None),
]


@pytest.mark.parametrize("signal,condition,hit,miss", CONDITIONS,
                         ids=[f"{c[0]}-{c[1]}" for c in CONDITIONS])
def test_every_operator_on_every_signal(tmp_path: Path, signal: str, condition: Any, hit: Any, miss: Any) -> None:
    r = router(tmp_path, {"a": model(providers=("us", "eu")), "b": model(providers=("us", "eu"))},
               {"chains": {"ca": ["a"], "cb": ["b"]}, "default": "cb",
                "rules": [{"name": "the-rule", "when": {signal: condition}, "chain": "ca"}]})
    plan = r.plan(make_signals(**{signal: hit}), "auto")
    assert (plan.rule, plan.chain) == ("the-rule", "ca")
    assert plan.candidates[0].model.name == "a"
    missed = r.plan(make_signals(**{signal: miss}), "auto")
    assert (missed.rule, missed.chain) == ("default", "cb")


def test_first_match_wins_and_all_conditions_must_hold(tmp_path: Path) -> None:
    r = router(tmp_path, {"a": model(), "b": model(), "c": model()},
               {"chains": {"ca": ["a"], "cb": ["b"], "cc": ["c"]}, "default": "cc",
                "rules": [
                    {"name": "both", "when": {"task_type": "code", "tier": "premium"}, "chain": "ca"},
                    {"name": "code", "when": {"task_type": "code"}, "chain": "cb"},
                    {"name": "also-code", "when": {"task_type": "code"}, "chain": "cc"},
                ]})
    assert r.plan(make_signals(task_type="code", tier="premium"), "auto").rule == "both"
    assert r.plan(make_signals(task_type="code", tier="free"), "auto").rule == "code"
    default = r.plan(make_signals(), "auto")
    assert (default.rule, default.chain, default.reason) == ("default", "cc", "no rule matched")
    assert "task_type='code'" in r.plan(make_signals(task_type="code"), "auto").reason


def test_named_chain_and_named_model_with_fallbacks(tmp_path: Path) -> None:
    r = router(tmp_path, {"a": model(), "b": model(), "c": model()},
               {"chains": {"main": ["a", "b"]}, "default": "main", "fallbacks": {"b": ["c", "a"]}})
    chain = r.plan(make_signals(), "main")
    assert (chain.rule, chain.chain, [c.model.name for c in chain.candidates]) == ("chain", "main", ["a", "b"])
    direct = r.plan(make_signals(), "b")
    assert (direct.rule, [c.model.name for c in direct.candidates]) == ("model", ["b", "c", "a"])
    assert [c.model.name for c in r.plan(make_signals(), "c").candidates] == ["c"]
    with pytest.raises(GatewayError) as caught:
        r.plan(make_signals(), "d")
    assert caught.value.status == 404


def _chain_router(tmp_path: Path) -> Router:
    return router(tmp_path, {
        "tiny": model(window=4000, out=1000, price=(0.1, 0.2)),
        "textonly": model(caps=(), price=(0.1, 0.2)),
        "euonly": model(providers=("eu",)),
        "pricey": model(price=(100.0, 400.0)),
        "fits": model(window=200_000, price=(0.5, 1.0)),
    }, {"chains": {"main": ["tiny", "textonly", "euonly", "pricey", "fits"]}, "default": "main"})


@pytest.mark.parametrize("overrides,skipped,reason", [
    ({"input_tokens": 3800, "max_tokens": 500}, "tiny", "context window: needs ~4300 tokens"),
    ({"max_tokens": 2000}, "tiny", "exceeds the model's output limit 1000"),
    ({"output_format": "json_schema"}, "textonly", "capability: json_schema output needs 'json'"),
    ({"tools": True}, "textonly", "capability: tools need 'tools'"),
    ({"images": True}, "textonly", "capability: images need 'vision'"),
    ({"region": "us"}, "euonly", "region: no deployment in 'us'"),
    ({"max_cost_usd": 0.4, "max_tokens": 1000}, "pricey", "cost ceiling: worst case $0.450000 exceeds $0.4"),
])
def test_each_skip_reason(tmp_path: Path, overrides: dict[str, Any], skipped: str, reason: str) -> None:
    plan = _chain_router(tmp_path).plan(make_signals(**overrides), "auto")
    reasons = {s.model: s.reason for s in plan.skipped}
    assert skipped in reasons and reason in reasons[skipped]
    assert skipped not in [c.model.name for c in plan.candidates]
    assert plan.candidates[-1].model.name == "fits"


def test_cost_ceiling_uses_output_limit_when_max_tokens_unset(tmp_path: Path) -> None:
    # worst case for `fits`: 500 input x 0.5 + 4096 output x 1.0 per million = 0.00435
    r = _chain_router(tmp_path)
    assert "fits" in [c.model.name for c in r.plan(make_signals(max_cost_usd=0.0044), "auto").candidates]
    with pytest.raises(GatewayError):
        r.plan(make_signals(max_cost_usd=0.0043, input_tokens=500), "fits")


def test_no_candidate_says_why_each_was_skipped(tmp_path: Path) -> None:
    with pytest.raises(GatewayError) as caught:
        _chain_router(tmp_path).plan(make_signals(max_cost_usd=0.0, images=True, region="eu"), "auto")
    err = caught.value
    assert (err.status, err.code) == (400, "no_candidate")
    for name, why in [("tiny", "region"), ("textonly", "capability"), ("euonly", "cost ceiling"),
                      ("pricey", "region"), ("fits", "region")]:
        assert f"{name}: {why}" in err.message


def test_unknown_region_never_grows_state(tmp_path: Path) -> None:
    r = _chain_router(tmp_path)
    before = len(r._by_region)
    for i in range(50):
        with pytest.raises(GatewayError):
            r.plan(make_signals(region=f"mars-{i}"), "auto")
    assert len(r._by_region) == before


def test_names_resolve_through_aliases_upstream_ids_and_patterns(tmp_path: Path) -> None:
    models = {"opus": {**model(3), "deployments": [{"provider": "us", "model": "claude-opus-4-1-20250805"}]},
              "haiku": {**model(1), "deployments": [{"provider": "us", "model": "claude-haiku-4-5-20251001"}]}}
    routes = {"chains": {"premium": ["opus", "haiku"], "budget": ["haiku"]}, "default": "budget",
              "aliases": {"claude-opus-5-5": "premium", "claude-haiku-*": "budget", "claude-*": "auto",
                          "claude-opus-4-1-20250805": "haiku"}}
    r = router(tmp_path, models, routes)
    assert r.resolve("opus") == "opus" and r.resolve("premium") == "premium" and r.resolve("auto") == "auto"
    assert r.resolve("claude-opus-5-5") == "premium"                 # an exact alias
    assert r.resolve("claude-haiku-4-5-20251001") == "haiku"         # an upstream id, before any pattern
    assert r.resolve("claude-opus-4-1-20250805") == "haiku"          # an exact alias beats an upstream id
    assert r.resolve("claude-haiku-3") == "budget"                   # the first matching pattern
    assert r.resolve("claude-sonnet-9") == "auto"
    assert r.resolve("gpt-4o") is None
    plan = r.plan(make_signals(), "claude-opus-5-5")
    assert (plan.rule, plan.chain) == ("chain", "premium") and "(as 'claude-opus-5-5')" in plan.reason
    assert r.plan(make_signals(), "claude-haiku-4-5-20251001").candidates[0].model.name == "haiku"
    assert r.plan(make_signals(), "claude-sonnet-9").rule == "default"
    with pytest.raises(GatewayError) as caught:
        r.plan(make_signals(), "gpt-4o")
    assert caught.value.status == 404
