"""One module per `llm-proxy` command, and the helpers they share.

Each command module has `add_arguments(parser)`, which declares its options and sets
`func`. `proxy.__main__` only assembles the parser; no command imports it.

Config files are found from --providers/--routes, then $LLM_PROXY_PROVIDERS and
$LLM_PROXY_ROUTES, then ./providers.yaml and ./routes.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import config as config_module
from ..config import Config, ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")


def config_paths(args: argparse.Namespace) -> tuple[str, str]:
    providers = args.providers or os.environ.get("LLM_PROXY_PROVIDERS") or "providers.yaml"
    routes = args.routes or os.environ.get("LLM_PROXY_ROUTES") or "routes.yaml"
    return providers, routes


def load_or_exit(args: argparse.Namespace) -> Config:
    providers, routes = config_paths(args)
    try:
        return config_module.load(providers, routes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def with_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--providers", help="providers.yaml (default ./providers.yaml)")
    parser.add_argument("--routes", help="routes.yaml (default ./routes.yaml)")
    return parser


def port_number(text: str, allow_zero: bool = False) -> int:
    """An argparse type: a TCP port, so that 99999 is an error rather than port 34463."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be a whole number of at least 1")
    return value


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                        help="least severe log level written to stderr (default info)")
