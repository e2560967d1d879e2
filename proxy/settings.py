"""The `server:` section of routes.yaml -> one frozen `ServerSettings`.

Owns what a process needs to serve, apart from the providers and the routing: request and
connection bounds, the decision log, CORS, the breaker policy and where shared state lives.
`config` calls `parse_server` while it reads routes.yaml, so errors name file and path the
same way. Must not import the server, the router or any provider adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .breaker import BreakerPolicy
from .sse import MAX_EVENT_BYTES
from .yaml_paths import Node, opt


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where buckets, breakers, holds and recent requests live: this process, or Redis."""

    url: str = "memory"             # memory | redis://host:6379/0 | rediss://... | unix:///run/redis.sock
    password_env: str | None = None
    instances: int = 1              # gateway instances sharing the URL: each enforces 1/instances while Redis is away
    timeout_ms: float = 50.0        # the bound on every Redis call; past it, local shares
    prefix: str = "llm-proxy"       # key prefix, so that several gateways can share one Redis
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def shared(self) -> bool:
        return self.url != "memory"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 2048
    max_attempts: int = 6
    max_retry_wait_s: float = 10.0
    request_timeout_s: float = 600.0
    default_tier: str = "standard"
    decision_log: str = "stdout"                # "stdout", "off" or a file path
    cors_origins: tuple[str, ...] = ()
    drain_timeout_s: float = 30.0
    body_timeout_s: float = 30.0                # a client must deliver its whole body in this time
    max_upstream_body_bytes: int = 64 * 1024 * 1024     # a non-streamed upstream answer
    max_upstream_event_bytes: int = MAX_EVENT_BYTES     # one event of an upstream stream
    header_timeout_s: float = 10.0              # a request's line and headers must arrive in this time
    keepalive_timeout_s: float = 75.0           # an idle connection between requests is closed after this
    max_connections: int | None = None          # open client connections; None: from the open-file limit
    breaker: BreakerPolicy = BreakerPolicy()
    responses_ttl_s: float = 86400.0            # how long a stored response can be retrieved or followed up
    state: StateSettings = StateSettings()
    feedback_window_s: float = 3600.0           # how long a request id can still be scored


# --------------------------------------------------------------------------- parsing


def _decision_log(node: Node) -> str:
    """`stdout`, `off` or a path. YAML reads a bare `off` (and `no`, `false`) as the boolean
    false, so that means off too; `true` says nothing about where to write."""
    if node.value is False:
        return "off"
    if node.value is True:
        raise node.error("expected stdout, off or a file path, got true")
    return node.string()


def _breaker(node: Node) -> BreakerPolicy:
    m = node.mapping(("consecutive", "ratio", "min_calls", "window_s", "open_s", "max_backoff_s", "cost_factor",
                      "max_open_s", "probes"))
    d = BreakerPolicy()
    ratio = opt(m, "ratio", Node.number, d.ratio)
    if not 0 < ratio <= 1:
        raise m["ratio"].error("must be > 0 and <= 1")
    open_s = opt(m, "open_s", lambda n: n.number(0.001), d.open_s)
    max_open_s = opt(m, "max_open_s", lambda n: n.number(0.001), max(d.max_open_s, open_s))
    if max_open_s < open_s:
        raise m["max_open_s"].error("must be >= open_s")
    # Unset, the backoff cap follows the interval bounds it sits between.
    max_backoff_s = opt(m, "max_backoff_s", lambda n: n.number(0.001), min(max(d.max_backoff_s, open_s), max_open_s))
    if not open_s <= max_backoff_s <= max_open_s:
        raise m["max_backoff_s"].error("must be >= open_s and <= max_open_s")
    return BreakerPolicy(
        consecutive=opt(m, "consecutive", lambda n: n.integer(1), d.consecutive),
        ratio=ratio,
        min_calls=opt(m, "min_calls", lambda n: n.integer(1), d.min_calls),
        window_s=opt(m, "window_s", lambda n: n.number(0.001), d.window_s),
        open_s=open_s,
        max_backoff_s=max_backoff_s,
        cost_factor=opt(m, "cost_factor", Node.number, d.cost_factor),
        max_open_s=max_open_s,
        probes=opt(m, "probes", lambda n: n.integer(1), d.probes),
    )


def _timeout_ms(node: Node) -> float:
    value = node.number(1)
    if value > 5000:
        raise node.error("must be <= 5000 (it bounds every request's admission while Redis hangs)")
    return value


def _state(node: Node, env: Mapping[str, str]) -> StateSettings:
    m = node.mapping(("url", "password_env", "instances", "timeout_ms", "prefix"))
    d = StateSettings()
    url = opt(m, "url", Node.string, d.url)
    if url != "memory":
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise m["url"].error("expected 'memory' or a redis://, rediss:// or unix:// URL")
        if parts.password or "password=" in parts.query:
            raise m["url"].error("no password in the file: name the environment variable that holds it "
                                 "in password_env")
    password_env = opt(m, "password_env", Node.string, None)
    return StateSettings(
        url=url, password_env=password_env,
        instances=opt(m, "instances", lambda n: n.integer(1), d.instances),
        timeout_ms=opt(m, "timeout_ms", _timeout_ms, d.timeout_ms),
        prefix=opt(m, "prefix", Node.string, d.prefix),
        password=env.get(password_env) if password_env else None,
    )


def parse_server(node: Node, env: Mapping[str, str]) -> ServerSettings:
    """The `server:` section of routes.yaml; `env` supplies the Redis password."""
    m = node.mapping((
        "max_body_bytes", "max_messages", "max_attempts", "max_retry_wait_s", "request_timeout_s",
        "default_tier", "decision_log", "cors_origins", "drain_timeout_s", "body_timeout_s", "breaker",
        "responses_ttl_s", "max_upstream_body_bytes", "max_upstream_event_bytes", "state", "feedback_window_s",
        "header_timeout_s", "keepalive_timeout_s", "max_connections",
    ))
    d = ServerSettings()
    return ServerSettings(
        max_body_bytes=opt(m, "max_body_bytes", lambda n: n.integer(1024), d.max_body_bytes),
        max_messages=opt(m, "max_messages", lambda n: n.integer(1), d.max_messages),
        max_attempts=opt(m, "max_attempts", lambda n: n.integer(1), d.max_attempts),
        max_retry_wait_s=opt(m, "max_retry_wait_s", Node.number, d.max_retry_wait_s),
        request_timeout_s=opt(m, "request_timeout_s", lambda n: n.number(0.001), d.request_timeout_s),
        default_tier=opt(m, "default_tier", Node.string, d.default_tier),
        decision_log=opt(m, "decision_log", _decision_log, d.decision_log),
        cors_origins=opt(m, "cors_origins", Node.strings, d.cors_origins),
        drain_timeout_s=opt(m, "drain_timeout_s", Node.number, d.drain_timeout_s),
        body_timeout_s=opt(m, "body_timeout_s", lambda n: n.number(0.001), d.body_timeout_s),
        breaker=opt(m, "breaker", _breaker, d.breaker),
        responses_ttl_s=opt(m, "responses_ttl_s", lambda n: n.number(1), d.responses_ttl_s),
        max_upstream_body_bytes=opt(m, "max_upstream_body_bytes", lambda n: n.integer(1024),
                                    d.max_upstream_body_bytes),
        max_upstream_event_bytes=opt(m, "max_upstream_event_bytes", lambda n: n.integer(1024),
                                     d.max_upstream_event_bytes),
        state=opt(m, "state", lambda n: _state(n, env), d.state),
        feedback_window_s=opt(m, "feedback_window_s", lambda n: n.number(1), d.feedback_window_s),
        header_timeout_s=opt(m, "header_timeout_s", lambda n: n.number(0.001), d.header_timeout_s),
        keepalive_timeout_s=opt(m, "keepalive_timeout_s", lambda n: n.number(0.001), d.keepalive_timeout_s),
        max_connections=opt(m, "max_connections", lambda n: n.integer(1), d.max_connections),
    )
