"""The command line: `llm-proxy` and `python -m proxy`.

  serve          run the gateway (uvloop; --workers N processes share the port)
  check          validate providers.yaml and routes.yaml; exit 1 on an error, warn otherwise
  explain        print the routing decision for a request body, as POST /v1/route does
  report         weekly cost, fallback rate and quality per tier from decision logs
  demo           the gateway in front of a simulated provider fleet, no keys needed
  chaos          inject faults into a simulated fleet and prove every fallback step triggers
  systemd-unit   print a unit file for this install

Config files are found from --providers/--routes, then $LLM_PROXY_PROVIDERS and
$LLM_PROXY_ROUTES, then ./providers.yaml and ./routes.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import config as config_module
from .config import Config, ConfigError


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    providers = args.providers or os.environ.get("LLM_PROXY_PROVIDERS") or "providers.yaml"
    routes = args.routes or os.environ.get("LLM_PROXY_ROUTES") or "routes.yaml"
    return providers, routes


def load_or_exit(args: argparse.Namespace) -> Config:
    providers, routes = _paths(args)
    try:
        return config_module.load(providers, routes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check(args: argparse.Namespace) -> int:
    from .checks import warnings

    config = load_or_exit(args)
    found = warnings(config)
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    print(f"ok: {len(config.providers)} providers, {len(config.models)} models, {len(config.chains)} chains, "
          f"{len(config.rules)} rules" + (f", {len(found)} warnings" if found else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs
    from .app import is_loopback, listen_problem, serve
    from .decisions import DecisionLog

    logs.setup(args.log_level)
    config = load_or_exit(args)
    if not config.auth_required and not is_loopback(args.host) and not args.allow_unauthenticated:
        print(f"error: routes.yaml has no keys: section, so the gateway is unauthenticated and will not "
              f"bind to {args.host}; add keys, bind to 127.0.0.1, or pass --allow-unauthenticated",
              file=sys.stderr)
        return 2
    problem = DecisionLog(config.server.decision_log).problem() or listen_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return serve(config, args.host, args.port, args.workers)
    except OSError as exc:                  # lost a race for the port after the check, say
        print(f"error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _parse_headers(raw: Sequence[str]) -> dict[str, str]:
    headers = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"error: header '{item}' must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def cmd_explain(args: argparse.Namespace) -> int:
    from multidict import CIMultiDict

    from .decisions import Decision
    from .errors import GatewayError
    from .gateway import Gateway
    from .handlers import decide, route_view

    config = load_or_exit(args)
    try:
        raw = sys.stdin.buffer.read() if args.body in (None, "-") else Path(args.body).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.body}: {exc.strerror}", file=sys.stderr)
        return 1
    headers = CIMultiDict(_parse_headers(args.header))
    gateway = Gateway(config)
    decision = Decision("explain", 0.0)
    try:
        body: Any = orjson.loads(raw)
        key = gateway.snapshot.authenticate(headers.get("Authorization")) if "Authorization" in headers else None
        _, plan = decide(gateway.snapshot, key, headers, body, decision)
    except orjson.JSONDecodeError as exc:
        print(f"error: the body is not valid JSON: {exc}", file=sys.stderr)
        return 1
    except GatewayError as err:
        print(err.body().decode(), file=sys.stderr)
        return 1
    print(orjson.dumps(route_view(plan, decision), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import logs
    from .app import listen_problem
    from .demo import run_demo

    logs.setup(args.log_level)
    config = load_or_exit(args)
    problem = listen_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return run_demo(config, args.host, args.port, args.sim_port)


LOG_LEVELS = ("debug", "info", "warning", "error")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="An OpenAI-compatible LLM gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--providers", help="providers.yaml (default ./providers.yaml)")
        p.add_argument("--routes", help="routes.yaml (default ./routes.yaml)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--workers", type=positive_int, default=1,
                       help="processes sharing the port with SO_REUSEPORT (default 1)")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="bind beyond loopback although routes.yaml has no keys")
    serve.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                       help="least severe log level written to stderr (default info)")
    serve.set_defaults(func=cmd_serve)

    with_config(sub.add_parser("check", help="validate the config files")).set_defaults(func=cmd_check)

    explain = with_config(sub.add_parser("explain", help="show the routing decision for a request body"))
    explain.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    explain.add_argument("body", nargs="?", help="BODY.json (default: standard input)")
    explain.set_defaults(func=cmd_explain)

    demo = with_config(sub.add_parser("demo", help="the gateway in front of a simulated provider fleet"))
    demo.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    demo.add_argument("--port", type=port_number, default=8080, help="the gateway's port (default 8080)")
    demo.add_argument("--sim-port", type=lambda text: port_number(text, allow_zero=True), default=0,
                      help="the simulated fleet's port (default: any free port)")
    demo.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                      help="least severe log level written to stderr (default info)")
    demo.set_defaults(func=cmd_demo)

    from . import chaos, report, systemd

    for name, module, text in (("report", report, "weekly cost, fallback rate and quality per tier"),
                               ("chaos", chaos, "prove every fallback path with injected faults"),
                               ("systemd-unit", systemd, "print a systemd unit file for this install")):
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
