"""`llm-proxy check`: validate providers.yaml and routes.yaml; exit 1 on an error, warn otherwise."""

from __future__ import annotations

import argparse

from . import load_or_exit


def run(args: argparse.Namespace) -> int:
    import sys

    from ..checks import warnings

    config = load_or_exit(args)
    found = warnings(config)
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    print(f"ok: {len(config.providers)} providers, {len(config.models)} models, {len(config.chains)} chains, "
          f"{len(config.rules)} rules" + (f", {len(found)} warnings" if found else ""))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)
