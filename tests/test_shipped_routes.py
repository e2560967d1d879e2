"""The shipped providers.yaml and routes.yaml implement the routing guide."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import config as config_module
from proxy.router import Router
from proxy.signals import extract

from .conftest import ROOT

CONFIG = config_module.load(ROOT / "providers.yaml", ROOT / "routes.yaml", env={})
ROUTER = Router(CONFIG)


def plan_for(tokens: int, headers: dict[str, str] | None = None, **body: Any):
    text = "word " * int(tokens * 0.8)          # "word " is 5 ASCII chars: 1.25 tokens
    request = {"model": "auto", "messages": [{"role": "user", "content": text}], **body}
    signals = extract(request, headers or {}, None, CONFIG.server.default_tier, 1000)
    assert abs(signals.input_tokens - tokens) < tokens * 0.02 + 10
    return ROUTER.plan(signals, "auto")


def test_long_input_goes_to_the_long_context_model() -> None:
    plan = plan_for(60_000)
    first = plan.candidates[0].model
    assert plan.rule == "long-context"
    assert first.name == "gemini-2.5-pro" and first.context_window >= 1_000_000


def test_code_goes_to_a_frontier_model() -> None:
    plan = plan_for(5_000, {"X-Task-Type": "code"})
    top = max(m.tier for m in CONFIG.models.values())
    assert plan.rule == "code"
    assert plan.candidates[0].model.tier == top
    assert plan.candidates[0].model.name == "claude-opus-4-1"


def test_short_input_goes_to_the_cheap_model() -> None:
    plan = plan_for(500)
    first = plan.candidates[0].model
    cheapest = min(m.price.input + m.price.output for m in CONFIG.models.values())
    assert plan.rule == "short"
    assert first.tier == 1 and first.price.input + first.price.output == cheapest


def test_everything_else_goes_to_the_mid_tier_model() -> None:
    plan = plan_for(5_000)
    assert (plan.rule, plan.chain) == ("default", "standard")
    assert plan.candidates[0].model.name == "claude-sonnet-4-5"
    assert plan.candidates[0].model.tier == 3


@pytest.mark.parametrize("tier,task,tokens,chain", [
    ("free", None, 5_000, "budget"),
    ("free", "code", 5_000, "budget"),
    ("standard", "code", 5_000, "premium"),
    ("premium", None, 5_000, "premium"),
    ("premium", "code", 80_000, "long-context"),
])
def test_user_tiers_map_to_chains(tier: str, task: str | None, tokens: int, chain: str) -> None:
    headers = {"X-User-Tier": tier, **({"X-Task-Type": task} if task else {})}
    assert plan_for(tokens, headers).chain == chain


def _provider(name: str) -> str:
    return CONFIG.models[name].deployments[0].provider.name


@pytest.mark.parametrize("chain", ["premium", "standard", "long-context"])
def test_chains_step_down_gradually(chain: str) -> None:
    """Primary, a comparable model on another provider, one step down, a cheap baseline."""
    names = CONFIG.chains[chain].models
    models = [CONFIG.models[n] for n in names]
    assert len(models) == 4
    assert models[0].tier == models[1].tier
    assert _provider(names[0]) != _provider(names[1])
    assert models[2].tier == models[1].tier - 1
    assert all(a.tier - b.tier <= 1 for a, b in zip(models, models[1:]))
    prices = [m.price.input + m.price.output for m in models]
    assert prices[3] == min(prices)


def test_budget_chain_spans_providers_and_stays_cheap() -> None:
    names = CONFIG.chains["budget"].models
    assert len({_provider(n) for n in names}) >= 2
    assert all(CONFIG.models[n].tier <= 2 for n in names)


def test_real_providers_read_keys_from_the_environment() -> None:
    envs = {p.name: p.api_key_env for p in CONFIG.providers.values()}
    assert envs == {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "google": "GEMINI_API_KEY"}
    assert {p.api for p in CONFIG.providers.values()} == {"openai", "anthropic", "gemini"}
