"""`llm-proxy systemd-unit`: print a systemd service unit for this very install.

The unit runs this interpreter (`sys.executable`) on the absolute config paths, reloads
with SIGHUP, drains on SIGTERM with a stop timeout longer than the drain deadline, reads
gateway and provider keys from an EnvironmentFile, and is hardened so that the service
can read its install and config and write only its decision-log directory.
Imports config and the shared command helpers only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ..config import Config
from . import load_or_exit, port_number, positive_int

STOP_MARGIN_S = 15          # on top of the drain deadline: cut-off grace, log flush, exit
DEFAULT_ENV_FILE = "/etc/llm-proxy/llm-proxy.env"


def _quote(arg: str) -> str:
    """A word for ExecStart: quoted when it holds a space or a quote, `$` and `%` escaped."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in " \t\"'\\"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _under_home(path: Path) -> bool:
    return any(path == root or root in path.parents for root in (Path("/home"), Path("/root"), Path("/run/user")))


def render(config: Config, *, host: str, port: int, workers: int, user: str, env_file: str,
           description: str = "llm-proxy, an OpenAI-compatible LLM gateway") -> str:
    providers = Path(config.providers_path).resolve()
    routes = Path(config.routes_path).resolve()
    command = [sys.executable, "-m", "proxy", "serve", "--providers", str(providers), "--routes", str(routes),
               "--host", host, "--port", str(port), "--workers", str(workers)]
    package_root = Path(__file__).resolve().parents[2]             # the folder holding proxy/: `-m proxy` finds it
    read_paths = sorted({str(p) for p in (providers.parent, routes.parent, package_root, Path(sys.prefix).resolve())})
    write_paths = []
    destination = config.server.decision_log
    if destination not in ("stdout", "off"):
        log_path = Path(destination)
        if not log_path.is_absolute():
            log_path = routes.parent / log_path                    # the service's WorkingDirectory
        write_paths.append(str(log_path.resolve().parent))
    # ProtectHome=yes would hide an install or config that lives in a home directory.
    home = any(_under_home(Path(p)) for p in (*read_paths, *write_paths, sys.executable))
    stop_s = math.ceil(config.server.drain_timeout_s) + STOP_MARGIN_S
    low_port = port < 1024
    # A Redis on this host (server.state): start after it, so the gateway starts shared, not degraded.
    after = "network-online.target" + (" redis-server.service" if local_redis(config.server.state.url) else "")
    lines = [
        "[Unit]",
        f"Description={description}",
        f"After={after}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"Group={user}",
        f"WorkingDirectory={routes.parent}",
        f"EnvironmentFile={env_file}",
        "Environment=PYTHONUNBUFFERED=1",
        f"Environment=PYTHONPATH={package_root}",
        "ExecStart=" + " ".join(_quote(a) for a in command),
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_s}",
        "Restart=on-failure",
        "RestartSec=2",
        "LimitNOFILE=65536",
        "SyslogIdentifier=llm-proxy",
        "",
        "# Hardening: the service reads its install and config, writes only its decision log.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if home else 'yes'}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "UMask=0027",
        f"CapabilityBoundingSet={'CAP_NET_BIND_SERVICE' if low_port else ''}",
    ]
    if low_port:
        lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")
    lines.append("ReadOnlyPaths=" + " ".join(_quote(p) for p in read_paths))
    if write_paths:
        lines.append("ReadWritePaths=" + " ".join(_quote(p) for p in write_paths))
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def local_redis(url: str) -> bool:
    """Whether `server.state` names a Redis on this host (a unix socket or a loopback address)."""
    if url == "memory":
        return False
    parts = urlsplit(url)
    return parts.scheme == "unix" or parts.hostname in ("localhost", "::1") or \
        (parts.hostname or "").startswith("127.")


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from ..server.app import is_loopback

    config = load_or_exit(args)
    host = args.host or ("0.0.0.0" if config.auth_required else "127.0.0.1")
    if not config.auth_required and not is_loopback(host):
        print(f"warning: routes.yaml has no keys: section, so `serve` will refuse to bind to {host} and the "
              "unit will not start; add keys (or serve on 127.0.0.1)", file=sys.stderr)
    elif not config.auth_required:
        print("note: routes.yaml has no keys: section, so the unit serves on 127.0.0.1 only; add keys to "
              "serve other hosts", file=sys.stderr)
    state = config.server.state
    if state.shared and state.password_env:
        print(f"note: put {state.password_env}=<the Redis password> in {args.env_file}; the unit reads it "
              "from there", file=sys.stderr)
    if state.url.startswith("unix:") and urlsplit(state.url).path.startswith(("/tmp/", "/var/tmp/")):
        print("warning: the unit has a private /tmp (PrivateTmp=yes), so it cannot reach a Redis socket "
              "there; put the socket under /run (Debian: /run/redis/redis-server.sock)", file=sys.stderr)
    elif state.url.startswith("unix:"):
        print(f"note: user {args.user} must be allowed to open {urlsplit(state.url).path}: Debian's Redis makes "
              f"its socket redis:redis, mode 770, so run `usermod -aG redis {args.user}`", file=sys.stderr)
    print(render(config, host=host, port=args.port, workers=args.workers, user=args.user,
                 env_file=os.path.abspath(args.env_file)), end="")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address the service listens on (default 0.0.0.0 when routes.yaml has "
                                       "keys, else 127.0.0.1: without keys the gateway serves loopback only)")
    parser.add_argument("--port", type=port_number, default=8080)
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--user", default="llm-proxy", help="system user the service runs as")
    parser.add_argument("--env-file", default=DEFAULT_ENV_FILE,
                        help=f"file with the key variables, mode 0640 (default {DEFAULT_ENV_FILE})")
    parser.set_defaults(func=cmd_systemd_unit)
