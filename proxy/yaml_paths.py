"""YAML read with its locations: every value knows its file and YAML path, so that a
config error can say exactly where it is (`routes.yaml: rules[2].when.tier: ...`).

Owns `ConfigError`, the strict loader (a mapping key given twice is an error) and `Node`,
whose typed readers (`mapping`, `string`, `number`, ...) raise errors naming the place.
Knows nothing of the gateway's config schema; imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A config file is invalid; the message names the file and the YAML path."""



class Node:
    """A YAML value plus its location, so that every error can say where it is."""

    __slots__ = ("value", "file", "path")

    def __init__(self, value: Any, file: str, path: str) -> None:
        self.value = value
        self.file = file
        self.path = path

    def error(self, message: str) -> ConfigError:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return ConfigError(f"{where}: {message}")

    def child(self, key: str | int) -> Node:
        value = self.value[key]
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
        else:
            path = f"{self.path}.{key}" if self.path else str(key)
        return Node(value, self.file, path)

    def mapping(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Node]:
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        out: dict[str, Node] = {}
        for key in self.value:
            if not isinstance(key, str) or key not in allowed:
                raise self.child(str(key)).error(f"unknown key (allowed: {', '.join(allowed)})")
            out[key] = self.child(key)
        for key in required:
            if key not in out:
                raise self.error(f"missing required key '{key}'")
        return out

    def entries(self) -> list[tuple[str, Node]]:
        if self.value is None:
            return []
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        return [(str(k), self.child(k)) for k in self.value]

    def items(self) -> list[Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {_kind(self.value)}")
        return [self.child(i) for i in range(len(self.value))]

    def string(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.error(f"expected a non-empty string, got {_kind(self.value)}")
        return self.value

    def number(self, minimum: float = 0.0) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise self.error(f"expected a number, got {_kind(self.value)}")
        if self.value < minimum:
            raise self.error(f"must be >= {minimum}")
        return float(self.value)

    def integer(self, minimum: int = 0) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.error(f"expected an integer, got {_kind(self.value)}")
        if self.value < minimum:
            raise self.error(f"must be >= {minimum}")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error(f"expected true or false, got {_kind(self.value)}")
        return self.value

    def choice(self, options: tuple[str, ...]) -> str:
        value = self.string()
        if value not in options:
            raise self.error(f"'{value}' is not one of {', '.join(options)}")
        return value

    def strings(self) -> tuple[str, ...]:
        return tuple(n.string() for n in self.items())


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def opt(nodes: dict[str, Node], key: str, read: Callable[[Node], Any], default: Any) -> Any:
    node = nodes.get(key)
    return default if node is None else read(node)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor` merges are fine
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "found an unhashable key", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice in one mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Node:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return Node({} if data is None else data, path.name, "")
