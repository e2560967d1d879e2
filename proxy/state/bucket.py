"""The token bucket: pure arithmetic with time as a parameter.

Requests per minute and tokens per minute are both buckets of `per_minute` units that
refill evenly at `per_minute / 60` per second. A request larger than the bucket is
admitted once the bucket is full (it could never fit otherwise), and takes all it
reserves: the level goes below zero, and the debt delays the next admission. So a bucket
never admits more than its size plus its refill, even when a worker's share of a limit is
smaller than one request (rpm 2 over 4 processes: each admits one every two minutes).
The Redis backend's scripts (`lua/common.lua`) repeat exactly this arithmetic
server-side; `tests/test_state_contract.py` holds both to the same expectations.
No I/O, no imports from the package.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("capacity", "rate", "level", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def level_at(self, now: float) -> float:
        """The level at `now` without changing the bucket (for views)."""
        return min(self.capacity, self.level + max(0.0, now - self.updated) * self.rate)

    def available(self, amount: float, now: float) -> bool:
        self._refill(now)
        return self.level >= min(amount, self.capacity)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def refund(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` (capped at the capacity) fits; 0 when it fits now."""
        self._refill(now)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def settle(self, reserved: float, used: float, now: float) -> None:
        """Correct a reservation of `reserved` to the real `used`: refund or charge the difference."""
        if used < reserved:
            self.refund(reserved - used, now)
        elif used > reserved:
            self.take(used - reserved, now)
