"""The command line: `llm-proxy` and `python -m proxy`.

  serve          run the gateway (uvloop; --workers N processes share the port)
  check          validate providers.yaml and routes.yaml; exit 1 on an error, warn otherwise
  explain        print the routing decision for a request body, as POST /v1/route does
  report         weekly cost, fallback rate and quality per tier from decision logs
  demo           the gateway in front of a simulated provider fleet, no keys needed
  chaos          inject faults into a simulated fleet and prove every fallback step triggers
  systemd-unit   print a unit file for this install

Each command is a module of `proxy.commands`; this file only assembles the parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .commands import chaos, check, demo, explain, report, serve, systemd, with_config

COMMANDS = (
    ("serve", serve, "run the gateway"),
    ("check", check, "validate the config files"),
    ("explain", explain, "show the routing decision for a request body"),
    ("demo", demo, "the gateway in front of a simulated provider fleet"),
    ("report", report, "weekly cost, fallback rate and quality per tier"),
    ("chaos", chaos, "prove every fallback path with injected faults"),
    ("systemd-unit", systemd, "print a systemd unit file for this install"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="An OpenAI-compatible LLM gateway.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, text in COMMANDS:
        module.add_arguments(with_config(sub.add_parser(name, help=text)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:                 # `llm-proxy report | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
