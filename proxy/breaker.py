"""Circuit breaker per deployment: closed -> open -> half-open -> closed.

Opens after `consecutive` failures in a row, or when at least `min_calls` calls in the
last `window_s` seconds failed at `ratio` or more. Half-open admits `probes` requests at
a time; one success closes it.

A probe slot is freed by its own probe's end only (a verdict, or none when its client
left): not by a reopening, nor by a request admitted before the breaker opened that fails
meanwhile, so at most `probes` are ever in flight. Slots belong to an `epoch`, which a
close ends: a probe that ends after its breaker has closed (and perhaps opened again)
frees nothing. Only a probe's own failure counts as a failed probe for the schedule.

The recovery schedule is the policy's few numbers, so every state backend (memory,
Redis) applies the same one. The open interval is the provider's `Retry-After` when the
failure gave one (capped at `max_open_s`); otherwise `open_s`, doubling after each failed
probe up to `max_backoff_s`, a low cap so that the delay between a provider's recovery
and its next probe stays small however long the outage was. A failure that kept its
request waiting (`cost_s`, a silent route's `first_token_s`) opens the breaker for at
least `cost_factor` times that, so a probe's cost to the request that carries it stays a
bounded share of the time. No interval or hold is ever longer than `max_open_s`.

Time is always a parameter (an injected clock), so tests are exact. No I/O, no imports
from the package.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}    # for the metrics gauge


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    consecutive: int = 5
    ratio: float = 0.5
    min_calls: int = 10
    window_s: float = 30.0
    open_s: float = 1.0             # the first open interval
    max_backoff_s: float = 2.0      # a failed probe doubles the interval up to this
    cost_factor: float = 4.0        # an interval is at least this times what the failure cost its request
    max_open_s: float = 300.0       # no interval or hold is longer, whatever a Retry-After says
    probes: int = 1

    def open_interval(self, failed_probes: int) -> float:
        """The open interval after `failed_probes` failed probes in a row, before the cost floor:
        `open_s`, doubling up to the low cap. The one definition of the schedule: the Redis
        backend is handed `schedule()` and applies exactly these numbers."""
        return min(self.open_s * 2.0 ** min(failed_probes, 64), max(self.max_backoff_s, self.open_s))

    def schedule(self) -> list[float]:
        """`open_interval(k)` for k = 0, 1, ... up to the first value that no longer grows."""
        out = [self.open_interval(0)]
        while len(out) < 64 and self.open_interval(len(out)) > out[-1]:
            out.append(self.open_interval(len(out)))
        return out


class CircuitBreaker:
    __slots__ = ("policy", "state", "opened_at", "open_until", "held_until", "epoch", "_failed_probes", "_streak",
                 "_recent", "_probing")

    def __init__(self, policy: BreakerPolicy = BreakerPolicy()) -> None:
        self.policy = policy
        self.state = CLOSED
        self.opened_at = 0.0
        self.open_until = 0.0
        self.held_until = 0.0           # a rate-limit hold (429 Retry-After): not a failure
        self.epoch = 0                  # the probe slots' generation: a slot taken now belongs to it
        self._failed_probes = 0
        self._streak = 0
        self._recent: deque[tuple[float, bool]] = deque(maxlen=256)
        self._probing = 0

    def allows(self, now: float) -> bool:
        """Whether a request may go now; in half-open this takes one probe slot."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if now < self.open_until:
                return False
            self.state = HALF_OPEN
        if self._probing < self.policy.probes:
            self._probing += 1
            return True
        return False

    def force_probe(self, now: float) -> bool:
        """Admit one request although open: used when every candidate's breaker is open.

        Still bounded: False while the half-open probes are already out.
        """
        if self.state == CLOSED:
            return True
        if self._probing >= self.policy.probes:
            return False
        self.state = HALF_OPEN
        self._probing += 1
        return True

    def record_success(self, now: float, probe: int | None = None) -> None:
        """A call that went well; `probe` is the epoch of the probe slot it held, if any."""
        self.release_probe(probe)
        self._recent.append((now, True))
        self._streak = 0
        if self.state != CLOSED:
            self.state = CLOSED
            self._failed_probes = 0
            self._probing = 0
            self.epoch += 1         # probes still out belong to the closed breaker

    def record_failure(self, now: float, open_for: float | None = None, cost_s: float = 0.0,
                       probe: int | None = None) -> None:
        """A failed call. `open_for` is the provider's Retry-After, if it gave one; `cost_s` is
        how long the failure kept its request waiting before it could fall over; `probe` is the
        epoch of the probe slot it held, if any."""
        own_probe = probe is not None and probe == self.epoch
        self.release_probe(probe)
        self._recent.append((now, False))
        self._streak += 1
        policy = self.policy
        if self.state == HALF_OPEN and own_probe:   # a failed probe: back off, but never past the low cap
            self._failed_probes += 1
        elif self._streak < policy.consecutive and not self._ratio_exceeded(now):
            return
        interval = policy.open_interval(self._failed_probes)
        self.trip(now, open_for if open_for is not None else max(interval, policy.cost_factor * cost_s))

    def release_probe(self, probe: int | None) -> None:
        """Free the slot of a probe of `probe` (its epoch) that ended; None: it held none."""
        if probe is not None and probe == self.epoch and self._probing:
            self._probing -= 1

    def trip(self, now: float, duration: float) -> None:
        """Open now, for `duration` seconds, never longer than `max_open_s` (a provider's
        Retry-After of a day must not take a deployment out for a day). Probes still out keep
        their slots until they end."""
        if self.state != OPEN:
            self.opened_at = now
        self.state = OPEN
        self.open_until = max(self.open_until, now + min(duration, self.policy.max_open_s))

    def hold(self, now: float, duration: float) -> None:
        """No traffic for `duration` seconds because the provider asked (429): the deployment is
        healthy, so this is a rate limit, reported as one, and never probed early."""
        self.held_until = max(self.held_until, now + min(duration, self.policy.max_open_s))

    def _ratio_exceeded(self, now: float) -> bool:
        horizon = now - self.policy.window_s
        recent = self._recent
        while recent and recent[0][0] < horizon:
            recent.popleft()
        if len(recent) < self.policy.min_calls:
            return False
        failures = sum(1 for _, ok in recent if not ok)
        return failures / len(recent) >= self.policy.ratio
