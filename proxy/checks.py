"""Warnings for `llm-proxy check`: a config that loads but probably does not do what was meant.

- a chain step that drops more than one tier (users would notice the quality cliff)
- a rule that can never match (an empty `in`, a numeric range with nothing in it, an
  unknown latency class or output format, or an earlier rule that matches everything it does)
- a chain that no rule, default or key uses
- a provider or gateway key whose environment variable is unset, or the Redis password's
- an alias that hides a deployment's upstream id (the alias wins), or a pattern alias that an
  earlier pattern already catches
- gateway keys without a usable admin key: /metrics and /dashboard would be closed to everyone

Pure: takes a Config, returns strings. Imports config only.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping

from .config import LATENCY_CLASSES, OUTPUT_FORMATS, Condition, Config, Rule, declared_keys, is_pattern


def _never_matches(rule: Rule) -> str | None:
    low, high = float("-inf"), float("inf")
    numeric: dict[str, tuple[float, float]] = {}
    for c in rule.when:
        if c.op == "in" and not c.value:
            return f"'{c.signal}: {{in: []}}' admits nothing"
        if c.op == "eq" and c.signal == "latency" and c.value not in LATENCY_CLASSES:
            return f"latency '{c.value}' is not one of {', '.join(LATENCY_CLASSES)}"
        if c.op == "eq" and c.signal == "output_format" and c.value not in OUTPUT_FORMATS:
            return f"output_format '{c.value}' is not one of {', '.join(OUTPUT_FORMATS)}"
        if c.op in ("gt", "gte", "lt", "lte"):
            low, high = numeric.get(c.signal, (float("-inf"), float("inf")))
            if c.op == "gt":
                low = max(low, c.value + 1)         # token counts are integers
            elif c.op == "gte":
                low = max(low, c.value)
            elif c.op == "lt":
                high = min(high, c.value - 1)
            else:
                high = min(high, c.value)
            numeric[c.signal] = (low, high)
            if low > high:
                return f"no {c.signal} satisfies its conditions"
    return None


def _covers(earlier: tuple[Condition, ...], later: tuple[Condition, ...]) -> bool:
    """True when every condition of `earlier` also appears in `later`: `later` is shadowed."""
    return all(c in later for c in earlier)


def warnings(config: Config, env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    out: list[str] = []
    routes, providers = config.routes_path, config.providers_path
    for name, chain in config.chains.items():
        for i in range(1, len(chain.models)):
            a, b = config.models[chain.models[i - 1]], config.models[chain.models[i]]
            if a.tier - b.tier > 1:
                out.append(f"{routes}: chains.{name}[{i}]: steps down {a.tier - b.tier} tiers "
                           f"({a.name} tier {a.tier} -> {b.name} tier {b.tier}); insert a model in between")
    for i, rule in enumerate(config.rules):
        why = _never_matches(rule)
        if why is None:
            for j, earlier in enumerate(config.rules[:i]):
                if _covers(earlier.when, rule.when):
                    why = f"rules[{j}] ('{earlier.name}') matches every request this rule would"
                    break
        if why:
            out.append(f"{routes}: rules[{i}] ('{rule.name}'): can never match: {why}")
    used = {r.chain for r in config.rules} | {config.default}
    for key in config.keys:
        used |= set(key.allow or ())
    for name in config.chains:
        if name not in used:
            out.append(f"{routes}: chains.{name}: no rule, default or key uses this chain "
                       f"(it is reachable only by naming it as the model)")
    out += _alias_warnings(config)
    for name, provider in config.providers.items():
        if provider.api_key_env and not env.get(provider.api_key_env):
            out.append(f"{providers}: providers.{name}.api_key_env: {provider.api_key_env} is not set")
    if config.auth_required and not any(key.admin for key in config.keys):
        out.append(f"{routes}: keys: no key that admits anyone has 'admin: true', so nobody can read /metrics "
                   f"or /dashboard (give the monitoring system its own admin key)")
    for i, (name, key_env) in enumerate(declared_keys(routes)):
        if key_env and not env.get(key_env):
            out.append(f"{routes}: keys[{i}] ('{name}'): {key_env} is not set; this key admits nobody")
    password_env = config.server.state.password_env
    if password_env and not env.get(password_env):
        out.append(f"{routes}: server.state.password_env: {password_env} is not set; the gateway sends Redis no "
                   f"password (a Redis that requires one keeps every instance in degraded mode)")
    return out


def _alias_warnings(config: Config) -> list[str]:
    out = []
    upstream = {d.upstream_model: m.name for m in reversed(list(config.models.values())) for d in m.deployments}
    patterns: list[str] = []
    for name, target in config.aliases.items():
        if not is_pattern(name):
            if name in upstream and upstream[name] != target:
                out.append(f"{config.routes_path}: aliases.{name}: is also the upstream id of model "
                           f"'{upstream[name]}'; requests for it go to '{target}'")
            continue
        earlier = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        if earlier is not None:
            out.append(f"{config.routes_path}: aliases.{name}: never applies: the earlier pattern "
                       f"'{earlier}' matches every name it does")
        patterns.append(name)
    return out
