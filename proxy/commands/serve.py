"""`llm-proxy serve`: run the gateway (uvloop; --workers N processes share the port)."""

from __future__ import annotations

import argparse
import sys

from . import add_log_level, load_or_exit, port_number, positive_int


def run(args: argparse.Namespace) -> int:
    from .. import logs
    from ..decisions import DecisionLog
    from ..server.app import is_loopback, listen_problem, serve

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="bind beyond loopback although routes.yaml has no keys")
    add_log_level(parser)
    parser.set_defaults(func=run)
