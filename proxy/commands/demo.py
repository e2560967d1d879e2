"""`llm-proxy demo`: the shipped routes in front of a simulated provider fleet.

Every provider of providers.yaml is pointed at the simulator, which speaks its protocol,
so the demo needs no keys and no network: it shows routing, streaming and failover
exactly as configured. It prints a ready curl command and serves until interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from ..config import Config, Provider, replace_providers
from ..simulator import Behaviour
from ..simulator import start as start_simulator
from . import add_log_level, load_or_exit, port_number

SIM_PREFIX = {"openai": "/openai/v1", "anthropic": "/anthropic/v1", "gemini": "/gemini/v1beta"}
DEMO_BEHAVIOUR = Behaviour(ttft_s=0.25, gap_s=0.03, tokens=40)


def simulated(config: Config, sim_port: int) -> Config:
    """The config with every provider served by the simulator on `sim_port`."""
    def change(p: Provider) -> Provider:
        return dataclasses.replace(p, base_url=f"http://127.0.0.1:{sim_port}{SIM_PREFIX[p.api]}",
                                   api_key="sim-key", query={})
    return replace_providers(config, change)


async def _run(config: Config, host: str, port: int, sim_port: int) -> int:
    from ..server.app import run_server

    _, sim_runner, bound = await start_simulator("127.0.0.1", sim_port, DEMO_BEHAVIOUR)
    fleet = simulated(config, bound)
    url = f"http://{host}:{port}"
    auth = " -H 'Authorization: Bearer $YOUR_GATEWAY_KEY'" if config.auth_required else ""
    destination = {"stdout": "on stdout", "off": "nowhere (decision_log: off)"}.get(
        config.server.decision_log, f"in {config.server.decision_log}")
    banner = f"""
llm-proxy demo: the gateway on {url}, a simulated fleet ({', '.join(sorted(config.providers))}) on port {bound}.
Try:

  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "auto", "stream": true, "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  curl {url}/v1/route -H 'X-Task-Type: code'{auth} \\
    -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Fix my bug"}}]}}'

The operations page: {url}/dashboard{" (an admin key as the password)" if config.auth_required else ""}
Decision records go {destination}. Ctrl-C stops.
"""
    try:
        # Printed once the port accepts connections, so a script may run the commands at once.
        return await run_server(fleet, host, port, listening=lambda: print(banner, file=sys.stderr, flush=True))
    finally:
        await sim_runner.cleanup()


def run_demo(config: Config, host: str, port: int, sim_port: int) -> int:
    import uvloop

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return uvloop.run(_run(config, host, port, sim_port))


def run(args: argparse.Namespace) -> int:
    from .. import logs
    from ..server.app import listen_problem

    logs.setup(args.log_level)
    config = load_or_exit(args)
    problem = listen_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return run_demo(config, args.host, args.port, args.sim_port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8080, help="the gateway's port (default 8080)")
    parser.add_argument("--sim-port", type=lambda text: port_number(text, allow_zero=True), default=0,
                        help="the simulated fleet's port (default: any free port)")
    add_log_level(parser)
    parser.set_defaults(func=run)
