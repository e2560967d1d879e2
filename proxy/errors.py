"""The error tree: what a client is told, and how an upstream failure is classified.

`GatewayError` is everything the gateway answers with an error status; it renders
OpenAI's error shape. `UpstreamFailure` is one failed attempt, classified once into a
`FailureClass`; the `POLICY` table then decides retry, fallback and breaker impact, so
no other module needs to reason about status codes. When nothing served, `final_error`
derives the client's status from the attempts.

Imports nothing from the package.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


class FailureClass(enum.Enum):
    CALLER = "caller_error"             # 400/404/422: the request itself is wrong
    CONTEXT_LENGTH = "context_length"   # 400 context_length_exceeded
    CONTENT_POLICY = "content_policy"   # refused by the provider's content filter
    AUTH = "auth"                       # 401/403: our provider key is wrong or revoked
    RATE_LIMITED = "rate_limited"       # 429, or our own bucket for the deployment is empty
    OVERLOADED = "overloaded"           # 503/529 or an "overloaded" error event
    SERVER = "server_error"             # 500/502 and other 5xx
    TIMEOUT = "timeout"                 # no headers or no first content in time, or a stall
    CONNECT = "connect"                 # refused, reset or closed before response headers
    PROTOCOL = "protocol"               # an answer we cannot read, or an in-band error event
    DIVERGED = "diverged"               # a restarted answer did not reproduce the text already sent


@dataclass(frozen=True, slots=True)
class Policy:
    fallback: bool      # try the next deployment / candidate
    retry_same: bool    # one more try on the same deployment first
    breaker: bool       # counts as a failure for the deployment's breaker


POLICY: dict[FailureClass, Policy] = {
    FailureClass.CALLER: Policy(fallback=False, retry_same=False, breaker=False),
    FailureClass.CONTEXT_LENGTH: Policy(fallback=True, retry_same=False, breaker=False),
    FailureClass.CONTENT_POLICY: Policy(fallback=False, retry_same=False, breaker=False),
    FailureClass.AUTH: Policy(fallback=True, retry_same=False, breaker=True),
    FailureClass.RATE_LIMITED: Policy(fallback=True, retry_same=True, breaker=False),
    FailureClass.OVERLOADED: Policy(fallback=True, retry_same=True, breaker=True),
    FailureClass.SERVER: Policy(fallback=True, retry_same=True, breaker=True),
    FailureClass.TIMEOUT: Policy(fallback=True, retry_same=False, breaker=True),
    FailureClass.CONNECT: Policy(fallback=True, retry_same=True, breaker=True),
    FailureClass.PROTOCOL: Policy(fallback=True, retry_same=False, breaker=True),
    FailureClass.DIVERGED: Policy(fallback=True, retry_same=False, breaker=False),     # it answered, differently
}


# Credential shapes providers are known to echo: OpenAI/Anthropic style `sk-...`, Google `AIza...`,
# and any bearer token. Exact occurrences of the configured key are removed first.
_CREDENTIAL = re.compile(r"(?i)\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}|\bAIza[0-9A-Za-z_\-]{20,}|\bbearer\s+[^\s\"',]+")
REDACTED = "[redacted]"
MAX_MESSAGE_CHARS = 500         # an upstream's reason as a record or a client gets it


def redact(message: str, secret: str | None) -> str:
    """`message` without the provider key or anything shaped like a credential, then cut to
    MAX_MESSAGE_CHARS. In that order: a cut first could split an echoed key, and the part
    left would match neither the key nor a credential's shape."""
    if secret and secret in message:
        message = message.replace(secret, REDACTED)
    message = _CREDENTIAL.sub(REDACTED, message)
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."


@dataclass(slots=True)
class UpstreamFailure(Exception):
    """One failed attempt. `message` is the provider's reason, never a secret."""

    kind: FailureClass
    message: str
    status: int | None = None
    code: str | None = None
    retry_after: float | None = None
    in_stream: bool = False             # an error event inside a 200 stream

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


@dataclass(slots=True)
class GatewayError(Exception):
    """An answer with an error status, in OpenAI's error shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str = "error"              # for the decision record
    detail: Any = None                  # extra structured data for the decision record

    def __str__(self) -> str:
        return self.message

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param, outcome="bad_request")


def not_found(message: str, param: str | None = "model") -> GatewayError:
    return GatewayError(404, message, "invalid_request_error", "model_not_found", param, outcome="not_found")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, "authentication_error", "invalid_api_key", outcome="unauthorized")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, "permission_error", "model_not_allowed", "model", outcome="forbidden")


class Tried(Protocol):
    """An attempt as the final error lists it (`decisions.AttemptRecord`)."""

    @property
    def model(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def failure(self) -> str | None: ...
    @property
    def status(self) -> int | None: ...
    @property
    def message(self) -> str | None: ...


class Limit(Protocol):
    """A bucket as a refusal names it (`state.BucketSpec`)."""

    @property
    def name(self) -> str: ...
    @property
    def per_minute(self) -> int: ...


def key_limited(key: Limit | None, retry_after: float) -> GatewayError:
    """429 for a gateway key over its own `rpm` (`key`: its bucket, named `key:<name>`)."""
    assert key is not None
    name = key.name.removeprefix("key:")
    return GatewayError(429, f"key '{name}' exceeded its limit of {key.per_minute} requests per minute",
                        "rate_limit_error", "key_rate_limited",
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))}, outcome="rate_limited")


def final_error(attempts: Sequence[Tried], caller: UpstreamFailure | None,
                rate_limited_wait: float | None, open_wait: float | None = None) -> GatewayError:
    """The answer when nothing served: its status is derived from what the attempts saw."""
    if caller is not None:
        status = caller.status if caller.status is not None and 400 <= caller.status < 500 else 400
        return GatewayError(status, caller.message, "invalid_request_error", caller.code or caller.kind.value,
                            outcome=caller.kind.value)
    listing = "; ".join(f"{a.model} via {a.provider}: {a.failure}{f' {a.status}' if a.status else ''}"
                        f" ({a.message})" for a in attempts)
    kinds = {a.failure for a in attempts}
    if not attempts and rate_limited_wait is None and open_wait is None:
        return GatewayError(502, "no deployment of any candidate is available", "upstream_error",
                            "no_deployment", outcome="upstream_failed")
    if not attempts and rate_limited_wait is None:
        # Nothing could be tried: every breaker is open and the one probe allowed is already out.
        after = max(1, math.ceil(open_wait)) if open_wait is not None else 1
        return GatewayError(503, "every candidate's circuit breaker is open; retry shortly", "upstream_error",
                            "all_breakers_open", headers={"Retry-After": str(after)}, outcome="upstream_failed")
    if not attempts or kinds == {FailureClass.RATE_LIMITED.value}:
        retry = max(1, math.ceil(rate_limited_wait)) if rate_limited_wait is not None else 1
        message = "every candidate is rate-limited" + (f" ({listing})" if listing else "")
        return GatewayError(429, message, "rate_limit_error", "rate_limited",
                            headers={"Retry-After": str(retry)}, outcome="rate_limited")
    if kinds == {FailureClass.TIMEOUT.value}:
        return GatewayError(504, f"every attempt timed out ({listing})", "upstream_error", "upstream_timeout",
                            outcome="timeout")
    return GatewayError(502, f"every attempt failed upstream ({listing})", "upstream_error", "upstream_failed",
                        outcome="upstream_failed")
