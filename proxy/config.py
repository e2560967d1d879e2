"""providers.yaml + routes.yaml -> one frozen `Config`.

Owns the schema: what each key means, its validation (unknown keys, wrong types,
dangling references) and the frozen dataclasses. Every error names the file and the YAML
path, for example ``routes.yaml: rules[2].when.tier: unknown operator 'gte'``; reading
YAML with those locations is `yaml_paths`, the `server:` section is `settings`, the
warnings of `llm-proxy check` are `checks`.

Secrets are read from the environment here and kept out of every ``repr``.
Must not import the server, the router or any provider adapter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import ServerSettings, parse_server
from .yaml_paths import ConfigError as ConfigError  # re-exported: the error every config user catches
from .yaml_paths import Node, load_yaml, opt

PROTOCOLS = ("openai", "anthropic", "gemini")
STRATEGIES = ("weighted", "least_loaded", "lowest_latency", "cheapest")
CAPABILITIES = ("code", "json", "tools", "vision", "prefill", "reasoning")
SIGNAL_NAMES = (
    "input_tokens", "max_tokens", "task_type", "tier", "latency", "output_format",
    "tools", "images", "region", "key",
)
NUMERIC_SIGNALS = ("input_tokens", "max_tokens")
OPERATORS = ("in", "gt", "gte", "lt", "lte", "exists")
LATENCY_CLASSES = ("realtime", "interactive", "batch")
OUTPUT_FORMATS = ("text", "json_object", "json_schema")


RESERVED_RULE_NAMES = ("default", "model", "chain", "none")
KEY_FIELDS = ("name", "key_env", "key_sha256", "tier", "trust_tier_header", "allow", "rpm", "admin")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0
    first_token_s: float = 15.0
    idle_s: float = 30.0
    total_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    api: str
    base_url: str
    api_key_env: str | None
    region: str | None
    limits: Limits
    timeouts: Timeouts
    headers: Mapping[str, str]
    query: Mapping[str, str]
    auth_header: str | None
    api_key: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str                 # "<model>/<provider>/<index>": stable across reloads
    provider: Provider
    upstream_model: str
    weight: float
    limits: Limits
    price: Price            # the model's price unless the deployment sets its own

    @property
    def region(self) -> str | None:
        return self.provider.region


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    tier: int
    context_window: int
    max_output_tokens: int
    price: Price
    capabilities: frozenset[str]
    deployments: tuple[Deployment, ...]
    strategy: str = "weighted"


@dataclass(frozen=True, slots=True)
class Condition:
    signal: str
    op: str                 # eq | in | gt | gte | lt | lte | exists
    value: Any


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: tuple[Condition, ...]
    chain: str


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    models: tuple[str, ...]
    on_stream_failure: str = "error"            # error | continue
    fallback_on_content_policy: bool = False


@dataclass(frozen=True, slots=True)
class GatewayKey:
    name: str
    tier: str
    trust_tier_header: bool
    allow: frozenset[str] | None                # models and chains; None means all
    rpm: int | None
    sha256: bytes = field(repr=False, compare=False, default=b"")
    admin: bool = False                         # may read /metrics and the operations page


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    chains: Mapping[str, Chain]
    rules: tuple[Rule, ...]
    default: str
    fallbacks: Mapping[str, tuple[str, ...]]
    keys: tuple[GatewayKey, ...]
    auth_required: bool                         # routes.yaml has a keys: section
    server: ServerSettings
    providers_path: str
    routes_path: str
    # Names clients send -> a model, chain or `auto`: exact names, and glob patterns in file order.
    aliases: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- providers.yaml


def _limits(node: Node) -> Limits:
    m = node.mapping(("rpm", "tpm"))
    return Limits(rpm=opt(m, "rpm", lambda n: n.integer(1), None),
                  tpm=opt(m, "tpm", lambda n: n.integer(1), None))


def _timeouts(node: Node) -> Timeouts:
    m = node.mapping(("connect_s", "first_token_s", "idle_s", "total_s"))
    d = Timeouts()
    return Timeouts(
        connect_s=opt(m, "connect_s", lambda n: n.number(0.001), d.connect_s),
        first_token_s=opt(m, "first_token_s", lambda n: n.number(0.001), d.first_token_s),
        idle_s=opt(m, "idle_s", lambda n: n.number(0.001), d.idle_s),
        total_s=opt(m, "total_s", lambda n: n.number(0.001), d.total_s),
    )


def _price(node: Node) -> Price:
    m = node.mapping(("input", "output", "cached_input", "cache_write"), ("input", "output"))
    return Price(
        input=m["input"].number(), output=m["output"].number(),
        cached_input=opt(m, "cached_input", Node.number, None),
        cache_write=opt(m, "cache_write", Node.number, None),
    )


def _str_map(node: Node) -> dict[str, str]:
    return {k: v.string() for k, v in node.entries()}


def _provider(name: str, node: Node, env: Mapping[str, str]) -> Provider:
    m = node.mapping(
        ("api", "base_url", "api_key_env", "region", "limits", "timeouts", "headers", "query", "auth_header"),
        ("api", "base_url"),
    )
    base_url = m["base_url"].string().rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise m["base_url"].error("must start with http:// or https://")
    key_env = opt(m, "api_key_env", Node.string, None)
    return Provider(
        name=name,
        api=m["api"].choice(PROTOCOLS),
        base_url=base_url,
        api_key_env=key_env,
        region=opt(m, "region", Node.string, None),
        limits=opt(m, "limits", _limits, Limits()),
        timeouts=opt(m, "timeouts", _timeouts, Timeouts()),
        headers=opt(m, "headers", _str_map, {}),
        query=opt(m, "query", _str_map, {}),
        auth_header=opt(m, "auth_header", Node.string, None),
        api_key=env.get(key_env) if key_env else None,
    )


def _model(name: str, node: Node, providers: Mapping[str, Provider]) -> Model:
    m = node.mapping(
        ("tier", "context_window", "max_output_tokens", "price", "capabilities", "deployments", "strategy"),
        ("tier", "context_window", "price", "deployments"),
    )
    caps = m.get("capabilities")
    capabilities = frozenset(n.choice(CAPABILITIES) for n in caps.items()) if caps else frozenset()
    context_window = m["context_window"].integer(1)
    price = _price(m["price"])
    deployments = []
    for i, dnode in enumerate(m["deployments"].items()):
        d = dnode.mapping(("provider", "model", "weight", "limits", "price"), ("provider",))
        pname = d["provider"].string()
        if pname not in providers:
            raise d["provider"].error(f"unknown provider '{pname}' (not in providers:)")
        deployments.append(Deployment(
            id=f"{name}/{pname}/{i}",
            provider=providers[pname],
            upstream_model=opt(d, "model", Node.string, name),
            weight=opt(d, "weight", lambda n: n.number(0.0001), 1.0),
            limits=opt(d, "limits", _limits, Limits()),
            price=opt(d, "price", _price, price),
        ))
    if not deployments:
        raise m["deployments"].error("a model needs at least one deployment")
    return Model(
        name=name,
        tier=m["tier"].integer(0),
        context_window=context_window,
        max_output_tokens=opt(m, "max_output_tokens", lambda n: n.integer(1), min(4096, context_window)),
        price=price,
        capabilities=capabilities,
        deployments=tuple(deployments),
        strategy=opt(m, "strategy", lambda n: n.choice(STRATEGIES), "weighted"),
    )


# --------------------------------------------------------------------------- routes.yaml


def _condition(signal: str, node: Node) -> list[Condition]:
    if signal not in SIGNAL_NAMES:
        raise node.error(f"unknown signal (known: {', '.join(SIGNAL_NAMES)})")
    value = node.value
    if not isinstance(value, dict):
        if isinstance(value, (list, type(None))):
            raise node.error("expected a plain value or an operator mapping such as {in: [...]}")
        return [Condition(signal, "eq", value)]
    out = []
    for op, arg in node.entries():
        if op not in OPERATORS:
            raise arg.error(f"unknown operator (known: {', '.join(OPERATORS)})")
        if op == "in":
            if not isinstance(arg.value, list):
                raise arg.error("'in' takes a list")
            out.append(Condition(signal, "in", frozenset(arg.value)))
        elif op == "exists":
            out.append(Condition(signal, "exists", arg.boolean()))
        else:
            if signal not in NUMERIC_SIGNALS:
                raise arg.error(f"'{op}' needs a numeric signal ({', '.join(NUMERIC_SIGNALS)})")
            bound = arg.number(minimum=-1e18)
            out.append(Condition(signal, op, int(bound) if bound.is_integer() else bound))   # 1000, not 1000.0
    return out


def _chain(name: str, node: Node) -> Chain:
    if isinstance(node.value, list):
        return Chain(name, node.strings())
    m = node.mapping(("models", "on_stream_failure", "fallback_on_content_policy"), ("models",))
    return Chain(
        name=name,
        models=m["models"].strings(),
        on_stream_failure=opt(m, "on_stream_failure", lambda n: n.choice(("error", "continue")), "error"),
        fallback_on_content_policy=opt(m, "fallback_on_content_policy", Node.boolean, False),
    )


def _key(node: Node, env: Mapping[str, str]) -> GatewayKey | None:
    m = node.mapping(KEY_FIELDS, ("name", "tier"))
    if "allow" in m:
        m["allow"].strings()            # checked even when the key's variable is unset
    if ("key_env" in m) == ("key_sha256" in m):
        raise node.error("give exactly one of key_env or key_sha256")
    if "key_env" in m:
        secret = env.get(m["key_env"].string())
        if not secret:
            return None     # `check` warns; an unset key simply admits nobody
        digest = hashlib.sha256(secret.encode()).digest()
    else:
        hexdigest = m["key_sha256"].string().lower()
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise m["key_sha256"].error("expected 64 hex digits")
    allow = m.get("allow")
    return GatewayKey(
        name=m["name"].string(),
        tier=m["tier"].string(),
        trust_tier_header=opt(m, "trust_tier_header", Node.boolean, False),
        allow=frozenset(allow.strings()) if allow is not None else None,
        rpm=opt(m, "rpm", lambda n: n.integer(1), None),
        sha256=digest,
        admin=opt(m, "admin", Node.boolean, False),
    )


def is_pattern(name: str) -> bool:
    """An alias name with a glob wildcard (`*`, `?`, `[...]`) matches many names."""
    return any(c in name for c in "*?[")


def _aliases(node: Node, models: Mapping[str, Model], chains: Mapping[str, Chain]) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for name, target_node in node.entries():
        target = target_node.string()
        if target not in models and target not in chains and target != "auto":
            raise target_node.error(f"unknown model or chain '{target}' (an alias names a model, a chain or auto)")
        if name in models or name in chains or name == "auto":
            raise target_node.error(f"'{name}' is already a model, chain or auto; an alias cannot change it")
        aliases[name] = target
    return aliases


# --------------------------------------------------------------------------- load


def load(providers_path: str | os.PathLike[str], routes_path: str | os.PathLike[str],
         env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and cross-check both files. Raises ConfigError naming file and path."""
    env = os.environ if env is None else env
    p_root = load_yaml(Path(providers_path)).mapping(("providers", "models"), ("providers", "models"))
    providers = {name: _provider(name, n, env) for name, n in p_root["providers"].entries()}
    models = {name: _model(name, n, providers) for name, n in p_root["models"].entries()}

    r_root = load_yaml(Path(routes_path)).mapping(
        ("chains", "rules", "default", "fallbacks", "aliases", "keys", "server"), ("chains", "default"))
    chains = {name: _chain(name, n) for name, n in r_root["chains"].entries()}
    for name, chain in chains.items():
        if not chain.models:
            raise r_root["chains"].child(name).error("a chain needs at least one model")
        for i, model in enumerate(chain.models):
            if model not in models:
                node = r_root["chains"].child(name)
                at = node.child("models").child(i) if isinstance(node.value, dict) else node.child(i)
                raise at.error(f"unknown model '{model}' (not in providers.yaml models:)")
        if name in models or name == "auto":
            raise r_root["chains"].child(name).error("a chain cannot share its name with a model or 'auto'")

    rules = []
    for rnode in (r_root["rules"].items() if "rules" in r_root else []):
        r = rnode.mapping(("name", "when", "chain"), ("name", "chain"))
        chain_name = r["chain"].string()
        if chain_name not in chains:
            raise r["chain"].error(f"unknown chain '{chain_name}'")
        when: list[Condition] = []
        for signal, cnode in (r["when"].entries() if "when" in r else []):
            when.extend(_condition(signal, cnode))
        rules.append(Rule(r["name"].string(), tuple(when), chain_name))
    names = [r.name for r in rules]
    for i, name in enumerate(names):
        if name in RESERVED_RULE_NAMES:
            raise r_root["rules"].child(i).child("name").error(
                f"'{name}' is reserved: X-Route-Rule uses it when no rule applies")
        if name in names[:i]:
            raise r_root["rules"].child(i).child("name").error(f"duplicate rule name '{name}'")

    default = r_root["default"].string()
    if default not in chains:
        raise r_root["default"].error(f"unknown chain '{default}'")

    fallbacks: dict[str, tuple[str, ...]] = {}
    if "fallbacks" in r_root:
        for name, fnode in r_root["fallbacks"].entries():
            if name not in models:
                raise fnode.error(f"unknown model '{name}'")
            targets = fnode.strings()
            for i, target in enumerate(targets):
                if target not in models:
                    raise fnode.child(i).error(f"unknown model '{target}'")
            fallbacks[name] = targets

    aliases = _aliases(r_root["aliases"], models, chains) if "aliases" in r_root else {}

    keys: list[GatewayKey] = []
    key_names: set[str] = set()
    for knode in (r_root["keys"].items() if "keys" in r_root else []):
        key = _key(knode, env)
        fields = knode.mapping(KEY_FIELDS)   # `_key` has checked its shape; read it again here
        key_name = fields["name"].string()
        if key_name in key_names:       # limits, metrics and feedback ownership all go by name
            raise knode.child("name").error(f"duplicate key name '{key_name}'")
        key_names.add(key_name)
        for i, target in enumerate(fields["allow"].strings() if "allow" in fields else ()):
            if target not in models and target not in chains and target != "auto":
                raise knode.child("allow").child(i).error(f"unknown model or chain '{target}'")
        if key is not None:
            keys.append(key)

    return Config(
        providers=providers, models=models, chains=chains, rules=tuple(rules), default=default,
        fallbacks=fallbacks, keys=tuple(keys), auth_required="keys" in r_root,
        server=opt(r_root, "server", lambda n: parse_server(n, env), ServerSettings()),
        providers_path=str(providers_path), routes_path=str(routes_path), aliases=aliases,
    )


def replace_providers(config: Config, change: Callable[[Provider], Provider]) -> Config:
    """The same config with every provider passed through `change` (demo, chaos and tests
    point the shipped config at the simulator this way)."""
    import dataclasses

    providers = {name: change(p) for name, p in config.providers.items()}
    models = {
        name: dataclasses.replace(m, deployments=tuple(
            dataclasses.replace(d, provider=providers[d.provider.name]) for d in m.deployments))
        for name, m in config.models.items()
    }
    return dataclasses.replace(config, providers=providers, models=models)


def declared_keys(routes_path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """(name, key_env) of every key in routes.yaml, set or not: for `check` warnings."""
    root = load_yaml(Path(routes_path))
    out = []
    for item in (root.value.get("keys") or []) if isinstance(root.value, dict) else []:
        if isinstance(item, dict):
            out.append((str(item.get("name")), item.get("key_env")))
    return out
