"""The one app-scoped object that holds every piece of mutable state.

`Gateway` owns the current config `Snapshot` (config + compiled router + dispatcher), the
state store (buckets, breakers, holds, recent requests: this process's memory or Redis,
see proxy.state), this process's load statistics, the upstream sessions, the decision log
and the metrics. A request pins the snapshot it started with, so a reload (SIGHUP)
changes what new requests see while requests in flight finish on their own; the state
is keyed by stable deployment ids, so breakers and buckets carry over.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from . import config as config_module
from .balancer import Load, key_spec, watched
from .config import Config, GatewayKey
from .decisions import CLIENT_DISCONNECTED, Decision, DecisionLog, Served, iso_time
from .dispatch import Dispatcher
from .errors import GatewayError, forbidden, key_limited, unauthorized
from .metrics import Metrics
from .ops.live import LiveStats
from .providers import Adapter, registry
from .router import Router
from .state import Admission, Refusal, StateStore, StateView, open_state
from .transport import Transport

log = logging.getLogger("proxy.gateway")

SERVED = "served"               # the memo scope of finished requests that feedback may score


def instance_id() -> str:
    """This gateway process, as `host:pid`: unique among the workers of one host and the hosts
    of one cluster, readable in a decision record, and new after a restart."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    dispatcher: Dispatcher

    def authenticate(self, authorization: str | None) -> GatewayKey | None:
        """The key presented as `Authorization: Bearer KEY`; raises 401. None when auth is off."""
        if not self.config.auth_required:
            return None
        if not authorization:
            raise unauthorized("missing gateway key: send 'Authorization: Bearer <key>'")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise unauthorized("the Authorization header must be 'Bearer <key>'")
        digest = hashlib.sha256(secret.strip().encode()).digest()
        found = None
        for key in self.config.keys:        # no early exit: every key is compared, in constant time
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            raise unauthorized("unknown gateway key")
        return found

    def authenticate_admin(self, authorization: str | None) -> GatewayKey | None:
        """An admin key (`admin: true` in routes.yaml `keys:`) for the operator's endpoints
        (/metrics, the operations page): 401 without a key or with an unknown one, 403 for a
        key that is not an admin key. Without a keys section the gateway serves loopback only
        and, as everywhere else, asks for no key (None)."""
        key = self.authenticate(authorization)
        if key is not None and not key.admin:
            raise GatewayError(403, f"key '{key.name}' is not an admin key (admin: true in routes.yaml keys:)",
                               "permission_error", "admin_required", outcome="forbidden")
        return key

    def may_use(self, key: GatewayKey | None, requested: str) -> bool:
        """The key's `allow` list names what a request may resolve to (or the name itself)."""
        return key is None or key.allow is None or requested in key.allow \
            or self.router.resolve(requested) in key.allow

    def authorize(self, key: GatewayKey | None, requested: str) -> None:
        if not self.may_use(key, requested):
            assert key is not None
            raise forbidden(f"key '{key.name}' may not use '{requested}'")


class Gateway:
    def __init__(self, config: Config, *, state: StateStore | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 adapters: Mapping[str, Adapter] | None = None, workers: int = 1) -> None:
        self.clock = clock
        self.instance = instance_id()
        self.state: StateStore = state or open_state(config.server.state, config.server.breaker, workers=workers,
                                                     clock=clock)
        self.state.set_breaker_policy(config.server.breaker)
        self.load = Load()          # this process's in-flight counts and latencies, for the balancer
        self.transport = Transport()
        self.adapters = adapters or registry()
        self.decisions = DecisionLog(config.server.decision_log)
        self.metrics = Metrics(self.decisions)
        self.live = LiveStats()         # the operations page's rolling aggregates
        self.snapshot = self._build(config)
        self._longest_request_s = config.server.request_timeout_s   # how long an old snapshot may live on
        self.ready = False
        self.draining = False           # SIGTERM seen: /readyz answers 503
        self.cut_off = False            # the drain deadline passed: requests still running are ended
        self.keys_required = False      # serving beyond loopback with keys: a reload may not drop them
        self.loopback_only = True       # listening on loopback: without keys, Host must name it too
        self.in_flight: set[asyncio.Task[object]] = set()    # routed requests of every API, for the drain

    def _build(self, config: Config) -> Snapshot:
        keys = {k.name: spec for k in config.keys if (spec := key_spec(k)) is not None}
        dispatcher = Dispatcher(self.adapters, self.transport, self.state, config.server, self.load, keys,
                                clock=self.clock)
        snapshot = Snapshot(config, Router(config), dispatcher)
        self.metrics.configure(config)      # only once everything that can fail has been built
        self.live.configure(self.metrics.tiers)     # the same bounded tier names
        return snapshot

    async def start(self) -> None:
        self.decisions.start()
        await self.state.start()        # never fails: Redis away means degraded mode from the start
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.transport.close()
        await self.state.close()
        await self.decisions.close()

    async def admit_key(self, key: GatewayKey | None) -> None:
        """The key's own rpm for a request that admits no deployment (a token count); 429 when
        it is spent. Requests that reach the attempt loop pay it there, with their first admission."""
        spec = key_spec(key)
        if spec is not None:
            answer = await self.state.admit(Admission((), spec))
            if isinstance(answer, Refusal):
                raise key_limited(spec, answer.retry_after)

    async def state_view(self) -> StateView:
        """Every configured breaker and bucket as the state store sees them (cluster-wide with Redis)."""
        deployments, buckets = watched(self.snapshot.config)
        return await self.state.view(deployments, buckets)

    def reload(self) -> bool:
        """Load both files again; keep the old config (and say why) when the new one is invalid."""
        old = self.snapshot.config
        try:
            new = config_module.load(old.providers_path, old.routes_path)
            if self.keys_required and not new.auth_required:
                raise config_module.ConfigError(f"{old.routes_path}: keys: the gateway serves beyond loopback, "
                                                "so the keys section cannot be removed by a reload")
            snapshot = self._build(new)
        except Exception as exc:       # a reload must never take the serving config down
            reason = str(exc) if isinstance(exc, config_module.ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("reload rejected, the old config keeps serving", extra={"reason": reason})
            return False
        self.snapshot = snapshot
        self.state.set_breaker_policy(new.server.breaker)
        # Requests still on the old snapshot may use its sessions until their own deadline.
        self._longest_request_s = max(self._longest_request_s, old.server.request_timeout_s)
        self.transport.retire(new.providers.values(), grace_s=self._longest_request_s + 5)
        if new.server.decision_log != self.decisions.destination:
            log.warning("decision_log destination changes take effect on restart")
        if new.server.state != old.server.state:
            log.warning("state changes take effect on restart")
        self.decisions.reopen()
        log.info("config reloaded", extra={"models": len(new.models), "rules": len(new.rules)})
        return True

    def finish(self, decision: Decision) -> None:
        """The single exit of every request: one decision record, one metrics update. Never raises."""
        try:
            decision.duration_ms = round((self.clock() - decision.started) * 1000, 3)
            decision.instance = self.instance
            if decision.outcome == CLIENT_DISCONNECTED:
                for attempt in decision.attempts:
                    if attempt.failure is None and not attempt.served:
                        attempt.failure = CLIENT_DISCONNECTED
            decision.settle()
            self.decisions.record(decision)
            self.metrics.observe(decision)
            self.live.observe(decision, time.time())
            self._remember(decision)
        except Exception:
            log.exception("could not record a decision", extra={"request_id": decision.request_id})

    def _remember(self, decision: Decision) -> None:
        """What feedback needs of a finished request, for `feedback_window_s` (in the background
        with Redis, so any instance can take the score)."""
        served = orjson.dumps([decision.tier, decision.served_model, decision.rule, decision.key])
        self.state.remember(SERVED, decision.request_id, served, self.snapshot.config.server.feedback_window_s)

    async def feedback(self, request_id: str, score: float, key: GatewayKey | None) -> Served:
        """Record a quality score against a finished request's tier, model and rule; 404 if unknown."""
        raw = await self.state.recall(SERVED, request_id)
        served = None if raw is None else Served(*orjson.loads(raw))
        if served is None or (key is not None and served.key != key.name):
            raise GatewayError(404, f"no recent request with id '{request_id}'", "invalid_request_error",
                               "request_not_found", "request_id", outcome="not_found")
        self.decisions.record({
            "type": "feedback", "time": iso_time(time.time()), "request_id": request_id, "score": score,
            "tier": served.tier, "model": served.model, "rule": served.rule,
            "key": key.name if key is not None else None,
        })
        self.metrics.observe_feedback(served, score)
        self.live.observe_feedback(served.tier, served.model, score)
        return served
