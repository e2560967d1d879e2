"""`SharedState`: Redis while it answers, this process's local shares while it does not.

Every Redis call is bounded (`timeout_ms`, 50 by default). A call that fails is served
locally at once; while the instance is still shared, what such a local admission took is
charged to the shared buckets in the background (its full reservation: a local settle
does not reach Redis, and a later return from degraded mode may charge it once more: both
err on the side of the limit). A refused or broken connection switches the instance to degraded mode at
once; timeouts do when they go on for longer than one bound with no call answered in
between (a stalled event loop times out every call in flight at the same moment, and is
not an outage). In degraded mode admissions, settles and memos are served at once by a
`MemoryState` that enforces this process's share of every limit (1 / (expected instances
x workers)), so no request waits on or fails because of Redis.
A background task pings Redis once a second; when it answers, the local buckets'
spending not yet refilled is handed back to the shared buckets (so the return does not
admit a second full minute's worth), and the instance is shared again. Each switch is
logged, counted in metrics and shown in /readyz.

The cost of an outage: each process's local buckets start full, so at its onset the
cluster may admit up to one share's burst per process on top of what the shared buckets
had left; the hand-back charges it to the shared buckets afterwards.

What stays local even while shared: load statistics (in flight, latency), which steer
only this instance's choices. Breakers learned locally during an outage are not merged
back: the shared breakers take over again as they were. Of the settles of grants Redis
made before the outage, only the probes' are kept and sent on the return (a probe slot
would otherwise stay taken until its lease); the others' reservations stay spent until
they refill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping

from ..breaker import BreakerPolicy
from .memory import MemoryState, done
from .redis_store import RedisState, StateUnavailable
from .store import Admission, Grant, Outcome, Refusal, StateView

log = logging.getLogger("proxy.state")

RECOVERY_INTERVAL_S = 1.0
MAX_PROBES_KEPT = 1000          # probe settles kept for the return (a few per deployment at most)


class SharedState:
    def __init__(self, shared: RedisState, local: MemoryState, *, recovery_interval_s: float = RECOVERY_INTERVAL_S
                 ) -> None:
        self.shared = shared
        self.local = local
        self.health = shared.health
        self.health.backend = "redis"
        self.recovery_interval_s = recovery_interval_s
        shared.on_failure = self.failed
        self._recovery: asyncio.Task[None] | None = None
        self._probes_out: list[tuple[Grant, Outcome]] = []     # probes granted by Redis that ended while away

    @property
    def degraded(self) -> bool:
        return self.health.mode == "degraded"

    async def start(self) -> None:
        self._switch("shared", None, quiet=True)
        try:
            await self.shared.start()
        except StateUnavailable as exc:
            self.failed(exc)

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        await self.shared.close()

    def set_breaker_policy(self, policy: BreakerPolicy) -> None:
        self.shared.set_breaker_policy(policy)
        self.local.set_breaker_policy(policy)

    # ------------------------------------------------------------------ the switch

    def failed(self, exc: StateUnavailable) -> None:
        """A Redis call failed (its caller serves locally): degrade on a broken connection, or
        once calls have kept timing out for a whole bound with none answering."""
        since = self.shared.failing_since
        if not exc.timed_out or (since is not None and time.monotonic() - since >= self.shared.timeout_s):
            self.degrade(str(exc))

    def degrade(self, reason: str) -> None:
        """Serve from local shares from now on; a background task watches for Redis to return."""
        if self.degraded:
            return
        self._switch("degraded", reason)
        log.warning("shared state unreachable, enforcing this process's share of every limit",
                    extra={"reason": reason, "share": round(self.local.share, 6), "pid": os.getpid()})
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    def _switch(self, mode: str, reason: str | None, quiet: bool = False) -> None:
        health = self.health
        health.mode, health.reason, health.since = mode, reason, time.time()
        if not quiet:
            health.switches[mode] = health.switches.get(mode, 0) + 1

    async def _recover(self) -> None:
        while self.degraded:
            await asyncio.sleep(self.recovery_interval_s)
            try:
                await self.shared.reconnect()
                await self.shared.ping()
                await self.shared.start()           # its scripts, in case Redis restarted empty
                charged = self._local_spending()
                await self.shared.charge(charged)
            except StateUnavailable:
                continue
            # What the local shares admitted during that round trip goes after it; from here to
            # the switch nothing else is admitted locally.
            meanwhile = {name: (limit, spent - charged[name][1] if name in charged else spent)
                         for name, (limit, spent) in self._local_spending().items()}
            if late := {name: amount for name, amount in meanwhile.items() if amount[1] > 0}:
                self.shared.charge_later(late)
            for grant, outcome in self._probes_out:
                self.shared.settle(grant, outcome)
            self._probes_out.clear()
            self.local.buckets.clear()
            since = self.health.since
            self._switch("shared", None)
            log.info("shared state reachable again",
                     extra={"degraded_s": round(time.time() - since, 3), "pid": os.getpid()})

    def _local_spending(self) -> dict[str, tuple[int, float]]:
        """What each local bucket spent and has not refilled yet, at the full limit's scale."""
        now = self.local.clock()
        share = self.local.share
        out = {}
        for name, bucket in self.local.buckets.items():
            spent = bucket.capacity - bucket.level_at(now)
            if spent > 0:
                out[name] = (round(bucket.capacity / share), spent)
        return out

    # ------------------------------------------------------------------ the interface

    async def admit(self, admission: Admission) -> Grant | Refusal:
        if not self.degraded:
            try:
                answer = await self.shared.admit(admission)
            except StateUnavailable as exc:
                self.failed(exc)
            else:
                if isinstance(answer, Grant):
                    answer.owner = self.shared
                return answer
        answer = self.local.admit_now(admission)
        if isinstance(answer, Grant):
            answer.owner = self.local
            if not self.degraded:       # one call failed, Redis is not away: it learns of this one afterwards
                self.shared.charge_later(taken(admission, answer))
        return answer

    def settle(self, grant: Grant, outcome: Outcome) -> asyncio.Future[str]:
        if grant.owner is self.local:
            return self.local.settle(grant, outcome)
        if not self.degraded:
            return self.shared.settle(grant, outcome)
        # Granted by Redis, which is away now: the reservation stays spent until it refills, but
        # a probe's slot must not wait out its lease: its settle goes on the return.
        if grant.probe and len(self._probes_out) < MAX_PROBES_KEPT:
            self._probes_out.append((grant, outcome))
        return done("")

    async def view(self, breakers: Iterable[str], buckets: Mapping[str, int]) -> StateView:
        breakers = list(breakers)
        if not self.degraded:
            try:
                return await self.shared.view(breakers, buckets)
            except StateUnavailable as exc:
                self.failed(exc)
        return await self.local.view(breakers, buckets)

    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]:
        if self.degraded:
            return self.local.remember(scope, key, value, ttl_s)
        return self.shared.remember(scope, key, value, ttl_s)

    async def recall(self, scope: str, key: str) -> bytes | None:
        if not self.degraded:
            try:
                value = await self.shared.recall(scope, key)
            except StateUnavailable as exc:
                self.failed(exc)
            else:
                if value is not None:
                    return value
        return self.local.recall_now(scope, key)       # also what was remembered during an outage

    def forget(self, scope: str, key: str) -> asyncio.Future[bool]:
        local = self.local.forget(scope, key)           # also what was remembered during an outage
        if self.degraded:
            return local
        return asyncio.ensure_future(self._forget_both(local, self.shared.forget(scope, key)))

    @staticmethod
    async def _forget_both(local: asyncio.Future[bool], shared: asyncio.Future[bool]) -> bool:
        return any(await asyncio.gather(local, shared))


def taken(admission: Admission, grant: Grant) -> dict[str, tuple[int, float]]:
    """What `grant` took from each bucket, as `charge` takes it: {name: (limit, amount)}."""
    specs = list(admission.options[grant.index].buckets) if grant.index >= 0 else []
    if admission.key is not None:
        specs.append(admission.key)
    return {spec.name: (spec.per_minute, spec.amount) for spec in specs}
