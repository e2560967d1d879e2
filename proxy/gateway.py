"""The one app-scoped object that holds every piece of mutable state.

`Gateway` owns the current config `Snapshot` (config + compiled router + dispatcher), the
per-deployment state (buckets, breakers, load), the upstream sessions, the decision log
and the metrics. A request pins the snapshot it started with, so a reload (SIGHUP)
changes what new requests see while requests in flight finish on their own; the state
is keyed by stable deployment ids, so breakers and buckets carry over.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import config as config_module
from .balancer import MemoryState, StateStore
from .config import Config, GatewayKey
from .decisions import Decision, DecisionLog
from .dispatch import Dispatcher
from .errors import forbidden, unauthorized
from .metrics import Metrics
from .providers import Adapter, registry
from .router import Router
from .transport import Transport

log = logging.getLogger("proxy.gateway")


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

    @staticmethod
    def authorize(key: GatewayKey | None, requested: str) -> None:
        if key is not None and key.allow is not None and requested not in key.allow:
            raise forbidden(f"key '{key.name}' may not use '{requested}'")


class Gateway:
    def __init__(self, config: Config, *, state: StateStore | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 adapters: Mapping[str, Adapter] | None = None) -> None:
        self.clock = clock
        self.state: StateStore = state or MemoryState()
        self.transport = Transport()
        self.adapters = adapters or registry()
        self.decisions = DecisionLog(config.server.decision_log)
        self.metrics = Metrics(self)
        self.snapshot = self._build(config)
        self.ready = False
        self.draining = False

    def _build(self, config: Config) -> Snapshot:
        dispatcher = Dispatcher(self.adapters, self.transport, self.state, config.server, clock=self.clock)
        return Snapshot(config, Router(config), dispatcher)

    async def start(self) -> None:
        self.decisions.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.transport.close()
        await self.decisions.close()

    def reload(self) -> bool:
        """Load both files again; keep the old config (and say why) when the new one is invalid."""
        old = self.snapshot.config
        try:
            new = config_module.load(old.providers_path, old.routes_path)
        except config_module.ConfigError as exc:
            log.error("reload rejected, the old config keeps serving", extra={"reason": str(exc)})
            return False
        self.snapshot = self._build(new)
        if new.server.decision_log != self.decisions.destination:
            log.warning("decision_log destination changes take effect on restart")
        self.decisions.reopen()
        log.info("config reloaded", extra={"models": len(new.models), "rules": len(new.rules)})
        return True

    def finish(self, decision: Decision) -> None:
        """The single exit of every request: one decision record, one metrics update."""
        decision.duration_ms = round((self.clock() - decision.started) * 1000, 3)
        self.decisions.record(decision)
        self.metrics.observe(decision)
