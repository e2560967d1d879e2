"""Pure, far under a millisecond: `Signals` + routes.yaml -> `Plan`.

The rules are read in order and the first whose every condition holds names the chain;
with none, the `default` chain. A request may instead name a chain, or a model (that
model, then its `fallbacks`). A name the catalogue does not have resolves (`resolve`) in
this order: an exact alias from routes.yaml, a deployment's upstream id (its catalogue
model: clients of a provider's own API send those), then the first glob-pattern alias
that matches; anything else is a 404. Each candidate of the chain is then filtered, in this order:
context window (input tokens + max_tokens must fit, and max_tokens within the model's
output limit), capabilities (json output needs `json`, tools `tools`, images `vision`),
region (only deployments in the requested region), and the cost ceiling (worst case =
input tokens x input price + max_tokens, or the model's output limit when the request
sets none, x output price). Every skipped candidate keeps its reason.

Everything that can be computed from the config alone is computed once in `Router.__init__`.
No I/O, no clock; imports only config, errors and signals.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Chain, Condition, Config, Deployment, Model, Rule, is_pattern
from .errors import GatewayError, not_found
from .signals import Signals


@dataclass(frozen=True, slots=True)
class Candidate:
    model: Model
    deployments: tuple[Deployment, ...]     # already filtered by region


@dataclass(frozen=True, slots=True)
class Skip:
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    rule: str               # rule name, "default", "chain" or "model"
    reason: str
    chain: str | None
    candidates: tuple[Candidate, ...]
    skipped: tuple[Skip, ...]
    chain_config: Chain | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "reason": self.reason,
            "chain": self.chain,
            "candidates": [
                {"model": c.model.name, "tier": c.model.tier,
                 "deployments": [d.id for d in c.deployments]}
                for c in self.candidates
            ],
            "skipped": [{"model": s.model, "reason": s.reason} for s in self.skipped],
        }


_NUMERIC: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def holds(condition: Condition, value: Any) -> bool:
    op = condition.op
    if op == "eq":
        return bool(value == condition.value)
    if op == "in":
        return value in condition.value
    if op == "exists":
        return (value is not None and value is not False) == condition.value
    return value is not None and _NUMERIC[op](value, condition.value)


def describe(condition: Condition, value: Any) -> str:
    symbol = {"eq": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}.get(condition.op)
    if symbol:
        return f"{condition.signal}={value!r} {symbol} {condition.value!r}" if symbol != "=" \
            else f"{condition.signal}={value!r}"
    if condition.op == "in":
        return f"{condition.signal}={value!r} in {sorted(map(str, condition.value))}"
    return f"{condition.signal} {'present' if condition.value else 'absent'}"


class Router:
    """Compiled routes for one config snapshot; `plan` is the only per-request call."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._rules: tuple[Rule, ...] = config.rules
        self._chain_models = {
            name: tuple(config.models[m] for m in chain.models) for name, chain in config.chains.items()
        }
        self._direct = {
            name: (model,) + tuple(config.models[m] for m in config.fallbacks.get(name, ()) if m != name)
            for name, model in config.models.items()
        }
        # Every (model, region) pair is built here, so that a client-chosen X-Region can
        # never grow a cache; an unknown region simply finds no deployment.
        regions = {p.region for p in config.providers.values() if p.region}
        self._by_region: dict[tuple[str, str | None], Candidate] = {}
        for model in config.models.values():
            self._by_region[(model.name, None)] = Candidate(model, model.deployments)
            for region in regions:
                self._by_region[(model.name, region)] = Candidate(
                    model, tuple(d for d in model.deployments if d.region == region))
        self._nowhere = {m.name: Candidate(m, ()) for m in config.models.values()}
        # What a name means: itself, an exact alias, or a deployment's upstream id (the first
        # model in providers.yaml that deploys it); glob aliases are tried after these.
        names = {name: name for name in (*config.models, *config.chains, "auto")}
        for alias, target in config.aliases.items():
            if not is_pattern(alias):
                names.setdefault(alias, target)
        for model in config.models.values():
            for deployment in model.deployments:
                names.setdefault(deployment.upstream_model, model.name)
        self._names = names
        self._patterns = tuple((re.compile(fnmatch.translate(alias)), target)
                               for alias, target in config.aliases.items() if is_pattern(alias))

    def resolve(self, requested: str) -> str | None:
        """The model, chain or `auto` a client's name means, or None for a name nothing maps."""
        found = self._names.get(requested)
        if found is not None:
            return found
        for pattern, target in self._patterns:
            if pattern.match(requested):
                return target
        return None

    def match(self, signals: Signals) -> tuple[str, str, str]:
        """(rule name, reason, chain name) for an `auto` request."""
        for rule in self._rules:
            for condition in rule.when:
                if not holds(condition, getattr(signals, condition.signal)):
                    break
            else:
                reason = "; ".join(describe(c, getattr(signals, c.signal)) for c in rule.when)
                return rule.name, reason or "unconditional rule", rule.chain
        return "default", "no rule matched", self.config.default

    def plan(self, signals: Signals, requested: str) -> Plan:
        """Raises a 404 GatewayError for an unknown model or chain, 400 `no_candidate` if all skip."""
        chain_config = None
        name = self.resolve(requested)
        if name is None:
            raise not_found(f"unknown model or chain '{requested}'; GET /v1/models lists them")
        aka = "" if name == requested else f" (as '{requested}')"
        if name == "auto":
            rule, reason, chain = self.match(signals)
            models = self._chain_models[chain]
            chain_config = self.config.chains[chain]
            reason += aka
        elif name in self._chain_models:
            rule, reason, chain = "chain", f"chain '{name}' named by the request{aka}", name
            models = self._chain_models[name]
            chain_config = self.config.chains[name]
        else:
            rule, reason, chain = "model", f"model '{name}' named by the request{aka}", None
            models = self._direct[name]

        candidates: list[Candidate] = []
        skipped: list[Skip] = []
        for model in models:
            why = self.skip_reason(model, signals)
            if why is None:
                candidate = self._by_region.get((model.name, signals.region)) or self._nowhere[model.name]
                if not candidate.deployments:
                    why = f"region: no deployment in '{signals.region}'"
                elif signals.max_cost_usd is not None:
                    why = cost_reason(model, signals, signals.max_cost_usd)
                if why is None:
                    candidates.append(candidate)
                    continue
            skipped.append(Skip(model.name, why))
        plan = Plan(rule, reason, chain, tuple(candidates), tuple(skipped), chain_config)
        if not candidates:
            raise no_candidate(plan)
        return plan

    @staticmethod
    def skip_reason(model: Model, signals: Signals) -> str | None:
        """Context window and capability checks; region and cost follow in `plan`."""
        max_tokens = signals.max_tokens
        needed = signals.input_tokens + (max_tokens or 0)
        if needed > model.context_window:
            return f"context window: needs ~{needed} tokens, model has {model.context_window}"
        if max_tokens is not None and max_tokens > model.max_output_tokens:
            return f"context window: max_tokens {max_tokens} exceeds the model's output limit " \
                   f"{model.max_output_tokens}"
        caps = model.capabilities
        if signals.output_format != "text" and "json" not in caps:
            return f"capability: {signals.output_format} output needs 'json'"
        if signals.tools and "tools" not in caps:
            return "capability: tools need 'tools'"
        if signals.images and "vision" not in caps:
            return "capability: images need 'vision'"
        return None


def worst_case_cost(model: Model, signals: Signals) -> float:
    output = signals.max_tokens if signals.max_tokens is not None else model.max_output_tokens
    return (signals.input_tokens * model.price.input + output * model.price.output) / 1e6


def cost_reason(model: Model, signals: Signals, ceiling: float) -> str | None:
    worst = worst_case_cost(model, signals)
    if worst > ceiling:
        return f"cost ceiling: worst case ${worst:.6f} exceeds ${ceiling:.6g}"
    return None


def no_candidate(plan: Plan) -> GatewayError:
    reasons = "; ".join(f"{s.model}: {s.reason}" for s in plan.skipped)
    return GatewayError(400, f"no model can serve this request ({reasons})", "invalid_request_error",
                        "no_candidate", outcome="no_candidate", detail=plan)
