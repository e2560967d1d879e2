"""Config loading: errors name the file and the YAML path; `llm-proxy check` exits 1 on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy import config as config_module
from proxy.checks import warnings

from .conftest import ROOT

PROVIDERS = {
    "providers": {"p": {"api": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "P_KEY"}},
    "models": {
        "big": {"tier": 3, "context_window": 1000, "price": {"input": 1, "output": 2},
                "deployments": [{"provider": "p"}]},
        "small": {"tier": 1, "context_window": 1000, "price": {"input": 1, "output": 2},
                  "deployments": [{"provider": "p"}]},
    },
}
ROUTES = {"chains": {"main": ["big", "small"]}, "default": "main"}


def write(tmp_path: Path, providers: dict, routes: dict) -> tuple[Path, Path]:
    p, r = tmp_path / "providers.yaml", tmp_path / "routes.yaml"
    p.write_text(yaml.safe_dump(providers))
    r.write_text(yaml.safe_dump(routes))
    return p, r


def run_check(p: Path, r: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", "--providers", str(p), "--routes", str(r)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_shipped_files_pass_check() -> None:
    result = run_check(ROOT / "providers.yaml", ROOT / "routes.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
    assert "steps down" not in result.stderr and "never match" not in result.stderr


BROKEN = [
    ("providers", ["models", "big", "deployments", 0, "provider"], "nowhere",
     "providers.yaml: models.big.deployments[0].provider: unknown provider 'nowhere'"),
    ("providers", ["providers", "p", "colour"], "blue", "providers.yaml: providers.p.colour: unknown key"),
    ("providers", ["providers", "p", "api"], "soap", "providers.yaml: providers.p.api: 'soap' is not one of"),
    ("providers", ["models", "big", "tier"], "three", "providers.yaml: models.big.tier: expected an integer"),
    ("routes", ["chains", "main", 1], "medium", "routes.yaml: chains.main[1]: unknown model 'medium'"),
    ("routes", ["default"], "missing", "routes.yaml: default: unknown chain 'missing'"),
    ("routes", ["rules"], [{"name": "r", "when": {"tier": {"gte": 2}}, "chain": "main"}],
     "routes.yaml: rules[0].when.tier.gte: 'gte' needs a numeric signal"),
    ("routes", ["rules"], [{"name": "r", "when": {"mood": "happy"}, "chain": "main"}],
     "routes.yaml: rules[0].when.mood: unknown signal"),
    ("routes", ["rules"], [{"name": "r", "when": {"input_tokens": {"around": 5}}, "chain": "main"}],
     "routes.yaml: rules[0].when.input_tokens.around: unknown operator"),
    ("routes", ["fallbacks"], {"big": ["ghost"]}, "routes.yaml: fallbacks.big[0]: unknown model 'ghost'"),
]


def _set(tree: dict, path: list, value: object) -> None:
    for step in path[:-1]:
        tree = tree[step]
    tree[path[-1]] = value


@pytest.mark.parametrize("which,path,value,message", BROKEN, ids=[b[3].split(":")[1].strip() for b in BROKEN])
def test_broken_config_names_file_and_path(tmp_path: Path, which: str, path: list, value: object,
                                           message: str) -> None:
    providers, routes = yaml.safe_load(yaml.safe_dump(PROVIDERS)), yaml.safe_load(yaml.safe_dump(ROUTES))
    _set(providers if which == "providers" else routes, path, value)
    p, r = write(tmp_path, providers, routes)
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(p, r)
    assert message in str(caught.value)
    result = run_check(p, r)
    assert result.returncode == 1
    assert message in result.stderr


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    r.write_text("chains:\n  main: [big, small\ndefault: main\n")
    result = run_check(p, r)
    assert result.returncode == 1
    assert "routes.yaml" in result.stderr and "invalid YAML" in result.stderr


def test_warnings(tmp_path: Path) -> None:
    routes = {
        "chains": {"main": ["big", "small"], "unused": ["small"]},
        "rules": [
            {"name": "any-code", "when": {"task_type": "code"}, "chain": "main"},
            {"name": "shadowed", "when": {"task_type": "code", "tier": "free"}, "chain": "main"},
            {"name": "empty-range", "when": {"input_tokens": {"gt": 100, "lt": 50}}, "chain": "main"},
            {"name": "empty-in", "when": {"tier": {"in": []}}, "chain": "main"},
        ],
        "default": "main",
    }
    p, r = write(tmp_path, PROVIDERS, routes)
    found = warnings(config_module.load(p, r, env={}), env={})
    text = "\n".join(found)
    assert "chains.main[1]: steps down 2 tiers" in text
    assert "rules[1] ('shadowed'): can never match" in text
    assert "rules[2] ('empty-range'): can never match" in text
    assert "rules[3] ('empty-in'): can never match" in text
    assert "rules[0] ('any-code'): can never match" not in text
    assert "chains.unused: no rule, default or key uses this chain" in text
    assert "P_KEY is not set" in text
    assert len(found) == 6


def test_alias_warnings(tmp_path: Path) -> None:
    providers = yaml.safe_load(yaml.safe_dump(PROVIDERS))
    providers["models"]["big"]["deployments"] = [{"provider": "p", "model": "big-2025"}]
    routes = {**ROUTES, "aliases": {"big-2025": "small", "claude-*": "main", "claude-opus-*": "big", "gpt-*": "auto"}}
    p, r = write(tmp_path, providers, routes)
    found = [w for w in warnings(config_module.load(p, r, env={}), env={}) if "aliases" in w]
    assert len(found) == 2
    assert "aliases.big-2025: is also the upstream id of model 'big'; requests for it go to 'small'" in found[0]
    assert "aliases.claude-opus-*: never applies: the earlier pattern 'claude-*'" in found[1]


def test_secrets_stay_out_of_repr(tmp_path: Path) -> None:
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    config = config_module.load(p, r, env={"P_KEY": "sk-very-secret-value"})
    assert config.providers["p"].api_key == "sk-very-secret-value"
    assert "sk-very-secret-value" not in repr(config)


@pytest.mark.parametrize("routes_extra,message", [
    ({"keys": [{"name": "a", "key_env": "UNSET_A", "tier": "free", "allow": ["nope"]}]},
     "routes.yaml: keys[0].allow[0]: unknown model or chain 'nope'"),
    ({"keys": [{"name": "a", "key_env": "UNSET_A", "tier": "free"},
               {"name": "a", "key_env": "UNSET_B", "tier": "free"}]},
     "routes.yaml: keys[1].name: duplicate key name 'a'"),
    ({"rules": [{"name": "default", "chain": "main"}]}, "routes.yaml: rules[0].name: 'default' is reserved"),
    ({"aliases": {"claude-*": "ghost"}}, "routes.yaml: aliases.claude-*: unknown model or chain 'ghost'"),
    ({"aliases": {"small": "big"}}, "routes.yaml: aliases.small: 'small' is already a model, chain or auto"),
    ({"aliases": {"x": ["big"]}}, "routes.yaml: aliases.x: expected a non-empty string"),
])
def test_key_and_rule_mistakes_are_errors(tmp_path: Path, routes_extra: dict, message: str) -> None:
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, **routes_extra})
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(p, r, env={})        # checked even while the key variables are unset
    assert message in str(caught.value)


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path: Path) -> None:
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    r.write_text("chains: {main: [big]}\ndefault: main\nchains: {other: [small]}\n")
    result = run_check(p, r)
    assert result.returncode == 1
    assert "routes.yaml (line 3)" in result.stderr and "'chains' is given twice" in result.stderr


def test_yaml_merge_keys_still_load_and_unhashable_keys_are_clean_errors(tmp_path: Path) -> None:
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    p.write_text("""
providers:
  p: {api: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  big: &base {tier: 3, context_window: 1000, price: {input: 1, output: 2}, deployments: [{provider: p}]}
  small: {<<: *base, tier: 2}
""")
    assert config_module.load(p, r, env={}).models["small"].tier == 2
    r.write_text("chains: {main: [big]}\ndefault: main\n? [a, b]\n: 1\n")
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(p, r, env={})
    assert "routes.yaml (line 3)" in str(caught.value) and "unhashable" in str(caught.value)


@pytest.mark.parametrize("allow", [[{"a": 1}], "big"])
def test_allow_must_be_a_list_of_names_even_with_the_key_unset(tmp_path: Path, allow: object) -> None:
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "keys": [{"name": "k", "key_env": "UNSET", "tier": "free",
                                                           "allow": allow}]})
    with pytest.raises(config_module.ConfigError) as caught:
        config_module.load(p, r, env={})
    assert "routes.yaml: keys[0].allow" in str(caught.value)


@pytest.mark.parametrize("written,meant", [("off", "off"), ("false", "off"), ("no", "off"), ("stdout", "stdout"),
                                           ("/var/log/llm-proxy/d.jsonl", "/var/log/llm-proxy/d.jsonl")])
def test_decision_log_off_as_yaml_reads_it(tmp_path: Path, written: str, meant: str) -> None:
    """A bare `off` is the boolean false to YAML: it still means off, as the README writes it."""
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    r.write_text(r.read_text() + f"server:\n  decision_log: {written}\n")
    assert config_module.load(p, r, env={}).server.decision_log == meant


def test_decision_log_true_is_an_error(tmp_path: Path) -> None:
    p, r = write(tmp_path, PROVIDERS, ROUTES)
    r.write_text(r.read_text() + "server:\n  decision_log: true\n")
    with pytest.raises(config_module.ConfigError, match="server.decision_log: expected stdout, off or a file path"):
        config_module.load(p, r, env={})


def test_admin_is_a_boolean_flag_on_a_key(tmp_path: Path) -> None:
    keys = [{"name": "ops", "key_env": "OPS", "tier": "free", "admin": True, "allow": []},
            {"name": "app", "key_env": "APP", "tier": "free"}]
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "keys": keys})
    config = config_module.load(p, r, env={"OPS": "o", "APP": "a"})
    assert [(k.name, k.admin) for k in config.keys] == [("ops", True), ("app", False)]
    keys[0]["admin"] = "yes"
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "keys": keys})
    with pytest.raises(config_module.ConfigError, match=r"keys\[0\].admin: expected true or false"):
        config_module.load(p, r, env={"OPS": "o", "APP": "a"})
    keys[0]["admin"] = False
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "keys": keys})
    found = warnings(config_module.load(p, r, env={"OPS": "o", "APP": "a"}), env={"OPS": "o", "APP": "a"})
    assert any("no key that admits anyone has 'admin: true'" in w for w in found)
    keys[0]["admin"] = True             # an admin key whose variable is unset admits nobody either
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "keys": keys})
    found = warnings(config_module.load(p, r, env={"APP": "a"}), env={"APP": "a"})
    assert any("nobody can read /metrics or /dashboard" in w for w in found)
    assert not any("nobody can read" in w for w in warnings(config_module.load(p, r, env={"OPS": "o"}),
                                                             env={"OPS": "o"}))


def test_an_unset_redis_password_variable_is_warned_about(tmp_path: Path) -> None:
    state = {"url": "redis://127.0.0.1:6379/0", "password_env": "REDIS_PW"}
    p, r = write(tmp_path, PROVIDERS, {**ROUTES, "server": {"state": state}})
    assert any("server.state.password_env: REDIS_PW is not set" in w
               for w in warnings(config_module.load(p, r, env={}), env={}))
    assert not any("REDIS_PW" in w
                   for w in warnings(config_module.load(p, r, env={"REDIS_PW": "x"}), env={"REDIS_PW": "x"}))


def readme_yaml_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


@pytest.mark.parametrize("block", readme_yaml_blocks(), ids=lambda b: b.split(":", 1)[0].strip())
def test_every_yaml_block_of_the_readme_loads(tmp_path: Path, block: str) -> None:
    """Each README example, merged into the shipped files, passes the real loader: an example a
    user copies must not be rejected (as `decision_log: off` once was)."""
    fragment = yaml.safe_load(block)
    providers = yaml.safe_load((ROOT / "providers.yaml").read_text())
    routes = yaml.safe_load((ROOT / "routes.yaml").read_text())
    target = providers if set(fragment) <= {"providers", "models"} else routes    # the loader rejects the rest
    for section, value in fragment.items():
        if isinstance(value, dict) and isinstance(target.get(section), dict):
            target[section] = {**target[section], **value}
        else:
            target[section] = value
    p, r = write(tmp_path, providers, routes)
    config_module.load(p, r, env={})
