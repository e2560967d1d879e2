"""`llm-proxy explain`: the routing decision for a request body, exactly as POST /v1/route
returns it, without starting a server or calling any upstream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import load_or_exit


def parse_headers(raw: Sequence[str]) -> dict[str, str]:
    headers = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"error: header '{item}' must look like 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def run(args: argparse.Namespace) -> int:
    from multidict import CIMultiDict

    from ..decisions import Decision
    from ..errors import GatewayError
    from ..gateway import Gateway
    from ..inbound.routing import decide, route_view

    config = load_or_exit(args)
    try:
        raw = sys.stdin.buffer.read() if args.body in (None, "-") else Path(args.body).read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.body}: {exc.strerror}", file=sys.stderr)
        return 1
    headers = CIMultiDict(parse_headers(args.header))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("body", nargs="?", help="BODY.json (default: standard input)")
    parser.set_defaults(func=run)
